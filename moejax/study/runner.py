"""Runs a study's jobs, each in its own `python -m moejax.main` process: one after another, or
several at once, each on its own slot of the machine (`--jobs`, slots.py).

What a job's workdir says decides what happens to it:

    finished   metrics.jsonl holds the record of the last step with its evaluation: never rerun,
               its workdir is not touched
    resume     checkpoints exist: the trainer resumes from the newest (same command)
    new        nothing yet
    failed     an earlier attempt ended with an error (a divergence, a crash); reported, and
               retried only with `retry_failed` (a deterministic failure would repeat)

A workdir whose saved config.json differs from the job's config in a field a resumed run must
keep (`moejax.config.check_resume`) stops the study before anything trains: the study file
changed since the run was made, and the old results must not pass for the new setting.

Each job runs in a subprocess of its own (by default one at a time, with the whole machine), so
a crash of one run does not lose the others. Its output goes to WORKDIR/train.log; the runner
prints one progress line: which run of how many is going, and the time left, estimated from the
finished runs' wall times (seconds per step) and the steps still to train. The runner's own
record of a job (attempts, wall time, failure) is WORKDIR/study_run.json. Once every job has
trained, the study's extra evaluations (`Evaluation`) of each finished job that lacks its
WORKDIR/eval_<name>.json run the same way, each a `python -m moejax.evaluate` process whose output
also goes to the job's train.log.

Stopping: SIGTERM or SIGINT (Ctrl-C) to the study is forwarded to every running job as SIGTERM,
which saves a checkpoint and exits; the study then stops, and the same command resumes it. A
job that reports bad input stops the others the same way before the study says so. A job
runs in its own process group (a Ctrl-C at the terminal reaches only the study, which forwards
it), and on Linux it gets SIGTERM when the study process dies however it dies (SIGKILL
included), so it saves and ends instead of running on alone.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from etils import epath

from moejax import config as config_lib
from moejax import lock as lock_lib
from moejax.study import sharing
from moejax.study import slots as slots_lib
from moejax.study.spec import Evaluation, Job, StudyError
from moejax.study.status import RunRecord, is_finished, last_step, latest_checkpoint, status

LOG_FILE = "train.log"
EXIT_USAGE = 2  # moejax.main: bad input
LOCK_WAIT_S = 600.0
_PR_SET_PDEATHSIG = 1


def check_saved_config(job: Job) -> None:
  """Raises StudyError when the workdir was made with settings other than the job's."""
  if not (job.workdir / config_lib.CONFIG_FILE).exists():
    return
  try:
    config_lib.check_resume(job.workdir, job.experiment, resuming=True, write=False)
  except ValueError as error:
    raise StudyError(
        f"run {job.run.name}, seed {job.seed}: its workdir {job.workdir} holds a run with other "
        f"settings than the study's ({error}). Move that workdir away (or restore the study's "
        "old setting) and rerun.") from None


# ----------------------------------------------------------------------------- subprocess


def _die_with_parent() -> None:
  """In the child before exec: SIGTERM when the study process dies (Linux); else nothing."""
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
  except (OSError, AttributeError):
    return


def _start(argv: Sequence[str], log, slot: slots_lib.Slot) -> subprocess.Popen:
  """`python ARGV` in its own process group on `slot`, its command line and output appended to
  `log`."""
  log.write(f"$ {' '.join([sys.executable, *argv])}\n")
  log.flush()

  def before_exec():
    _die_with_parent()
    if slot.cpus is not None and hasattr(os, "sched_setaffinity"):
      os.sched_setaffinity(0, slot.cpus)

  return subprocess.Popen([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL, process_group=0, preexec_fn=before_exec,
                          env={**os.environ, **slot.env})


def _reason(log_path: epath.Path, returncode: int) -> str:
  """One line saying why a job failed: its `moejax:` line, else its output's last line."""
  try:
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines()
             if line.strip()]
  except OSError:
    lines = []
  said = [line for line in lines if line.startswith("moejax:")]
  if returncode < 0:
    return f"killed by signal {-returncode}" + (f" ({said[-1]})" if said else "")
  return said[-1] if said else (lines[-1] if lines else f"exit status {returncode}")


class Stop(Exception):
  """The study was asked to stop (SIGTERM, SIGINT); the running job has saved and ended."""


@dataclasses.dataclass
class _Running:
  """A job's process and what finishing it needs."""

  job: Job
  index: int
  slot: slots_lib.Slot
  process: subprocess.Popen
  log: object
  record: RunRecord
  start: float


class Runner:
  """Runs jobs in order, `len(slots)` at a time, with a progress line; see the module docstring."""

  def __init__(self, jobs: Sequence[Job], *, retry_failed: bool = False, stream=None,
               share_root: pathlib.Path | None = None,
               slots: Sequence[slots_lib.Slot] = (slots_lib.Slot(),)):
    self.jobs = list(jobs)
    self.retry_failed = retry_failed
    self.share_root = share_root
    self.slots = list(slots)
    self.stream = stream or sys.stdout
    self._children: list[subprocess.Popen] = []
    self._stop_signal: int | None = None
    self.failed_evaluations: list[tuple[Job, Evaluation]] = []

  # -- signals

  def _on_signal(self, signum, frame) -> None:
    del frame
    self._stop_signal = signum
    for child in self._children:
      if child.poll() is None:
        child.send_signal(signal.SIGTERM)

  def run(self) -> dict[str, list[Job]]:
    """Trains every job not yet finished. Returns {"finished", "failed"} job lists.

    Raises Stop when a signal stopped the study, StudyError when a job reported bad input.
    """
    for job in self.jobs:
      check_saved_config(job)
    for job in self.jobs:
      self._share(job)
    todo = [job for job in self.jobs if status(job) in ("new", "resume") or
            (self.retry_failed and status(job) == "failed")]
    done = len([job for job in self.jobs if status(job) == "finished"])
    self.say(f"{len(self.jobs)} runs: {done} finished, {len(todo)} to do")
    previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
      self._train(todo)
      if self._stop_signal is not None:
        raise Stop()
      evaluations = [(job, e) for job in self.jobs if status(job) == "finished"
                     for e in job.extra_evaluations if not (job.workdir / e.file_name).exists()]
      for index, (job, evaluation) in enumerate(evaluations, start=1):
        self._evaluate(job, evaluation, f"evaluation {index}/{len(evaluations)}")
        if self._stop_signal is not None:
          raise Stop()
    finally:
      for s, handler in previous.items():
        signal.signal(s, handler)
    return {"finished": [j for j in self.jobs if status(j) == "finished"],
            "failed": [j for j in self.jobs if status(j) == "failed"]}

  def _share(self, job: Job) -> bool:
    """Links a job not yet started to a finished twin under `share_root` (sharing.py)."""
    return self.share_root is not None and sharing.share_one(job, self.share_root, self.say)

  def _train(self, todo: list[Job]) -> None:
    """Runs the jobs of `todo` in order, one per free slot, until all ended or a signal came.

    A job that reports bad input stops the others (each saves) before its StudyError is raised.
    """
    pending = list(enumerate(todo, start=1))
    free = list(self.slots)
    running: list[_Running] = []
    error: StudyError | None = None
    while pending or running:
      while pending and free and self._stop_signal is None and error is None:
        index, job = pending.pop(0)
        if not self._share(job):  # another study, beside this one, may have finished it since
          running.append(self._start_job(job, index, todo, free.pop(0)))
      if not running:
        break
      for ended in self._wait(running, todo):
        running.remove(ended)
        free.append(ended.slot)
        try:
          self._finish_job(ended, todo)
        except StudyError as raised:  # the others save and end; then it is raised
          error = error or raised
          for other in running:
            other.process.send_signal(signal.SIGTERM)
      if error is not None and not running:
        raise error

  def _start_job(self, job: Job, index: int, todo: list[Job], slot: slots_lib.Slot) -> _Running:
    job.workdir.mkdir(parents=True, exist_ok=True)
    _wait_for_lock(job, self.say)
    record = RunRecord.read(job.workdir)
    record.attempts += 1
    record.failed = None
    saved = latest_checkpoint(job.workdir)
    what = f"resuming from step {saved}" if saved else "new"
    where = f" on {slot.name}" if slot.name else ""
    self.say(f"run {index}/{len(todo)} to do: {job.label} ({what}){where}; "
             f"{self._time_left(todo, index)}")
    log = (job.workdir / LOG_FILE).open("a")
    process = _start(job.argv, log, slot)
    self._children.append(process)
    if self._stop_signal is not None:  # a signal between the last job and this one
      process.send_signal(signal.SIGTERM)
    return _Running(job, index, slot, process, log, record, time.monotonic())

  def _finish_job(self, ended: _Running, todo: list[Job]) -> None:
    job, record, returncode = ended.job, ended.record, ended.process.returncode
    ended.log.close()
    self._children.remove(ended.process)
    log_path = job.workdir / LOG_FILE
    record.wall_seconds += time.monotonic() - ended.start
    finished = is_finished(job)
    if not finished and (self._stop_signal is not None or returncode == 0):
      # Stopped: by the study's signal, or by a SIGTERM sent to the run itself (it saved), which
      # stops the study, and the other running jobs with it.
      if self._stop_signal is None:
        self._on_signal(signal.SIGTERM, None)
    elif not finished and returncode == EXIT_USAGE:
      record.write(job.workdir)
      raise StudyError(f"run {job.run.name}, seed {job.seed}: {_reason(log_path, returncode)} "
                       f"(see {log_path})")
    elif not finished:
      record.failed = _reason(log_path, returncode)
    record.write(job.workdir)
    if finished:
      self.say(f"run {ended.index}/{len(todo)} to do: {job.label} finished in "
               f"{_minutes(record.wall_seconds)}")
    elif record.failed is not None:
      self.say(f"run {ended.index}/{len(todo)} to do: {job.label} FAILED: {record.failed} "
               f"(log: {log_path})")

  def _evaluate(self, job: Job, evaluation: Evaluation, what: str) -> None:
    """Runs one extra evaluation of a finished job (its output goes to the job's log)."""
    self.say(f"{what}: {job.label} under {' '.join(evaluation.settings)}")
    log_path = job.workdir / LOG_FILE
    with log_path.open("a") as log:
      child = _start(job.evaluation_argv(evaluation), log, slots_lib.Slot())
      self._children.append(child)
      returncode = child.wait()
      self._children.remove(child)
    if returncode == 0 or self._stop_signal is not None:
      return
    reason = _reason(log_path, returncode)
    if returncode == EXIT_USAGE:
      raise StudyError(f"run {job.run.name}, seed {job.seed}: evaluation {evaluation.name}: "
                       f"{reason} (see {log_path})")
    self.failed_evaluations.append((job, evaluation))
    self.say(f"{what}: {job.label} FAILED: {reason} (log: {log_path})")

  def _wait(self, running: list[_Running], todo: list[Job]) -> list[_Running]:
    """Waits until a running job's process ends (returns those that did), refreshing the
    progress line on a terminal."""
    interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
    shown = time.monotonic()
    while True:
      ended = [r for r in running if r.process.poll() is not None]
      if ended:
        return ended
      try:  # returns as soon as the first of them ends; the others are polled above
        running[0].process.wait(timeout=1.0)
      except subprocess.TimeoutExpired:
        pass
      if interactive and time.monotonic() - shown >= 5.0:
        shown = time.monotonic()
        steps = "; ".join(f"{r.job.label}: step {_safe_last_step(r.job)}/{r.job.num_steps}"
                          for r in running)
        first = min(r.index for r in running)
        self.stream.write(f"\r{steps}; {self._time_left(todo, first)}\x1b[K")
        self.stream.flush()

  def _time_left(self, todo: list[Job], index: int) -> str:
    """The estimated time left: seconds per step of finished runs x steps still to train."""
    seconds, steps = 0.0, 0
    for job in self.jobs:
      if is_finished(job):
        record = RunRecord.read(job.workdir)
        if record.wall_seconds > 0:
          seconds, steps = seconds + record.wall_seconds, steps + job.num_steps
    if not steps:
      return "time left: known once a run has finished"
    remaining = sum(max(job.num_steps - _safe_last_step(job), 0) for job in todo[index - 1:])
    return f"about {_minutes(seconds / steps * remaining / len(self.slots))} left"

  def say(self, text: str) -> None:
    prefix = "\r\x1b[K" if hasattr(self.stream, "isatty") and self.stream.isatty() else ""
    self.stream.write(f"{prefix}study: {text}\n")
    self.stream.flush()


def _safe_last_step(job: Job) -> int:
  try:
    return last_step(job.workdir)
  except (OSError, ValueError):
    return 0


def _minutes(seconds: float) -> str:
  if seconds < 90:
    return f"{seconds:.0f} s"
  if seconds < 5400:
    return f"{seconds / 60:.0f} min"
  return f"{seconds / 3600:.1f} h"


def _wait_for_lock(job: Job, say) -> None:
  """Waits while another process holds the job's workdir (a run of a killed study, saving)."""
  deadline = time.monotonic() + LOCK_WAIT_S
  told = False
  while True:
    try:
      with lock_lib.WorkdirLock(job.workdir):
        return
    except lock_lib.WorkdirLockedError as error:
      if time.monotonic() > deadline:
        raise StudyError(f"run {job.run.name}, seed {job.seed}: {error}") from None
      if not told:
        say(f"{job.label}: waiting for the process that holds {job.workdir} to end")
        told = True
      time.sleep(1.0)
