"""Checkpoints of a moejax run: the train state and the data iterator, and saving on SIGTERM.

Layout under the workdir (Orbax `CheckpointManager`):

    WORKDIR/checkpoints/<step>/state/   params, optimizer state, step (sharded arrays, OCDBT)
    WORKDIR/checkpoints/<step>/data/    the grain iterator's position, one JSON file per process
    WORKDIR/checkpoints_damaged/<step>  checkpoints that did not restore, set aside (below)

Everything that decides the rest of a run is in there: random numbers in training are a function
of the step (see `train.py`), so a run restarted on the same workdir continues exactly.

A checkpoint restores onto a mesh of any shape: `abstract_like(tree, mesh)` describes the arrays
with concrete `NamedSharding`s on the new mesh (same PartitionSpecs) and Orbax reads each device's
shard directly.

Damaged checkpoints: `restore_latest` tries the newest checkpoint first and falls back to older
ones. A checkpoint that does not restore (a missing item, a truncated or corrupted array file, an
unreadable iterator position, an empty step folder) is reported on stderr and in the log, one line
naming the step and the error, and moved to `checkpoints_damaged/` for inspection, never deleted.

Failed saves: writing goes on in the background after `save` returns. A failure there (disk full,
file too large, no permission) is raised as `CheckpointError` at the next `save` or at
`wait_until_finished`/`close`, whichever comes first, with one line naming the checkpoint's path
and the operating system's error. The checkpoints written before it stay.

Orbax logs a traceback for every array whose write failed, and its abandoned write coroutines
complain again when they finish and at exit (hundreds of lines for one full disk). moejax drops
those, since the `CheckpointError` says it once, unless the log verbosity is INFO or more verbose
(`--verbosity=0`).

Preemption: `PreemptionFlag` installs a SIGTERM handler that only records the request; the training
loop asks `flag.should_stop()` after each step, saves and returns, so the process exits 0.
"""

from __future__ import annotations

import copy
import inspect
import logging as pylogging
import os
import re
import signal
import sys
import threading
import traceback
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax import storage

STATE, DATA = "state", "data"
DAMAGED_SUFFIX = "_damaged"  # WORKDIR/checkpoints -> WORKDIR/checkpoints_damaged


class CheckpointError(RuntimeError):
  """A checkpoint could not be written or read; the message says where and why, in one line."""


class Checkpointer:
  """Saves and restores (train state, data iterator) under `directory`, keeping the newest few."""

  def __init__(self, directory: str | epath.PathLike, *, max_to_keep: int = 3):
    directory = epath.Path(directory)
    if "://" not in str(directory):  # Orbax needs an absolute local path (gs:// is one already)
      directory = epath.Path(os.path.abspath(directory))
    self.directory = directory
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    _quiet_orbax_failures()
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._saving: int | None = None  # the step of the newest save started
    self._failed = False  # a failed save was raised; Orbax would raise it again at every wait

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iterator=None, *, force: bool = True) -> bool:
    """Starts saving `state` (and the iterator's position) as checkpoint `step`.

    The arrays are copied off the devices before this returns; writing to disk continues in the
    background (`wait_until_finished` waits for it). Returns whether a checkpoint was started.

    Raises:
      CheckpointError: the previous save failed in the background (reported here at the latest,
        before anything else is written), or this one failed to start.
    """
    self.wait_until_finished()
    if step in self._manager.all_steps():
      return False
    items = {STATE: ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    self._saving = step
    try:
      return self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as error:  # pylint: disable=broad-except
      raise self._save_failed(step, error) from error

  def restore(self, step: int, abstract_state: Any, data_iterator=None) -> Any:
    """The state saved at `step`, laid out as `abstract_state` says; also rewinds the iterator.

    Each process reads only what it needs and no collective runs in here, so that a checkpoint
    that fails on some processes only leaves every process free to agree on what to do next
    (`restore_latest`).

    Args:
      step: a step from `all_steps()`.
      abstract_state: a tree of `jax.ShapeDtypeStruct` with concrete `NamedSharding`s
        (`abstract_like`), in the structure that was saved.
      data_iterator: a grain iterator of the same pipeline; its position is set to the saved one.

    Raises:
      CheckpointError: naming the item that did not restore and why.
    """
    step_dir = self.directory / str(step)
    handler = ocp.StandardCheckpointHandler()
    try:
      state = handler.restore(step_dir / STATE, args=ocp.args.StandardRestore(abstract_state))
    except Exception as error:  # pylint: disable=broad-except
      raise CheckpointError(f"{STATE}/: {describe_error(error)}") from error
    finally:
      handler.close()
    if data_iterator is not None:
      try:
        grain.checkpoint.CheckpointHandler().restore(
            step_dir / DATA, args=grain.checkpoint.CheckpointRestore(data_iterator))
      except Exception as error:  # pylint: disable=broad-except
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"  # grain's naming
        raise CheckpointError(f"{DATA}/{name}: {describe_error(error)}") from error
    return state

  def restore_latest(self, abstract_state: Any, data_iterator=None) -> tuple[int, Any] | None:
    """The newest checkpoint that restores, as (step, state); None when none does.

    Steps are tried newest first. One that does not restore is reported (its step and the
    error, in one line, on stderr and in the log), moved to `<directory>_damaged/<step>`, and
    the next older one is tried. `data_iterator` ends at the restored checkpoint's position, or
    at its position on entry when nothing restored (a failed attempt may have moved it). With
    several processes, process 0 names each step to try and a step counts only if it restored
    on every process, so that all of them continue from the same step.
    """
    start = None if data_iterator is None else copy.deepcopy(data_iterator.get_state())
    skipped = []
    while (step := _from_process_0(self.latest_step())) is not None:
      try:
        state, error = self.restore(step, abstract_state, data_iterator), None
      except CheckpointError as failure:
        state, error = None, failure
      failed = _failing_processes(error is None)
      if not failed:
        return step, state
      if data_iterator is not None:
        data_iterator.set_state(copy.deepcopy(start))
      self._set_aside(step, error, failed)
      skipped.append(step)
    if skipped:
      _warn(f"moejax: none of the checkpoints in {self.directory} restores (steps "
           f"{', '.join(map(str, skipped))} were set aside); training starts from step 0.")
    return None

  def wait_until_finished(self) -> None:
    """Waits for the save in progress to be written.

    Raises:
      CheckpointError: that save failed (raised once; later calls return).
    """
    try:
      self._manager.wait_until_finished()
    except Exception as error:  # pylint: disable=broad-except
      if not self._failed:
        raise self._save_failed(self._saving, error) from error

  def close(self) -> None:
    """Waits for the save in progress (raising `CheckpointError` if it failed), then closes."""
    try:
      self.wait_until_finished()
    finally:
      try:
        self._manager.close()
      except Exception:  # pylint: disable=broad-except
        if not self._failed:  # a failure reported already comes back here once more
          raise

  def _save_failed(self, step: int | None, error: BaseException) -> CheckpointError:
    """The one-line error for a failed save of `step`; the checkpoints before it stay."""
    self._failed = True
    self._manager.reload()  # Orbax's list of steps, from what is on disk now
    kept = sorted(self._manager.all_steps())
    if kept:
      kept_text = (f"the earlier checkpoint{'s' if len(kept) > 1 else ''} "
                   f"({', '.join(map(str, kept))}) {'are' if len(kept) > 1 else 'is'} intact")
    else:
      kept_text = "there is no earlier checkpoint"
    return CheckpointError(f"saving checkpoint {step} to {self.directory / str(step)} failed: "
                           f"{describe_error(error)}; {kept_text}.")

  def _set_aside(self, step: int, error: CheckpointError | None, failed: list[int]) -> None:
    """Reports checkpoint `step` as damaged and moves it out of Orbax's sight (process 0)."""
    source = self.directory / str(step)
    cause = str(error) if error is not None else f"it failed on process(es) {failed}"
    target, move_error = None, None
    if jax.process_index() == 0:
      target = _free_path(self.directory.parent / (self.directory.name + DAMAGED_SUFFIX) /
                          str(step))
      try:
        target.parent.mkdir(parents=True, exist_ok=True)
        storage.move_tree(source, target)
      except OSError as e:
        move_error = e
    if _failing_processes(move_error is None):  # also the barrier before everyone reloads
      why = describe_error(move_error) if move_error else "see process 0's log"
      raise CheckpointError(f"checkpoint {step} at {source} does not restore ({cause}) and could "
                            f"not be moved aside: {why}; move it out of the checkpoints folder, "
                            "then rerun.")
    if target is not None:
      _warn(f"moejax: checkpoint {step} at {source} does not restore ({cause}); moved it to "
           f"{target} and trying the next older checkpoint.")
    elif error is not None:
      _warn(f"moejax: process {jax.process_index()}: checkpoint {step} at {source} does not "
           f"restore ({cause}); process 0 sets it aside.")
    self._manager.reload()  # the step list is cached; the folder has moved


def _warn(line: str) -> None:
  """`line` on stderr and in the log: something the user must see, though the run goes on."""
  logging.warning("%s", line)
  print(line, file=sys.stderr, flush=True)


# TensorStore (Orbax's array storage) reports an OS error inside its message:
#   ... Failed writing: "/ckpt/3.orbax-checkpoint-tmp/.../d/e32e": ... File too large
#   [os_error_code='27']
_TENSORSTORE_OS_ERROR = re.compile(r"os_error_code='?(\d+)")
_QUOTED_PATH = re.compile(r'"((?:/|[a-z0-9]+://)[^"]*)"')


def describe_error(error: BaseException) -> str:
  """`error` in one line: its operating-system error where it has one, else its innermost cause.

  The OS error is an `OSError` anywhere among its causes (`__cause__`, `__context__`, the members
  of an exception group) or an OS error code in a TensorStore message; it is written as Python
  writes OSErrors: `[Errno 28] No space left on device: '/path/of/the/file'`.
  """
  causes = _causes(error)
  for e in causes:
    if isinstance(e, OSError) and e.errno is not None:
      return _first_line(str(e))
  for e in causes:
    found = _TENSORSTORE_OS_ERROR.search(str(e))
    if found:
      code = int(found.group(1))
      paths = _QUOTED_PATH.findall(str(e)[:found.start()])
      return str(OSError(code, os.strerror(code), *paths[-1:]))
  innermost = causes[-1]
  return f"{type(innermost).__name__}: {_first_line(str(innermost))}"


def _causes(error: BaseException) -> list[BaseException]:
  """`error` and everything that caused it, outermost first."""
  seen, order, pending = set(), [], [error]
  while pending:
    e = pending.pop(0)
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    order.append(e)
    context = None if e.__suppress_context__ else e.__context__  # `raise ... from None`
    pending.extend([*getattr(e, "exceptions", ()), e.__cause__, context])
  return order


def _first_line(text: str, limit: int = 300) -> str:
  line = (text.strip().splitlines() or [""])[0]
  return line if len(line) <= limit else line[:limit - 3] + "..."


_ORBAX_DIR = os.path.dirname(ocp.__file__)
_quieted = False


def _quiet_orbax_failures() -> None:
  """Drops Orbax's repetitions of a failed write (see the module docstring); once per process."""
  global _quieted
  if _quieted:
    return
  _quieted = True
  logging.get_absl_logger().addFilter(_OrbaxTracebacks())
  previous = sys.unraisablehook

  def unraisablehook(unraisable):
    if logging.get_verbosity() >= logging.INFO or not _from_abandoned_write(unraisable):
      previous(unraisable)

  sys.unraisablehook = unraisablehook


class _OrbaxTracebacks(pylogging.Filter):
  """Drops the tracebacks Orbax logs for failed background work at the default verbosity."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return (logging.get_verbosity() >= logging.INFO or record.levelno < pylogging.ERROR or
            not record.exc_info or not record.pathname.startswith(_ORBAX_DIR))


def _from_abandoned_write(unraisable) -> bool:
  """Whether an unraisable error comes from an Orbax write left behind by a failed save: the
  coroutine itself (collected at exit), or its storage callback finding its event loop closed."""
  if inspect.iscoroutine(unraisable.object):
    return unraisable.object.cr_code.co_filename.startswith(_ORBAX_DIR)
  frames = [frame.f_code.co_name for frame, _ in traceback.walk_tb(unraisable.exc_traceback)]
  return (isinstance(unraisable.exc_value, RuntimeError) and
          str(unraisable.exc_value) == "Event loop is closed" and
          "call_soon_threadsafe" in frames)


def _free_path(path: epath.Path) -> epath.Path:
  """`path`, or `path-2`, `path-3`, ... : the first that does not exist yet."""
  candidate, n = path, 1
  while candidate.exists():
    n += 1
    candidate = path.parent / f"{path.name}-{n}"
  return candidate


def _from_process_0(step: int | None) -> int | None:
  """Process 0's `step` on every process (it is the one that decides)."""
  if jax.process_count() == 1:
    return step
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  value = int(multihost_utils.broadcast_one_to_all(np.int32(-1 if step is None else step)))
  return None if value < 0 else value


def _failing_processes(ok: bool) -> list[int]:
  """The indices of the processes whose `ok` is false (a collective when there are several)."""
  if jax.process_count() == 1:
    return [] if ok else [0]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = np.asarray(multihost_utils.process_allgather(np.asarray(ok))).reshape(-1)
  return [int(i) for i in np.flatnonzero(~flags.astype(bool))]


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
