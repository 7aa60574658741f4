"""random: k distinct experts drawn uniformly, whatever the token; router weights of those experts.

Hand cases choose router logits as log(p) so that the softmax returns p, and give the uniform
numbers; the two largest uniforms of a token name its experts. Evaluation's fixed numbers are
recomputed here by an independent pure-Python version of the 32-bit hash.
"""

import itertools
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from family_checks import (assert_capacity_respected, dispatch_results, forward,
                           forward_all_to_alls, make_layer, routed, sharded_results,
                           single_device_results)
from moejax.routing import RouterConfig, RouterInputs, route
from moejax.routing.random_routing import position_uniform_SE
from routing_reference import reference_route
from test_moe import apply, assert_same_results, inputs

ATOL = 1e-6


def config(num_experts=4, **kwargs):
  kwargs.setdefault("min_capacity", 1)
  return RouterConfig(kind="random", num_experts=num_experts, **kwargs)


def log_probs(p):
  return np.log(np.asarray(p, np.float64)).astype(np.float32)


# G=1, S=4, E=4, k=2, capacity factor 0.5: C = ceil(2 * 0.5 * 4 / 4) = 1. Token 3 is padding.
_PROBS = [[[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25], [0.4, 0.3, 0.2, 0.1],
           [0.7, 0.1, 0.1, 0.1]]]
_UNIFORM = [[[0.1, 0.9, 0.5, 0.3],    # t0 -> e1, e2
             [0.8, 0.2, 0.7, 0.1],    # t1 -> e0, e2
             [0.2, 0.3, 0.6, 0.95],   # t2 -> e3, e2
             [0.9, 0.1, 0.8, 0.2]]]   # t3 (padding) -> e0, e2, but takes nothing
_MASK = [[True, True, True, False]]


@pytest.mark.parametrize("normalize", [True, False])
def test_training_decision_by_hand(normalize):
  cfg = config(k=2, normalize_weights=normalize, capacity_factor_train=0.5)
  r = routed(log_probs(_PROBS), cfg, train=True, mask_GS=_MASK,
             uniform_GSE=np.asarray(_UNIFORM, np.float32))
  assert r.capacity == 1
  np.testing.assert_array_equal(r.expert_index_GSK[0, :3], [[1, 2], [0, 2], [3, 2]])
  # Token by token: t0 takes e1 and e2's one slot; t1 takes e0 and finds e2 full; t2 takes e3
  # and finds e2 full. (Every first choice before any second gives the same here.)
  np.testing.assert_array_equal(r.keep_GSK[0], [[1, 1], [1, 0], [1, 0], [0, 0]])
  # Weights: the router's probabilities of the drawn experts, renormalised over the two.
  want = ([[0.4, 0.6], [0.5, 0.0], [1 / 3, 0.0], [0.0, 0.0]] if normalize else
          [[0.2, 0.3], [0.25, 0.0], [0.1, 0.0], [0.0, 0.0]])
  np.testing.assert_allclose(r.weight_GSK[0], want, atol=ATOL)
  assert set(r.losses) == {"router_z_loss"}  # no balancing loss: the choice ignores the router
  np.testing.assert_allclose(r.losses["router_z_loss"], 0.0, atol=1e-5)  # logsumexp(log p) = 0
  np.testing.assert_allclose(r.metrics["expert_load"], [1 / 6, 1 / 6, 3 / 6, 1 / 6], atol=ATOL)
  np.testing.assert_allclose(r.metrics["dropped_assignment_fraction"], 2 / 6, atol=ATOL)
  assert_capacity_respected(r, _MASK)


def test_single_expert_with_normalised_weights_has_weight_one():
  r = routed(log_probs(_PROBS), config(k=1, capacity_factor_train=4.0), train=True,
             uniform_GSE=np.asarray(_UNIFORM, np.float32))
  np.testing.assert_array_equal(r.expert_index_GSK[0, :, 0], [1, 0, 3, 0])
  np.testing.assert_allclose(r.weight_GSK[0, :, 0], 1.0, atol=ATOL)


def test_choice_ignores_the_logits():
  rng = np.random.default_rng(0)
  uniform = rng.random((3, 8, 6)).astype(np.float32)
  cfg = config(num_experts=6, k=3, capacity_factor_train=6.0)
  a = routed(rng.normal(size=(3, 8, 6)).astype(np.float32), cfg, train=True, uniform_GSE=uniform)
  b = routed(rng.normal(size=(3, 8, 6)).astype(np.float32) * 5, cfg, train=True,
             uniform_GSE=uniform)
  np.testing.assert_array_equal(a.expert_index_GSK, b.expert_index_GSK)
  np.testing.assert_array_equal(a.expert_index_GSK, np.argsort(-uniform, -1)[..., :3])


def test_training_needs_the_uniforms():
  with pytest.raises(ValueError, match="random.*uniform_GSE"):
    routed(log_probs(_PROBS), config(k=2), train=True)


# (E, k, normalize, capacity factor, train, pad rate, claim order)
_CASES = [(4, 1, True, 1.0, True, 0.3, "position"), (6, 2, True, 0.5, True, 0.3, "position"),
          (6, 3, False, 1.25, True, 0.0, "choice"), (5, 2, False, 0.75, False, 0.3, "choice"),
          (3, 3, True, 1.0, True, 0.5, "position")]


@pytest.mark.parametrize("case", _CASES, ids=lambda c: "-".join(map(str, c)))
def test_properties_and_reference(case):
  E_, k, normalize, factor, train, pad, claim_order = case
  G, S = 4, 8
  rng = np.random.default_rng(zlib.crc32(repr(case).encode()))
  logits = rng.normal(size=(G, S, E_))
  mask = rng.random((G, S)) >= pad
  uniform = rng.random((G, S, E_)).astype(np.float32) if train else None
  cfg = config(E_, k=k, normalize_weights=normalize, capacity_factor_train=factor,
               capacity_factor_eval=factor, **({"claim_order": claim_order} if k > 1 else {}))
  # Padded tokens hold NaN logits: they must reach no output, loss or metric.
  r = routed(np.where(mask[..., None], logits, np.nan).astype(np.float32), cfg, train=train,
             mask_GS=mask, uniform_GSE=uniform)
  scores = uniform if train else np.broadcast_to(position_uniform_SE(S, E_), (G, S, E_))
  # The claim ranks the uniforms: reference_route on them gives the experts, keep and slots.
  ref = reference_route(np.log(scores.astype(np.float64)), kind="topk", k=k, normalize=False,
                        capacity=cfg.capacity(S, train=train), mask_GS=mask,
                        batch_prioritized=False, claim_order=claim_order)
  np.testing.assert_array_equal(r.expert_index_GSK[mask], ref["expert"][mask])
  np.testing.assert_array_equal(r.keep_GSK, ref["keep"])
  np.testing.assert_array_equal(r.slot_GSK[r.keep_GSK], ref["slot"][ref["keep"]])
  assert_capacity_respected(r, mask)
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  gates = np.take_along_axis(probs, ref["expert"], -1)
  if normalize:
    gates /= gates.sum(-1, keepdims=True)
  np.testing.assert_allclose(r.weight_GSK, np.where(ref["keep"], gates, 0.0), atol=ATOL)
  z = np.log(np.exp(logits).sum(-1)) ** 2
  np.testing.assert_allclose(r.losses["router_z_loss"], z[mask].mean(), rtol=1e-5)
  for name, value in r.metrics.items():
    assert np.all(np.isfinite(value)), name


# ======================================================================= evaluation


def _fmix32(h):
  h ^= h >> 16
  h = (h * 0x85EBCA6B) & 0xFFFFFFFF
  h ^= h >> 13
  h = (h * 0xC2B2AE35) & 0xFFFFFFFF
  return h ^ (h >> 16)


def _position_uniform(s, e, num_experts):
  return (_fmix32((s * num_experts + e) ^ 0x9E3779B9) >> 8) / 2.0**24


def test_evaluation_numbers_are_the_documented_hash():
  got = np.asarray(position_uniform_SE(5, 3))
  want = [[_position_uniform(s, e, 3) for e in range(3)] for s in range(5)]
  np.testing.assert_array_equal(got, np.asarray(want, np.float32))


def test_evaluation_routes_by_position_in_the_group_only():
  rng = np.random.default_rng(1)
  cfg = config(num_experts=5, k=2, capacity_factor_eval=5.0)
  a = routed(rng.normal(size=(3, 6, 5)).astype(np.float32), cfg, train=False)
  b = routed(rng.normal(size=(3, 6, 5)).astype(np.float32), cfg, train=False)
  want_SK = [sorted(range(5), key=lambda e: -_position_uniform(s, e, 5))[:2] for s in range(6)]
  for r in (a, b):  # whatever the logits, in every group: the same experts for position s
    np.testing.assert_array_equal(r.expert_index_GSK, np.broadcast_to(want_SK, (3, 6, 2)))
  # The weights are still the router's.
  assert np.abs(a.weight_GSK - b.weight_GSK).max() > 1e-3


def _chi_square(counts, expected):
  counts = np.asarray(counts, np.float64)
  return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("train", [True, False])
def test_experts_and_pairs_of_experts_are_uniform(train):
  """Over 4096 tokens (E=8, k=2): each expert and each pair of experts as often as any other."""
  E_, k, tokens = 8, 2, 4096
  cfg = config(E_, k=k)
  uniform = jax.random.uniform(jax.random.key(0), (1, tokens, E_)) if train else None
  # Only the choice is compared: no (G, S, E, C) tensors of a 4096-token group.
  choose = jax.jit(lambda logits, uniform: route(
      logits, cfg, train=train, inputs=RouterInputs(uniform_GSE=uniform)).expert_index_GSK)
  experts = np.asarray(choose(jnp.zeros((1, tokens, E_)), uniform)).reshape(-1, k)
  assert np.all(experts[:, 0] != experts[:, 1]), "a token drew the same expert twice"
  # 99.9% quantiles of chi-square with 7 and 27 degrees of freedom: 24.3 and 55.5.
  assert _chi_square(np.bincount(experts.ravel(), minlength=E_), tokens * k / E_) < 24.3
  pairs = {p: i for i, p in enumerate(itertools.combinations(range(E_), 2))}
  pair_counts = np.bincount([pairs[tuple(sorted(t))] for t in experts], minlength=len(pairs))
  assert _chi_square(pair_counts, tokens / math.comb(E_, 2)) < 55.5


# ======================================================================= through MoeLayer


def _layer(dispatch="index", **kwargs):
  kwargs.setdefault("k", 2)
  kwargs.setdefault("capacity_factor_train", 1.0)
  return make_layer("random", dispatch=dispatch, **kwargs)


def test_layer_draws_new_experts_every_training_step_and_fixed_ones_in_evaluation():
  layer = _layer()
  x, mask, _ = inputs()
  y_train, aux = apply(layer, x, mask, train=True)
  y_train_2, _ = apply(layer, x, mask, train=True)
  y_eval, _ = apply(layer, x, mask, train=False)
  y_eval_2, _ = apply(layer, x, mask, train=False)
  assert np.abs(np.asarray(y_train - y_train_2)).max() > 1e-3
  np.testing.assert_array_equal(y_eval, y_eval_2)
  assert set(aux.losses) == {"router_z_loss"}


def test_einsum_and_index_layers_agree_with_gradients():
  results = dispatch_results(lambda dispatch: _layer(dispatch, activation="gelu"))
  assert float(results["index"][0][1][1].metrics["dropped_assignment_fraction"]) > 0.05
  assert_same_results(results["einsum"], results["index"], "random")


_SHARDED = [
    ((2, 4, 1), dict()),
    ((1, 8, 1), dict(k=1, dispatch="einsum", capacity_factor_train=0.5)),
    ((1, 4, 2), dict(k=3, normalize_weights=False, activation="swiglu")),
]


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape,settings", _SHARDED, ids=[str(c[0]) for c in _SHARDED])
def test_sharded_matches_single_device(mesh_shape, settings):
  layer = _layer(**settings)
  want = single_device_results(layer)
  assert float(want[0][1][1].metrics["dropped_assignment_fraction"]) > 0.05
  assert_same_results(sharded_results(layer, mesh_shape), want, f"random on {mesh_shape}")


@pytest.mark.slow
def test_sharded_evaluation_matches_single_device():
  layer = _layer(capacity_factor_eval=1.0)
  y, aux = forward(layer)
  y_mesh, aux_mesh = forward(layer, (2, 4, 1))
  np.testing.assert_allclose(y_mesh, y, rtol=1e-5, atol=1e-6)
  for name, value in {**aux.losses, **aux.metrics}.items():
    np.testing.assert_allclose({**aux_mesh.losses, **aux_mesh.metrics}[name], value, rtol=1e-5,
                               atol=1e-7, err_msg=name)


def test_forward_holds_two_all_to_alls():
  ops = forward_all_to_alls(_layer(), (1, 8, 1))
  assert len(ops) == 2, f"expected 2 all-to-alls, found {len(ops)}"
