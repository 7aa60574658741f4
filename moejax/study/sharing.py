"""Runs shared between studies: a job with the settings of a run another study has finished.

Several studies hold the same run: switch_small at its defaults is `compare`'s switch_small,
`routers`' switch, `num_experts`' e8, `capacity_factor`'s top1_cf1.25, `precision`'s float32,
`init_scale`'s scale1.0 and `balancing`'s lb0.01. Before training anything, the runner looks
under the runs root (RUNS_ROOT/<study>/<run>/seed_<seed>) for a finished run whose saved
config.json equals the job's validated config in every field (`moejax.config.saved_changes`:
seed, steps, evaluation settings included; of several, the first trained); a job that has not
started yet then becomes a relative symbolic link to that run, so it is trained once and each
study reads the same metrics. Its extra evaluations are written into the shared run's workdir
(named after the evaluation, so two studies' evaluations do not collide).

The runner looks before the study starts and again before each job, so a study running beside
another (each on its own core) picks up the runs the other finishes meanwhile. Only a job whose
workdir does not exist yet (or is an empty folder) is linked: a run already begun, finished or
failed is the study's own. Links point at real workdirs, never at another link. A study's
report lists its shared runs. `python -m moejax.study NAME --no-share` trains
every run of the study itself.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable

from moejax import config as config_lib
from moejax.study import status
from moejax.study.spec import Job


def _candidates(runs_root: pathlib.Path, job: Job):
  """Real workdirs RUNS_ROOT/*/*/seed_<seed> outside the job's study, holding a config.json."""
  own_study = job.workdir.parent.parent.resolve()
  for path in sorted(runs_root.glob(f"*/*/seed_{job.seed}")):
    if path.is_symlink() or not (path / config_lib.CONFIG_FILE).is_file():
      continue
    if path.parent.parent.resolve() == own_study:
      continue
    yield path


def find_twin(job: Job, runs_root: pathlib.Path) -> pathlib.Path | None:
  """A finished run under `runs_root`, of another study, with exactly the job's settings; of
  several, the first trained (the oldest metrics.jsonl), so every study shares the same one."""
  twins = []
  for path in _candidates(pathlib.Path(runs_root), job):
    try:
      same = not config_lib.saved_changes(path, job.experiment)
    except (OSError, ValueError):  # an unreadable config.json is no twin
      continue
    if same and status.is_finished(dataclasses.replace(job, workdir=path)):
      twins.append(path)
  return min(twins, key=lambda p: ((p / "metrics.jsonl").stat().st_mtime_ns, str(p)),
             default=None)


def _unstarted(workdir: pathlib.Path) -> bool:
  if workdir.is_symlink():
    return False
  return not workdir.exists() or (workdir.is_dir() and not any(workdir.iterdir()))


def link(job: Job, twin: pathlib.Path) -> None:
  """Makes the job's workdir a relative symbolic link to `twin`."""
  workdir = job.workdir
  if workdir.is_dir():
    workdir.rmdir()
  workdir.parent.mkdir(parents=True, exist_ok=True)
  workdir.symlink_to(os.path.relpath(twin.resolve(), workdir.parent.resolve()),
                     target_is_directory=True)


def twin_of_unstarted(job: Job, runs_root: pathlib.Path) -> pathlib.Path | None:
  """The finished twin the job would be linked to now: None if it has started or has none."""
  return find_twin(job, runs_root) if _unstarted(job.workdir) else None


def share_one(job: Job, runs_root: pathlib.Path, say: Callable[[str], None]) -> bool:
  """Links the job to its finished twin if it has not started and has one; whether it did."""
  twin = twin_of_unstarted(job, runs_root)
  if twin is None:
    return False
  link(job, twin)
  say(f"{job.label}: the same settings as the finished run {twin}; shared, not retrained")
  return True


def shared_with(job: Job) -> str | None:
  """Where a linked job's workdir points, relative to the runs root (None: the study's own)."""
  if not job.workdir.is_symlink():
    return None
  target = job.workdir.resolve()
  root = job.workdir.parent.parent.parent.resolve()
  try:
    return str(target.relative_to(root))
  except ValueError:
    return str(target)
