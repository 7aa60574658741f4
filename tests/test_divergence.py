"""Divergence: a run whose loss or gradient norm turns non-finite stops, names the step and keeps
its finite checkpoints.

The diverging run is real: AdamW's decoupled weight decay with learning_rate * weight_decay = 10
multiplies every matrix by (1 - 10) = -9 per step on top of the update, and with clipping off the
parameters and then the gradients overflow float32 after about a dozen steps of the tiny model.
"""

import math
import os
import pathlib
import subprocess
import sys
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import switch_small
from moejax import checkpoint, divergence, metrics, train

REPO = pathlib.Path(__file__).resolve().parents[1]
WATCHED = ("train/loss", "train/grad_norm")
DIVERGING = dict(learning_rate=10.0, weight_decay=1.0, clip_norm=0.0, schedule="constant",
                 warmup_steps=0)

pytestmark = pytest.mark.usefixtures("compile_once")


def diverging_config(data_dir, **train_overrides):
  config = switch_small.get_config("tiny")
  config.data.update(name="ptb", data_dir=data_dir)
  config.mesh.update(data=2, expert=4)
  config.train.update(num_steps=30, checkpoint_every=4, max_checkpoints=2, **train_overrides)
  config.optimizer.update(DIVERGING)
  return config


def _finite(record):
  return all(math.isfinite(float(record[name])) for name in WATCHED)  # "nan" -> nan


def _checkpoint_steps(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _assert_all_finite(state_dir):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Orbax: sharding read from the checkpoint's own file
    with ocp.PyTreeCheckpointer() as reader:
      tree = reader.restore(state_dir)
  for path, value in jax.tree_util.tree_leaves_with_path(tree):
    value = np.asarray(value)
    if value.dtype.kind == "f":
      assert np.isfinite(value).all(), (state_dir, jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def checked_every_step(ptb_dir, tmp_path_factory):
  """The diverging run, logged (and so checked) at every step."""
  workdir = tmp_path_factory.mktemp("every_step")
  with pytest.raises(divergence.NonFiniteError) as raised:
    train.train_and_evaluate(diverging_config(ptb_dir, log_every=1), workdir)
  return workdir, raised.value


def test_a_run_checked_every_step_stops_at_its_first_non_finite_step(checked_every_step):
  workdir, error = checked_every_step
  logged = [r for r in metrics.read_jsonl(workdir / "metrics.jsonl") if "train/loss" in r]
  # Every step up to the failing one is logged, all finite but the last, which shows the values.
  assert [r["step"] for r in logged] == list(range(1, error.step + 1))
  assert all(_finite(r) for r in logged[:-1]) and not _finite(logged[-1])
  assert error.what == tuple(n for n in WATCHED if not math.isfinite(float(logged[-1][n])))
  assert error.step > 8  # mid-run: after two checkpoints
  saved = list(range(4, error.step, 4))[-2:]
  assert _checkpoint_steps(workdir) == saved
  for step in saved:
    _assert_all_finite(workdir / "checkpoints" / str(step) / "state")


def test_a_run_checked_every_ten_steps_names_the_same_first_step_and_saves_nothing_after(
    ptb_dir, checked_every_step, tmp_path):
  _, first = checked_every_step
  with pytest.raises(divergence.NonFiniteError) as raised:
    train.train_and_evaluate(diverging_config(ptb_dir, log_every=10), tmp_path)
  error = raised.value
  assert (error.step, error.what) == (first.step, first.what)
  # Found at the first check after it: the one before the next save (every 4 steps).
  saved = list(range(4, error.step, 4))[-2:]
  checked_at = saved[-1] + 4
  assert str(error).startswith(f"training diverged: {' and '.join(error.what)} not finite at "
                               f"step {error.step} (")
  assert f"(found at the check after step {checked_at})" in str(error)
  assert f"the newest checkpoint, step {saved[-1]} in {tmp_path / 'checkpoints'}" in str(error)
  # The checkpoints from before the divergence were not rotated out by non-finite ones.
  assert _checkpoint_steps(tmp_path) == saved
  for step in saved:
    _assert_all_finite(tmp_path / "checkpoints" / str(step) / "state")
  # Logged: step 10 alone, the one log step before the check that found the divergence.
  assert [r["step"] for r in metrics.read_jsonl(tmp_path / "metrics.jsonl")] == [10]


def test_a_state_with_a_non_finite_array_is_named_and_not_saved(tmp_path):
  checkpointer = checkpoint.Checkpointer(tmp_path / "checkpoints")
  good = {"params": {"w": np.ones((2, 2), np.float32)}, "step": np.int32(3)}
  divergence.check_finite_state(good, step=3, checkpointer=checkpointer)
  checkpointer.save(3, good)
  checkpointer.wait_until_finished()
  bad = {"params": {"w": np.array([[1.0, np.inf], [0.0, 1.0]], np.float32),
                    "b": np.zeros(2, np.float32)}, "step": np.int32(4)}
  with pytest.raises(divergence.NonFiniteError, match=r"at step 4 holds non-finite values in "
                     r"params/w\. Not saved; the newest checkpoint, step 3 ") as raised:
    divergence.check_finite_state(bad, step=4, checkpointer=checkpointer)
  assert raised.value.what == ("params/w",)
  checkpointer.close()


@pytest.mark.slow  # one subprocess that imports and compiles: about 30 s
def test_the_command_exits_non_zero_naming_the_step(ptb_dir, checked_every_step, tmp_path,
                                                    compile_once):
  _, first = checked_every_step
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_COMPILATION_CACHE_DIR=str(compile_once),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  flags = [f"--config.optimizer.{name}={value}" for name, value in DIVERGING.items()]
  run = subprocess.run(
      [sys.executable, "-m", "moejax.main", "--config=experiments/switch_small.py:tiny",
       f"--workdir={tmp_path}", "--config.data.name=ptb", f"--config.data.data_dir={ptb_dir}",
       "--config.mesh.data=2", "--config.mesh.expert=4", "--config.train.num_steps=30",
       "--config.train.checkpoint_every=4", "--config.train.log_every=10", *flags],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode != 0
  assert f"not finite at step {first.step}" in run.stderr
  assert "validation loss" not in run.stdout
