"""Tests of moejax.model: the decoder-only transformer with MoE blocks."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax import attention as attention_lib
from moejax import model as model_lib
from moejax import sharding
from moejax.model import ModelAux, ModelConfig, Transformer
from moejax.moe import MoeConfig, MoeLayer
from moejax.routing import RouterConfig

VOCAB, M, L, B = 64, 32, 16, 8


def tiny_config(**overrides) -> ModelConfig:
  """2 blocks, the second an MoE with E=8 experts, one routing group per sequence (S = L)."""
  moe = MoeConfig(router=RouterConfig(kind="switch", num_experts=8), ffn_dim=32, group_size=L)
  fields = dict(vocab_size=VOCAB, num_layers=2, model_dim=M, num_heads=4, head_dim=8, ffn_dim=64,
                moe_every=2, moe=moe)
  fields.update(overrides)
  return ModelConfig(**fields)


def random_tokens(seed, shape=(B, L)):
  return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB)


@nnx.jit(static_argnames="train")
def apply(model, inputs_BL, mask_BL=None, train=False):
  """The model under jit (eager op-by-op dispatch is much slower to run the first time)."""
  return model(inputs_BL, mask_BL=mask_BL, train=train)


# ----------------------------------------------------------------------------- building blocks


def test_rms_norm_matches_numpy():
  x = np.random.default_rng(0).normal(size=(2, 3, 5)).astype(np.float32) * 3.0
  scale = np.linspace(0.5, 2.0, 5).astype(np.float32)
  expected = x / np.sqrt(np.mean(x.astype(np.float64)**2, axis=-1, keepdims=True) + 1e-6) * scale
  got = model_lib.rms_norm(jnp.asarray(x), jnp.asarray(scale))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def _numpy_rope(x_LD, positions, base):
  """Rotates each pair (x[i], x[i + D/2]) by pos * base^(-2i/D) with explicit 2x2 matrices."""
  D = x_LD.shape[-1]
  out = np.zeros_like(x_LD, dtype=np.float64)
  for l, pos in enumerate(positions):
    for i in range(D // 2):
      theta = pos * base**(-2.0 * i / D)
      rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
      out[l, [i, i + D // 2]] = rot @ x_LD[l, [i, i + D // 2]].astype(np.float64)
  return out


def test_rope_matches_numpy_rotation_and_depends_on_relative_position():
  rng = np.random.default_rng(1)
  D, base = 8, 100.0
  q_D = rng.normal(size=D).astype(np.float32)
  k_D = rng.normal(size=D).astype(np.float32)
  positions = np.array([0, 1, 3, 7, 12])
  rope = lambda v, pos: np.asarray(attention_lib.apply_rope(
      jnp.broadcast_to(jnp.asarray(v), (1, len(pos), 1, D)), jnp.asarray(pos), base))[0, :, 0]
  np.testing.assert_allclose(rope(q_D, positions), _numpy_rope(np.tile(q_D, (5, 1)), positions,
                                                               base), rtol=1e-5, atol=1e-5)
  scores = rope(q_D, positions) @ rope(k_D, positions).T  # scores[m, n] = q(p_m) . k(p_n)
  shifted = rope(q_D, positions + 5) @ rope(k_D, positions + 5).T
  np.testing.assert_allclose(shifted, scores, rtol=1e-5, atol=1e-5)
  # And the score is not independent of the offset: moving k alone changes it.
  moved = rope(q_D, positions) @ rope(k_D, positions + 5).T
  assert np.abs(moved - scores).max() > 1e-2


def test_attention_mask_is_causal_and_excludes_padding_keys():
  mask_BL = jnp.array([[False, True, True]])
  allowed = np.asarray(attention_lib.attention_mask(3, mask_BL))[0]
  np.testing.assert_array_equal(allowed, [[1, 0, 0], [0, 1, 0], [0, 1, 1]])
  np.testing.assert_array_equal(np.asarray(attention_lib.attention_mask(3, None))[0],
                                np.tril(np.ones((3, 3))))


# ----------------------------------------------------------------------------- structure


def test_moe_blocks_every_second_layer():
  config = tiny_config(num_layers=4, moe_every=2)
  model = Transformer(config, rngs=nnx.Rngs(0))
  kinds = [type(block.ffn).__name__ for block in model.blocks]
  assert kinds == ["DenseFfn", "MoeLayer", "DenseFfn", "MoeLayer"]
  logits, aux = apply(model, random_tokens(0, (2, L)))
  assert logits.shape == (2, L, VOCAB) and logits.dtype == jnp.float32
  assert sorted(aux.moe) == ["layer_1", "layer_3"]
  expected = aux.moe["layer_1"].aux_loss + aux.moe["layer_3"].aux_loss
  np.testing.assert_allclose(aux.aux_loss, expected, rtol=1e-6)
  assert float(aux.aux_loss) > 0


def test_dense_model_has_no_moe_blocks():
  model = Transformer(tiny_config(moe_every=0, moe=None), rngs=nnx.Rngs(0))
  assert not any(isinstance(block.ffn, MoeLayer) for block in model.blocks)
  _, aux = apply(model, random_tokens(0, (2, L)))
  assert isinstance(aux, ModelAux) and aux.moe == {} and float(aux.aux_loss) == 0.0


def test_moe_every_one_and_three():
  assert [tiny_config(num_layers=3, moe_every=1).is_moe_block(i) for i in range(3)] == [1, 1, 1]
  assert [tiny_config(num_layers=6, moe_every=3).is_moe_block(i) for i in range(6)] == [
      0, 0, 1, 0, 0, 1]


def test_partition_spec_of_every_parameter():
  model = Transformer(tiny_config(tie_embeddings=False), rngs=nnx.Rngs(0))
  specs = sharding.partition_specs(nnx.state(model, nnx.Param))
  flat = {"/".join(str(key.key) for key in path): spec
          for path, spec in jax.tree_util.tree_flatten_with_path(
              specs, is_leaf=lambda x: isinstance(x, P))[0]}
  qkv, norm = P(None, "model", None), P(None)
  block0 = {  # dense FFN
      "attention/wq": qkv, "attention/wk": qkv, "attention/wv": qkv,
      "attention/wo": P("model", None, None), "attention_norm/scale": norm,
      "ffn_norm/scale": norm, "ffn/wi": P(None, "model"), "ffn/wo": P("model", None)}
  block1 = {k: v for k, v in block0.items() if not k.startswith("ffn/")}
  block1.update({"ffn/router": P(None, None), "ffn/wi": P("expert", None, "model"),
                 "ffn/wo": P("expert", "model", None)})
  expected = {"embed": P(None, None), "unembed": P(None, None), "final_norm/scale": norm}
  expected.update({f"blocks/0/{k}": v for k, v in block0.items()})
  expected.update({f"blocks/1/{k}": v for k, v in block1.items()})
  assert flat == expected


# ----------------------------------------------------------------------------- FLOPs


def test_active_ffn_flops_equal_for_dense_switch_and_gshard():
  Md, F = 256, 1024
  dense = ModelConfig(vocab_size=100, num_layers=4, model_dim=Md, ffn_dim=F)
  # 4 blocks x 2 matmuls x 2 FLOPs x M x F = 16 * 256 * 1024
  assert model_lib.active_ffn_flops_per_token(dense) == 4_194_304
  switch = dataclasses.replace(dense, moe_every=2, moe=MoeConfig(
      router=RouterConfig(kind="switch", num_experts=8), ffn_dim=F))
  gshard = dataclasses.replace(dense, moe_every=2, moe=MoeConfig(
      router=RouterConfig(kind="gshard", num_experts=8), ffn_dim=F // 2))
  assert model_lib.active_ffn_flops_per_token(switch) == 4_194_304
  assert model_lib.active_ffn_flops_per_token(gshard) == 4_194_304
  # Top-2 with full-width experts doubles the MoE blocks: 2 dense (2*1048576) + 2 MoE (2*2097152).
  wide = dataclasses.replace(gshard, moe=dataclasses.replace(gshard.moe, ffn_dim=F))
  assert model_lib.active_ffn_flops_per_token(wide) == 6_291_456
  # swiglu: 3 matmuls per block, 4 * 3 * 2 * 256 * 1024.
  swiglu = dataclasses.replace(dense, activation="swiglu")
  assert model_lib.active_ffn_flops_per_token(swiglu) == 6_291_456


# ----------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("moe_every,kind", [(0, None), (2, "switch"), (2, "hash")],
                         ids=["dense", "switch", "hash"])
def test_causal_changing_token_t_leaves_earlier_logits(moe_every, kind):
  # Tight capacity (C = 2 of 16 tokens per expert): top-1 in position order stays causal. Hash
  # routing reads the token ids the model is given (its inputs), never the targets.
  moe = MoeConfig(router=RouterConfig(kind=kind or "switch", num_experts=4,
                                      capacity_factor_eval=0.5, min_capacity=1),
                  ffn_dim=32, group_size=L)
  # The dense case also exercises the untied output projection.
  config = tiny_config(moe_every=moe_every, moe=moe if moe_every else None,
                       tie_embeddings=bool(moe_every))
  model = Transformer(config, rngs=nnx.Rngs(0))
  t = 9
  inputs = random_tokens(3, (2, L))
  changed = inputs.at[:, t].set((inputs[:, t] + 1) % VOCAB)
  logits, aux = apply(model, inputs)
  logits2, _ = apply(model, changed)
  np.testing.assert_allclose(logits2[:, :t], logits[:, :t], rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(logits2[:, t] - logits[:, t])).max() > 1e-3
  if moe_every:
    assert float(aux.moe["layer_1"].metrics["dropped_fraction"]) > 0  # capacity did overflow


def test_padding_takes_no_expert_capacity():
  # Groups of S = 8 (one sequence each), E = 2, C = max(1, ceil(0.25 * 8 / 2)) = 1 slot/expert.
  # Left padding: only the last token of each sequence is real.
  moe = MoeConfig(router=RouterConfig(kind="switch", num_experts=2, capacity_factor_eval=0.25,
                                      min_capacity=1), ffn_dim=16, group_size=8)
  model = Transformer(tiny_config(moe=moe), rngs=nnx.Rngs(0))
  inputs = random_tokens(4, (2, 8))
  mask_BL = jnp.arange(8)[None, :].repeat(2, axis=0) == 7
  _, aux = apply(model, inputs, mask_BL)
  metrics = aux.moe["layer_1"].metrics
  # Each real token is alone in its group, so it takes slot 0 of its expert: nothing dropped,
  # 2 kept of G * E * C = 2 * 2 * 1 slots, and the expert load counts the 2 real tokens only.
  assert float(metrics["dropped_fraction"]) == 0.0
  np.testing.assert_allclose(metrics["capacity_utilisation"], 0.5, rtol=1e-6)
  load = np.asarray(metrics["expert_load"]) * 2
  np.testing.assert_allclose(load, np.round(load), atol=1e-6)
  # With every token real the 16 tokens compete for 4 slots: at least 12 of 16 are dropped.
  _, aux_all = apply(model, inputs, jnp.ones_like(mask_BL))
  assert float(aux_all.moe["layer_1"].metrics["dropped_fraction"]) >= 0.75


def test_real_tokens_do_not_depend_on_padding_content():
  moe = MoeConfig(router=RouterConfig(kind="switch", num_experts=2, capacity_factor_eval=0.5,
                                      min_capacity=1), ffn_dim=16, group_size=L)
  model = Transformer(tiny_config(moe=moe), rngs=nnx.Rngs(0))
  mask_BL = jnp.arange(L)[None, :].repeat(2, axis=0) >= 6  # 6 padding tokens on the left
  inputs = random_tokens(5, (2, L))
  other = jnp.where(mask_BL, inputs, (inputs + 17) % VOCAB)  # different padding content
  logits, _ = apply(model, inputs, mask_BL)
  logits2, _ = apply(model, other, mask_BL)
  np.testing.assert_allclose(logits2[:, 6:], logits[:, 6:], rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(logits2[:, :6] - logits[:, :6])).max() > 1e-3


def test_dropout_only_in_training():
  config = tiny_config(num_layers=1, moe_every=0, moe=None, dropout_rate=0.5)
  model = Transformer(config, rngs=nnx.Rngs(params=0, dropout=1))
  inputs = random_tokens(6, (2, L))
  eval1, _ = apply(model, inputs)
  eval2, _ = apply(model, inputs)
  np.testing.assert_array_equal(eval1, eval2)
  train1, _ = apply(model, inputs, train=True)
  train2, _ = apply(model, inputs, train=True)
  assert np.abs(np.asarray(train1 - eval1)).max() > 1e-3
  assert np.abs(np.asarray(train2 - train1)).max() > 1e-3  # a fresh mask each call


def test_bfloat16_compute_is_close_to_float32():
  # Same float32 parameters, compute in bfloat16 (8 significant bits, relative rounding 2^-9 per
  # operation). A dense model's logits then stay within a few percent of the float32 ones. MoE
  # models are left out of the closeness check: a near-tie in the router can flip an expert choice,
  # which is a legitimate, discontinuous difference.
  config = tiny_config(moe_every=0, moe=None)
  model32 = Transformer(config, rngs=nnx.Rngs(0))
  model16 = Transformer(dataclasses.replace(config, dtype="bfloat16"), rngs=nnx.Rngs(0))
  inputs = random_tokens(7, (2, L))
  logits32, _ = apply(model32, inputs)
  logits16, _ = apply(model16, inputs)
  assert logits16.dtype == jnp.float32
  error = np.abs(np.asarray(logits16 - logits32)).max()
  scale = np.abs(np.asarray(logits32)).max()
  assert 0 < error < 0.05 * scale, (error, scale)
  moe16 = Transformer(tiny_config(dtype="bfloat16"), rngs=nnx.Rngs(0))
  logits_moe, aux = apply(moe16, inputs)
  assert logits_moe.dtype == jnp.float32 and aux.aux_loss.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits_moe)).all()


# ----------------------------------------------------------------------------- sharding


def _loss_and_grads(model, inputs, mask):
  """Mean next-token cross entropy (masked) + aux loss; its gradients w.r.t. every Param."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params):
    logits_BLV, aux = nnx.merge(graphdef, params, rest)(inputs, mask_BL=mask)
    targets_BLV = jax.nn.one_hot(jnp.roll(inputs, -1, axis=1), VOCAB)
    nll_BL = -jnp.sum(jax.nn.log_softmax(logits_BLV) * targets_BLV, axis=-1)
    weight_BL = mask.astype(jnp.float32)
    loss = jnp.sum(nll_BL * weight_BL) / jnp.sum(weight_BL)
    return loss + aux.aux_loss, (logits_BLV, aux.aux_loss)

  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)


def _sharded_case():
  inputs = random_tokens(8)
  mask = jnp.arange(L)[None, :] < jnp.arange(L - B, L)[:, None] + 1  # lengths 9..16
  return inputs, mask


@pytest.fixture(scope="module")
def single_device_reference():
  """(loss, (logits, aux_loss)), grads of the tiny MoE model on one device, computed once."""
  model = Transformer(tiny_config(), rngs=nnx.Rngs(0))
  return _loss_and_grads(model, *_sharded_case())


@pytest.mark.parametrize("mesh_shape", [(2, 4, 1), (1, 8, 1), (1, 4, 2)])
def test_sharded_model_matches_single_device(mesh_shape, single_device_reference):
  (loss, (logits, aux_loss)), grads = single_device_reference
  model = Transformer(tiny_config(), rngs=nnx.Rngs(0))
  inputs, mask = _sharded_case()
  mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape))
  with jax.set_mesh(mesh):
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, sharding.shardings(state, mesh)))
    batch = NamedSharding(mesh, P(sharding.TOKEN_AXES, None))
    (loss_s, (logits_s, aux_s)), grads_s = _loss_and_grads(
        model, jax.device_put(inputs, batch), jax.device_put(mask, batch))
  assert logits_s.sharding.spec[0] == sharding.TOKEN_AXES  # the batch stayed sharded
  assert grads_s["blocks"][1]["ffn"]["wi"].sharding.spec[0] == "expert"
  assert float(aux_s) > 0
  np.testing.assert_allclose(logits_s, logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(aux_s, aux_loss, rtol=1e-5)
  np.testing.assert_allclose(loss_s, loss, rtol=1e-5)
  for g_s, g in zip(jax.tree.leaves(grads_s), jax.tree.leaves(grads)):
    np.testing.assert_allclose(g_s, g, rtol=1e-5, atol=1e-6 * np.abs(np.asarray(g)).max())


def test_sharded_training_randomness_matches_single_device():
  # Residual dropout and router jitter draw their random numbers in the global view, so with
  # partitionable threefry (tests/conftest.py) a sharded run draws the same numbers.
  moe = MoeConfig(router=RouterConfig(kind="switch", num_experts=8, jitter_eps=0.1), ffn_dim=32,
                  group_size=L)
  config = tiny_config(num_layers=1, moe_every=1, dropout_rate=0.1, moe=moe)
  inputs, mask = _sharded_case()
  single = Transformer(config, rngs=nnx.Rngs(0))
  logits, aux = apply(single, inputs, mask, train=True)
  model = Transformer(config, rngs=nnx.Rngs(0))
  mesh = sharding.make_mesh(sharding.MeshConfig(2, 4, 1))
  with jax.set_mesh(mesh):
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, sharding.shardings(state, mesh)))
    batch = NamedSharding(mesh, P(sharding.TOKEN_AXES, None))
    logits_s, aux_s = apply(model, jax.device_put(inputs, batch), jax.device_put(mask, batch),
                            train=True)
  np.testing.assert_allclose(logits_s, logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(aux_s.aux_loss, aux.aux_loss, rtol=1e-5)
  logits_next, _ = apply(single, inputs, mask, train=True)
  assert np.abs(np.asarray(logits_next - logits)).max() > 1e-3  # the random numbers do matter


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("field, value", [
    ("vocab_size", 0), ("num_layers", 0), ("model_dim", -1), ("num_heads", 0), ("head_dim", 7),
    ("ffn_dim", 0), ("activation", "tanh"), ("moe_every", -1), ("moe_every", 3),
    ("dtype", "float16"), ("param_dtype", "int8"), ("dropout_rate", 1.0), ("rope_base", 0.0),
    ("tie_embeddings", "yes"),
])
def test_bad_config_values_name_the_field(field, value):
  with pytest.raises(ValueError, match=rf"model\.{field}={value!r}".replace("(", r"\(")):
    tiny_config(**{field: value})


def test_moe_every_needs_moe_settings():
  with pytest.raises(ValueError, match=r"model\.moe=None"):
    tiny_config(moe=None)


def _config_dict():
  return ml_collections.ConfigDict(dict(
      num_layers=2, model_dim=32, num_heads=4, head_dim=8, ffn_dim=64, moe_every=2,
      dtype="bfloat16",
      moe=dict(ffn_dim=32, group_size=16, activation="gelu",
               router=dict(kind="gshard", num_experts=4, capacity_factor_train=1.5))))


def test_model_config_from_config_dict():
  config = model_config_from_ok = model_lib.model_config_from(_config_dict(), vocab_size=77)
  assert model_config_from_ok.vocab_size == 77 and config.num_layers == 2
  assert config.moe.ffn_dim == 32 and config.moe.activation.value == "gelu"
  assert config.moe.router.kind.value == "gshard" and config.moe.router.k == 2
  assert config.moe.router.capacity_factor_train == 1.5
  assert config.moe.dtype == "bfloat16"  # inherited from the model's compute dtype
  dense = model_lib.model_config_from({"vocab_size": 10, "num_layers": 1})
  assert dense.moe is None and dense.vocab_size == 10


@pytest.mark.parametrize("path, name", [
    ((), "hidden_size"), (("moe",), "num_experts"), (("moe", "router"), "top_k")])
def test_model_config_from_rejects_unknown_fields(path, name):
  cfg = _config_dict()
  node = cfg
  for key in path:
    node = node[key]
  with cfg.unlocked():
    node[name] = 1
  prefix = ".".join(("model",) + path)
  with pytest.raises(ValueError, match=rf"{prefix}\.{name}.*allowed"):
    model_lib.model_config_from(cfg, vocab_size=77)


def test_model_config_from_needs_vocab_size():
  with pytest.raises(ValueError, match="vocab_size"):
    model_lib.model_config_from({"num_layers": 1})
