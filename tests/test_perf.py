"""Model FLOPs, MFU, the device peak table, rematerialisation and profiler traces."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import switch_small
from moejax import device_peak, flops, metrics, train
from moejax.config import experiment_config_from
from moejax.model import Transformer, model_config_from
from moejax.typed_config import ConfigError


def _model(**changes):
  config = switch_small.get_config("tiny")
  config.model.update(vocab_size=100, **changes)
  return model_config_from(config.model)


def test_forward_flops_of_a_tiny_switch_model_match_a_hand_count():
  # tiny: 2 blocks, M=32, H=2, D=16, dense F=64 relu in block 0, block 1 an MoE of 8 experts of
  # F=64 with top-1 (switch), V=100, L=16.
  config = _model()
  assert (config.num_layers, config.model_dim, config.num_heads, config.head_dim) == (2, 32, 2, 16)
  assert config.moe.router.num_experts == 8 and config.moe.ffn_dim == 64
  M, H, D, L, V, F, E = 32, 2, 16, 16, 100, 64, 8
  projections = 2 * 4 * M * H * D            # 8192 per block
  attention = 2 * 2 * L * H * D              # 2048 per block
  dense_ffn = 2 * 2 * M * F                  # 8192 (block 0)
  expert = 2 * 2 * M * F * 1                 # one expert of width 64: 8192 (block 1)
  router = 2 * M * E                         # 512 (block 1)
  logits = 2 * M * V                         # 6400
  hand = 2 * (projections + attention) + dense_ffn + expert + router + logits
  assert hand == 43776
  assert flops.forward_flops_per_token(config, L) == hand
  assert flops.train_flops_per_token(config, L) == 3 * hand


def test_flops_count_k_experts_swiglu_and_shared_experts():
  config = _model(moe_every=1)
  config = dataclasses.replace(config, moe=dataclasses.replace(
      config.moe, activation="swiglu", shared_ffn_dim=32,
      router=dataclasses.replace(config.moe.router, kind="topk", k=2)))
  M, H, D, L, V, F, E = 32, 2, 16, 16, 100, 64, 8
  per_block = 2 * 4 * M * H * D + 2 * 2 * L * H * D + (2 * F + 32) * 3 * 2 * M + 2 * M * E
  assert flops.forward_flops_per_token(config, L) == 2 * per_block + 2 * M * V


def test_performance_metrics_divide_by_devices_and_the_peak():
  perf = flops.performance_metrics(1e9, 2e5, num_devices=4, peak_per_device=1e14)
  assert perf["perf/tflops_per_device"] == pytest.approx(50.0)  # 1e9 * 2e5 / 4 = 5e13 FLOP/s
  assert perf["perf/mfu"] == pytest.approx(0.5)                 # 5e13 / 1e14
  assert "perf/mfu" not in flops.performance_metrics(1e9, 2e5, num_devices=1,
                                                     peak_per_device=None)


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("TPU v4", 275e12), ("TPU v5 lite", 197e12),
    ("TPU v5", 459e12), ("TPU v6 lite", 918e12), ("cpu", None), ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_table_matches_device_kinds(kind, peak):
  assert device_peak.peak_flops_per_device(kind) == peak


def test_progress_line_shows_flops_and_mfu(capsys):
  bar = metrics.ProgressBar(100, stream=None)
  bar.update(10, 4.5, 12345.0, tflops=412.3, mfu=0.4169)
  assert capsys.readouterr().err.strip() == (
      "step  10/100 loss 4.500 tok/s 12.3k TFLOP/s/device 412 MFU 41.7%")


@pytest.mark.parametrize("remat", ["full", "save_matmuls"])
def test_remat_keeps_loss_and_gradients(remat):
  def grads(config):
    model = Transformer(config, rngs=nnx.Rngs(0))
    inputs = jax.random.randint(jax.random.key(1), (2, 16), 0, 100)

    def loss(model):
      logits, aux = model(inputs, train=True)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + aux.aux_loss

    return nnx.jit(nnx.value_and_grad(loss))(model)  # one compilation, not op-by-op

  base_loss, base = grads(_model())
  loss, other = grads(_model(remat=remat))
  np.testing.assert_allclose(loss, base_loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(nnx.state(base)), jax.tree.leaves(nnx.state(other))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_remat_value_is_checked():
  with pytest.raises(ConfigError, match="model.remat"):
    _model(remat="some")


@pytest.mark.usefixtures("compile_once")  # the trainer's programs, as other modules compile them
def test_profile_steps_write_a_trace_and_metrics_hold_flops(ptb_dir, tmp_path):
  config = switch_small.get_config("tiny")
  config.data.update(name="ptb", data_dir=ptb_dir)
  config.train.update(num_steps=4, log_every=2, profile_steps=2, profile_start_step=2)
  result = train.train_and_evaluate(config, tmp_path)
  traces = list((tmp_path / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
  experiment = experiment_config_from(config)
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  first = records[0]
  model_config = dataclasses.replace(experiment.model, vocab_size=int(
      first["model/params_embedding"]) // experiment.model.model_dim)
  assert first["model/train_flops_per_token"] == flops.train_flops_per_token(model_config, 16)
  # CPUs have no peak: achieved FLOP/s only.
  with_rate = [r for r in records if "train/tokens_per_sec" in r]
  assert with_rate and all("perf/mfu" not in r for r in with_rate)
  for r in with_rate:
    expected = (r["train/tokens_per_sec"] * first["model/train_flops_per_token"]
                / jax.device_count() / 1e12)
    assert r["perf/tflops_per_device"] == pytest.approx(expected, rel=1e-6)
  assert result["perf/tflops_per_device_mean"] > 0
