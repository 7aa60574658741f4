"""A profiler trace of chosen training steps, for TensorBoard's profile plugin.

`train.profile_steps = n` traces n steps, starting at `train.profile_start_step` (0: the second
step of the run, the first one after compilation). The trace goes to WORKDIR/tensorboard/plugins/
profile/<timestamp>/ (jax.profiler's layout), so

    tensorboard --logdir WORKDIR/tensorboard

shows it under PROFILE (the `tensorboard-plugin-profile` package, or xprof, renders it). Each
process writes its own trace file. Tracing slows the traced steps: their throughput is not
representative, and the progress line's rate for that interval is lower.
"""

from __future__ import annotations

import jax
from etils import epath


class StepProfiler:
  """Starts a trace before step `start` and stops it after step `start + steps - 1`."""

  def __init__(self, logdir: epath.PathLike, *, first_step: int, start_step: int, steps: int):
    self.logdir = epath.Path(logdir)
    self.start = start_step if start_step > 0 else first_step + 1
    self.stop = self.start + steps - 1
    self.enabled = steps > 0
    self.active = False

  def before(self, step: int) -> None:
    if self.enabled and step == self.start:
      self.logdir.mkdir(parents=True, exist_ok=True)
      jax.profiler.start_trace(str(self.logdir))
      self.active = True

  def after(self, step: int, wait_for) -> None:
    if self.active and step >= self.stop:
      self.close(wait_for)

  def close(self, wait_for=None) -> None:
    """Stops a trace in progress (at the run's end or when it stops early)."""
    if self.active:
      if wait_for is not None:
        jax.block_until_ready(wait_for)
      jax.profiler.stop_trace()
      self.active = False
