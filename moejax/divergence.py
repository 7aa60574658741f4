"""Divergence detection: training stops at the first non-finite loss or gradient norm it sees.

A diverging run (a learning rate too large for the model, an aux-loss weight of inf, bad data)
turns its loss or gradient norm into inf or NaN; every later step is then NaN, and saving such a
state would rotate the last good checkpoints out. moejax never saves it:

* `NonFiniteWatch` remembers, on the device, the first step whose `train/loss` or
  `train/grad_norm` was not finite, and the two values at that step. Observing a step is one tiny
  asynchronous computation on the step's outputs (no host synchronisation); the loop reads the
  watch (`check`) only when it logs, evaluates or saves anyway.
* `check_finite_state` looks at every array of a state about to be saved (a parameter can
  overflow while the loss of the step before was still finite).

Both raise `NonFiniteError`, which names the step and the metric or array, and the loop stops
without saving: the newest checkpoint on disk stays the last finite one, and rerunning the
command (after lowering the learning rate, say) resumes from it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# The metrics watched, in the order of the watch's value vector.
WATCHED = ("train/loss", "train/grad_norm")


class NonFiniteError(RuntimeError):
  """Training produced a non-finite value; the run stopped without saving it.

  Attributes:
    step: the first step at which a non-finite value was found.
    what: the metric names (or the state array path) that were not finite at `step`.
  """

  def __init__(self, message: str, *, step: int, what: tuple[str, ...]):
    super().__init__(message)
    self.step = step
    self.what = what


@jax.jit
def _observe(watch, loss, grad_norm):
  """The watch after one more step: `first` and `values` change at the first non-finite one."""
  count, first, values = watch
  now = jnp.stack([loss, grad_norm]).astype(jnp.float32)
  is_first = (first < 0) & ~jnp.all(jnp.isfinite(now))
  return count + 1, jnp.where(is_first, count, first), jnp.where(is_first, now, values)


class NonFiniteWatch:
  """The first step whose loss or gradient norm was inf or NaN, kept on the device.

      watch = NonFiniteWatch(first_step, NamedSharding(mesh, P()))
      for step in range(first_step, ...):
        state, metrics = train_fn(state, batch)
        watch.observe(metrics["train"])              # asynchronous, nothing sent to the device
        if step % log_every == 0:
          watch.check(checked_at=step, ...)          # reads the watch; raises NonFiniteError

  The watch counts the steps it observed (the step number is `first_step` + that count), so
  observing needs no host input. All processes of a multi-process run hold the same replicated
  values, so they all raise at the same check.
  """

  def __init__(self, first_step: int, sharding: jax.sharding.Sharding):
    self._first_step = first_step
    count, first, values = np.int32(0), np.int32(-1), np.zeros((len(WATCHED),), np.float32)
    self._watch = jax.device_put((count, first, values), sharding)

  def observe(self, train_metrics: dict[str, jax.Array]) -> None:
    """Records the next step's `loss` and `grad_norm` (device scalars) without waiting."""
    self._watch = _observe(self._watch, train_metrics["loss"], train_metrics["grad_norm"])

  def first_non_finite(self) -> tuple[int, dict[str, float]] | None:
    """(step, {metric: value}) of the first non-finite step observed, or None (waits)."""
    _, first, values = jax.device_get(self._watch)
    if first < 0:
      return None
    return self._first_step + int(first), dict(zip(WATCHED, (float(v) for v in values)))

  def check(self, *, checked_at: int, checkpointer) -> None:
    """Raises NonFiniteError if an observed step had a non-finite loss or gradient norm.

    `checkpointer` (the run's `Checkpointer`) names the checkpoint the run can resume from.
    """
    found = self.first_non_finite()
    if found is None:
      return
    step, values = found
    bad = tuple(name for name, value in values.items() if not np.isfinite(value))
    shown = ", ".join(f"{name}={value}" for name, value in values.items())
    where = "" if checked_at == step else f" (found at the check after step {checked_at})"
    raise NonFiniteError(
        f"training diverged: {' and '.join(bad)} not finite at step {step} ({shown}){where}. "
        f"Stopped without saving; {_kept(checkpointer)}", step=step, what=bad)


def check_finite_state(tree: Any, *, step: int, checkpointer) -> None:
  """Raises NonFiniteError naming the first array of `tree` that holds an inf or NaN.

  One reduction per array, on the devices; only the booleans come back to the host.
  """
  flags = jax.device_get(_finite_leaves(tree))
  for path, finite in jax.tree_util.tree_leaves_with_path(flags):
    if not finite:
      name = jax.tree_util.keystr(path, simple=True, separator="/")
      raise NonFiniteError(
          f"training diverged: the state to be saved at step {step} holds non-finite values "
          f"in {name}. Not saved; {_kept(checkpointer)}", step=step, what=(name,))


@jax.jit
def _finite_leaves(tree):
  return jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
                      else jnp.bool_(True), tree)


def _kept(checkpointer) -> str:
  """Which checkpoint the run resumes from, and what to change first."""
  advice = "Lower optimizer.learning_rate (or check the data and the loss weights)"
  last = checkpointer.latest_step()
  if last is None:
    return f"no checkpoint had been saved. {advice} and start again."
  return (f"the newest checkpoint, step {last} in {checkpointer.directory}, is finite. {advice} "
          f"and rerun: the run resumes from step {last}.")
