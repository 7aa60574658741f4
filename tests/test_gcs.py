"""Workdirs on Cloud Storage: every file the trainer writes, on gs:// served by a local emulator.

The emulator (`gcs_emulator.py`: gcp-storage-emulator in a process of its own) serves one bucket
for the module; the clients find it through the environment, set here for this process and
passed on to the trainer's. Nothing is mocked: gcsfs, TensorStore (Orbax's arrays), TensorBoard's
reader and moejax's writers all speak HTTP to the emulator.
"""

import json
import os
import pathlib
import subprocess
import sys
import time
import uuid

import gcs_emulator
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from tensorboard.backend.event_processing import event_accumulator

from moejax import checkpoint, lock, metrics, storage
from moejax.profiler import StepProfiler
REPO = pathlib.Path(__file__).resolve().parents[1]
BUCKET = "moejax-test"


@pytest.fixture(scope="module")
def gcs_env():
  """The emulator's client environment, set in os.environ for the module's tests."""
  with gcs_emulator.serve(BUCKET) as env, pytest.MonkeyPatch.context() as patch:
    for name, value in env.items():
      patch.setenv(name, value)
    yield env


@pytest.fixture
def gcs_dir(gcs_env):
  """A fresh gs:// folder in the emulator's bucket."""
  return epath.Path(f"gs://{BUCKET}/{uuid.uuid4().hex[:12]}")


def _objects(folder: epath.Path) -> list[str]:
  """Every object under `folder`, as paths relative to it."""
  import gcsfs  # pylint: disable=g-import-not-at-top
  prefix = os.fspath(folder).removeprefix("gs://")
  return sorted(p.removeprefix(prefix + "/") for p in gcsfs.GCSFileSystem().find(prefix))


# ----------------------------------------------------------------------------- storage


def test_appending_to_an_object_keeps_what_it_held(gcs_dir):
  path = gcs_dir / "log.txt"
  first = storage.open_append(path)
  first.write(b"one\n")
  first.close()
  second = storage.open_append(path, upload_every=3600)
  second.write(b"two\n")
  assert path.read_bytes() == b"one\n"  # not uploaded yet: an object changes whole
  second.flush()
  assert path.read_bytes() == b"one\ntwo\n"
  second.write(b"three\n")
  second.close()
  assert path.read_bytes() == b"one\ntwo\nthree\n"


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_upload_interval_from_the_environment_is_checked(monkeypatch, value):
  monkeypatch.setenv(storage.UPLOAD_EVERY_VARIABLE, value)
  with pytest.raises(ValueError, match=f"MOEJAX_UPLOAD_EVERY_SECONDS='{value}' must be a number"):
    storage.open_append("gs://bucket/log.txt")


def test_appending_uploads_once_the_interval_has_passed(gcs_dir, monkeypatch):
  monkeypatch.setenv(storage.UPLOAD_EVERY_VARIABLE, "0.5")
  path = gcs_dir / "log.txt"
  appender = storage.open_append(path)
  appender.write(b"a")
  assert not path.exists()
  time.sleep(0.6)
  appender.write(b"b")
  assert path.read_bytes() == b"ab"
  appender.close()


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_create_exclusive_creates_only_once(tmp_path, gcs_dir, where):
  path = (gcs_dir if where == "gcs" else epath.Path(tmp_path)) / "run.lock"
  assert storage.create_exclusive(path, "first")
  assert not storage.create_exclusive(path, "second")
  assert path.read_text() == "first"


def test_replace_text_replaces_an_object(gcs_dir):
  path = gcs_dir / "config.json"
  storage.replace_text(path, "old")
  storage.replace_text(path, "new")
  assert path.read_text() == "new"
  assert _objects(gcs_dir) == ["config.json"]  # no temporary left beside it


def test_move_tree_moves_a_folder_to_a_parent_that_has_no_objects_yet(gcs_dir):
  (gcs_dir / "checkpoints" / "3" / "state").mkdir(parents=True, exist_ok=True)
  (gcs_dir / "checkpoints" / "3" / "state" / "a").write_text("a")
  (gcs_dir / "checkpoints" / "3" / "b").write_text("b")
  (gcs_dir / "checkpoints" / "4" / "b").write_text("b")
  storage.move_tree(gcs_dir / "checkpoints" / "3", gcs_dir / "checkpoints_damaged" / "3")
  assert _objects(gcs_dir) == ["checkpoints/4/b", "checkpoints_damaged/3/b",
                               "checkpoints_damaged/3/state/a"]


# ----------------------------------------------------------------------------- the lock


def test_workdir_lock_on_gcs_is_exclusive_and_released(gcs_dir):
  with lock.WorkdirLock(gcs_dir) as held:
    assert json.loads(held.path.read_text())["pid"] == os.getpid()
    with pytest.raises(lock.WorkdirLockedError, match=f"pid {os.getpid()}"):
      lock.WorkdirLock(gcs_dir).acquire()
  assert not (gcs_dir / lock.LOCK_FILE).exists()
  with lock.WorkdirLock(gcs_dir):  # free again
    pass


def test_workdir_lock_on_gcs_takes_over_a_dead_holders_lock(gcs_dir):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  this_process = lock._this_process()  # pylint: disable=protected-access
  (gcs_dir / lock.LOCK_FILE).write_text(json.dumps(
      {**this_process, "pid": int(dead.stdout), "pid_start": 1}))
  with lock.WorkdirLock(gcs_dir) as held:
    assert json.loads(held.path.read_text())["pid"] == os.getpid()


# ----------------------------------------------------------------------------- metric writers


def test_metric_writers_resume_on_gcs(gcs_dir):
  """An interrupted run's records after its checkpoint are dropped, those before it kept, in
  both files; the files are readable where TensorBoard and moejax read them."""
  first = metrics.create_writers(gcs_dir, process_index=0)
  for step in (1, 2, 3):
    first.write_scalars(step, {"train/loss": 10.0 - step})
  first.close()
  resumed = metrics.create_writers(gcs_dir, process_index=0, resume_step=2)
  for step in (3, 4):
    resumed.write_scalars(step, {"train/loss": 1.0 / step})
  resumed.close()
  records = metrics.read_jsonl(gcs_dir / "metrics.jsonl")
  assert [(r["step"], r["train/loss"]) for r in records] == [
      (1, 9.0), (2, 8.0), (3, 1 / 3), (4, 0.25)]
  accumulator = event_accumulator.EventAccumulator(os.fspath(gcs_dir / "tensorboard"))
  accumulator.Reload()
  logged = [(e.step, e.value) for e in accumulator.Scalars("train/loss")]
  assert logged == [(1, 9.0), (2, 8.0), (3, np.float32(1 / 3)), (4, 0.25)]


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoints_on_gcs_restore_and_a_damaged_one_is_set_aside(gcs_dir):
  mesh = jax.make_mesh((8,), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  tree = {"w": jax.device_put(jnp.arange(64.0).reshape(16, 4), sharding), "step": jnp.int32(1)}
  saver = checkpoint.Checkpointer(gcs_dir / "checkpoints")
  saver.save(1, tree)
  saver.save(2, {**tree, "w": tree["w"] * 2, "step": jnp.int32(2)})
  saver.close()
  (gcs_dir / "checkpoints" / "2" / "state").rmtree()  # checkpoint 2 no longer restores
  reader = checkpoint.Checkpointer(gcs_dir / "checkpoints")
  abstract = checkpoint.abstract_like(tree, mesh)
  step, restored = reader.restore_latest(abstract)
  reader.close()
  assert step == 1
  np.testing.assert_array_equal(restored["w"], tree["w"])
  assert restored["w"].sharding == sharding
  assert "checkpoints_damaged/2/commit_success.txt" in _objects(gcs_dir)
  assert not any(p.startswith("checkpoints/2/") for p in _objects(gcs_dir))


def test_an_unfinished_checkpoint_on_gcs_is_ignored_and_saved_again(gcs_dir):
  """A save killed midway leaves a step folder without commit_success.txt (Orbax writes in place
  on Cloud Storage): it is not a checkpoint, and the step can be saved again over it."""
  tree = {"w": jnp.ones(4)}
  saver = checkpoint.Checkpointer(gcs_dir / "checkpoints")
  saver.save(1, tree)
  saver.close()
  (gcs_dir / "checkpoints" / "2" / "state" / "d").mkdir(parents=True, exist_ok=True)
  (gcs_dir / "checkpoints" / "2" / "state" / "d" / "partial").write_text("cut short")
  saver = checkpoint.Checkpointer(gcs_dir / "checkpoints")
  assert saver.all_steps() == [1]
  saver.save(2, {"w": tree["w"] * 2})
  saver.close()
  reader = checkpoint.Checkpointer(gcs_dir / "checkpoints")
  step, restored = reader.restore_latest(checkpoint.abstract_like(tree))
  reader.close()
  assert step == 2
  np.testing.assert_array_equal(restored["w"], 2 * np.ones(4))


def test_a_profile_trace_reaches_a_gcs_workdir(gcs_dir):
  """jaxlib writes traces with its own Cloud Storage client, which cannot be pointed at another
  endpoint; moejax traces to a local folder and uploads it (here: to the emulator)."""
  profiler = StepProfiler(gcs_dir / "tensorboard", first_step=1, start_step=2, steps=1)
  profiler.before(2)
  result = jnp.arange(1000.0) @ jnp.arange(1000.0)
  profiler.after(2, result)
  traces = [p for p in _objects(gcs_dir) if p.endswith(".xplane.pb")]
  assert len(traces) == 1 and traces[0].startswith("tensorboard/plugins/profile/")
  assert (gcs_dir / traces[0]).stat().length > 0


# ----------------------------------------------------------------------------- the trainer


def _committed_steps(folder: epath.Path) -> list[int]:
  """The steps of the finished checkpoints under folder/checkpoints (Orbax marks each one on
  Cloud Storage with a commit_success.txt in its step folder)."""
  return sorted(int(p.split("/")[1]) for p in _objects(folder)
                if p.startswith("checkpoints/") and p.endswith("/commit_success.txt")
                and p.count("/") == 2)


@pytest.mark.slow  # two trainer processes: ~2 min on a busy 2-core machine, as on a local workdir
def test_training_on_gcs_resumes_after_a_kill(gcs_env, gcs_dir, ptb_dir, compile_once):
  """`python -m moejax.main --workdir=gs://...` is killed (SIGKILL, as a lost VM) once it has
  saved a checkpoint; the same command resumes from its newest checkpoint: the run's lock is
  taken over, and every step is logged once, in metrics.jsonl and TensorBoard alike.

  The metric files are uploaded only when flushed (no uploads by time): the trainer must flush
  them before each checkpoint for the killed run's steps up to it to be there."""
  env = {**os.environ, **gcs_env, storage.UPLOAD_EVERY_VARIABLE: "1e9", "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_COMPILATION_CACHE_DIR": str(compile_once),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}

  def command(num_steps):
    return [sys.executable, "-m", "moejax.main", "--config=experiments/switch_small.py:tiny",
            f"--workdir={gcs_dir}", "--config.data.name=ptb", f"--config.data.data_dir={ptb_dir}",
            "--config.mesh.data=2", "--config.mesh.expert=4",
            f"--config.train.num_steps={num_steps}", "--config.train.log_every=1",
            "--config.train.checkpoint_every=2", "--config.train.eval_every=0",
            "--config.train.eval_batches=1", "--config.train.max_checkpoints=100"]

  first = subprocess.Popen(command(100_000), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while first.poll() is None and time.time() < deadline and not _committed_steps(gcs_dir):
    time.sleep(0.5)
  first.kill()
  _, errors = first.communicate()
  assert first.returncode == -9, errors
  saved = _committed_steps(gcs_dir)
  assert saved, "no checkpoint was saved before the deadline"
  assert (gcs_dir / lock.LOCK_FILE).exists()  # a killed run cannot remove its lock

  last = saved[-1] + 2
  resumed = subprocess.run(command(last), cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  assert "taking over the lock of a run that no longer runs" in resumed.stderr
  assert f"step {last}: validation loss" in resumed.stdout
  records = metrics.read_jsonl(gcs_dir / "metrics.jsonl")
  assert [r["step"] for r in records] == list(range(1, last + 1))
  assert all(np.isfinite(r["train/loss"]) for r in records)
  assert _committed_steps(gcs_dir) == [*saved, last]  # the resumed run saved at `last` once
  assert json.loads((gcs_dir / "config.json").read_text())["train"]["num_steps"] == last
  assert not (gcs_dir / lock.LOCK_FILE).exists()  # released at the end
  accumulator = event_accumulator.EventAccumulator(os.fspath(gcs_dir / "tensorboard"))
  accumulator.Reload()
  assert [e.step for e in accumulator.Scalars("train/loss")] == list(range(1, last + 1))
