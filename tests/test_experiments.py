"""The experiment files: they load, agree on active FLOPs, and each trains a step (tiny variant)."""

import dataclasses
import importlib
import math

import numpy as np
import pytest

from moejax import config as config_lib, metrics, train
from moejax.model import active_ffn_flops_per_token

EXPERIMENTS = ("dense_small", "switch_small", "gshard_small")  # the compare study's three
# Routers that look at later tokens of their group: flagged, and allowed explicitly.
NONCAUSAL_EXPERIMENTS = ("expert_choice_small", "soft_small", "sinkhorn_small")
# Further router families at the same active FFN FLOPs per token.
ROUTER_EXPERIMENTS = ("deepseek_small", "noisy_topk_small", "random_small",
                      "hash_small") + NONCAUSAL_EXPERIMENTS
# Other objectives at the same active FFN FLOPs per token (masked LM: moejax/objective.py).
OBJECTIVE_EXPERIMENTS = ("mlm_small",)
# Other dispatch forms at the same active FFN FLOPs per token (dropless: moejax/dropless.py).
DISPATCH_EXPERIMENTS = ("switch_small_dropless",)
ALL_EXPERIMENTS = EXPERIMENTS + ROUTER_EXPERIMENTS + OBJECTIVE_EXPERIMENTS + DISPATCH_EXPERIMENTS
# Sized for accelerators (experiments/accelerator.py): bfloat16, their own meshes.
ACCELERATOR_EXPERIMENTS = ("dense_base", "switch_base_8", "switch_base_64", "mixtral_small")


pytestmark = pytest.mark.usefixtures("compile_once")


def _get_config(name, arg=None):
  return importlib.import_module(f"experiments.{name}").get_config(arg)


def _typed(name, arg=None, num_devices=1):
  return config_lib.experiment_config_from(_get_config(name, arg), num_devices=num_devices,
                                           num_processes=1)


@pytest.mark.parametrize("name", ALL_EXPERIMENTS)
@pytest.mark.parametrize("arg", [None, "tiny"])
def test_configs_load_and_validate(name, arg):
  experiment = _typed(name, arg)
  assert experiment.optimizer.name == "adamw"
  assert experiment.train.num_steps >= 1
  assert experiment.mesh.resolve(1) == (1, 1, 1)


def test_docstrings_give_the_command():
  for name in ALL_EXPERIMENTS + ACCELERATOR_EXPERIMENTS:
    doc = importlib.import_module(f"experiments.{name}").__doc__
    assert f"--config=experiments/{name}.py" in doc, name


def test_routing_settings():
  switch, gshard = _typed("switch_small").model, _typed("gshard_small").model
  assert (switch.moe_every, switch.moe.router.num_experts, switch.moe.router.k) == (2, 8, 1)
  assert (gshard.moe_every, gshard.moe.router.num_experts, gshard.moe.router.k) == (2, 8, 2)
  assert gshard.moe.ffn_dim * 2 == switch.moe.ffn_dim == switch.ffn_dim
  assert _typed("dense_small").model.moe_every == 0


def test_noisy_random_and_hash_settings():
  noisy, random, hashed = (_typed(name).model
                           for name in ("noisy_topk_small", "random_small", "hash_small"))
  assert (noisy.moe.router.kind.value, noisy.moe.router.k) == ("noisy_topk", 2)
  assert noisy.moe.router.noisy_topk.noise.value == "learned"
  assert (random.moe.router.kind.value, random.moe.router.k) == ("random", 1)
  assert (hashed.moe.router.kind.value, hashed.moe.router.k) == ("hash", 1)
  assert hashed.moe.router.hash.table.value == "random"
  for model in (noisy, random, hashed):
    assert (model.moe_every, model.moe.router.num_experts) == (2, 8)


@pytest.mark.parametrize("arg", [None, "tiny"])
def test_router_family_settings(arg):
  switch = _typed("switch_small", arg).model.moe
  expert_choice = _typed("expert_choice_small", arg).model.moe
  # Expert choice: factor 2 fills 2 rows per token on average, at half the expert width.
  assert expert_choice.router.capacity(expert_choice.group_size, train=True) * 8 == (
      2 * expert_choice.group_size)
  assert expert_choice.ffn_dim * 2 == switch.ffn_dim
  soft = _typed("soft_small", arg).model.moe
  assert soft.router.soft.slots_per_expert * 8 == soft.group_size  # as many slots as tokens
  assert soft.ffn_dim == switch.ffn_dim and soft.dispatch.value == "einsum"
  sinkhorn = _typed("sinkhorn_small", arg).model.moe
  assert (sinkhorn.router.k, sinkhorn.ffn_dim) == (1, switch.ffn_dim)
  for moe in (expert_choice, soft, sinkhorn):
    assert moe.router.allow_noncausal and not moe.router.causal(train=True)


@pytest.mark.parametrize("name", NONCAUSAL_EXPERIMENTS)
def test_noncausal_experiments_are_flagged(name):
  assert "NON-CAUSAL" in importlib.import_module(f"experiments.{name}").__doc__
  config = _get_config(name)
  config.model.moe.router.allow_noncausal = False
  with pytest.raises(ValueError, match="model.moe.router.allow_noncausal=True"):
    _typed_from(config, 1)


@pytest.mark.parametrize("arg", [None, "tiny"])
def test_equal_active_ffn_flops_per_token(arg):
  flops = {name: active_ffn_flops_per_token(_typed(name, arg).model) for name in ALL_EXPERIMENTS}
  # dense_small: 4 blocks x 2 matmuls x 2 FLOPs x M=128 x F=512.
  expected = 4 * 2 * 2 * 128 * 512 if arg is None else 2 * 2 * 2 * 32 * 64
  assert flops == dict.fromkeys(ALL_EXPERIMENTS, expected)


def test_deepseek_small_settings():
  model = _typed("deepseek_small").model
  router = model.moe.router
  assert (router.kind.value, router.num_experts, router.k) == ("deepseek", 16, 2)
  assert (model.moe.ffn_dim, model.moe.shared_ffn_dim) == (model.ffn_dim // 4, model.ffn_dim // 2)
  assert router.deepseek.score.value == "sigmoid"
  assert (router.deepseek.num_groups, router.deepseek.topk_groups) == (4, 2)
  assert router.balance.bias_update_rate > 0 and router.normalize_weights


def test_unknown_variant_is_rejected():
  with pytest.raises(ValueError, match="'huge'"):
    _get_config("switch_small", "huge")


def test_expert_parallel_mesh_on_eight_devices():
  config = _get_config("switch_small")
  config.mesh.update(data=-1, expert=8)
  assert _typed_from(config, 8).mesh.resolve(8) == (1, 8, 1)
  config.mesh.update(expert=16)
  with pytest.raises(ValueError, match="mesh"):
    _typed_from(config, 16)


def _typed_from(config, num_devices):
  return config_lib.experiment_config_from(config, num_devices=num_devices, num_processes=1)


# The three compared experiments train a step in `make test`; the router and objective
# experiments (their layers are tested in tests/test_routing_*.py and tests/test_objective.py) in
# `make test-all`.
@pytest.mark.parametrize("name", [*EXPERIMENTS, "switch_base_8", *(
    pytest.param(name, marks=pytest.mark.slow) for name in ROUTER_EXPERIMENTS +
    OBJECTIVE_EXPERIMENTS + DISPATCH_EXPERIMENTS + ("dense_base", "switch_base_64",
                                                    "mixtral_small"))])
def test_each_experiment_trains_one_step(name, ptb_dir, tmp_path):
  config = _get_config(name, "tiny")
  config.data.update(name="ptb", data_dir=ptb_dir)
  config.mesh.update(data=2, expert=4)
  config.train.update(num_steps=1, eval_batches=1)
  result = train.train_and_evaluate(config, tmp_path)
  assert result["step"] == 1
  assert math.isfinite(result["train/loss"]) and math.isfinite(result["eval/loss"])
  np.testing.assert_allclose(result["eval/perplexity"], math.exp(result["eval/loss"]), rtol=1e-9)
  assert (tmp_path / "checkpoints" / "1" / "state").is_dir()
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  records = metrics.read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in records] == [1]
  # Non-causal routers in the causal LM are marked as such in the metrics.
  assert records[0]["model/noncausal_routing"] == float(name in NONCAUSAL_EXPERIMENTS)
  loads = [v for k, v in records[0].items() if k.startswith("moe/layer_1/expert_load/")]
  if name in ("dense_small", "dense_base"):
    assert loads == [] and result["train/aux_loss"] == 0.0
  else:
    assert len(loads) == _typed(name, "tiny").model.moe.router.num_experts
    np.testing.assert_allclose(sum(loads), 1.0, rtol=1e-5)
  if name in DISPATCH_EXPERIMENTS:  # dropless: nothing dropped, the exchange overflow reported
    assert records[0]["moe/layer_1/dropped_fraction"] == 0.0
    assert records[0]["moe/layer_1/exchange_overflow"] == 0.0


def test_dropless_experiment_settings():
  switch = _typed("switch_small").model.moe
  dropless = _typed("switch_small_dropless").model.moe
  assert dropless.dispatch.value == "dropless" and switch.dispatch.value == "index"
  assert dataclasses.replace(dropless, dispatch=switch.dispatch) == switch



@pytest.mark.parametrize("name, devices, mesh", [
    ("dense_base", 1, (1, 1, 1)), ("switch_base_8", 1, (1, 1, 1)),
    ("switch_base_64", 8, (1, 8, 1)), ("mixtral_small", 32, (4, 8, 1))])
def test_accelerator_experiments_fit_their_meshes(name, devices, mesh):
  experiment = _typed(name, num_devices=devices)
  assert experiment.mesh.resolve(devices) == mesh
  model = experiment.model
  assert (model.dtype, model.param_dtype) == ("bfloat16", "float32")
  # The experts run in the model's bfloat16; the router always in float32 (moejax/moe.py).
  assert model.moe is None or model.moe.dtype == "bfloat16"
  assert experiment.data.vocab_size == 32000


@pytest.mark.parametrize("arg", [None, "tiny"])
def test_switch_base_8_spends_dense_base_active_ffn_flops(arg):
  dense, switch = _typed("dense_base", arg).model, _typed("switch_base_8", arg).model
  assert active_ffn_flops_per_token(switch) == active_ffn_flops_per_token(dense)
  if arg is None:  # 12 blocks x 2 matmuls x 2 FLOPs x M=768 x F=3072
    assert active_ffn_flops_per_token(dense) == 12 * 2 * 2 * 768 * 3072
    assert switch.moe.router.num_experts == 8 and switch.moe_every == 2
