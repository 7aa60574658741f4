"""A profiler trace of chosen training steps, for TensorBoard's profile plugin.

`train.profile_steps = n` traces n steps, starting at `train.profile_start_step` (0: the second
step of the run, the first one after compilation). The trace goes to WORKDIR/tensorboard/plugins/
profile/<timestamp>/ (jax.profiler's layout), so

    tensorboard --logdir WORKDIR/tensorboard

shows it under PROFILE (the `tensorboard-plugin-profile` package, or xprof, renders it). Each
process writes its own trace file. Tracing slows the traced steps: their throughput is not
representative, and the progress line's rate for that interval is lower.

On an object store (a gs:// workdir) the trace is written to a local temporary folder and
uploaded when it stops (`storage.upload_tree`), through the same client as the workdir's other
files; jaxlib's own Cloud Storage client would otherwise write it, with its own credentials and
no way to point it at another endpoint.
"""

from __future__ import annotations

import tempfile

import jax
from etils import epath

from moejax import storage


class StepProfiler:
  """Starts a trace before step `start` and stops it after step `start + steps - 1`."""

  def __init__(self, logdir: epath.PathLike, *, first_step: int, start_step: int, steps: int):
    self.logdir = epath.Path(logdir)
    self.start = start_step if start_step > 0 else first_step + 1
    self.stop = self.start + steps - 1
    self.enabled = steps > 0
    self.active = False
    self._local = None  # the temporary folder of a trace bound for an object store

  def before(self, step: int) -> None:
    if self.enabled and step == self.start:
      self.logdir.mkdir(parents=True, exist_ok=True)
      target = self.logdir
      if storage.is_object_store(self.logdir):
        self._local = tempfile.TemporaryDirectory(prefix="moejax-profile-")
        target = self._local.name
      jax.profiler.start_trace(str(target))
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
      if self._local is not None:
        try:
          storage.upload_tree(self._local.name, self.logdir)
        finally:
          self._local.cleanup()
          self._local = None
