"""Reading a study table's "mean ± std (n)" cells back into numbers, to check them against the JSON.

Used by tests/test_study.py (the markdown reports) and tests/test_notebooks.py (the lines the
reproduction notebook prints). A cell is compared with the JSON numbers it was written from: the
mean and the std each within half a unit of the last digit written (percentages scaled by 100),
n exactly; "—" stands for a metric the run lacks, and a std of "—" for one seed.
"""

from __future__ import annotations

import re

MISSING = "—"
_CELL = re.compile(r"^(?P<mean>\S+) ± (?P<std>\S+) \((?P<n>\d+)\)$")


def _number(text: str) -> tuple[float, float]:
  """(value, tolerance) of a number as the tables write it: half a unit of its last digit."""
  scale = 0.01 if text.endswith("%") else 1.0
  digits = text.rstrip("%").replace(",", "")
  mantissa, _, exponent = digits.partition("e")  # .4g may write 1.234e-05
  unit = 10.0 ** (int(exponent or 0) - len(mantissa.partition(".")[2]))
  return float(digits) * scale, 0.5 * unit * scale


def assert_cell_matches(text: str, summary: dict | None, where: str) -> None:
  """The cell `text` holds `summary`'s mean, std and n (see the module docstring)."""
  text = text.strip()
  if text == MISSING:
    assert not summary or summary["n"] == 0 or summary["mean"] is None, (where, text, summary)
    return
  match = _CELL.match(text)
  assert match, f"{where}: {text!r} is not 'mean ± std (n)'"
  assert summary is not None, f"{where}: {text!r} but the JSON has no such metric"
  assert int(match["n"]) == summary["n"], (where, text, summary)
  mean, tolerance = _number(match["mean"])
  assert abs(mean - summary["mean"]) <= tolerance * (1 + 1e-9) + 1e-12, (where, text, summary)
  if match["std"] == MISSING:
    assert summary["std"] is None, (where, text, summary)
  else:
    std, tolerance = _number(match["std"])
    assert abs(std - summary["std"]) <= tolerance * (1 + 1e-9) + 1e-12, (where, text, summary)


def table_rows(markdown: str) -> tuple[list[str], dict[str, list[str]]]:
  """(the metric columns, {run: its cells}) of a study report's first table."""
  lines = markdown.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("| run | active FFN"))
  header = [c.strip() for c in lines[start].strip("|").split("|")]
  rows = {}
  for line in lines[start + 2:]:
    if not line.startswith("|"):
      break
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    rows[cells[0]] = cells[2:]
  return header[2:], rows
