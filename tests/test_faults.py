"""Fault injection: damaged checkpoints, a failing disk, and SIGKILL at random moments.

Every recovery must end where the uninterrupted run ends: the same metrics.jsonl, bitwise as
logged (throughput aside). The trials:

* a damaged newest checkpoint, one kind of damage each (`DAMAGE`): the resume restores the next
  older checkpoint, warns naming the step and the error, and keeps the damaged folder in
  `checkpoints_damaged/`; on the `Checkpointer` alone (fast), through the trainer, and with two
  processes of which only one fails to restore (both must skip the step);
* writes that fail at the operating-system level (`RLIMIT_FSIZE`: a write past the limit fails
  with EFBIG, as a write to a full disk fails with ENOSPC): one line naming the checkpoint's path
  and the OS error, a non-zero exit, and the earlier checkpoints restore;
* SIGKILL at random moments (a seeded RNG; every other trial waits for a checkpoint being
  written), then a rerun to completion.

    .venv/bin/python -m pytest tests/test_faults.py -m "not slow"   # the fast checks
    MOEJAX_FAULT_TRIALS=12 MOEJAX_FAULT_SEED=3 .venv/bin/python -m pytest tests/test_faults.py \
        -k sigkill                                                   # more kills, other moments
"""

import json
import os
import pathlib
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import switch_small
from moejax import checkpoint, config as config_lib, data as data_lib, metrics, train

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 6  # of every trainer run here; a checkpoint after each step, the newest 3 kept
TRIALS = int(os.environ.get("MOEJAX_FAULT_TRIALS", "4"))
SEED = int(os.environ.get("MOEJAX_FAULT_SEED", "0"))
# A small window keeps the iterator's shuffle state in the checkpoint (what `wrong_iterator_state`
# damages) while making each restore cheap: restoring replays the rows of the window.
SHUFFLE_WINDOW = 16

pytestmark = pytest.mark.usefixtures("compile_once")


# ----------------------------------------------------------------------------- damage


def damage(step_dir: pathlib.Path, kind: str) -> None:
  """Damages the checkpoint folder `step_dir` in one of the ways of `DAMAGE`."""
  arrays = sorted((step_dir / "state").glob("ocdbt.process_*/d/*"), key=lambda p: p.stat().st_size)
  positions = sorted((step_dir / "data").glob("*.json"))
  assert arrays and positions, f"{step_dir} is not a complete checkpoint"
  largest = arrays[-1]
  if kind == "missing_state":
    shutil.rmtree(step_dir / "state")
  elif kind == "missing_data":
    shutil.rmtree(step_dir / "data")
  elif kind == "truncated_array":  # as a write cut short leaves them
    # Every data file: which file holds which array varies from run to run (OCDBT's writers),
    # and a file may hold bytes no array of the restore reads.
    for array in arrays:
      os.truncate(array, array.stat().st_size // 2)
  elif kind == "garbage_array":
    largest.write_bytes(random.Random(0).randbytes(largest.stat().st_size))
  elif kind == "garbage_iterator_json":  # not JSON at all
    positions[0].write_text('{"parent_window_start_state": {"par')
  elif kind == "wrong_iterator_state":  # JSON that grain applies halfway before it fails
    state = json.loads(positions[0].read_text())
    positions[0].write_text(json.dumps({**state, "pos_in_window": "x"}))
  elif kind == "empty_step_folder":
    shutil.rmtree(step_dir)
    step_dir.mkdir()
  else:
    raise ValueError(f"unknown damage {kind!r}")


# kind -> what the warning says about it
DAMAGE = {
    "missing_state": "state/: FileNotFoundError",
    "missing_data": "data/process_0-of-1.json: ValueError",
    "truncated_array": "state/: ValueError: OUT_OF_RANGE",
    "garbage_array": "state/: ValueError",
    "garbage_iterator_json": "data/process_0-of-1.json: JSONDecodeError",
    "wrong_iterator_state": "data/process_0-of-1.json: TypeError",
    "empty_step_folder": "state/: FileNotFoundError",
}


def _warning_lines(stderr: str, step: int) -> list[str]:
  return [line for line in stderr.splitlines()
          if line.startswith(f"moejax: checkpoint {step} at ") and "does not restore" in line]


# ----------------------------------------------------------------------------- Checkpointer


@pytest.fixture(scope="module")
def pipeline(ptb_dir):
  """A function giving a fresh training iterator of the PTB fixture."""
  config = switch_small.get_config("tiny")
  config.data.update(name="ptb", data_dir=ptb_dir, shuffle_window=SHUFFLE_WINDOW)
  experiment = config_lib.experiment_config_from(config)
  tokenizer = data_lib.prepare(experiment.data)
  return lambda: data_lib.train_iterator(experiment.data, tokenizer, batch_size=8)


def _tree(step: int) -> dict[str, jax.Array]:
  # Random values: zstd would squeeze constants into a few bytes, leaving nothing to truncate.
  w = jax.random.normal(jax.random.key(step), (128, 128), jnp.float32)
  return {"step": jnp.int32(step), "w": w}


def _save_steps(directory, iterator, steps) -> dict[int, dict]:
  """Checkpoints `steps`, one batch apart; returns, per step, the batch that follows it."""
  checkpointer = checkpoint.Checkpointer(directory, max_to_keep=5)
  following = {}
  for step in steps:
    next(iterator)
    checkpointer.save(step, _tree(step), iterator)
    checkpointer.wait_until_finished()
    following[step] = _peek(iterator)
  checkpointer.close()
  return following


def _peek(iterator) -> dict:
  """The batch after `iterator`'s position; the iterator stays where it is."""
  state = iterator.get_state()
  batch = next(iterator)
  iterator.set_state(state)
  return batch


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_restore_latest_skips_a_damaged_newest_checkpoint(kind, pipeline, tmp_path, capfd):
  directory = tmp_path / "checkpoints"
  following = _save_steps(directory, pipeline(), [1, 2, 3])
  damage(directory / "3", kind)

  checkpointer = checkpoint.Checkpointer(directory, max_to_keep=5)
  iterator = pipeline()
  step, state = checkpointer.restore_latest(checkpoint.abstract_like(_tree(0)), iterator)
  assert step == 2
  np.testing.assert_array_equal(state["w"], _tree(2)["w"])
  for key, value in next(iterator).items():  # the data position of step 2, not 3 or 0
    np.testing.assert_array_equal(value, following[2][key])
  # Set aside, not deleted, and out of Orbax's sight; step 3 can be saved again.
  assert checkpointer.all_steps() == [1, 2]
  assert checkpoint.Checkpointer(directory).all_steps() == [1, 2]
  assert (tmp_path / "checkpoints_damaged" / "3").is_dir()
  assert checkpointer.save(3, _tree(3), iterator)
  checkpointer.close()
  assert checkpoint.Checkpointer(directory).all_steps() == [1, 2, 3]
  lines = _warning_lines(capfd.readouterr().err, 3)
  assert lines and all(DAMAGE[kind] in line for line in lines), lines
  assert f"moved it to {tmp_path / 'checkpoints_damaged' / '3'}" in lines[0]


def test_restore_latest_with_no_checkpoint_that_restores_starts_the_data_afresh(
    pipeline, tmp_path, capfd):
  directory = tmp_path / "checkpoints"
  _save_steps(directory, pipeline(), [1, 2])
  for step in (1, 2):
    damage(directory / str(step), "wrong_iterator_state")
  (tmp_path / "checkpoints_damaged" / "2").mkdir(parents=True)  # set aside once before

  checkpointer = checkpoint.Checkpointer(directory)
  iterator = pipeline()
  assert checkpointer.restore_latest(checkpoint.abstract_like(_tree(0)), iterator) is None
  checkpointer.close()
  # The failed attempts half-applied a bad position; the iterator is back at its start.
  for key, value in next(iterator).items():
    np.testing.assert_array_equal(value, next(pipeline())[key])
  assert sorted(p.name for p in (tmp_path / "checkpoints_damaged").iterdir()) == ["1", "2",
                                                                                  "2-2"]
  err = capfd.readouterr().err
  assert _warning_lines(err, 2) and _warning_lines(err, 1)
  assert "training starts from step 0" in err


_FAILING_SAVE = """
import resource, signal, sys
import jax, jax.numpy as jnp
from moejax import checkpoint
directory, limit = sys.argv[1], int(sys.argv[2])
tree = {"w": jax.random.normal(jax.random.key(0), (256, 256), jnp.float32)}  # 256 KiB
checkpointer = checkpoint.Checkpointer(directory)
checkpointer.save(1, tree)
checkpointer.wait_until_finished()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
print("save 2 started:", checkpointer.save(2, tree), flush=True)
try:
  checkpointer.save(3, tree)
except checkpoint.CheckpointError as error:
  print(f"save 3 raised: {error}", flush=True)
checkpointer.close()
print("closed", flush=True)
"""


def test_a_save_that_fails_in_the_background_is_reported_once_before_the_next_save(tmp_path):
  directory = tmp_path / "checkpoints"
  # One device, and the code generation of this process (the test compares random numbers).
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags))
  run = subprocess.run([sys.executable, "-c", _FAILING_SAVE, str(directory), "100000"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=180)
  assert run.returncode == 0, run.stderr
  lines = run.stdout.splitlines()
  assert lines[0] == "save 2 started: True" and lines[-1] == "closed", run.stdout
  assert lines[1].startswith(f"save 3 raised: saving checkpoint 2 to {directory / '2'} failed: "
                             f"[Errno 27] File too large: '{directory}/2.orbax-checkpoint-tmp/")
  assert lines[1].endswith("the earlier checkpoint (1) is intact.")
  # Orbax's own tracebacks for the failed write (hundreds of lines) are not shown.
  assert "Traceback" not in run.stderr and len(run.stderr.splitlines()) < 5, run.stderr
  checkpointer = checkpoint.Checkpointer(directory)
  assert checkpointer.all_steps() == [1]
  restored = checkpointer.restore(1, checkpoint.abstract_like({"w": jnp.zeros((256, 256))}))
  checkpointer.close()
  np.testing.assert_array_equal(restored["w"],
                                jax.random.normal(jax.random.key(0), (256, 256), jnp.float32))


# ----------------------------------------------------------------------------- the trainer


def _records(workdir) -> dict[int, dict]:
  """metrics.jsonl by step, throughput and FLOP/s (timing, not results) left out."""
  return {r["step"]: {k: v for k, v in r.items()
                      if "tokens_per_sec" not in k and not k.startswith("perf/")}
          for r in metrics.read_jsonl(pathlib.Path(workdir) / "metrics.jsonl")}


def _assert_same_run(workdir, expected: dict[int, dict]) -> None:
  steps = [r["step"] for r in metrics.read_jsonl(pathlib.Path(workdir) / "metrics.jsonl")]
  assert steps == list(range(1, NUM_STEPS + 1))  # each step once, in order
  got = _records(workdir)
  assert len({r["train/loss"] for r in expected.values()}) == NUM_STEPS  # the loss moves
  for step, record in expected.items():
    assert got[step] == record, step  # bitwise, as logged


def _config(ptb_dir):
  """The tiny experiment with dropout and router jitter (exact resume needs the random streams)."""
  config = switch_small.get_config("tiny")
  config.data.update(name="ptb", data_dir=ptb_dir, shuffle_window=SHUFFLE_WINDOW)
  config.mesh.update(data=2, expert=4)
  config.model.dropout_rate = 0.1
  config.model.moe.router.jitter_eps = 0.05
  config.optimizer.decay_steps = NUM_STEPS
  config.train.update(num_steps=NUM_STEPS, checkpoint_every=1, max_checkpoints=3, log_every=1,
                      eval_batches=1)
  return config


@pytest.fixture(scope="module")
def finished_run(ptb_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("finished")
  train.train_and_evaluate(_config(ptb_dir), workdir)
  return workdir, _records(workdir)


def _resume_damaged(ptb_dir, finished_run, tmp_path, capfd, kinds_by_step):
  source, expected = finished_run
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  for step, kind in kinds_by_step.items():
    damage(workdir / "checkpoints" / str(step), kind)
  capfd.readouterr()
  result = train.train_and_evaluate(_config(ptb_dir), workdir)
  assert result["step"] == NUM_STEPS
  _assert_same_run(workdir, expected)
  assert checkpoint.Checkpointer(workdir / "checkpoints").all_steps() == [4, 5, 6]
  err = capfd.readouterr().err
  for step, kind in kinds_by_step.items():
    assert (workdir / "checkpoints_damaged" / str(step)).is_dir()
    lines = _warning_lines(err, step)
    assert lines and DAMAGE[kind] in lines[0], err


def test_trainer_resumes_from_the_checkpoint_before_a_truncated_one(
    ptb_dir, finished_run, tmp_path, capfd):
  _resume_damaged(ptb_dir, finished_run, tmp_path, capfd, {6: "truncated_array"})


@pytest.mark.slow  # a resumed run per kind of damage: about 5 s each
@pytest.mark.parametrize("kind", sorted(set(DAMAGE) - {"truncated_array"}))
def test_trainer_resumes_from_the_checkpoint_before_a_damaged_one(
    kind, ptb_dir, finished_run, tmp_path, capfd):
  _resume_damaged(ptb_dir, finished_run, tmp_path, capfd, {6: kind})


@pytest.mark.slow
def test_trainer_skips_two_damaged_checkpoints(ptb_dir, finished_run, tmp_path, capfd):
  _resume_damaged(ptb_dir, finished_run, tmp_path, capfd,
                  {6: "garbage_iterator_json", 5: "missing_state"})


# ----------------------------------------------------------------------------- subprocesses


def _flags(workdir, ptb_dir, num_steps=NUM_STEPS) -> list[str]:
  """moejax.main's flags for `_config`'s run (the mesh aside: all devices on the data axis)."""
  return ["--config=experiments/switch_small.py:tiny", f"--workdir={workdir}",
          "--config.data.name=ptb", f"--config.data.data_dir={ptb_dir}",
          "--config.model.dropout_rate=0.1", "--config.model.moe.router.jitter_eps=0.05",
          f"--config.optimizer.decay_steps={NUM_STEPS}", f"--config.train.num_steps={num_steps}",
          "--config.train.checkpoint_every=1", "--config.train.max_checkpoints=3",
          "--config.train.eval_batches=1", f"--config.data.shuffle_window={SHUFFLE_WINDOW}"]


def _cli(workdir, ptb_dir, num_steps=NUM_STEPS, *, file_size_limit=None) -> list[str]:
  """`python -m moejax.main` for `_flags`'s run, with writes limited to `file_size_limit` bytes
  per file if given."""
  flags = _flags(workdir, ptb_dir, num_steps)
  if file_size_limit is None:
    return [sys.executable, "-m", "moejax.main", *flags]
  limited = ("import resource, runpy, signal, sys\n"
             "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
             f"resource.setrlimit(resource.RLIMIT_FSIZE, ({file_size_limit}, "
             "resource.RLIM_INFINITY))\n"
             "sys.argv[0] = 'moejax.main'\n"
             "runpy.run_module('moejax.main', run_name='__main__', alter_sys=True)\n")
  return [sys.executable, "-c", limited, *flags]


def _env(compile_cache, *, write_cache=True) -> dict[str, str]:
  # A run whose writes fail must not write the shared compilation cache: an entry cut short at
  # the size limit would stay there, truncated.
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="",
              JAX_COMPILATION_CACHE_DIR=str(compile_cache),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0" if write_cache else "1e9")


def _run(command, env, timeout=300) -> subprocess.CompletedProcess:
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


@pytest.fixture(scope="module")
def cli_run(ptb_dir, tmp_path_factory, compile_once):
  """The uninterrupted run, as the command line runs it."""
  workdir = tmp_path_factory.mktemp("cli_uninterrupted")
  done = _run(_cli(workdir, ptb_dir), _env(compile_once))
  assert done.returncode == 0, done.stderr
  return workdir, _records(workdir)


@pytest.mark.slow  # three command-line runs: about a minute
def test_a_failing_disk_stops_the_run_with_one_line_and_keeps_the_earlier_checkpoints(
    ptb_dir, cli_run, tmp_path, compile_once):
  source, expected = cli_run
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  for step in (5, 6):  # as if stopped after step 4
    shutil.rmtree(workdir / "checkpoints" / str(step))
  limit = 150_000  # bytes per file: the small files pass, the largest array file does not
  assert max(p.stat().st_size for p in (workdir / "checkpoints").rglob("*") if p.is_file()) > limit

  failed = _run(_cli(workdir, ptb_dir, 1000, file_size_limit=limit),
                _env(compile_once, write_cache=False))
  assert failed.returncode != 0
  last = failed.stderr.strip().splitlines()[-1]
  assert last.startswith(f"moejax: saving checkpoint 5 to {workdir / 'checkpoints' / '5'} "
                         f"failed: [Errno 27] File too large: '{workdir / 'checkpoints'}/5."), last
  assert last.endswith("the earlier checkpoint (4) is intact."), last
  assert "Traceback" not in failed.stderr, failed.stderr
  assert max(_records(workdir)) <= 6  # stopped at the next save, not at the end of the run
  assert checkpoint.Checkpointer(workdir / "checkpoints").all_steps() == [4]

  resumed = _run(_cli(workdir, ptb_dir), _env(compile_once))
  assert resumed.returncode == 0, resumed.stderr
  _assert_same_run(workdir, expected)


@pytest.mark.slow  # two command-line runs: about a minute
def test_a_full_disk_stops_the_run_with_one_line_and_a_rerun_resumes(
    ptb_dir, cli_run, tmp_path, compile_once):
  """A real ENOSPC: the workdir on a tmpfs (mounted in a user and mount namespace, `unshare -rm`)
  with room for two and a half checkpoints, so that it fills up while step 3 is saved."""
  source, expected = cli_run
  checkpoint_bytes = sum(p.stat().st_size for p in (source / "checkpoints" / "6").rglob("*")
                         if p.is_file())
  disk, copy = tmp_path / "small_disk", tmp_path / "copy"
  disk.mkdir()
  probe = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "none", str(disk)],
                         capture_output=True, text=True, check=False)
  if probe.returncode != 0:
    pytest.skip(f"no tmpfs in a user namespace here (unshare -rm mount: {probe.stderr.strip()})")
  workdir = disk / "run"
  script = (f"mount -t tmpfs -o size={int(2.5 * checkpoint_bytes) + 100_000} none {disk} && "
            f"{shlex.join(_cli(workdir, ptb_dir, 1000))}; status=$?; "
            f"cp -r {workdir} {copy}; exit $status")  # the tmpfs goes with the namespace
  failed = _run(["unshare", "-rm", "sh", "-c", script], _env(compile_once))
  assert failed.returncode == 1, failed.stderr
  last = failed.stderr.strip().splitlines()[-1]
  assert last.startswith(f"moejax: saving checkpoint 3 to {workdir / 'checkpoints' / '3'} "
                         "failed: [Errno 28] No space left on device: "
                         f"'{workdir / 'checkpoints'}/3."), last
  assert last.endswith("the earlier checkpoints (1, 2) are intact."), last
  assert "Traceback" not in failed.stderr, failed.stderr
  assert max(_records(copy)) <= 4  # stopped at the next save

  resumed = _run(_cli(copy, ptb_dir), _env(compile_once))
  assert resumed.returncode == 0, resumed.stderr
  _assert_same_run(copy, expected)


def _kill_while_running(proc, workdir, *, after_step: int, delay: float, during_save: bool
                        ) -> dict:
  """SIGKILLs `proc` once `after_step` steps are logged: after `delay` seconds, or (with
  `during_save`) as soon as a checkpoint is being written. Returns where the kill landed."""
  jsonl, checkpoints = workdir / "metrics.jsonl", workdir / "checkpoints"
  deadline = time.time() + 240

  def logged():
    return len(jsonl.read_text().splitlines()) if jsonl.exists() else 0

  def writing():
    return checkpoints.exists() and any("tmp" in p.name for p in checkpoints.iterdir())

  while logged() < after_step and proc.poll() is None and time.time() < deadline:
    time.sleep(0.005)
  if during_save:
    until = time.time() + 5
    while not writing() and proc.poll() is None and time.time() < until:
      time.sleep(0.001)
  else:
    time.sleep(delay)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  return {"killed": proc.returncode == -signal.SIGKILL, "logged": logged(),
          "during_save": writing()}


@pytest.mark.slow  # two command-line runs per trial: about 30 s each
def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_run(
    ptb_dir, cli_run, tmp_path, compile_once):
  _, expected = cli_run
  rng = random.Random(SEED)
  landed = []
  for trial in range(TRIALS):
    workdir = tmp_path / f"trial_{trial}"
    proc = subprocess.Popen(_cli(workdir, ptb_dir), cwd=REPO, env=_env(compile_once),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    landed.append(_kill_while_running(proc, workdir, after_step=rng.randint(1, NUM_STEPS - 1),
                                      delay=rng.uniform(0.0, 0.3), during_save=trial % 2 == 1))
    rerun = _run(_cli(workdir, ptb_dir), _env(compile_once))
    assert rerun.returncode == 0, (landed[-1], rerun.stderr)
    _assert_same_run(workdir, expected)
  print(f"kills (seed {SEED}): {landed}")
  assert all(trial["killed"] for trial in landed), landed
  if TRIALS >= 2:
    assert any(trial["during_save"] for trial in landed), landed


@pytest.mark.slow  # two runs of two processes: about 2 minutes
def test_processes_agree_on_the_step_when_a_checkpoint_fails_on_one_of_them(
    ptb_dir, tmp_path, compile_once):
  """Process 1's iterator position of the newest checkpoint is garbage, process 0's is fine:
  both must skip that checkpoint, or they would train on from different steps."""
  workdir, logs = tmp_path / "run", tmp_path / "logs"
  env = {k: v for k, v in os.environ.items() if not k.startswith(("MOEJAX_", "JAX_", "XLA_"))}
  env.update(PYTHON=sys.executable, MOEJAX_LOG_DIR=str(logs),
             JAX_COMPILATION_CACHE_DIR=str(compile_once),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  command = ["bash", "launch/local.sh", "2", *_flags(workdir, ptb_dir, 3)]
  first = _run(command, env)
  assert first.returncode == 0, first.stdout + first.stderr
  loss_3 = _records(workdir)[3]["train/loss"]
  (workdir / "checkpoints" / "3" / "data" / "process_1-of-2.json").write_text("{garbage")

  rerun = _run(command, env)
  assert rerun.returncode == 0, rerun.stdout + rerun.stderr
  step_dir = workdir / "checkpoints" / "3"
  assert (f"moejax: checkpoint 3 at {step_dir} does not restore (it failed on process(es) [1]); "
          f"moved it to {tmp_path / 'run' / 'checkpoints_damaged' / '3'}") in rerun.stderr
  assert (f"moejax: process 1: checkpoint 3 at {step_dir} does not restore (data/"
          "process_1-of-2.json: JSONDecodeError") in (logs / "process_1.log").read_text()
  steps = [r["step"] for r in metrics.read_jsonl(workdir / "metrics.jsonl")]
  assert steps == [1, 2, 3]  # both resumed from step 2: step 3 once, trained again
  assert _records(workdir)[3]["train/loss"] == loss_3
  assert checkpoint.Checkpointer(workdir / "checkpoints").all_steps() == [1, 2, 3]
