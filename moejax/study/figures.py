"""A study's figures, drawn from its JSON (the same functions serve the report and the notebook).

* `metric_figure`: one point per run, the mean over seeds, with a bar of one standard deviation
  either side (points rather than bars from zero: the differences studied are small next to the
  values);
* `curve_figure`: a metric against training steps, one line per run (the mean over seeds) with a
  band of one standard deviation.

Figures are `matplotlib.figure.Figure`s made without pyplot, so drawing them changes no global
state; matplotlib comes with the `plot` extra. PNGs are written without the matplotlib version in
their metadata, so the same numbers give the same file.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any


def figure_name(study: str, metric: str, *, curve: bool = False) -> str:
  """The PNG's file name: <study>_<metric as a slug>[_curve].png ("*" becomes "mean")."""
  slug = re.sub(r"[^A-Za-z0-9]+", "_", metric.replace("*", "mean")).strip("_")
  return f"{study}_{slug}{'_curve' if curve else ''}.png"


def _new_figure(width: float = 6.4, height: float = 4.0):
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  figure = Figure(figsize=(width, height), dpi=110)
  return figure, figure.add_subplot()


def metric_figure(result: dict[str, Any], metric: str):
  """Each run's mean of `metric` with one standard deviation either side; n under the name."""
  rows = [(run["name"], run["metrics"].get(metric)) for run in result["runs"]]
  rows = [(name, s) for name, s in rows if s and s["mean"] is not None]
  figure, ax = _new_figure(max(6.4, 0.8 * len(rows) + 2), 4.0)
  positions = list(range(len(rows)))
  means = [s["mean"] for _, s in rows]
  errors = [s["std"] or 0.0 for _, s in rows]
  ax.errorbar(positions, means, yerr=errors, fmt="o", capsize=5, color="tab:blue")
  ax.set_xlim(-0.5, len(rows) - 0.5)
  ax.set_xticks(positions, [f"{name}\nn={s['n']}" for name, s in rows],
                rotation=30 if len(rows) > 6 else 0, fontsize=8)
  ax.set_ylabel(metric)
  ax.set_title(f"{result['study']}: {metric} (mean ± std over seeds)", fontsize=10)
  ax.grid(alpha=0.3, axis="y")
  figure.tight_layout()
  return figure


def curve_figure(result: dict[str, Any], metric: str):
  """`metric` against steps, one line per run, with a band of one standard deviation."""
  figure, ax = _new_figure()
  for run in result["runs"]:
    points = run["curves"].get(metric, [])
    points = [p for p in points if p["mean"] is not None]
    if not points:
      continue
    steps = [p["step"] for p in points]
    means = [p["mean"] for p in points]
    line, = ax.plot(steps, means, marker="o", markersize=3, label=run["name"])
    if all(p["std"] is not None for p in points):
      low = [p["mean"] - p["std"] for p in points]
      high = [p["mean"] + p["std"] for p in points]
      ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
  ax.set_xlabel("training step")
  ax.set_ylabel(metric)
  ax.set_title(f"{result['study']}: {metric} during training (mean ± std over seeds)",
               fontsize=10)
  ax.grid(alpha=0.3)
  if ax.get_lines():
    ax.legend(fontsize=8)
  figure.tight_layout()
  return figure


def all_figures(result: dict[str, Any]) -> list[tuple[str, str, Any]]:
  """(label, file name, figure) of every figure of a study: its plots, then its curves.

  A curve's label is "<metric> curve".
  """
  out = [(metric, figure_name(result["study"], metric), metric_figure(result, metric))
         for metric in result["plots"]]
  out += [(f"{metric} curve", figure_name(result["study"], metric, curve=True),
           curve_figure(result, metric)) for metric in result["curves"]]
  return out


def write_figures(result: dict[str, Any], out_dir: pathlib.Path) -> list[tuple[str, str]]:
  """Writes every figure as OUT_DIR/<file name>; returns (label, file name) of each."""
  out_dir.mkdir(parents=True, exist_ok=True)
  written = []
  for label, name, figure in all_figures(result):
    figure.savefig(out_dir / name, metadata={"Software": None})
    written.append((label, name))
  return written
