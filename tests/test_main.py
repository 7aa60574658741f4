"""The entry point, `python -m moejax.main`: how bad input, unusable directories and an early
SIGTERM end a run (one line on stderr and the documented exit status, no traceback).

Runs are subprocesses of the tiny switch_small on the PTB fixture; bad input fails before any
compilation, so each takes a few seconds. `EarlySigterm` and the OS error messages are also
checked in-process.
"""

import gc
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from moejax import checkpoint, main

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = "--config=experiments/switch_small.py:tiny"


def _env(**extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith("MOEJAX_")}
  env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **extra)
  return env


def _run(*flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "moejax.main", *flags], cwd=REPO,
                        env=env or _env(), capture_output=True, text=True, timeout=180,
                        check=False)


def _assert_one_line(result: subprocess.CompletedProcess, *parts: str, status: int = 2) -> str:
  """The run exited with `status` and said why in one `moejax:` line holding `parts`."""
  said = [line for line in result.stderr.splitlines() if line.startswith("moejax:")]
  assert result.returncode == status, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  assert len(said) == 1 and said[0] == result.stderr.strip().splitlines()[-1], result.stderr
  for part in parts:
    assert part in said[0], said[0]
  return said[0]


@pytest.mark.parametrize("flags, parts", [
    # a value the typed config refuses
    (["--config.train.num_steps=-5"], ["train.num_steps=-5"]),
    # a field the experiment does not have
    (["--config.train.nope=1"], ["--config.train.nope: train has no field 'nope'; its fields: "
                                 "batch_size, "]),
    # a value absl cannot parse
    (["--config.train.num_steps=abc"], ["--config.train.num_steps=abc: invalid literal"]),
    # an unknown variant: get_config's own error, without the traceback config_flags nests in it
    (["--config=experiments/switch_small.py:bogus"],
     ["--config=experiments/switch_small.py:bogus: ValueError: config variant 'bogus'"]),
    (["--config=experiments/missing.py"],
     ["--config=experiments/missing.py: cannot load it: [Errno 2] No such file"]),
    (["stray"], ["unexpected arguments ['stray']"]),
], ids=["value", "unknown-field", "unparsable", "variant", "missing-file", "positional"])
def test_bad_input_prints_one_line_and_exits_2(tmp_path, flags, parts):
  if not any(flag.startswith("--config=") for flag in flags):
    flags = [TINY, *flags]
  _assert_one_line(_run(*flags, f"--workdir={tmp_path / 'run'}"), *parts)


def test_bad_environment_setting_is_bad_input(tmp_path):
  _assert_one_line(_run(TINY, f"--workdir={tmp_path}", env=_env(MOEJAX_WATCH_PEERS="yes")),
                   "moejax: MOEJAX_WATCH_PEERS='yes' must be 0 or 1.")


def test_traceback_flag_adds_the_traceback(tmp_path):
  result = _run(TINY, f"--workdir={tmp_path}", "--config.train.num_steps=-5", "--traceback")
  assert result.returncode == 2
  assert "Traceback (most recent call last)" in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith("moejax: ")
  assert "train.num_steps=-5" in result.stderr.strip().splitlines()[-1]


def test_unusable_workdir_names_the_flag(tmp_path):
  file = tmp_path / "file"
  file.write_text("")
  _assert_one_line(_run(TINY, f"--workdir={file}"),
                   f"moejax: --workdir='{file}': {file} is a file, not a directory")
  _assert_one_line(_run(TINY, f"--workdir={file}/run"),
                   f"moejax: --workdir='{file}/run': cannot create it: {file} is a file, not a "
                   "directory")


@pytest.mark.skipif(not pathlib.Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_workdir_that_cannot_be_written_names_the_flag():
  # /proc/self is a directory in which not even root can create a file.
  _assert_one_line(_run(TINY, "--workdir=/proc/self"),
                   "moejax: --workdir='/proc/self': cannot write in it: ")


def test_unusable_data_dir_names_the_field(tmp_path):
  file = tmp_path / "file"
  file.write_text("")
  _assert_one_line(_run(TINY, f"--workdir={tmp_path / 'run'}", f"--config.data.data_dir={file}"),
                   f"moejax: data.data_dir='{file}': {file} is a file, not a directory")
  # Unset, it comes from $MOEJAX_DATA_DIR: the message says so.
  _assert_one_line(_run(TINY, f"--workdir={tmp_path / 'run'}",
                        env=_env(MOEJAX_DATA_DIR=f"{file}/tfds")),
                   f"moejax: data.data_dir (unset; $MOEJAX_DATA_DIR='{file}/tfds'): cannot create "
                   f"it: {file} is a file, not a directory")


def test_sigterm_before_training_exits_cleanly(ptb_dir, tmp_path):
  """SIGTERM while the trainer builds its state and compiles (no compilation cache, so that
  takes seconds): status 0 and one line, nothing written; without the early handler the
  process died of the signal (status -15)."""
  workdir = tmp_path / "run"
  proc = subprocess.Popen(
      [sys.executable, "-m", "moejax.main", TINY, f"--workdir={workdir}",
       "--config.data.name=ptb", f"--config.data.data_dir={ptb_dir}",
       "--config.train.num_steps=1000"],
      cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 120
  while not workdir.is_dir():  # main creates it once the config is valid, before training
    assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=180)
  result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
  _assert_one_line(result, "moejax: stopped by SIGTERM before training started; nothing to save",
                   status=0)
  assert not (workdir / "metrics.jsonl").exists()
  assert not any(p.name.isdigit() for p in (workdir / "checkpoints").glob("*"))


def test_early_sigterm_raises_until_the_loop_takes_over(capsys):
  before = signal.getsignal(signal.SIGTERM)
  with main.EarlySigterm() as early:
    with pytest.raises(main.StoppedBeforeTraining):
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(5)
    with checkpoint.PreemptionFlag() as flag:  # the training loop's handler
      assert early.loop_started.wait(5)
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.1)
      assert flag.requested
    # After the loop: the run is finishing its last checkpoint; a SIGTERM does not cut it short.
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.1)
  assert "SIGTERM after the training loop" in capsys.readouterr().err
  assert signal.getsignal(signal.SIGTERM) is before


def test_early_sigterm_is_not_lost_when_python_swallows_it(capsys):
  """Python may run the handler inside a garbage-collector callback (JAX has one), where the
  raised stop is swallowed: the stop still comes, a moment later, and stderr stays clean."""
  def callback(phase, info):
    del info
    if phase == "start":
      os.kill(os.getpid(), signal.SIGTERM)
      for _ in range(10_000):  # bytecodes: the handler runs here, inside the callback
        pass
  with main.EarlySigterm() as early:
    gc.callbacks.append(callback)
    try:
      gc.collect()  # returns: the stop raised inside the callback went nowhere
    finally:
      gc.callbacks.remove(callback)
    assert early._requested_at is not None  # pylint: disable=protected-access
    with pytest.raises(main.StoppedBeforeTraining):
      time.sleep(5)  # the watcher signals again after RESEND_AFTER_S
    early.acknowledge()
    time.sleep(main.EarlySigterm.RESEND_AFTER_S + 0.2)  # acknowledged: no further signal
  assert capsys.readouterr().err == ""


def test_os_errors_name_the_directory_setting(tmp_path):
  fields = [(str(tmp_path / "run"), "--workdir='run'"),
            (str(tmp_path / "tfds"), "data.data_dir='tfds'")]
  full = OSError(28, "No space left on device", str(tmp_path / "run" / "checkpoints" / "7"))
  assert main.os_error_message(full, fields) == (
      f"--workdir='run': No space left on device: '{tmp_path}/run/checkpoints/7'")
  denied = PermissionError(13, "Permission denied", str(tmp_path / "tfds" / "ptb"))
  assert main.os_error_message(denied, fields) == (
      f"data.data_dir='tfds': Permission denied: '{tmp_path}/tfds/ptb'")
  # Elsewhere, or without a file name: not moejax's to name (the traceback says where).
  assert main.os_error_message(OSError(5, "I/O error", "/elsewhere"), fields) is None
  assert main.os_error_message(OSError(5, "I/O error"), fields) is None
  # A sibling that merely shares the prefix is not inside the workdir.
  assert main.os_error_message(
      OSError(5, "I/O error", str(tmp_path / "run2" / "x")), fields) is None
