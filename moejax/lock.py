"""An exclusive lock on a workdir: two runs never train into the same directory.

Two runs on one workdir would each restore the same checkpoint, overwrite each other's
checkpoints and log every step twice. `train_and_evaluate` therefore holds `WorkdirLock(workdir)`
for the whole run (process 0 of a multi-process run takes it for all), and a second run fails at
once with a message that names the holder: its host, pid, when it started and its command.

The lock is the file WORKDIR/run.lock, whose content (JSON) names the holder. How it is held
depends on where the workdir is:

* A local or NFS directory: the holder keeps an `fcntl.flock` on the file. The kernel drops it
  when the holding process ends, however it ends (SIGKILL and out-of-memory kills included), so
  a lock left by a killed run never blocks a restart. Only the holder's name comes from the file.
* An object store (gs://...), which has no locks: the file's existence is the lock. It is
  created with an upload conditional on its absence (`storage.create_exclusive`; Cloud Storage's
  `ifGenerationMatch=0`), so of two runs that start at the same moment exactly one gets it.
  A process that is killed cannot remove the file: a lock whose holder ran on this host and no
  longer runs (by its pid and that process's start time, so that a reused pid does not count) is
  stale and taken over (deleted, then created again the same way). A holder on another host
  cannot be checked from here: the message says so and names the file to delete once that run
  is known to be gone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from typing import Any

import fcntl
import numpy as np
from absl import logging
from etils import epath

from moejax import storage

LOCK_FILE = "run.lock"
# Errors of flock on file systems that do not support it: fall back to the lock record.
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class WorkdirLockedError(RuntimeError):
  """Another run holds the workdir's lock."""


@contextlib.contextmanager
def hold_for_run(workdir: str | os.PathLike):
  """Holds the workdir's lock for a run of one or several processes (process 0 takes it).

  With several processes, process 0 tells the others whether it got the lock, so that all of
  them stop at once when another run holds it.
  """
  import jax  # pylint: disable=g-import-not-at-top  (WorkdirLock itself needs no JAX)
  lock = WorkdirLock(workdir) if jax.process_index() == 0 else None
  error = None
  if lock is not None:
    try:
      lock.acquire()
    except WorkdirLockedError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    held = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if not held and error is None:
      error = WorkdirLockedError(
          f"workdir {workdir} is in use by another moejax run (process 0 names it).")
  if error is not None:
    raise error
  try:
    yield
  finally:
    if lock is not None:
      lock.release()


class WorkdirLock:
  """Holds WORKDIR/run.lock for the duration of a `with` block (or acquire() ... release()).

  Args:
    workdir: the run's directory (it must exist).
    use_flock: hold an flock (None: for local paths, not for gs:// and other URLs). False uses
      the lock record alone, as for object stores.
  """

  def __init__(self, workdir: str | os.PathLike, *, use_flock: bool | None = None):
    self.path = epath.Path(workdir) / LOCK_FILE
    self._use_flock = "://" not in str(workdir) if use_flock is None else use_flock
    self._fd = None
    self._record = None

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()

  def acquire(self) -> None:
    """Takes the lock or raises WorkdirLockedError naming its holder."""
    if self._record is not None:
      raise RuntimeError(f"{self.path} is already held by this WorkdirLock.")
    record = _this_process()
    if self._use_flock and self._acquire_flock(record):
      return
    self._acquire_record(record)

  def release(self) -> None:
    """Gives the lock up (nothing happens if it is not held)."""
    if self._record is None:
      return
    if self._fd is not None:
      os.ftruncate(self._fd, 0)  # a file naming no holder: the lock is free
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None
    elif _read_record(self.path) == self._record:
      self.path.unlink(missing_ok=True)
    self._record = None

  def _acquire_flock(self, record: dict[str, Any]) -> bool:
    """Takes the flock; False if this file system has no flock (then the record decides)."""
    fd = os.open(os.fspath(self.path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      holder = _read_record(self.path)
      raise WorkdirLockedError(_held_message(self.path, holder, _is_running(holder),
                                             deletable=False)) from None
    except OSError as e:
      os.close(fd)
      if e.errno in _NO_FLOCK:
        logging.warning("%s: file locks are not supported here (%s); using the lock record "
                        "alone.", self.path, e)
        return False
      raise
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(record).encode())
    os.fsync(fd)
    self._fd, self._record = fd, record
    return True

  def _acquire_record(self, record: dict[str, Any]) -> None:
    """The lock as a file alone (object stores): free when absent, empty or left by a dead
    process. It is only ever created if absent, so of two runs starting together one fails."""
    text = json.dumps(record)
    if storage.create_exclusive(self.path, text):
      self._record = record
      return
    holder = _read_record(self.path)
    running = _is_running(holder) if holder else None
    if (holder is None and not _lock_text(self.path).strip()) or running is False:
      if running is False:
        logging.warning("%s: taking over the lock of a run that no longer runs (%s, pid %s).",
                        self.path, holder.get("host"), holder.get("pid"))
      self.path.unlink(missing_ok=True)
      if storage.create_exclusive(self.path, text):
        self._record = record
        return
      holder, running = _read_record(self.path), None  # another run took it first
    raise WorkdirLockedError(_held_message(self.path, holder, running, deletable=True))


def _this_process() -> dict[str, Any]:
  """The record that names this process as the holder."""
  pid = os.getpid()
  now = time.time()
  return {"host": socket.gethostname(), "pid": pid,
          "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(now)),
          "started_unix": now, "boot_id": _boot_id(), "pid_start": _pid_start(pid),
          "command": " ".join(sys.argv)}


def _read_record(path: epath.Path) -> dict[str, Any] | None:
  """The holder named in the lock file; None if it is absent, empty or unreadable."""
  try:
    record = json.loads(path.read_text())
  except (OSError, ValueError):
    return None
  return record if isinstance(record, dict) else None


def _lock_text(path: epath.Path) -> str:
  """The lock file's text; empty when it is gone."""
  try:
    return path.read_text()
  except FileNotFoundError:
    return ""


def _boot_id() -> str | None:
  """This boot of this machine's kernel (pids are unique only within one boot)."""
  try:
    return _read_text("/proc/sys/kernel/random/boot_id").strip()
  except OSError:
    return None


def _pid_start(pid: int) -> int | None:
  """When process `pid` started, in clock ticks after boot (/proc/PID/stat field 22)."""
  try:
    stat = _read_text(f"/proc/{pid}/stat")
  except OSError:
    return None
  # The command name (field 2) is in parentheses and may contain spaces: split after it.
  fields = stat[stat.rindex(")") + 2:].split()
  return int(fields[19])


def _read_text(path: str) -> str:
  """A local file's text (the /proc and /sys entries above)."""
  with open(path, encoding="utf-8") as f:
    return f.read()


def _is_running(holder: dict[str, Any] | None) -> bool | None:
  """Whether the holder's process still runs; None when that cannot be told from here."""
  if not holder or holder.get("host") != socket.gethostname():
    return None
  if holder.get("boot_id") and _boot_id() and holder["boot_id"] != _boot_id():
    return False  # the machine restarted since
  pid = holder.get("pid")
  if not isinstance(pid, int):
    return None
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # it exists, under another user
  started = holder.get("pid_start")
  return started is None or _pid_start(pid) in (None, started)


def _held_message(path: epath.Path, holder: dict[str, Any] | None, running: bool | None, *,
                  deletable: bool) -> str:
  """Who holds the lock, and what to do (`deletable`: the file alone is the lock)."""
  workdir = path.parent
  if holder is None:
    who = f"its lock file {path} does not name it (yet)"
  else:
    who = (f"host {holder.get('host')}, pid {holder.get('pid')}, started "
           f"{holder.get('started')}: {holder.get('command')}")
  message = f"workdir {workdir} is in use by another moejax run ({who}). "
  if running is False:
    message += ("That process no longer runs; a process it started may still hold the lock "
                f"(`fuser {path}` names it). ")
  elif running is None and deletable:
    message += f"Whether it still runs cannot be checked from here: if it is gone, delete {path}. "
  return message + ("Two runs on one workdir would overwrite each other's checkpoints and "
                    "metrics: wait for it to finish, stop it, or choose another --workdir.")
