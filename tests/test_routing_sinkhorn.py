"""S-BASE (Sinkhorn) routing: balanced matrices by hand, selection, properties, every mesh.

Hand cases choose logits as log(p) (test_routing.py's convention). A 2 x 2 matrix K has one
balanced form with unit rows and columns, [[x, 1-x], [1-x, x]], and scaling rows and columns keeps
the cross ratio K00 K11 / (K01 K10) = rho, so x^2 / (1-x)^2 = rho: x = sqrt(rho) / (1 + sqrt(rho)).
"""

import functools
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.routing import BalanceConfig, RouterConfig, SinkhornConfig
from moejax.routing.sinkhorn import sinkhorn_log_balance
from routing_reference import logits_from_probs, route_np, softmax64
from test_moe import (E, M, S, T, _all_to_alls, _compiled_forward_text, apply,
                      assert_same_results, grads_fn, inputs, make_layer, sharded_grads)

ATOL = 1e-6


def _config(num_experts=2, k=1, iterations=50, tolerance=1e-5, **kwargs):
  kwargs.setdefault("min_capacity", 1)
  kwargs.setdefault("normalize_weights", False)
  return RouterConfig(kind="sinkhorn", num_experts=num_experts, k=k,
                      sinkhorn=SinkhornConfig(iterations=iterations, tolerance=tolerance),
                      **kwargs)


@functools.partial(jax.jit, static_argnames=("iterations", "tolerance"))
def _balance_jit(logits, mask, *, iterations, tolerance):
  log_balanced, rounds = sinkhorn_log_balance(logits, mask, iterations=iterations,
                                              tolerance=tolerance)
  return jnp.exp(log_balanced), rounds


def _balance(logits, mask=None, *, iterations=50, tolerance=1e-6):
  logits = jnp.asarray(logits, jnp.float32)
  mask = jnp.ones(logits.shape[:2], bool) if mask is None else jnp.asarray(mask)
  balanced, rounds = _balance_jit(logits, mask, iterations=iterations, tolerance=tolerance)
  return np.asarray(balanced), np.asarray(rounds)


def _two_by_two(rho):
  x = math.sqrt(rho) / (1 + math.sqrt(rho))
  return [[x, 1 - x], [1 - x, x]]


def test_two_by_two_balanced_matrices_in_closed_form():
  # Router probabilities (.8, .2), (.5, .5): rho = (.8 * .5) / (.2 * .5) = 4, x = 2/3.
  balanced, rounds = _balance(logits_from_probs([[[0.8, 0.2], [0.5, 0.5]]]))
  np.testing.assert_allclose(balanced[0], [[2 / 3, 1 / 3], [1 / 3, 2 / 3]], atol=1e-5)
  # (.8, .2), (.6, .4): rho = .32 / .12 = 8/3.
  balanced, _ = _balance(logits_from_probs([[[0.8, 0.2], [0.6, 0.4]]]))
  np.testing.assert_allclose(balanced[0], _two_by_two(8 / 3), atol=1e-5)
  assert 1 <= rounds[0] < 50


def test_rows_total_one_and_columns_their_share_with_padding():
  # Five positions, three real (t1 and t3 padded with NaN), three experts: each expert's total is
  # N / E = 1; every real row totals 1; padded rows are 0. The 2 x 2 block case of group 1:
  # four real tokens, two experts, columns total 2.
  probs = [[[0.7, 0.2, 0.1], [0.3, 0.3, 0.4], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]],
           [[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.6, 0.3, 0.1],
            [0.1, 0.1, 0.8]]]
  logits = np.asarray(logits_from_probs(probs)).copy()
  logits[0, [1, 3]] = np.nan
  mask = np.array([[True, False, True, False, True], [True, True, True, True, False]])
  balanced, rounds = _balance(logits, mask, iterations=200, tolerance=1e-5)
  np.testing.assert_allclose(balanced.sum(-1), mask.astype(float), atol=1e-5)
  np.testing.assert_allclose(balanced[0].sum(0), [1.0, 1.0, 1.0], rtol=1e-4)
  np.testing.assert_allclose(balanced[1].sum(0), [4 / 3] * 3, rtol=1e-4)
  assert np.all(balanced[~mask] == 0.0)
  # The balanced matrix is the router's matrix with rows and columns rescaled: every cross ratio
  # p[a, e] p[b, f] / (p[a, f] p[b, e]) is kept.
  p = np.asarray(probs, np.float64)
  for g, (a, b) in [(0, (0, 2)), (0, (2, 4)), (1, (0, 3))]:
    for e, f in [(0, 1), (1, 2), (0, 2)]:
      ratio = lambda m: m[g, a, e] * m[g, b, f] / (m[g, a, f] * m[g, b, e])
      np.testing.assert_allclose(ratio(balanced), ratio(p), rtol=1e-4)
  assert np.all(rounds < 200)


def test_identical_rows_balance_in_one_round_to_uniform():
  balanced, rounds = _balance(logits_from_probs([[[0.7, 0.2, 0.1]] * 6]))
  np.testing.assert_allclose(balanced[0], np.full((6, 3), 1 / 3), atol=1e-6)
  assert rounds[0] == 1


def test_iterations_cap_and_tolerance_stop_the_rounds():
  rng = np.random.default_rng(3)
  logits = (rng.normal(size=(2, 16, 4)) * 3).astype(np.float32)
  tight, tight_rounds = _balance(logits, iterations=500, tolerance=1e-4)
  assert np.all((1 < tight_rounds) & (tight_rounds < 500))
  np.testing.assert_allclose(tight.sum(1), np.full((2, 4), 4.0), rtol=1e-4)
  once, once_rounds = _balance(logits, iterations=1, tolerance=1e-4)
  np.testing.assert_array_equal(once_rounds, [1, 1])
  assert np.abs(once.sum(1) / 4.0 - 1).max() > 1e-3  # one round does not balance this
  loose, loose_rounds = _balance(logits, iterations=500, tolerance=0.5)
  assert np.all(loose_rounds < tight_rounds)
  assert np.abs(loose.sum(1) / 4.0 - 1).max() <= 0.5


def test_a_converged_group_is_frozen_so_other_groups_do_not_change_it():
  # Group 0 converges in one round; group 1 needs many. Group 0's result alone and beside
  # group 1 is bitwise the same (what makes the sharded layer equal the single-device one).
  rng = np.random.default_rng(5)
  fast = np.asarray(logits_from_probs([[[0.7, 0.2, 0.1]] * 8]))
  slow = (rng.normal(size=(1, 8, 3)) * 4).astype(np.float32)
  alone, alone_rounds = _balance(fast, tolerance=1e-5)
  both, both_rounds = _balance(np.concatenate([fast, slow]), tolerance=1e-5)
  assert alone_rounds[0] == both_rounds[0] == 1 < both_rounds[1]
  np.testing.assert_array_equal(both[0], alone[0])
  np.testing.assert_array_equal(_balance(slow, tolerance=1e-5)[0][0], both[1])


def test_empty_group_is_all_zero():
  balanced, rounds = _balance(np.full((1, 3, 2), np.nan, np.float32), np.zeros((1, 3), bool))
  assert np.all(balanced == 0.0) and rounds[0] == 0


def test_training_picks_on_balanced_scores_with_unbalanced_weights():
  # Balanced: [[2/3, 1/3], [1/3, 2/3]]: t1 goes to e1 in training although its router
  # probabilities tie (and plain top-1 picks e0, the lower index, in evaluation).
  config = _config(capacity_factor_train=2.0, capacity_factor_eval=2.0)
  logits = logits_from_probs([[[0.8, 0.2], [0.5, 0.5]]])
  train = route_np(logits, config, train=True)
  np.testing.assert_array_equal(train.expert_index_GSK[0, :, 0], [0, 1])
  np.testing.assert_allclose(train.weight_GSK[0, :, 0], [0.8, 0.5], atol=ATOL)
  np.testing.assert_allclose(train.metrics["expert_load"], [0.5, 0.5], atol=ATOL)
  evaluation = route_np(logits, config, train=False)
  np.testing.assert_array_equal(evaluation.expert_index_GSK[0, :, 0], [0, 0])
  np.testing.assert_allclose(evaluation.metrics["expert_load"], [1.0, 0.0], atol=ATOL)
  # Renormalised over k = 1, every weight is 1.
  normalized = route_np(logits, _config(capacity_factor_train=2.0, normalize_weights=True),
                        train=True)
  np.testing.assert_allclose(normalized.weight_GSK[0, :, 0], [1.0, 1.0], atol=ATOL)
  assert set(train.losses) == {"router_z_loss"}


def test_a_later_token_changes_an_earlier_tokens_choice_in_training_only():
  config = _config(capacity_factor_train=2.0, capacity_factor_eval=2.0)
  first = logits_from_probs([[[0.6, 0.4], [0.9, 0.1]]])
  second = logits_from_probs([[[0.6, 0.4], [0.1, 0.9]]])
  for train, changes in [(True, True), (False, False)]:
    a = route_np(first, config, train=train).expert_index_GSK[0, 0, 0]
    b = route_np(second, config, train=train).expert_index_GSK[0, 0, 0]
    assert (a != b) == changes, train
  assert not config.causal(train=True) and config.causal(train=False)


def _skewed_inputs(G, S_, E_, seed, pad):
  rng = np.random.default_rng(seed)
  logits = (rng.normal(size=(G, S_, E_)) + np.linspace(2.0, 0.0, E_)).astype(np.float32)
  mask = rng.random((G, S_)) >= pad
  logits[~mask] = np.nan
  return logits, mask


@pytest.mark.parametrize("k,normalize,factor,pad", [
    (1, False, 1.0, 0.0), (2, True, 1.25, 0.3), (2, False, 2.0, 0.2)])
def test_evaluation_is_plain_topk(k, normalize, factor, pad):
  logits, mask = _skewed_inputs(4, 8, 4, zlib.crc32(repr((k, factor)).encode()), pad)
  common = dict(num_experts=4, k=k, normalize_weights=normalize, capacity_factor_eval=factor,
                min_capacity=1)
  got = route_np(logits, _config(**common), train=False, padding_mask_GS=mask)
  topk = RouterConfig(kind="topk", **common)
  want = route_np(logits, topk, train=False, padding_mask_GS=mask)
  for name in ("expert_index_GSK", "slot_GSK", "keep_GSK", "weight_GSK", "combine"):
    np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


@pytest.mark.parametrize("k,normalize,factor,pad", [
    (1, False, 1.0, 0.0), (2, True, 1.0, 0.3), (1, True, 0.5, 0.2)])
def test_training_properties(k, normalize, factor, pad):
  G, S_, E_ = 6, 16, 4
  logits, mask = _skewed_inputs(G, S_, E_, zlib.crc32(repr((k, factor, pad)).encode()), pad)
  config = _config(num_experts=E_, k=k, normalize_weights=normalize, capacity_factor_train=factor,
                   capacity_factor_eval=factor, iterations=100, tolerance=1e-4)
  got = route_np(logits, config, train=True, padding_mask_GS=mask)
  C = max(1, math.ceil(k * factor * S_ / E_))
  assert got.capacity == C
  # Selection: the top-k of each row of the balanced matrix.
  balanced, _ = _balance(logits, mask, iterations=100, tolerance=1e-4)
  want_expert = np.argsort(-balanced, axis=-1, kind="stable")[..., :k]
  np.testing.assert_array_equal(got.expert_index_GSK[mask], want_expert[mask])
  # Weights: the unbalanced softmax probabilities of the chosen experts, where kept.
  probs = softmax64(np.where(mask[..., None], logits, 0.0))
  gates = np.take_along_axis(probs, got.expert_index_GSK, -1)
  if normalize:
    gates = gates / gates.sum(-1, keepdims=True)
  np.testing.assert_allclose(got.weight_GSK, np.where(got.keep_GSK, gates, 0.0), atol=ATOL)
  # Capacity never exceeded, padding takes none.
  assert np.all(got.dispatch.sum(axis=(1, 3)) <= C)
  assert np.all(got.dispatch.sum(axis=1) <= 1)
  assert not np.any(got.keep_GSK[~mask])
  # The skewed router overloads expert 0 in evaluation; Sinkhorn balances training's choice.
  evaluation = route_np(logits, config, train=False, padding_mask_GS=mask)
  assert (float(got.metrics["max_load_violation"]) + 0.5
          < float(evaluation.metrics["max_load_violation"]))


def test_settings():
  with pytest.raises(ValueError, match=r"router\.k=None"):
    RouterConfig(kind="sinkhorn", num_experts=4)
  for kwargs, field in [
      (dict(load_balancing_loss_weight=0.1), "load_balancing_loss_weight"),
      (dict(balance=BalanceConfig(bias_update_rate=0.1)), "balance.bias_update_rate")]:
    with pytest.raises(ValueError, match=rf"router\.{field}=.* is not used: .*'sinkhorn'"):
      _config(**kwargs)
  config = _config(k=2, num_experts=4, batch_prioritized=True, capacity_factor_train=1.5)
  assert config.capacity(8, train=True) == 6  # ceil(2 * 1.5 * 8 / 4)
  assert config.loss_weights() == {"router_z_loss": config.z_loss_weight}


# ----------------------------------------------------------------------------- the layer


def test_layer_in_evaluation_equals_the_topk_layer():
  x, mask, _ = inputs()
  settings = dict(k=2, normalize_weights=True, capacity_factor_eval=1.0)
  y, aux = apply(make_layer("sinkhorn", **settings), x, mask, train=False)
  y_topk, aux_topk = apply(make_layer("topk", **settings), x, mask, train=False)
  np.testing.assert_array_equal(y, y_topk)
  for name in aux.metrics:
    np.testing.assert_array_equal(aux.metrics[name], aux_topk.metrics[name], err_msg=name)


def test_einsum_and_index_layers_agree_with_gradients():
  x, mask, r = inputs()
  results = {}
  for dispatch in ("einsum", "index"):
    layer = make_layer("sinkhorn", dispatch=dispatch, k=2, capacity_factor_train=1.0,
                       jitter_eps=0.05)
    graphdef, state = nnx.split(layer)
    results[dispatch] = grads_fn(graphdef)(state, x, mask, r)
  assert_same_results(results["einsum"], results["index"], "einsum vs index")


SHARDED_CASES = [
    ("index", (2, 4, 1), dict(k=1, normalize_weights=False, capacity_factor_train=1.0)),
    ("einsum", (1, 8, 1), dict(k=2, capacity_factor_train=1.0, jitter_eps=0.05)),
    ("index", (1, 4, 2), dict(k=2, capacity_factor_train=0.5, batch_prioritized=True)),
]


@pytest.mark.slow
@pytest.mark.parametrize("dispatch,mesh_shape,settings", SHARDED_CASES,
                         ids=[f"{c[0]}-{'x'.join(map(str, c[1]))}" for c in SHARDED_CASES])
def test_sharded_matches_single_device(dispatch, mesh_shape, settings):
  layer = make_layer("sinkhorn", dispatch=dispatch, **settings)
  x, mask, r = inputs()
  graphdef, state = nnx.split(layer)
  want = grads_fn(graphdef)(state, x, mask, r)
  got = sharded_grads(layer, mesh_shape, x, mask, r)
  assert_same_results(got, want, f"sinkhorn/{dispatch} on {mesh_shape}")


def test_hlo_has_two_all_to_alls():
  layer = make_layer("sinkhorn", k=1, capacity_factor_train=1.0)
  x, _, _ = inputs()
  ops = _all_to_alls(_compiled_forward_text(layer, (1, 8, 1), x))
  assert len(ops) == 2, f"expected 2 all-to-alls, found {len(ops)}"
  groups = T // 8 // S
  for _, operands, elements in ops:
    assert operands == 8 and elements == E * groups * 1 * M  # C = ceil(1 * 8 / 8) = 1
