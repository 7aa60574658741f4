"""The trainer: loss, schedules, the pure train step, exact resume, SIGTERM, config errors.

Runs use the real input pipeline on the PTB fixture (tests/fixtures/ptb, 40 training sentences,
word vocabulary) and the "tiny" variant of the experiments (M=32, L=16, 2 layers).
"""

import dataclasses
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tensorboard.backend.event_processing import event_accumulator

from experiments import switch_small
from moejax import config as config_lib
from moejax import data as data_lib
from moejax import metrics, sharding, train
from moejax.optim import OptimizerConfig, learning_rate_schedule

REPO = pathlib.Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("compile_once")


def tiny_config(data_dir, **train_overrides):
  config = switch_small.get_config("tiny")
  config.data.name = "ptb"
  config.data.data_dir = data_dir
  # Expert parallelism over the 8 simulated devices: two data rows of four expert shards.
  config.mesh.update(data=2, expert=4)
  config.train.update(train_overrides)
  return config


# ----------------------------------------------------------------------------- pure pieces


def test_token_loss_matches_hand_computed_values():
  # Row 0: logits (0, 0), target 1: -log(1/2) = log 2.
  # Row 1: logits (log 3, 0), target 0: p = 3/4, -log(3/4) = log(4/3).
  logits_BLV = jnp.array([[[0.0, 0.0], [math.log(3.0), 0.0]]])
  targets_BL = jnp.array([[1, 0]])
  total, count = train.token_loss(logits_BLV, targets_BL, jnp.array([[True, True]]))
  np.testing.assert_allclose(total, math.log(2) + math.log(4 / 3), rtol=1e-6)
  assert float(count) == 2.0
  total, count = train.token_loss(logits_BLV, targets_BL, jnp.array([[True, False]]))
  np.testing.assert_allclose(total, math.log(2), rtol=1e-6)
  assert float(count) == 1.0


def test_step_rngs_are_a_function_of_the_step():
  rngs = {"a": {"key": jax.random.key(1), "count": jnp.uint32(5)},
          "b": {"key": jax.random.key(2), "count": jnp.uint32(0)}}
  at_3 = train.step_rngs(rngs, jnp.int32(3))
  again = train.step_rngs(rngs, jnp.int32(3))
  at_4 = train.step_rngs(rngs, jnp.int32(4))
  data = jax.random.key_data
  np.testing.assert_array_equal(data(at_3["a"]["key"]), data(jax.random.fold_in(rngs["a"]["key"],
                                                                                3)))
  np.testing.assert_array_equal(data(at_3["b"]["key"]), data(again["b"]["key"]))
  assert not np.array_equal(data(at_3["a"]["key"]), data(at_4["a"]["key"]))
  assert int(at_3["a"]["count"]) == 0


@pytest.mark.parametrize("schedule, step, expected", [
    # warm-up: lr * (step + 1) / warmup_steps
    ("cosine", 0, 1e-4), ("cosine", 9, 1e-3),
    # cosine over steps 10..110 from 1 down to the floor 0.1
    ("cosine", 10, 1e-3), ("cosine", 60, 1e-3 * (0.1 + 0.9 * 0.5)), ("cosine", 110, 1e-4),
    ("cosine", 500, 1e-4),
    # rsqrt: lr * sqrt(warmup / (step + 1)) after warm-up
    ("rsqrt", 9, 1e-3), ("rsqrt", 39, 1e-3 * 0.5), ("rsqrt", 159, 1e-3 * 0.25),
    ("constant", 0, 1e-4), ("constant", 1000, 1e-3),
])
def test_learning_rate_schedules(schedule, step, expected):
  config = OptimizerConfig(learning_rate=1e-3, warmup_steps=10, schedule=schedule,
                           final_learning_rate_fraction=0.1)
  fn = learning_rate_schedule(config, num_steps=110)
  np.testing.assert_allclose(fn(step), expected, rtol=1e-6)


# ----------------------------------------------------------------------------- whole runs


def _losses(workdir):
  return {r["step"]: r["train/loss"] for r in metrics.read_jsonl(workdir / "metrics.jsonl")}


def _noisy_config(ptb_dir, **train_overrides):
  """Dropout and router jitter on, so that exact resume depends on the random streams too."""
  config = tiny_config(ptb_dir, **{"num_steps": 6, "log_every": 1, **train_overrides})
  config.model.dropout_rate = 0.1
  config.model.moe.router.jitter_eps = 0.05
  config.optimizer.decay_steps = 6  # the same schedule whatever num_steps a shortened run has
  return config


def test_train_step_loss_and_first_adamw_update(ptb_dir):
  """The step's loss against an independent forward pass, and AdamW's first update by hand."""
  config = _noisy_config(ptb_dir)
  experiment = config_lib.experiment_config_from(config)
  tokenizer = data_lib.prepare(experiment.data)
  model_config = dataclasses.replace(experiment.model, vocab_size=tokenizer.vocab_size)
  mesh = sharding.make_mesh(experiment.mesh)
  batch_np = next(data_lib.train_iterator(experiment.data, tokenizer, batch_size=8))
  with jax.set_mesh(mesh):
    state = train.create_train_state(model_config, experiment, mesh)
    params0 = jax.device_get(state.params)
    batch = train.device_batch(batch_np, NamedSharding(mesh, P(("data", "expert"))))

    def reference_loss(params):
      # The step's random streams: dropout and jitter masks as in the train step.
      model = nnx.merge(state.graphdef, params, train.step_rngs(state.rngs, state.step))
      logits, aux = model(batch["inputs"], mask_BL=batch["mask"], train=True)
      log_probs = jax.nn.log_softmax(logits, axis=-1)
      picked = jnp.sum(log_probs * jax.nn.one_hot(batch["targets"], logits.shape[-1]), axis=-1)
      weight = batch["mask"].astype(jnp.float32)
      return -jnp.sum(picked * weight) / jnp.sum(weight) + aux.aux_loss

    expected_loss, grads = jax.jit(jax.value_and_grad(reference_loss))(state.params)
    step_fn, _ = train.compile_steps(state, mesh, P(("data", "expert")))
    new_state, out = step_fn(state, batch)
    new_params = jax.device_get(new_state.params)
  np.testing.assert_allclose(out["train"]["loss"], expected_loss, rtol=1e-5)
  grads = jax.device_get(grads)
  norm = float(optax.tree.norm(grads))
  np.testing.assert_allclose(out["train"]["grad_norm"], norm, rtol=1e-5)
  assert int(new_state.step) == 1
  assert set(out["moe"]) == {"layer_1"}
  # AdamW's first step, lr = 3e-3 * 1/2 (warm-up of 2 steps), gradients clipped to norm 1:
  # m = g, v = g^2 after bias correction, so p' = p - lr * (g / (|g| + eps) + 0.1 * p [matrices]).
  lr, scale = 1.5e-3, min(1.0, 1.0 / norm)

  def expected(p, g):
    g = g * scale
    return p - lr * (g / (np.abs(g) + 1e-8) + (0.1 * p if p.ndim >= 2 else 0.0))

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8),
               new_params, jax.tree.map(expected, params0, grads))


@pytest.fixture(scope="module")
def uninterrupted(ptb_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  result = train.train_and_evaluate(_noisy_config(ptb_dir), workdir)
  return workdir, result


def test_resume_is_bitwise_exact(ptb_dir, uninterrupted, tmp_path):
  full_dir, full_result = uninterrupted
  stopped = train.train_and_evaluate(_noisy_config(ptb_dir, num_steps=3), tmp_path)
  assert stopped["step"] == 3
  resumed = train.train_and_evaluate(_noisy_config(ptb_dir), tmp_path)
  assert resumed["step"] == 6
  full, both = _losses(full_dir), _losses(tmp_path)
  assert sorted(both) == [1, 2, 3, 4, 5, 6]  # each step once: the resumed run starts at 4
  assert len(set(full.values())) == 6  # the loss moves: the comparison below means something
  for step in (4, 5, 6):
    assert both[step] == full[step], step
  assert resumed["eval/loss"] == full_result["eval/loss"]
  accumulator = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
  accumulator.Reload()
  logged = [(e.step, e.value) for e in accumulator.Scalars("train/loss")]
  assert logged == [(step, np.float32(both[step])) for step in range(1, 7)]


def test_resume_after_a_kill_while_a_record_was_being_written(ptb_dir, tmp_path):
  train.train_and_evaluate(_noisy_config(ptb_dir, num_steps=3), tmp_path)
  jsonl = tmp_path / "metrics.jsonl"
  with jsonl.open("a") as f:  # what a kill during the write of step 4's record leaves
    f.write('{"step": 4, "train/loss": 5.')
  train.train_and_evaluate(_noisy_config(ptb_dir), tmp_path)
  lines = jsonl.read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]


def test_rerun_of_a_finished_run_only_evaluates(ptb_dir, uninterrupted):
  workdir, result = uninterrupted
  before = (workdir / "metrics.jsonl").read_text()
  again = train.train_and_evaluate(_noisy_config(ptb_dir), workdir)
  assert again["step"] == 6
  assert again["eval/loss"] == result["eval/loss"]
  assert (workdir / "metrics.jsonl").read_text() == before


def test_tensorboard_holds_the_logged_scalars(uninterrupted):
  workdir, result = uninterrupted
  accumulator = event_accumulator.EventAccumulator(str(workdir / "tensorboard"))
  accumulator.Reload()
  tags = set(accumulator.Tags()["scalars"])
  expected_tags = {"train/loss", "train/aux_loss", "train/learning_rate", "train/grad_norm",
                   "train/tokens_per_sec", "eval/perplexity", "moe/layer_1/router_entropy",
                   "moe/layer_1/dropped_fraction", "moe/layer_1/load_balancing_loss",
                   "moe/layer_1/router_z_loss"}
  expected_tags |= {f"moe/layer_1/expert_load/{e}" for e in range(8)}
  assert expected_tags <= tags
  losses = _losses(workdir)
  logged = {e.step: e.value for e in accumulator.Scalars("train/loss")}
  assert logged == {step: np.float32(loss) for step, loss in losses.items()}
  load = sum(accumulator.Scalars(f"moe/layer_1/expert_load/{e}")[-1].value for e in range(8))
  np.testing.assert_allclose(load, 1.0, rtol=1e-5)
  perplexity = accumulator.Scalars("eval/perplexity")[-1]
  assert perplexity.step == 6
  np.testing.assert_allclose(perplexity.value, math.exp(result["eval/loss"]), rtol=1e-6)
  lr = [e.value for e in accumulator.Scalars("train/learning_rate")]
  np.testing.assert_allclose(lr[:2], [1.5e-3, 3e-3], rtol=1e-6)  # warm-up of 2 steps to 3e-3


def test_checkpoints_hold_state_and_data_position(uninterrupted):
  workdir, _ = uninterrupted
  step_dir = workdir / "checkpoints" / "6"
  assert (step_dir / "state").is_dir()
  assert list((step_dir / "data").glob("process_0-of-1.json"))


@pytest.mark.slow  # two subprocesses that each compile: about a minute
def test_sigterm_saves_and_exits_cleanly_then_resumes(ptb_dir, tmp_path, compile_once):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="",
             JAX_COMPILATION_CACHE_DIR=str(compile_once),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")

  def command(num_steps):
    return [sys.executable, "-m", "moejax.main", "--config=experiments/switch_small.py:tiny",
            f"--workdir={tmp_path}", "--config.data.name=ptb",
            f"--config.data.data_dir={ptb_dir}", f"--config.train.num_steps={num_steps}",
            "--config.train.eval_batches=1"]

  proc = subprocess.Popen(command(100_000), cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  jsonl = tmp_path / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if jsonl.exists() and len(jsonl.read_text().splitlines()) >= 2:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  output, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, output
  assert "stopped by SIGTERM" in output
  stopped_at = max(_losses(tmp_path))
  assert (tmp_path / "checkpoints" / str(stopped_at) / "state").is_dir()

  rerun = subprocess.run(command(stopped_at + 2), cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=240)
  assert rerun.returncode == 0, rerun.stdout + rerun.stderr
  assert sorted(_losses(tmp_path)) == list(range(1, stopped_at + 3))
  assert f"step {stopped_at + 2}: validation loss" in rerun.stdout


def test_first_record_holds_the_parameter_counts(uninterrupted):
  workdir, result = uninterrupted
  counted = [r for r in metrics.read_jsonl(workdir / "metrics.jsonl") if "model/params_total" in r]
  assert [r["step"] for r in counted] == [1]  # the first logged step (log_every=1)
  # By hand from the checkpoint's arrays: the embedding (V, M) and, of the 8 experts of the one
  # top-1 MoE layer (blocks/1/ffn/wi, wo), 7 are inactive for any one token.
  params = _checkpoint_shapes(workdir / "checkpoints" / "6" / "state")["params"]
  total = sum(math.prod(s) for s in jax.tree.leaves(params, is_leaf=lambda x: type(x) is tuple))
  embedding = math.prod(params["embed"])
  experts = math.prod(params["blocks"]["1"]["ffn"]["wi"]) + math.prod(
      params["blocks"]["1"]["ffn"]["wo"])
  assert counted[0]["model/params_total"] == result["model/params_total"] == total
  assert counted[0]["model/params_embedding"] == embedding
  assert counted[0]["model/params_active_per_token"] == total - embedding - experts * 7 // 8


def _checkpoint_shapes(state_dir):
  """The shapes of a checkpoint's arrays (a tree of tuples), from its metadata."""
  with ocp.PyTreeCheckpointer() as reader:
    tree = reader.metadata(state_dir).item_metadata.tree
  return jax.tree.map(lambda leaf: tuple(leaf.shape), tree)


def test_validation_loss_of_a_run_is_printed_once(ptb_dir, tmp_path, capsys):
  config = tiny_config(ptb_dir, num_steps=4, eval_every=2, progress=True, eval_batches=1)
  result = train.train_and_evaluate(config, tmp_path)
  captured = capsys.readouterr()
  both = captured.out + captured.err
  assert captured.out.count("parameters: ") == 1  # printed once, at the start
  assert both.count("validation loss") == 2  # the evaluations at steps 2 and 4
  assert "step 2: validation loss" in captured.err  # a progress note
  final = f"step 4: validation loss {result['eval/loss']:.4f}"
  assert both.count(final) == 1 and final in captured.out  # the summary alone


def test_summary_after_sigterm_names_the_step_of_the_last_evaluation(ptb_dir, tmp_path, capsys):
  """SIGTERM arrives a few steps after the evaluation at step 5 (this process signals itself)."""
  config = tiny_config(ptb_dir, num_steps=10_000, eval_every=5, eval_batches=1)
  jsonl = tmp_path / "metrics.jsonl"

  def terminate_after_step_6():
    deadline = time.time() + 240
    while time.time() < deadline:
      if jsonl.exists() and any(r["step"] >= 6 for r in metrics.read_jsonl(jsonl)):
        os.kill(os.getpid(), signal.SIGTERM)
        return
      time.sleep(0.01)

  thread = threading.Thread(target=terminate_after_step_6, daemon=True)
  thread.start()
  result = train.train_and_evaluate(config, tmp_path)
  thread.join()
  stopped = int(result["step"])
  assert result["preempted"] == 1.0 and 6 <= stopped < 10  # between two evaluations
  assert result["eval/step"] == 5.0
  out = capsys.readouterr().out
  assert f"step 5: validation loss {result['eval/loss']:.4f}" in out
  assert f"step {stopped}: validation loss" not in out
  assert f"stopped by SIGTERM at step {stopped}" in out


# ----------------------------------------------------------------------------- bad configs


@pytest.mark.parametrize("field, value, message", [
    ("optimizer.name", "sgd", "optimizer.name='sgd'"),
    ("train.num_steps", -5, "train.num_steps=-5"),
    ("train.batch_size", 0, "train.batch_size=0"),
    ("optimizer.schedule", "linear", "optimizer.schedule='linear'"),
    ("model.moe.router.num_experts", 4, "mesh.expert=8 must divide model.moe.router.num_experts=4"),
])
def test_bad_values_raise_naming_the_field(ptb_dir, tmp_path, field, value, message):
  config = tiny_config(ptb_dir)
  config.mesh.update(data=1, expert=8)
  group, name = field.rsplit(".", 1)
  node = config
  for part in group.split("."):
    node = node[part]
  node[name] = value
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    train.train_and_evaluate(config, tmp_path)
  assert not (tmp_path / "checkpoints").exists()  # failed before doing any work


@pytest.mark.parametrize("path", ["train.steps", "optimizer.lr", "model.moe.router.experts",
                                  "bogus"])
def test_unknown_fields_raise_naming_the_field(ptb_dir, path):
  config = tiny_config(ptb_dir)
  node = config
  *parents, name = path.split(".")
  for part in parents:
    node = node[part]
  node[name] = 1
  with pytest.raises(ValueError, match=path.replace(".", r"\.")):
    config_lib.experiment_config_from(config)


def test_expert_axis_must_divide_the_experts_on_any_device_count(ptb_dir):
  config = tiny_config(ptb_dir)
  config.mesh.update(data=-1, expert=3)
  with pytest.raises(ValueError, match=r"mesh.expert=3 must divide .*num_experts=8"):
    config_lib.experiment_config_from(config, num_devices=6, num_processes=1)


def test_group_size_must_divide_the_tokens_per_device(ptb_dir):
  config = tiny_config(ptb_dir)  # 8 sequences x 16 tokens over 8 devices: 16 tokens each
  config.model.moe.group_size = 32
  with pytest.raises(ValueError, match="model.moe.group_size=32"):
    config_lib.experiment_config_from(config)


def test_apply_overrides_reads_literals_and_rejects_unknown_fields(ptb_dir):
  config = tiny_config(ptb_dir)
  config_lib.apply_overrides(config, ["train.batch_size=16", "optimizer.learning_rate=1e-2",
                                      "data.name=moejax_public_domain", "train.progress=True"])
  assert (config.train.batch_size, config.optimizer.learning_rate) == (16, 0.01)
  assert config.data.name == "moejax_public_domain" and config.train.progress is True
  with pytest.raises(ValueError, match="train.bogus"):
    config_lib.apply_overrides(config, ["train.bogus=1"])
  with pytest.raises(ValueError, match="nope"):
    config_lib.apply_overrides(config, ["nope.x=1"])
