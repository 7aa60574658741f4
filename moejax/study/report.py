"""A study's report: the markdown table, the JSON of the aggregated numbers, and short readings.

Every measured cell is "mean ± std (n)": the mean over seeds, the sample standard deviation
(ddof=1) and the number of seeds, each number written with its metric's format (`format_value`),
so a reader (or a test) can find the JSON's numbers in the table. The report holds nothing that
changes between two writings of the same numbers (no date, no timing of the writing itself), so
rewriting a finished study's report gives the same bytes.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

from moejax.study.spec import TOKENS_PER_SEC

MISSING = "—"


def format_value(metric: str, value: float | None) -> str:
  """One number as the tables write it: losses to 4 decimals, perplexities to 2, fractions as
  percentages, throughputs and seconds as whole numbers with thousands separators."""
  if value is None:
    return MISSING
  name = metric.rsplit("/", 1)[-1]
  if "perplexity" in name:
    return f"{value:.2f}"
  if "loss" in name or "cross_entropy" in name:
    return f"{value:.4f}"
  if "fraction" in name or "utilisation" in name:
    return f"{100 * value:.2f}%"
  if "tokens_per_sec" in name or "seconds" in name:
    return f"{value:,.0f}"
  return f"{value:.4g}"


def cell(metric: str, summary: dict[str, Any] | None) -> str:
  """"mean ± std (n)", with "—" for what is missing (no value, or no std from one seed)."""
  if not summary or summary["n"] == 0 or summary["mean"] is None:
    return MISSING
  return (f"{format_value(metric, summary['mean'])} ± {format_value(metric, summary['std'])} "
          f"({summary['n']})")


def higher_is_better(metric: str) -> bool:
  return "tokens_per_sec" in metric or "utilisation" in metric


def reading(result: dict[str, Any], metric: str) -> str:
  """A short, number-based reading of one metric across the study's runs."""
  rows = [(run["name"], run["metrics"].get(metric)) for run in result["runs"]]
  rows = [(name, s) for name, s in rows if s and s["mean"] is not None]
  if not rows:
    return f"No run reports {metric}."
  higher = higher_is_better(metric)
  rows.sort(key=lambda row: row[1]["mean"], reverse=higher)
  (best, b), rest = rows[0], rows[1:]
  side = "highest" if higher else "lowest"
  text = f"{metric}: {side} for {best}, {cell(metric, b)}"
  if not rest:
    return text + "."
  second, s = rest[0]
  difference = abs(b["mean"] - s["mean"])
  text += (f"; next {second}, {cell(metric, s)}: a difference of "
           f"{format_value(metric, difference)}")
  if b["std"] is None or s["std"] is None:
    return text + " (one seed: no error bar to weigh it against)."
  error = math.sqrt(b["std"] ** 2 / b["n"] + s["std"] ** 2 / s["n"])
  if error == 0:
    return text + " (both without spread over seeds)."
  ratio = difference / error
  verdict = "larger than" if ratio >= 2 else "within"
  return (text + f", {ratio:.1f} standard errors of the difference: {verdict} the seed-to-seed "
          "noise (2 standard errors).")


def markdown(result: dict[str, Any], figures: Sequence[tuple[str, str]]) -> str:
  """The report: description, the table, the runs, the figures with their readings.

  `figures`: (label, file name) of each figure, in order: the label is its metric, or
  "<metric> curve" for a curve against steps.
  """
  metrics = result["table_metrics"]
  lines = [f"# Study: {result['study']}", "", result["description"].strip(), "",
           f"Made by `{result['command']}`. Every cell: mean ± standard deviation (n) over the "
           "seeds that finished; the standard deviation is the sample one (ddof=1). "
           f"{MISSING}: not reported by the run (a dense model has no MoE layer), or no spread "
           f"from a single seed. `{TOKENS_PER_SEC}`: each run's mean training throughput in "
           "tokens/s (compilation, evaluation and checkpoints excluded). Active FFN FLOPs per "
           "token: the forward FLOPs of the FFN and MoE blocks for the experts a token uses.",
           "",
           *_extra_evaluations(result),
           "| run | active FFN MFLOPs/token | " + " | ".join(metrics) + " |",
           "|---|---:|" + "---:|" * len(metrics)]
  for run in result["runs"]:
    cells = [cell(m, run["metrics"].get(m)) for m in metrics]
    lines.append(f"| {run['name']} | {run['active_ffn_flops_per_token'] / 1e6:.2f} | " +
                 " | ".join(cells) + " |")
  lines += ["", "## Runs", "",
            "| run | experiment | overrides | seeds finished | steps | training tokens "
            "| wall time per seed (s) | note |",
            "|---|---|---|---|---:|---:|---:|---|"]
  for run in result["runs"]:
    overrides = " ".join(f"`{o}`" for o in run["overrides"]) or MISSING
    seeds = ", ".join(str(s) for s in run["finished_seeds"]) or MISSING
    lines.append(
        f"| {run['name']} | `{run['experiment']}` | {overrides} | {seeds} of "
        f"{len(run['seeds'])} | {run['num_steps']} | {run['training_tokens']:,} | "
        f"{cell('wall_seconds', run['metrics'].get('wall_seconds'))} | {run['note']} |")
  failures = [(run["name"], seed, reason) for run in result["runs"]
              for seed, reason in run["failed"].items()]
  if failures:
    lines += ["", "Runs that failed (left out of the numbers above):", ""]
    lines += [f"* {name}, seed {seed}: {reason}" for name, seed, reason in failures]
  shared = [(run["name"], seed, where) for run in result["runs"]
            for seed, where in run.get("shared", {}).items()]
  if shared:
    lines += ["", "Runs shared with another study (the same settings in every field, trained "
              "once; paths under the runs root):", ""]
    lines += [f"* {name}, seed {seed}: `{where}`" for name, seed, where in shared]
  if figures:
    lines += ["", "## Figures"]
  for label, file_name in figures:
    lines += ["", f"![{result['study']}: {label}]({file_name})", "", figure_reading(result, label)]
  return "\n".join(lines) + "\n"


def _extra_evaluations(result: dict[str, Any]) -> list[str]:
  """The paragraph naming the extra evaluations' settings (none: no lines)."""
  if not result.get("extra_evaluations"):
    return []
  each = "; ".join(f"`{e['metrics']}` under " + " ".join(f"`{s}`" for s in e["settings"])
                   for e in result["extra_evaluations"])
  return [f"Each finished run is also evaluated, on the same validation batches, with settings "
          f"that leave the trained model as it is: {each}.", ""]


def figure_reading(result: dict[str, Any], label: str) -> str:
  """The text under a figure: `reading` of its metric, or for "<metric> curve" what it shows
  and the order of the runs at the last step."""
  if not label.endswith(" curve"):
    return reading(result, label)
  metric = label[:-len(" curve")]
  last = []
  for run in result["runs"]:
    points = [p for p in run["curves"].get(metric, []) if p["mean"] is not None]
    if points:
      last.append((points[-1]["mean"], run["name"], points[-1]["step"]))
  text = (f"{metric} against training steps: each line the mean over seeds, the band one "
          "standard deviation either side.")
  if last:
    last.sort(reverse=higher_is_better(metric))
    order = ", ".join(f"{name} {format_value(metric, mean)} (step {step})"
                      for mean, name, step in last)
    text += f" At the last point, from {'highest' if higher_is_better(metric) else 'lowest'}: "
    text += order + "."
  return text


def to_json(result: dict[str, Any]) -> str:
  """The JSON text of a study's numbers (non-finite values are null already)."""
  return json.dumps(result, indent=1, allow_nan=False, ensure_ascii=False) + "\n"


def write(result: dict[str, Any], out_dir: pathlib.Path,
          figures: Sequence[tuple[str, str]]) -> list[pathlib.Path]:
  """Writes OUT_DIR/<study>.md and OUT_DIR/<study>.json; returns their paths."""
  out_dir.mkdir(parents=True, exist_ok=True)
  name = result["study"]
  md, js = out_dir / f"{name}.md", out_dir / f"{name}.json"
  md.write_text(markdown(result, figures))
  js.write_text(to_json(result))
  return [md, js]

