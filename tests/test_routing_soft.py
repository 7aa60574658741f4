"""Soft MoE (Puigcerver et al. 2023): hand cases, the paper's formulas in numpy, every mesh.

Hand cases choose logits as log(w), so that each softmax returns ratios of the written w.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.dispatch import IndexDispatcher
from moejax.moe import MoeConfig, MoeLayer
from moejax.routing import RouterConfig, RouterInputs, SoftConfig, route
from moejax.routing.soft import NORM_EPS, soft_logits
from moejax.typed_config import ConfigError
from test_moe import (B, E, F, L, M, S, _all_to_alls, _compiled_forward_text, apply,
                      assert_same_results, grads_fn, inputs, sharded_grads)

ATOL = 1e-6


def _config(num_experts=2, slots=1, **kwargs):
  return RouterConfig(kind="soft", num_experts=num_experts,
                      soft=SoftConfig(slots_per_expert=slots), **kwargs)


@functools.partial(jax.jit, static_argnames="config")
def _route_jit(logits, mask, *, config):
  decision = route(logits, config, train=True, padding_mask_GS=mask)
  return decision.dispatch_GSEC(), decision.combine_GSEC(), *decision.stats.summarize()


def _routed(logits, mask, config):
  """(dispatch, combine, losses, metrics) as numpy arrays."""
  return jax.tree.map(np.asarray, _route_jit(jnp.asarray(logits, jnp.float32),
                                             jnp.asarray(mask), config=config))


def test_dispatch_softmax_over_tokens_and_combine_softmax_over_slots():
  # E = 2 experts of p = 2 slots; logit columns are (e0 c0, e0 c1, e1 c0, e1 c1).
  w = np.array([[[1.0, 2.0, 3.0, 4.0], [3.0, 2.0, 1.0, 4.0]]])
  dispatch, combine, losses, metrics = _routed(np.log(w), np.ones((1, 2), bool),
                                               _config(slots=2))
  # Dispatch: each column's softmax over the two tokens: (1, 3) (2, 2) (3, 1) (4, 4).
  np.testing.assert_allclose(dispatch[0], [[[1 / 4, 1 / 2], [3 / 4, 1 / 2]],
                                           [[3 / 4, 1 / 2], [1 / 4, 1 / 2]]], atol=ATOL)
  # Combine: each token's softmax over its four slots.
  np.testing.assert_allclose(combine[0], [[[0.1, 0.2], [0.3, 0.4]],
                                          [[0.3, 0.2], [0.1, 0.4]]], atol=ATOL)
  # Each expert's work is its 2 slots: uniform load, 4 slot rows for 2 tokens, nothing dropped.
  np.testing.assert_allclose(metrics["expert_load"], [0.5, 0.5], atol=ATOL)
  np.testing.assert_allclose(metrics["experts_per_token"], 2.0, atol=ATOL)
  np.testing.assert_allclose(metrics["capacity_utilisation"], 1.0, atol=ATOL)
  assert float(metrics["dropped_fraction"]) == 0.0
  assert float(metrics["dropped_assignment_fraction"]) == 0.0
  # Combine mass per expert: t0 (.3, .7), t1 (.5, .5).
  np.testing.assert_allclose(metrics["router_confidence"], (0.7 + 0.5) / 2, atol=ATOL)
  entropy = lambda p: -np.sum(np.asarray(p) * np.log(p))
  np.testing.assert_allclose(metrics["router_entropy"],
                             (entropy([0.3, 0.7]) + entropy([0.5, 0.5])) / 2, atol=1e-5)
  # z-loss: logsumexp of each token's four logits is log 10.
  assert set(losses) == {"router_z_loss"}
  np.testing.assert_allclose(losses["router_z_loss"], np.log(10.0) ** 2, rtol=1e-5)


def test_padding_gets_no_weight_and_an_empty_group_gives_zeros_not_nan():
  # Group 0: t2 is padding with NaN logits; the rest as in a 2-token case with p = 1.
  # Group 1: all padding.
  logits = np.log(np.array([[[1.0, 3.0], [3.0, 1.0], [1.0, 1.0]]] * 2))
  logits[0, 2] = np.nan
  mask = np.array([[True, True, False], [False, False, False]])
  dispatch, combine, losses, metrics = _routed(logits, mask, _config(slots=1))
  np.testing.assert_allclose(dispatch[0, :, :, 0], [[1 / 4, 3 / 4], [3 / 4, 1 / 4], [0, 0]],
                             atol=ATOL)
  np.testing.assert_allclose(combine[0, :, :, 0], [[1 / 4, 3 / 4], [3 / 4, 1 / 4], [0, 0]],
                             atol=ATOL)
  assert not np.any(dispatch[1]) and not np.any(combine[1])
  # Two slots (E * p) for two real tokens; group 1 holds none, so half the capacity is unused.
  np.testing.assert_allclose(metrics["experts_per_token"], 1.0, atol=ATOL)
  np.testing.assert_allclose(metrics["capacity_utilisation"], 0.5, atol=ATOL)
  np.testing.assert_allclose(losses["router_z_loss"], np.log(4.0) ** 2, rtol=1e-5)
  for name, value in {**losses, **metrics}.items():
    assert np.all(np.isfinite(value)), name


def test_gradients_do_not_reach_padding_and_stay_finite():
  logits = np.log(np.array([[[1.0, 3.0], [3.0, 1.0], [1.0, 1.0]]] * 2))
  logits[0, 2] = np.nan
  mask = jnp.array([[True, True, False], [False, False, False]])
  config = _config(slots=1)
  r = jax.random.normal(jax.random.key(0), (2, 3, 2, 1))

  def loss(lg):
    d = route(lg, config, train=True, padding_mask_GS=mask)
    losses, _ = d.stats.summarize()
    return (jnp.sum(d.dispatch_GSEC() * r) + jnp.sum(d.combine_GSEC() * r ** 2)
            + losses["router_z_loss"])

  grad = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(logits, jnp.float32)))
  assert np.all(np.isfinite(grad[np.asarray(mask)]))
  assert np.abs(grad[0, :2]).max() > 1e-3
  np.testing.assert_array_equal(np.nan_to_num(grad[~np.asarray(mask)], nan=1.0), 0.0)


def test_normalised_logits_with_scale():
  # x = (3, 4) -> (.6, .8); phi columns (1, 0) and (0, 2) -> (1, 0) and (0, 1); scale 2.
  x = jnp.array([[[3.0, 4.0], [0.0, 0.0]]])
  phi = jnp.array([[1.0, 0.0], [0.0, 2.0]])
  logits = soft_logits(x, phi, RouterInputs(scale=jnp.float32(2.0)))
  np.testing.assert_allclose(logits[0, 0], [1.2, 1.6], rtol=1e-6)
  np.testing.assert_array_equal(logits[0, 1], [0.0, 0.0])  # a zero (padding) token: no NaN
  np.testing.assert_allclose(soft_logits(100 * x, 7 * phi, RouterInputs(scale=jnp.float32(2.0))),
                             logits, rtol=1e-6)
  with pytest.raises(ValueError, match="scale"):
    soft_logits(x, phi, RouterInputs())


def test_settings():
  config = _config(num_experts=4, slots=3)
  assert config.capacity(128, train=True) == config.capacity(2, train=False) == 3
  assert config.family.logits_per_expert(config) == 3 and config.family.dense
  assert not config.causal(train=True) and not config.causal(train=False)
  for kwargs, field in [(dict(k=2), "k"), (dict(capacity_factor_train=2.0),
                                          "capacity_factor_train"),
                        (dict(min_capacity=1), "min_capacity"),
                        (dict(load_balancing_loss_weight=0.0), "load_balancing_loss_weight")]:
    with pytest.raises(ValueError, match=rf"router\.{field}=.* is not used: .*'soft'"):
      _config(**kwargs)
  with pytest.raises(ValueError, match=r"router\.soft\.slots_per_expert=0"):
    _config(slots=0)


def test_index_dispatch_is_refused_naming_the_field():
  with pytest.raises(ConfigError, match=r"model\.moe\.dispatch='index' cannot execute "
                     r"model\.moe\.router\.kind='soft'.*use 'einsum'"):
    MoeConfig(router=_config(), dispatch="index")
  MoeConfig(router=_config(), dispatch="einsum")
  decision = route(jnp.zeros((1, 2, 2)), _config(), train=False)
  with pytest.raises(ConfigError, match=r"model\.moe\.dispatch='index'.*'einsum'"):
    IndexDispatcher(decision)


# ----------------------------------------------------------------------------- the layer

P_SLOTS = 2  # slots per expert in the layer tests: E * p = 16 slots per group of S = 8 tokens


def make_soft_layer(*, slots=P_SLOTS, activation="relu", expert_dropout=0.0, seed=0, scale=2.5,
                    **router_kw):
  router = _config(num_experts=E, slots=slots, **router_kw)
  config = MoeConfig(router=router, ffn_dim=F, group_size=S, dispatch="einsum",
                     activation=activation, expert_dropout=expert_dropout)
  layer = MoeLayer(M, config, rngs=nnx.Rngs(seed))
  layer.router_scale[...] = jnp.float32(scale)  # a learned scale away from its initial 1
  return layer


def _softmax(a, axis):
  a = a - a.max(axis, keepdims=True)
  return np.exp(a) / np.exp(a).sum(axis, keepdims=True)


def paper_reference(layer, x_BLM, mask_BL):
  """Soft MoE from the paper's equations, in float64 numpy, group by group (relu experts)."""
  p = layer.config.router.soft.slots_per_expert
  phi = np.asarray(layer.router[...], np.float64)
  phi = phi / np.sqrt((phi ** 2).sum(0, keepdims=True) + NORM_EPS)
  scale = float(layer.router_scale[...])
  wi, wo = (np.asarray(w[...], np.float64) for w in (layer.wi, layer.wo))
  x_GSM = np.asarray(x_BLM, np.float64).reshape(-1, S, M)
  mask_GS = np.asarray(mask_BL).reshape(-1, S)
  y_GSM = np.zeros_like(x_GSM)
  for g in range(len(x_GSM)):
    real = mask_GS[g]
    x = x_GSM[g, real]  # the group's real tokens (N, M)
    if not len(x):
      continue
    x_norm = x / np.sqrt((x ** 2).sum(1, keepdims=True) + NORM_EPS)
    logits = scale * x_norm @ phi  # (N, E * p)
    dispatch = _softmax(logits, 0)  # eq. 1: over tokens, per slot
    combine = _softmax(logits, 1)  # eq. 3: over slots, per token
    slots = dispatch.T @ x  # eq. 2: (E * p, M)
    outputs = np.stack([np.maximum(slots[i] @ wi[i // p], 0.0) @ wo[i // p]
                        for i in range(E * p)])
    y_GSM[g, real] = combine @ outputs  # eq. 4
  return y_GSM.reshape(np.shape(x_BLM))


@pytest.mark.parametrize("train", [False, True])
def test_layer_equals_the_papers_formulas(train):
  layer = make_soft_layer()
  x, mask, _ = inputs()
  mask = np.asarray(mask).copy()
  mask[0, :S] = False  # one group without a real token
  x = np.where(mask[..., None], np.asarray(x), 1e3)  # large finite padding must not matter
  y, aux = apply(layer, jnp.asarray(x), jnp.asarray(mask), train=train)
  np.testing.assert_allclose(y, paper_reference(layer, x, mask), rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(y)[~mask] == 0.0)
  groups_with_tokens = mask.reshape(-1, S).any(1)
  np.testing.assert_allclose(aux.metrics["experts_per_token"],
                             E * P_SLOTS * groups_with_tokens.sum() / mask.sum(), rtol=1e-5)
  np.testing.assert_allclose(aux.metrics["expert_load"], np.full(E, 1 / E), rtol=1e-5)


def test_a_later_token_changes_an_earlier_tokens_output():
  layer = make_soft_layer()
  x, _, _ = inputs()
  y, _ = apply(layer, x, None, train=False)
  y2, _ = apply(layer, x.at[0, S - 1].multiply(-3.0), None, train=False)
  assert np.abs(np.asarray(y2 - y)[0, 0]).max() > 1e-4  # token 0 saw the change of token S-1


def test_gradients_reach_every_parameter_including_the_scale():
  x, mask, r = inputs()
  layer = make_soft_layer(activation="swiglu", jitter_eps=0.05)
  graphdef, state = nnx.split(layer)
  (_, (y, _)), (d_params, d_x) = grads_fn(graphdef)(state, x, mask, r)
  assert abs(float(d_params["router_scale"][...])) > 0
  for leaf in jax.tree.leaves(d_params) + [d_x]:
    assert np.all(np.isfinite(leaf))


SHARDED_CASES = [
    ((2, 4, 1), dict(jitter_eps=0.05)),
    ((1, 8, 1), dict(slots=1, activation="gelu")),
    ((1, 4, 2), dict(expert_dropout=0.2, activation="swiglu")),
]


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape,settings", SHARDED_CASES,
                         ids=["x".join(map(str, c[0])) for c in SHARDED_CASES])
def test_sharded_matches_single_device(mesh_shape, settings):
  layer = make_soft_layer(**settings)
  x, mask, r = inputs()
  graphdef, state = nnx.split(layer)
  want = grads_fn(graphdef)(state, x, mask, r)
  got = sharded_grads(layer, mesh_shape, x, mask, r)
  assert_same_results(got, want, f"soft on {mesh_shape}")


def test_hlo_has_two_all_to_alls():
  layer = make_soft_layer()
  x, _, _ = inputs()
  ops = _all_to_alls(_compiled_forward_text(layer, (1, 8, 1), x))
  assert len(ops) == 2, f"expected 2 all-to-alls, found {len(ops)}"
  groups = B * L // 8 // S
  for _, operands, elements in ops:
    assert operands == 8 and elements == E * groups * P_SLOTS * M
