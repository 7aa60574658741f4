"""The analysis report: OUT/analysis.json (every number), OUT/report.md and its PNG figures.

Per MoE layer the report shows the load heatmap (the share of each position bucket's assignments
that went to each expert), each expert's most over-represented tokens, and the share of each
token class per expert against all tokens; then, for each pair of consecutive MoE layers, how
often a token's first choice keeps its expert index. Figures are drawn without pyplot (no global
state) and saved without the matplotlib version, so the same numbers give the same files;
matplotlib comes with the `plot` extra.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

from moejax.analysis.token_classes import CLASSES

JSON_FILE, REPORT_FILE = "analysis.json", "report.md"
TOP_IN_TABLE = 8  # tokens per expert in the markdown table (the JSON holds all `top`)


def _heatmap(matrix, *, xlabels, ylabels, xlabel: str, ylabel: str, title: str, colorbar: str,
             annotate: bool = False):
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  matrix = np.asarray(matrix, np.float64)
  rows, cols = matrix.shape
  figure = Figure(figsize=(max(4.0, 0.45 * cols + 2.5), max(3.0, 0.35 * rows + 1.8)), dpi=110)
  ax = figure.add_subplot()
  image = ax.imshow(np.ma.masked_invalid(matrix), aspect="auto", cmap="viridis")
  tilted = cols > 8 or max(len(label) for label in xlabels) > 6
  ax.set_xticks(range(cols), xlabels, rotation=45 if tilted else 0,
                ha="right" if tilted else "center", fontsize=7)
  ax.set_yticks(range(rows), ylabels, fontsize=7)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=9)
  if annotate:
    for (i, j), value in np.ndenumerate(matrix):
      if np.isfinite(value):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6, color="white")
  figure.colorbar(image, ax=ax, label=colorbar)
  figure.tight_layout()
  return figure


def figures(result: dict[str, Any]) -> list[tuple[str, Any]]:
  """(file name, figure) of every figure: per layer its load heatmap and class shares, then the
  transitions between consecutive MoE layers."""
  E = result["num_experts"]
  experts = [str(e) for e in range(E)]
  buckets = [str(a) if b - a == 1 else f"{a}-{b - 1}" for a, b in result["position_buckets"]]
  out = []
  for name, layer in result["layers"].items():
    load = np.asarray(layer["load_by_position"], np.float64)
    with np.errstate(invalid="ignore"):
      share = load / load.sum(axis=0, keepdims=True)
    out.append((f"{name}_load.png", _heatmap(
        share, xlabels=buckets, ylabels=experts, xlabel="position in the sequence",
        ylabel="expert", title=f"{name}: share of each position bucket's assignments",
        colorbar="share of the bucket")))
    shares = np.asarray([[np.nan if x is None else x for x in row]
                         for row in layer["class_shares"]], np.float64)
    baseline = np.asarray(layer["class_shares_all"], np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
      ratio = shares / baseline[None, :]
    out.append((f"{name}_classes.png", _heatmap(
        ratio, xlabels=list(CLASSES), ylabels=experts, xlabel="token class", ylabel="expert",
        title=f"{name}: class share per expert / share over all tokens",
        colorbar="ratio to all tokens", annotate=True)))
  for pair in result["persistence"]:
    matrix = np.asarray(pair["transitions"], np.float64)
    with np.errstate(invalid="ignore"):
      rows = matrix / matrix.sum(axis=1, keepdims=True)
    out.append((f"{pair['from']}_to_{pair['to']}.png", _heatmap(
        rows, xlabels=experts, ylabels=experts, xlabel=f"expert in {pair['to']}",
        ylabel=f"expert in {pair['from']}",
        title=f"first choice: {pair['from']} -> {pair['to']} (row shares)",
        colorbar="share of the row's tokens")))
  return out


def _piece(text: str) -> str:
  """A token's text for a markdown table cell."""
  shown = text.replace("\\", "\\\\").replace("|", "\\|").replace("`", "'").replace("\n", "\\n")
  return f"`{shown}`" if shown.strip() else f"`{shown!r}`"


def _percent(x: float | None) -> str:
  return "—" if x is None else f"{100 * x:.1f}%"


def markdown(result: dict[str, Any], figure_names: list[str]) -> str:
  """The report's text (see the module docstring); `figure_names` are linked where they belong."""
  E, K = result["num_experts"], result["assignments_per_token"]
  lines = [
      f"# Expert specialisation: {result['workdir']}", "",
      f"Checkpoint step {result['step']}, split `{result['split']}`: {result['batches']} "
      f"batches, {result['tokens']:,} real tokens, {K} assignment(s) per token "
      f"({result['router']} router, {E} experts, sequence length {result['seq_len']}, "
      f"{result['tokenizer']} tokenizer). Made by `{result['command']}`.", "",
      "Counts are of the router's assignments before the capacity limit (each token counts "
      f"{K} time(s) per layer); lift = P(token | expert) / P(token) over the analysed tokens, "
      f"for tokens an expert got at least {result['min_count']} times; its largest value, "
      "1 / P(expert), means the expert got every occurrence of the token. Token purity: the "
      "share of assignments that go to their token id's most frequent expert (1: the expert is "
      "a function of the token id). Token classes are defined "
      "in moejax/analysis/token_classes.py. Numbers: "
      f"[{JSON_FILE}]({JSON_FILE}).", ""]
  for name, layer in result["layers"].items():
    assignments = layer["expert_assignments"]
    total = max(sum(assignments), 1)
    lines += [f"## {name}", "",
              f"Dropped tokens (no assignment kept): {layer['dropped_tokens']:,} of "
              f"{result['tokens']:,}. Token purity: {_percent(layer['token_purity'])}.", ""]
    if f"{name}_load.png" in figure_names:
      lines += [f"![{name} load]({name}_load.png)", ""]
    lines += ["| expert | share | top tokens by lift (count, lift) |", "|---|---|---|"]
    for e in range(E):
      top = layer["top_tokens"][e][:TOP_IN_TABLE]
      listed = ", ".join(f"{_piece(t['text'])} ({t['count']}, {t['lift']:.1f})"
                         for t in top) or "—"
      lines.append(f"| {e} | {100 * assignments[e] / total:.1f}% | {listed} |")
    lines += ["", "Share of each token class among each expert's assignments:", "",
              "| expert | " + " | ".join(CLASSES) + " |", "|---" * (len(CLASSES) + 1) + "|"]
    for e, row in enumerate(layer["class_shares"]):
      lines.append(f"| {e} | " + " | ".join(_percent(x) for x in row) + " |")
    lines.append("| all | " + " | ".join(_percent(x) for x in layer["class_shares_all"]) + " |")
    lines.append("")
    if f"{name}_classes.png" in figure_names:
      lines += [f"![{name} classes]({name}_classes.png)", ""]
  if result["persistence"]:
    lines += ["## From one MoE layer to the next", "",
              "How often a token's first choice has the same expert index in the next MoE layer "
              "(chance: the rate if the two choices were independent).", "",
              "| from | to | same expert | chance |", "|---|---|---|---|"]
    for pair in result["persistence"]:
      lines.append(f"| {pair['from']} | {pair['to']} | {_percent(pair['fraction'])} "
                   f"({pair['same']:,} of {pair['tokens']:,}) | {_percent(pair['chance'])} |")
    lines.append("")
    for pair in result["persistence"]:
      file_name = f"{pair['from']}_to_{pair['to']}.png"
      if file_name in figure_names:
        lines += [f"![{pair['from']} to {pair['to']}]({file_name})", ""]
  return "\n".join(lines)


def write(result: dict[str, Any], out_dir: pathlib.Path) -> list[pathlib.Path]:
  """Writes the JSON, the figures and the markdown into `out_dir`; returns their paths."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  paths = [out_dir / JSON_FILE]
  paths[0].write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
  names = []
  for name, figure in figures(result):
    figure.savefig(out_dir / name, metadata={"Software": None})
    names.append(name)
    paths.append(out_dir / name)
  (out_dir / REPORT_FILE).write_text(markdown(result, names))
  paths.append(out_dir / REPORT_FILE)
  return paths
