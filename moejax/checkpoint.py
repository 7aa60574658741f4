"""Checkpoints of a moejax run: the train state and the data iterator, and saving on SIGTERM.

Layout under the workdir (Orbax `CheckpointManager`):

    WORKDIR/checkpoints/<step>/state/   params, optimizer state, step (sharded arrays, OCDBT)
    WORKDIR/checkpoints/<step>/data/    the grain iterator's position, one JSON file per process

Everything that decides the rest of a run is in there: random numbers in training are a function
of the step (see `train.py`), so a run restarted on the same workdir continues exactly.

A checkpoint restores onto a mesh of any shape: `abstract_like(tree, mesh)` describes the arrays
with concrete `NamedSharding`s on the new mesh (same PartitionSpecs) and Orbax reads each device's
shard directly.

Preemption: `PreemptionFlag` installs a SIGTERM handler that only records the request; the training
loop asks `flag.should_stop()` after each step, saves and returns, so the process exits 0.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

STATE, DATA = "state", "data"


class Checkpointer:
  """Saves and restores (train state, data iterator) under `directory`, keeping the newest few."""

  def __init__(self, directory: str | epath.PathLike, *, max_to_keep: int = 3):
    directory = epath.Path(directory)
    if "://" not in str(directory):  # Orbax needs an absolute local path (gs:// is one already)
      directory = epath.Path(os.path.abspath(directory))
    self.directory = directory
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iterator=None, *, force: bool = True) -> bool:
    """Starts saving `state` (and the iterator's position) as checkpoint `step`.

    The arrays are copied off the devices before this returns; writing to disk continues in the
    background (`wait_until_finished` waits for it). Returns whether a checkpoint was started.
    """
    if step in self._manager.all_steps():
      return False
    items = {STATE: ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state: Any, data_iterator=None) -> Any:
    """The state saved at `step`, laid out as `abstract_state` says; also rewinds the iterator.

    Args:
      step: a step from `all_steps()`.
      abstract_state: a tree of `jax.ShapeDtypeStruct` with concrete `NamedSharding`s
        (`abstract_like`), in the structure that was saved.
      data_iterator: a grain iterator of the same pipeline; its position is set to the saved one.
    """
    items = {STATE: ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored[STATE]

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any, mesh: jax.sharding.Mesh | None = None) -> Any:
  """ShapeDtypeStructs of `tree`'s arrays, sharded with their own PartitionSpecs on `mesh`.

  With `mesh=None` each array keeps its own sharding.
  """

  def abstract(x):
    sharding = x.sharding
    if mesh is not None:
      spec = sharding.spec if isinstance(sharding, NamedSharding) else P()
      sharding = NamedSharding(mesh, spec)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  return jax.tree.map(abstract, tree)


class PreemptionFlag:
  """A SIGTERM handler that records the request to stop; use as a context manager.

      with PreemptionFlag() as flag:
        for step in ...:
          ...
          if flag.should_stop():
            save(); break

  Outside the main thread (where Python allows no signal handlers) it installs nothing and never
  fires. With several processes, `should_stop` is true on all of them as soon as one was signalled,
  so every process saves the same step.
  """

  def __init__(self, signum: int = signal.SIGTERM):
    self._signum = signum
    self._event = threading.Event()
    self._previous = None
    self._installed = False

  def __enter__(self) -> "PreemptionFlag":
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(self._signum, self._handle)
      self._installed = True
    return self

  def __exit__(self, *exc_info) -> None:
    if self._installed:
      signal.signal(self._signum, self._previous)
      self._installed = False

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self._event.set()

  @property
  def requested(self) -> bool:
    """Whether this process received the signal."""
    return self._event.is_set()

  def should_stop(self) -> bool:
    """Whether any process received the signal (a collective when there are several)."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.asarray(self.requested))
    return bool(np.any(flags))
