"""Expert-choice routing (Zhou et al. 2022): hand cases, properties, the layer on every mesh.

Hand cases choose logits as log(p) (test_routing.py's convention), so the affinities are the
written probabilities. Expected combine tensors are written per token as E rows of C slots.
"""

import math
import zlib

import numpy as np
import pytest
from flax import nnx

from moejax.routing import RouterConfig
from routing_reference import assert_combine, logits_from_probs, o, route_np, softmax64
from test_moe import (E, M, S, T, _all_to_alls, _compiled_forward_text, apply,
                      assert_same_results, grads_fn, inputs, make_layer, sharded_grads)

ATOL = 1e-6


def _config(num_experts=3, **kwargs):
  kwargs.setdefault("min_capacity", 1)
  return RouterConfig(kind="expert_choice", num_experts=num_experts, **kwargs)


# Five tokens, three experts; C = ceil(1.0 * 5 / 3) = 2.
_PROBS = [[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.4, 0.5, 0.1],
           [0.35, 0.4, 0.25]]]
_SHIFT = [[1.0, -1.0, 2.0, 0.0, 3.0]]


def test_each_expert_takes_its_top_c_tokens():
  # e0 scores .5 .1 .2 .4 .35 -> t0 (slot 0), t3 (slot 1)
  # e1 scores .3 .6 .2 .5 .4  -> t1 (0), t3 (1)
  # e2 scores .2 .3 .6 .1 .25 -> t2 (0), t1 (1)
  # t4 is nobody's top 2: it reaches no expert; t1 and t3 reach two.
  routed = route_np(logits_from_probs(_PROBS, _SHIFT), _config(capacity_factor_train=1.0),
                    train=True)
  assert routed.capacity == 2
  assert_combine(routed, [[
      [[0.5, o], [o, o], [o, o]],  # t0
      [[o, o], [0.6, o], [o, 0.3]],  # t1
      [[o, o], [o, o], [0.6, o]],  # t2
      [[o, 0.4], [o, 0.5], [o, o]],  # t3
      [[o, o], [o, o], [o, o]],  # t4
  ]])
  # K = E: assignment k is expert k.
  np.testing.assert_array_equal(routed.expert_index_GSK[0], np.tile(np.arange(3), (5, 1)))
  np.testing.assert_array_equal(routed.keep_GSK[0], [
      [1, 0, 0], [0, 1, 1], [0, 0, 1], [1, 1, 0], [0, 0, 0]])
  np.testing.assert_array_equal(routed.slot_GSK[0], [
      [0, 0, 0], [0, 0, 1], [0, 0, 0], [1, 1, 0], [0, 0, 0]])
  m = routed.metrics
  np.testing.assert_allclose(m["expert_load"], [1 / 3] * 3, atol=ATOL)  # 2 picks each
  np.testing.assert_allclose(m["dropped_fraction"], 1 / 5, atol=ATOL)  # t4
  np.testing.assert_allclose(m["experts_per_token"], 6 / 5, atol=ATOL)
  np.testing.assert_allclose(m["capacity_utilisation"], 1.0, atol=ATOL)
  np.testing.assert_allclose(m["dropped_assignment_fraction"], 0.0, atol=ATOL)
  np.testing.assert_allclose(m["max_load_violation"], 0.0, atol=ATOL)
  assert float(m["experts_without_tokens"]) == 0.0
  np.testing.assert_allclose(m["router_confidence"], (0.5 + 0.6 + 0.6 + 0.5 + 0.4) / 5, atol=ATOL)
  # z-loss: logsumexp is each token's shift: (1 + 1 + 4 + 0 + 9) / 5. No other loss.
  assert set(routed.losses) == {"router_z_loss"}
  np.testing.assert_allclose(routed.losses["router_z_loss"], 15 / 5, atol=1e-5)


def test_capacity_factor_two_and_eval_factor():
  # Train factor 2: C = ceil(2 * 5 / 3) = 4; eval factor 0.5: C = ceil(0.5 * 5 / 3) = 1.
  config = _config(capacity_factor_train=2.0, capacity_factor_eval=0.5)
  assert config.capacity(5, train=True) == 4 and config.capacity(5, train=False) == 1
  assert config.capacity(128, train=True) == 86  # ceil(2 * 128 / 3), the paper's factor
  assert config.capacity(2, train=True) == 2  # at most S
  assert _config(min_capacity=3, capacity_factor_eval=0.5).capacity(5, train=False) == 3
  # Eval, C = 1: e0 -> t0, e1 -> t1, e2 -> t2.
  routed = route_np(logits_from_probs(_PROBS), config, train=False)
  np.testing.assert_array_equal(routed.keep_GSK[0], [
      [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0], [0, 0, 0]])
  np.testing.assert_allclose(routed.metrics["dropped_fraction"], 2 / 5, atol=ATOL)


def test_padding_is_never_picked_and_nan_does_not_leak():
  # t1 padded, with NaN logits: e0 .5 .2 .4 .35 -> t0, t3; e1 .3 .2 .5 .4 -> t3, t4;
  # e2 .2 .6 .1 .25 -> t2, t4.
  logits = np.asarray(logits_from_probs(_PROBS, _SHIFT)).copy()
  logits[0, 1] = np.nan
  mask = np.array([[True, False, True, True, True]])
  routed = route_np(logits, _config(capacity_factor_train=1.0), train=True, padding_mask_GS=mask)
  assert_combine(routed, [[
      [[0.5, o], [o, o], [o, o]],  # t0
      [[o, o], [o, o], [o, o]],  # t1: padding
      [[o, o], [o, o], [0.6, o]],  # t2
      [[o, 0.4], [0.5, o], [o, o]],  # t3
      [[o, o], [o, 0.4], [o, 0.25]],  # t4
  ]])
  m = routed.metrics
  np.testing.assert_allclose(m["dropped_fraction"], 0.0, atol=ATOL)
  np.testing.assert_allclose(m["experts_per_token"], 6 / 4, atol=ATOL)
  # z-loss over real tokens only: (1 + 4 + 0 + 9) / 4.
  np.testing.assert_allclose(routed.losses["router_z_loss"], 14 / 4, atol=1e-5)
  for name, value in {**routed.losses, **m}.items():
    assert np.all(np.isfinite(value)), name


def test_fewer_real_tokens_than_capacity_leave_slots_empty():
  # Group 0: only t2 real, C = 2: every expert picks t2 in slot 0 and leaves slot 1 empty.
  # Group 1: all padding: nothing is picked, nothing counts.
  logits = np.asarray(logits_from_probs([_PROBS[0], _PROBS[0]])).copy()
  logits[1] = -np.inf
  mask = np.array([[False, False, True, False, False], [False] * 5])
  routed = route_np(logits, _config(capacity_factor_train=1.0), train=True, padding_mask_GS=mask)
  assert_combine(routed, [[
      [[o, o], [o, o], [o, o]],
      [[o, o], [o, o], [o, o]],
      [[0.2, o], [0.2, o], [0.6, o]],
      [[o, o], [o, o], [o, o]],
      [[o, o], [o, o], [o, o]],
  ], [[[o, o], [o, o], [o, o]]] * 5])
  m = routed.metrics
  np.testing.assert_allclose(m["experts_per_token"], 3.0, atol=ATOL)
  np.testing.assert_allclose(m["capacity_utilisation"], 3 / 12, atol=ATOL)
  np.testing.assert_allclose(m["dropped_fraction"], 0.0, atol=ATOL)
  for name, value in {**routed.losses, **m}.items():
    assert np.all(np.isfinite(value)), name


def test_ties_go_to_the_earlier_token():
  # Four identical tokens, C = ceil(4 / 3) = 2: every expert picks t0 and t1.
  routed = route_np(logits_from_probs([[[0.5, 0.25, 0.25]] * 4]),
                    _config(capacity_factor_train=1.0), train=True)
  np.testing.assert_array_equal(routed.keep_GSK[0], [[1, 1, 1], [1, 1, 1], [0, 0, 0], [0, 0, 0]])
  np.testing.assert_array_equal(routed.slot_GSK[0], [[0, 0, 0], [1, 1, 1], [0, 0, 0], [0, 0, 0]])


def test_settings_it_does_not_read_are_refused():
  for kwargs, field in [(dict(k=2), "k"), (dict(load_balancing_loss_weight=0.1),
                                          "load_balancing_loss_weight"),
                        (dict(batch_prioritized=True), "batch_prioritized"),
                        (dict(normalize_weights=False), "normalize_weights")]:
    with pytest.raises(ValueError, match=rf"router\.{field}=.* is not used: .*'expert_choice'"):
      _config(**kwargs)
  config = _config()
  assert config.k is None and not config.causal(train=True) and not config.causal(train=False)
  assert config.loss_weights() == {"router_z_loss": config.z_loss_weight}


def _reference_picks(logits_GSE, mask_GS, capacity):
  """(keep_GSE, slot_GSE): each expert's C best real tokens, ties in position order."""
  probs = softmax64(logits_GSE)
  G, S_, E_ = probs.shape
  keep = np.zeros((G, S_, E_), bool)
  slot = np.zeros((G, S_, E_), np.int64)
  for g in range(G):
    for e in range(E_):
      real = [s for s in range(S_) if mask_GS[g, s]]
      for rank, s in enumerate(sorted(real, key=lambda s: (-probs[g, s, e], s))[:capacity]):
        keep[g, s, e], slot[g, s, e] = True, rank
  return keep, slot, probs


@pytest.mark.parametrize("G,S_,E_,factor,min_capacity,pad", [
    (6, 8, 4, 1.0, 1, 0.0), (6, 8, 4, 2.0, 1, 0.3), (5, 6, 8, 0.5, 2, 0.5),
    (4, 16, 2, 1.25, 1, 0.2)])
def test_properties_against_a_sequential_reference(G, S_, E_, factor, min_capacity, pad):
  rng = np.random.default_rng(zlib.crc32(repr((G, S_, E_, factor, pad)).encode()))
  logits = (rng.normal(size=(G, S_, E_)) * 2).astype(np.float32)
  mask = rng.random((G, S_)) >= pad
  mask[-1] = mask[-1] & (pad == 0)  # the last group is all padding when there is padding
  logits[~mask] = np.nan
  config = _config(num_experts=E_, capacity_factor_train=factor, min_capacity=min_capacity)
  routed = route_np(logits, config, train=True, padding_mask_GS=mask)
  C = min(max(min_capacity, math.ceil(factor * S_ / E_)), S_)
  assert routed.capacity == C
  keep, slot, probs = _reference_picks(logits, mask, C)
  np.testing.assert_array_equal(routed.keep_GSK, keep)
  np.testing.assert_array_equal(routed.slot_GSK[keep], slot[keep])
  np.testing.assert_allclose(routed.weight_GSK, np.where(keep, probs, 0.0), atol=ATOL)
  # Capacity never exceeded, a slot holds at most one token, padding takes none.
  assert np.all(routed.dispatch.sum(axis=(1, 3)) <= C)
  assert np.all(routed.dispatch.sum(axis=1) <= 1)
  assert not np.any(routed.dispatch[~mask])
  # Metrics from the picks; padding counts in none of them.
  real = max(mask.sum(), 1)
  np.testing.assert_allclose(routed.metrics["experts_per_token"], keep.sum() / real, atol=ATOL)
  np.testing.assert_allclose(routed.metrics["dropped_fraction"],
                             (mask & ~keep.any(-1)).sum() / real, atol=ATOL)
  np.testing.assert_allclose(routed.metrics["expert_load"], keep.sum((0, 1)) / keep.sum(),
                             atol=ATOL)
  lse = np.log(np.exp(np.where(mask[..., None], logits, 0.0).astype(np.float64)).sum(-1))
  np.testing.assert_allclose(routed.losses["router_z_loss"], np.sum(lse[mask] ** 2) / real,
                             rtol=1e-5)


def test_a_later_token_changes_an_earlier_tokens_routing():
  # Non-causal by design: t3 scores higher at e0 than t0 once changed, and takes t0's place.
  config = _config(capacity_factor_train=0.6)  # C = ceil(0.6 * 5 / 3) = 1
  before = route_np(logits_from_probs(_PROBS), config, train=True)
  probs = np.array(_PROBS)
  probs[0, 3] = [0.8, 0.1, 0.1]
  after = route_np(logits_from_probs(probs), config, train=True)
  assert before.keep_GSK[0, 0, 0] and not after.keep_GSK[0, 0, 0]


# ----------------------------------------------------------------------------- the layer


def reference_layer(layer, x_BLM, mask_BL, capacity):
  """The expert-choice layer in float64 numpy, from the layer's own parameters."""
  x_TM = np.asarray(x_BLM, np.float64).reshape(-1, M)
  mask_T = np.asarray(mask_BL).reshape(-1)
  logits = (x_TM @ np.asarray(layer.router[...], np.float64)).reshape(-1, S, E)
  keep, _, probs = _reference_picks(logits, mask_T.reshape(-1, S), capacity)
  h_TEF = np.maximum(np.einsum("TM,EMF->TEF", x_TM, np.asarray(layer.wi[...], np.float64)), 0)
  ffn_TEM = np.einsum("TEF,EFM->TEM", h_TEF, np.asarray(layer.wo[...], np.float64))
  weight_TE = np.where(keep, probs, 0.0).reshape(-1, E)
  y_TM = np.einsum("TE,TEM->TM", weight_TE, ffn_TEM)
  return y_TM.reshape(np.shape(x_BLM)), keep.reshape(-1, E)


@pytest.mark.parametrize("dispatch", ["index", "einsum"])
def test_layer_matches_numpy_reference(dispatch):
  # C = ceil(2 * 8 / 8) = 2 in evaluation.
  layer = make_layer("expert_choice", dispatch=dispatch, capacity_factor_eval=2.0)
  x, mask, _ = inputs()
  y, aux = apply(layer, x, mask, train=False)
  want_y, keep_TE = reference_layer(layer, x, mask, capacity=2)
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-6)
  real = np.asarray(mask).reshape(-1)
  np.testing.assert_allclose(aux.metrics["experts_per_token"], keep_TE.sum() / real.sum(),
                             rtol=1e-6)
  np.testing.assert_allclose(aux.metrics["dropped_fraction"],
                             (real & ~keep_TE.any(-1)).sum() / real.sum(), rtol=1e-6)
  assert float(aux.metrics["dropped_fraction"]) > 0  # some tokens reach no expert
  assert np.all(np.asarray(y)[~np.asarray(mask)] == 0.0)


def test_einsum_and_index_layers_agree_with_gradients():
  x, mask, r = inputs()
  results = {}
  for dispatch in ("einsum", "index"):
    layer = make_layer("expert_choice", dispatch=dispatch, activation="gelu",
                       capacity_factor_train=1.0, jitter_eps=0.05)
    graphdef, state = nnx.split(layer)
    results[dispatch] = grads_fn(graphdef)(state, x, mask, r)
  assert_same_results(results["einsum"], results["index"], "einsum vs index")


SHARDED_CASES = [
    ("index", (2, 4, 1), dict(capacity_factor_train=1.0)),
    ("einsum", (1, 8, 1), dict(capacity_factor_train=2.0, jitter_eps=0.05)),
    ("index", (1, 4, 2), dict(capacity_factor_train=0.5, expert_dropout=0.2)),
]


@pytest.mark.slow
@pytest.mark.parametrize("dispatch,mesh_shape,settings", SHARDED_CASES,
                         ids=[f"{c[0]}-{'x'.join(map(str, c[1]))}" for c in SHARDED_CASES])
def test_sharded_matches_single_device(dispatch, mesh_shape, settings):
  settings = dict(settings)
  layer = make_layer("expert_choice", dispatch=dispatch,
                     expert_dropout=settings.pop("expert_dropout", 0.0), **settings)
  x, mask, r = inputs()
  graphdef, state = nnx.split(layer)
  want = grads_fn(graphdef)(state, x, mask, r)
  got = sharded_grads(layer, mesh_shape, x, mask, r)
  assert_same_results(got, want, f"expert_choice/{dispatch} on {mesh_shape}")


def test_hlo_has_two_all_to_alls():
  layer = make_layer("expert_choice", capacity_factor_train=1.0)
  x, _, _ = inputs()
  ops = _all_to_alls(_compiled_forward_text(layer, (2, 4, 1), x))
  assert len(ops) == 2, f"expected 2 all-to-alls, found {len(ops)}"
  groups = T // 8 // S  # local groups per device
  for _, operands, elements in ops:
    assert operands == 4 and elements == E * groups * 1 * M  # C = ceil(8 / 8) = 1
