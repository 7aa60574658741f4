"""Executes every notebook under notebooks/ and checks values the notebooks print.

Each notebook runs in a fresh ipykernel of the current Python (the native kernel spec, whatever
kernel specs are installed elsewhere), with the repository root as working directory and first on
PYTHONPATH, so it imports this checkout's moejax. The kernel is a separate process that does not
see conftest's 8 simulated devices: it gets JAX_PLATFORMS=cpu and XLA_FLAGS without the device
count, i.e. one CPU device, as when a notebook is opened on its own. Any cell error fails the test.

The reproduction notebook reads the committed study results (docs/studies); it is also executed on
the fixture report tests/fixtures/studies/tiny.json (made by running that tiny study), and what it
prints is checked against that JSON.
"""

import functools
import os
import pathlib
import re
import sys

import json

import nbformat
import pytest
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

import study_cells

REPO = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 300


def _kernel_env() -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if "xla_force_host_platform_device_count" not in f]
  if flags:
    env["XLA_FLAGS"] = " ".join(flags)
  else:
    env.pop("XLA_FLAGS", None)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
  return env


@functools.cache
def _execute(path: pathlib.Path, **extra_env: str):
  """The notebook at `path`, executed (once per test session and environment); raises on any
  cell error. `extra_env` is added to the kernel's environment."""
  nb = nbformat.read(path, as_version=4)
  # No kernel directories: the spec manager falls back to ipykernel's native spec, whose command
  # is this interpreter (sys.executable).
  km = KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))
  assert km.kernel_spec.argv[0] == sys.executable, km.kernel_spec.argv
  client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, record_timing=False,
                          resources={"metadata": {"path": str(REPO)}})
  client.execute(env={**_kernel_env(), **extra_env})
  return nb


def _stdout(nb) -> str:
  return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                 for out in cell.get("outputs", []) if out.get("name") == "stdout")


def test_notebooks_directory_holds_the_routing_walkthrough():
  assert REPO / "notebooks" / "routing_walkthrough.ipynb" in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_saved_executed(path):
  nb = nbformat.read(path, as_version=4)
  code = [cell for cell in nb.cells if cell.cell_type == "code"]
  assert code and all(cell.execution_count is not None for cell in code), (
      f"{path.name} is saved without outputs; re-execute it (see README, Notebooks).")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes_without_errors(path):
  nb = _execute(path)
  errors = [out for cell in nb.cells for out in cell.get("outputs", [])
            if out.get("output_type") == "error"]
  assert not errors


def _float(pattern: str, text: str) -> float:
  match = re.search(pattern, text)
  assert match, f"no line matches {pattern!r}"
  return float(match.group(1))


def test_routing_walkthrough_printed_values():
  text = _stdout(_execute(REPO / "notebooks" / "routing_walkthrough.ipynb"))
  # Capacity C = ceil(k * capacity_factor * S / E) with S=8, E=4, factor 1.0.
  for k, capacity in [(1, 2), (2, 4), (3, 6)]:
    assert f"C = ceil({k} * 1.0 * 8 / 4) = {capacity}" in text
  # Who is dropped: token 3 by position; token 1 by priority; nobody once token 0 is padding.
  for line in ["Switch top-1: dropped tokens [3]", "GShard top-2: dropped tokens []",
               "padding: dropped tokens []", "batch-prioritized: dropped tokens [1]"]:
    assert line in text
  # The library's losses against the notebook's float64 numpy recomputation.
  for name, expected in [("load-balancing loss", 1.065441), ("router z-loss", 6.231639)]:
    library = _float(rf"{name}: moejax (\S+)", text)
    by_hand = _float(rf"{name}: moejax \S+  numpy (\S+)", text)
    difference = _float(rf"{name}: .*\|difference\| (\S+)", text)
    assert difference <= 1e-6, name
    assert library == pytest.approx(expected, abs=1e-5), name
    assert by_hand == pytest.approx(expected, abs=1e-5), name
  assert "buffers equal: True" in text
  assert _float(r"einsum vs index: max \|y difference\| (\S+)", text) <= 1e-5
  assert re.search(r"einsum vs index: .*allclose: True", text)


def test_reproduction_notebook_prints_and_draws_the_study_numbers():
  studies = REPO / "tests" / "fixtures" / "studies"
  nb = _execute(REPO / "notebooks" / "reproduction.ipynb", MOEJAX_STUDIES_DIR=str(studies))
  text = _stdout(nb)
  result = json.loads((studies / "tiny.json").read_text())
  assert "1 studies in tests/fixtures/studies: tiny" in text
  lines = text.splitlines()
  for run in result["runs"]:
    line = next(line for line in lines if line.startswith(f"{run['name']}: "))
    cells = line[len(run["name"]) + 2:].split("; ")
    assert [c.split(" ", 1)[0] for c in cells] == result["table_metrics"]
    for cell in cells:
      metric, value = cell.split(" ", 1)
      study_cells.assert_cell_matches(value, run["metrics"].get(metric), f"{run['name']} {metric}")
  images = [out for cell in nb.cells for out in cell.get("outputs", [])
            if "image/png" in out.get("data", {})]
  assert len(images) == len(result["plots"]) + len(result["curves"])
  readings = [line for line in lines if line.startswith("[tiny] ")]
  assert [r.split(" ", 2)[1].rstrip(":") for r in readings] == [*result["plots"],
                                                                 *result["curves"]]
  loss = {run["name"]: run["metrics"]["eval/loss"]["mean"] for run in result["runs"]}
  assert readings[0].startswith(f"[tiny] eval/loss: lowest for {min(loss, key=loss.get)}, ")
