"""The workdir lock: a second run fails at once naming the holder; a killed holder blocks nothing.

Holders are real processes: the test process itself, or a child that takes the lock and waits.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from moejax import lock

REPO = pathlib.Path(__file__).resolve().parents[1]

_HOLD = """
import sys, time
from moejax import lock
lock.WorkdirLock(sys.argv[1], use_flock=sys.argv[2] == "flock").acquire()
print("locked", flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
  """Starts a child process that takes tmp_path's lock (mode "flock" or "record")."""
  children = []

  def start(mode: str) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path), mode], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
    children.append(child)
    assert child.stdout.readline().strip() == "locked"
    return child

  yield start
  for child in children:
    if child.poll() is None:
      child.kill()
    child.wait()


def _kill(child: subprocess.Popen) -> None:
  """SIGKILL: the child gets no chance to clean up."""
  os.kill(child.pid, signal.SIGKILL)
  child.wait()
  assert child.returncode == -signal.SIGKILL


@pytest.mark.parametrize("mode", ["flock", "record"])
def test_a_lock_held_by_a_running_process_names_it(tmp_path, holder, mode):
  child = holder(mode)
  with pytest.raises(lock.WorkdirLockedError) as raised:
    lock.WorkdirLock(tmp_path, use_flock=mode == "flock").acquire()
  message = str(raised.value)
  assert message.startswith(f"workdir {tmp_path} is in use by another moejax run (host "
                            f"{socket.gethostname()}, pid {child.pid}, started ")
  assert f": -c {tmp_path} {mode})" in message  # its command line
  assert "choose another --workdir" in message


@pytest.mark.parametrize("mode", ["flock", "record"])
def test_a_lock_left_by_a_sigkilled_process_does_not_block(tmp_path, holder, mode):
  child = holder(mode)
  _kill(child)
  with lock.WorkdirLock(tmp_path, use_flock=mode == "flock") as held:
    record = json.loads(held.path.read_text())
    assert (record["host"], record["pid"]) == (socket.gethostname(), os.getpid())


def test_a_released_lock_can_be_taken_and_a_second_holder_in_one_process_is_refused(tmp_path):
  with lock.WorkdirLock(tmp_path):
    with pytest.raises(lock.WorkdirLockedError, match=f"pid {os.getpid()}, started "):
      lock.WorkdirLock(tmp_path).acquire()
  assert (tmp_path / lock.LOCK_FILE).read_text() == ""  # released: the file names no holder
  with lock.WorkdirLock(tmp_path):
    pass


def _record_of(pid: int, **changes) -> dict:
  record = {"host": socket.gethostname(), "pid": pid, "started": "2024-01-02 03:04:05 UTC",
            "started_unix": 0.0, "boot_id": lock._boot_id(), "pid_start": lock._pid_start(pid),
            "command": "python -m moejax.main"}
  return {**record, **changes}


def test_a_lock_record_survives_only_while_its_very_process_runs(tmp_path):
  """Without flock (object stores) the record decides: by pid, its start time and the boot."""
  path = tmp_path / lock.LOCK_FILE
  live = _record_of(os.getpid())
  path.write_text(json.dumps(live))
  with pytest.raises(lock.WorkdirLockedError, match=f"pid {os.getpid()}, started 2024-01-02"):
    lock.WorkdirLock(tmp_path, use_flock=False).acquire()
  # The same pid, but a process that started at another time: the pid was reused.
  for stale in (dict(pid_start=live["pid_start"] + 1), dict(boot_id="another-boot")):
    path.write_text(json.dumps({**live, **stale}))
    with lock.WorkdirLock(tmp_path, use_flock=False):
      assert json.loads(path.read_text())["started"] != live["started"]  # this lock's record
    assert not path.exists()  # released: the record is removed


def test_a_lock_record_from_another_host_is_refused_with_what_to_do(tmp_path):
  path = tmp_path / lock.LOCK_FILE
  path.write_text(json.dumps(_record_of(1, host="node-7")))
  with pytest.raises(lock.WorkdirLockedError) as raised:
    lock.WorkdirLock(tmp_path, use_flock=False).acquire()
  assert "(host node-7, pid 1, started 2024-01-02 03:04:05 UTC" in str(raised.value)
  assert f"cannot be checked from here: if it is gone, delete {path}." in str(raised.value)


def test_a_second_run_on_a_locked_workdir_fails_at_once_naming_the_holder(tmp_path):
  """`python -m moejax.main` on a workdir that this test process holds."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  workdir, data_dir = tmp_path / "run", tmp_path / "no_data_yet"
  workdir.mkdir()
  with lock.WorkdirLock(workdir):
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "moejax.main", "--config=experiments/switch_small.py:tiny",
         f"--workdir={workdir}", f"--config.data.data_dir={data_dir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - started
  assert run.returncode != 0
  assert (f"is in use by another moejax run (host {socket.gethostname()}, pid {os.getpid()}, "
          "started ") in run.stderr
  assert seconds < 60  # before building data or compiling anything
  assert sorted(p.name for p in workdir.iterdir()) == [lock.LOCK_FILE]  # nothing else written
  assert not data_dir.exists() or not any(data_dir.iterdir())  # no dataset built


def test_every_process_of_a_multi_process_run_stops_when_the_workdir_is_locked(tmp_path):
  """Process 0 alone takes the lock and tells process 1 that it did not get it."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("MOEJAX_", "JAX_", "XLA_"))}
  env.update(PYTHON=sys.executable, MOEJAX_LOG_DIR=str(tmp_path / "logs"))
  workdir = tmp_path / "run"
  workdir.mkdir()
  with lock.WorkdirLock(workdir):
    run = subprocess.run(
        ["bash", "launch/local.sh", "2", "--config=experiments/switch_small.py:tiny",
         f"--workdir={workdir}", f"--config.data.data_dir={tmp_path / 'no_data_yet'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
  assert run.returncode != 0
  assert f"pid {os.getpid()}, started " in run.stderr  # process 0 names the holder
  process_1 = (tmp_path / "logs" / "process_1.log").read_text()
  assert f"workdir {workdir} is in use by another moejax run (process 0 names it)" in process_1
  assert sorted(p.name for p in workdir.iterdir()) == [lock.LOCK_FILE]
