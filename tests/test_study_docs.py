"""docs/studies/README.md against the committed study JSON files: every `mean ± std (n)` it
quotes in a study's section is a number of that study's JSON, at the precision printed."""

import json
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
STUDIES = REPO / "docs" / "studies"
COMMITTED = sorted(STUDIES.glob("*.json"))
# "4.2290 ± 0.0031 (3)", "0.06% ± 0.02% (3)", "3,331 ± 845 (3)"
CELL = re.compile(r"(-?[\d,]+(?:\.\d+)?)(%?) ± ([\d,]+(?:\.\d+)?)%? \((\d+)\)")


def _sections(text: str) -> dict[str, str]:
  parts = re.split(r"^## (\S+)\s*$", text, flags=re.M)
  return dict(zip(parts[1::2], parts[2::2]))


def _formats_as(value: float, printed: str, percent: bool) -> bool:
  decimals = len(printed.split(".")[1]) if "." in printed else 0
  value = value * 100 if percent else value
  return f"{value:,.{decimals}f}" == printed


def _quoted(summary: dict, mean: str, percent: bool, std: str, n: str) -> bool:
  return (summary.get("n") == int(n) and summary.get("mean") is not None and
          summary.get("std") is not None and _formats_as(summary["mean"], mean, percent) and
          _formats_as(summary["std"], std, percent))


@pytest.mark.parametrize("path", COMMITTED, ids=[p.stem for p in COMMITTED])
def test_the_readme_quotes_each_study_from_its_json(path):
  result = json.loads(path.read_text())
  section = _sections((STUDIES / "README.md").read_text()).get(result["study"], "")
  quoted = list(CELL.finditer(section))
  assert quoted, f"docs/studies/README.md has no section ## {result['study']} quoting its numbers"
  summaries = [s for run in result["runs"] for s in run["metrics"].values()]
  for match in quoted:
    mean, percent, std, n = match.group(1), bool(match.group(2)), match.group(3), match.group(4)
    assert any(_quoted(s, mean, percent, std, n) for s in summaries), (
        f"{result['study']}: {match.group(0)!r} is no number of {path.name}")


def test_the_cell_pattern_reads_the_report_formats():
  assert [m.groups() for m in CELL.finditer("4.2290 ± 0.0031 (3); 0.06% ± 0.02% (3); "
                                            "3,331 ± 845 (3)")] == [
      ("4.2290", "", "0.0031", "3"), ("0.06", "%", "0.02", "3"), ("3,331", "", "845", "3")]
  assert _quoted({"mean": 3331.2, "std": 845.0, "n": 3}, "3,331", False, "845", "3")
  assert _quoted({"mean": 0.0006, "std": 0.0002, "n": 3}, "0.06", True, "0.02", "3")
  assert not _quoted({"mean": 4.229, "std": 0.0031, "n": 2}, "4.2290", False, "0.0031", "3")
