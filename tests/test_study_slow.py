"""The study runner's slow tests: a study killed midway (SIGKILL, SIGTERM) resumes without
rerunning finished runs; the committed fixture report (tests/fixtures/studies) is what the tiny
study writes."""

import json
import math
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from moejax import lock as lock_lib
from moejax import metrics
from study_helpers import (FIXTURES, REPO, env, env_as_committed, in_repository,  # noqa: F401
                           ptb_dir, run_study, snapshot, write_study)

pytestmark = pytest.mark.usefixtures("compile_once", "in_repository")


def _wait_for_records(path: pathlib.Path, count: int, proc, deadline_s=300.0) -> None:
  deadline = time.monotonic() + deadline_s
  while time.monotonic() < deadline and proc.poll() is None:
    if path.exists() and len(metrics.read_jsonl(path)) >= count:
      return
    time.sleep(0.05)
  raise AssertionError(f"{path} did not reach {count} records (study status {proc.poll()})")


def _wait_until_free(workdir: pathlib.Path, deadline_s=120.0) -> None:
  deadline = time.monotonic() + deadline_s
  while time.monotonic() < deadline:
    try:
      with lock_lib.WorkdirLock(workdir):
        return
    except lock_lib.WorkdirLockedError:
      time.sleep(0.1)
  raise AssertionError(f"the run in {workdir} did not end after its study was killed")


@pytest.mark.slow  # three tiny runs and a resumed one, each its own process: 1-2 minutes
@pytest.mark.parametrize("kill", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_study_killed_midway_resumes_without_rerunning_finished_runs(kill, tmp_path, env):
  steps = 200
  study_file = write_study(tmp_path / "trio.py", seeds=(0, 1, 2), steps=steps, evaluations=1,
                           overrides=("train.checkpoint_every=20",))
  command = [sys.executable, "-m", "moejax.study", str(study_file), "--runs-root",
             str(tmp_path / "runs")]
  proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  workdirs = [tmp_path / "runs" / "trio" / "switch" / f"seed_{s}" for s in (0, 1, 2)]
  _wait_for_records(workdirs[1] / "metrics.jsonl", 3, proc)  # run 2 of 3 is training
  proc.send_signal(kill)
  output, _ = proc.communicate(timeout=180)
  if kill == signal.SIGTERM:
    assert proc.returncode == 0 and "study: stopped" in output, output
  else:
    assert proc.returncode == -signal.SIGKILL
    _wait_until_free(workdirs[1])  # the run got SIGTERM when the study died, saved and ended
  assert "stopped by SIGTERM" in (workdirs[1] / "train.log").read_text()
  stopped_at = metrics.read_jsonl(workdirs[1] / "metrics.jsonl")[-1]["step"]
  assert 3 <= stopped_at < steps
  assert (workdirs[1] / "checkpoints" / str(stopped_at)).is_dir()
  assert not (workdirs[2] / "metrics.jsonl").exists()
  finished = snapshot(workdirs[0])

  rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stdout + rerun.stderr
  assert "study: 3 runs: 1 finished, 2 to do" in rerun.stdout
  assert f"switch seed 1 (resuming from step {stopped_at})" in rerun.stdout
  assert snapshot(workdirs[0]) == finished  # the finished run was not touched
  for workdir in workdirs:
    assert [r["step"] for r in metrics.read_jsonl(workdir / "metrics.jsonl")] == list(
        range(1, steps + 1))
  result = json.loads((tmp_path / "runs" / "trio" / "report" / "trio.json").read_text())
  assert result["runs"][0]["finished_seeds"] == [0, 1, 2]
  assert result["runs"][0]["metrics"]["eval/loss"]["n"] == 3


def _close(a, b, path=""):
  """Equal structure; numbers within rtol 1e-3, timings (tokens/s, FLOP/s, wall time) left
  out."""
  if isinstance(a, dict):
    assert sorted(a) == sorted(b), path
    for key in a:
      if not any(word in key for word in ("tokens_per_sec", "wall_seconds", "perf/")):
        _close(a[key], b[key], f"{path}/{key}")
  elif isinstance(a, list):
    assert len(a) == len(b), path
    for i, (x, y) in enumerate(zip(a, b)):
      _close(x, y, f"{path}[{i}]")
  elif isinstance(a, float) and isinstance(b, float):
    assert math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-9), (path, a, b)
  else:
    assert a == b, (path, a, b)


@pytest.mark.slow  # the four runs of the fixture study: about a minute
def test_the_committed_fixture_is_what_the_tiny_study_writes(tmp_path, env_as_committed):
  result = run_study("tests/fixtures/studies/tiny.py", tmp_path / "runs", env_as_committed,
                     "--write-docs",
                     "--docs-dir", str(tmp_path / "docs"))
  assert result.returncode == 0, result.stdout + result.stderr
  fresh = json.loads((tmp_path / "docs" / "tiny.json").read_text())
  committed = json.loads((FIXTURES / "studies" / "tiny.json").read_text())
  _close(fresh, committed)
  assert sorted(p.name for p in (tmp_path / "docs").iterdir()) == sorted(
      p.name for p in (FIXTURES / "studies").iterdir() if p.suffix != ".py")
