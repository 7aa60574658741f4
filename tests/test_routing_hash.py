"""hash: expert = table[token id] (Roller et al. 2021), weight 1; the random and balanced tables.

Hand cases give the table and the token ids and spell out the decision; `balanced_table` is
followed step by step (token totals and id counts of each expert) in the comments.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from family_checks import (E, VOCAB, assert_capacity_respected, dispatch_results, forward,
                           forward_all_to_alls, make_layer, routed, sharded_results,
                           single_device_results, token_ids)
from moejax.moe import MoeConfig, MoeLayer
from moejax.routing import HashConfig, RouterConfig
from moejax.routing.hash_routing import balanced_table, initial_table, random_table
from test_moe import assert_same_results, inputs

ATOL = 1e-6


def config(num_experts=3, **kwargs):
  kwargs.setdefault("min_capacity", 1)
  return RouterConfig(kind="hash", num_experts=num_experts, **kwargs)


# ======================================================================= routing by hand

# E=3, S=5, capacity factor 0.6: C = ceil(0.6 * 5 / 3) = 1. Token 2 is padding with an id
# outside the table: padding ids are never read.
_TABLE = np.array([2, 0, 1, 2, 0, 1], np.int32)
_IDS = [[3, 0, 99, 4, 1]]
_MASK = [[True, True, False, True, True]]


@pytest.mark.parametrize("train", [True, False])
def test_decision_by_hand(train):
  cfg = config(capacity_factor_train=0.6, capacity_factor_eval=0.6)
  logits = np.random.default_rng(0).normal(size=(1, 5, 3)).astype(np.float32)
  r = routed(logits, cfg, train=train, mask_GS=_MASK, token_ids_GS=np.asarray(_IDS, np.int32),
             hash_table_V=_TABLE)
  assert r.capacity == 1
  # ids 3, 0, -, 4, 1 -> experts 2, 2, -, 0, 0: the second token at each expert is over capacity.
  np.testing.assert_array_equal(r.expert_index_GSK[0, [0, 1, 3, 4], 0], [2, 2, 0, 0])
  np.testing.assert_array_equal(r.keep_GSK[0, :, 0], [True, False, False, True, False])
  np.testing.assert_allclose(r.weight_GSK[0, :, 0], [1, 0, 0, 1, 0], atol=0)  # weight 1
  assert set(r.losses) == {"router_z_loss"}
  np.testing.assert_allclose(r.metrics["expert_load"], [0.5, 0.0, 0.5], atol=ATOL)
  np.testing.assert_allclose(r.metrics["dropped_fraction"], 0.5, atol=ATOL)
  np.testing.assert_allclose(r.metrics["experts_without_tokens"], 1.0, atol=0)
  assert_capacity_respected(r, _MASK)
  # The logits decide nothing.
  r2 = routed(-5 * logits, cfg, train=train, mask_GS=_MASK,
              token_ids_GS=np.asarray(_IDS, np.int32), hash_table_V=_TABLE)
  np.testing.assert_array_equal(r2.expert_index_GSK[0, [0, 1, 3, 4]],
                                r.expert_index_GSK[0, [0, 1, 3, 4]])
  np.testing.assert_array_equal(r2.weight_GSK, r.weight_GSK)


@pytest.mark.parametrize("num_experts,factor,train", [(3, 1.0, True), (4, 0.5, False),
                                                      (6, 1.25, True)])
def test_properties_and_reference(num_experts, factor, train):
  G, S, V = 4, 8, 11
  rng = np.random.default_rng(num_experts)
  table = rng.integers(0, num_experts, V).astype(np.int32)
  ids = rng.integers(0, V, (G, S)).astype(np.int32)
  mask = rng.random((G, S)) >= 0.3
  ids = np.where(mask, ids, -7)  # padding ids are never read
  logits = np.where(mask[..., None], rng.normal(size=(G, S, num_experts)), np.nan)
  cfg = config(num_experts, capacity_factor_train=factor, capacity_factor_eval=factor)
  r = routed(logits.astype(np.float32), cfg, train=train, mask_GS=mask, token_ids_GS=ids,
             hash_table_V=table)
  capacity = cfg.capacity(S, train=train)
  np.testing.assert_array_equal(r.expert_index_GSK[mask][:, 0], table[ids[mask]])
  for g in range(G):  # position order: the first `capacity` tokens of each expert are kept
    seen = np.zeros(num_experts, int)
    for s in range(S):
      if mask[g, s]:
        e = table[ids[g, s]]
        assert r.keep_GSK[g, s, 0] == (seen[e] < capacity)
        seen[e] += 1
  assert_capacity_respected(r, mask)
  np.testing.assert_array_equal(r.weight_GSK, r.keep_GSK.astype(np.float32))
  for name, value in {**r.losses, **r.metrics}.items():
    assert np.all(np.isfinite(value)), name


def test_routing_needs_token_ids_and_a_table():
  with pytest.raises(ValueError, match="hash.*token_ids_GS and hash_table_V"):
    routed(np.zeros((1, 5, 3), np.float32), config(), train=False)


def test_k_is_one():
  assert config().k == 1
  with pytest.raises(ValueError, match=r"model\.moe\.router\.k=2 is not allowed .*'hash'"):
    config(k=2)


def test_batch_prioritized_is_refused():
  with pytest.raises(ValueError, match=r"model\.moe\.router\.batch_prioritized=True"):
    config(batch_prioritized=True)


# ======================================================================= tables


def test_random_table_is_seeded_and_uniform():
  table = random_table(8000, 8, seed=5)
  assert table.dtype == np.int32 and table.shape == (8000,)
  np.testing.assert_array_equal(table, random_table(8000, 8, seed=5))
  assert np.mean(table != random_table(8000, 8, seed=6)) > 0.8
  counts = np.bincount(table, minlength=8)
  # 99.9% quantile of chi-square with 7 degrees of freedom: 24.3.
  assert ((counts - 1000.0) ** 2 / 1000.0).sum() < 24.3


@pytest.mark.parametrize("kind", ["random", "balanced"])
def test_initial_table_is_the_seeded_random_table(kind):
  cfg = config(num_experts=4, hash=HashConfig(table=kind, seed=3))
  np.testing.assert_array_equal(initial_table(cfg, 50), random_table(50, 4, seed=3))


def test_balanced_table_by_hand_two_experts():
  # Ids by descending count (ties: ascending id): 0 (5), 2 (3), 3 (3), 6 (2), 1 (1), 4 (0), 5 (0).
  # (tokens, ids) of e0 / e1, each id to the smallest (tokens, ids, expert):
  #   id 0 -> e0 (5, 1) / (0, 0);  id 2 -> e1 (5, 1) / (3, 1);  id 3 -> e1 (5, 1) / (6, 2);
  #   id 6 -> e0 (7, 2) / (6, 2);  id 1 -> e1 (7, 2) / (7, 3);  id 4 -> e0 (7, 3) / (7, 3);
  #   id 5 -> e0 (tie, lower index) (7, 4) / (7, 3).
  table = balanced_table(np.array([5, 1, 3, 3, 0, 0, 2]), 2)
  assert table.dtype == np.int32
  np.testing.assert_array_equal(table, [0, 1, 1, 1, 0, 0, 0])


def test_balanced_table_by_hand_unseen_ids_spread_by_id_count():
  # id 0 (10) -> e0; ids 1..6 (1 each) alternate e1, e2 (equal tokens: fewer ids, then index);
  # id 7 (0): e1 and e2 both hold (3, 3) -> e1.
  table = balanced_table(np.array([10, 1, 1, 1, 1, 1, 1, 0]), 3)
  np.testing.assert_array_equal(table, [0, 1, 2, 1, 2, 1, 2, 1])
  # Only unseen ids: spread evenly by their number.
  np.testing.assert_array_equal(balanced_table(np.zeros(7, np.int64), 3), [0, 1, 2, 0, 1, 2, 0])


def test_balanced_table_seed_only_relabels_the_experts():
  counts = np.random.default_rng(0).integers(0, 50, 200)
  plain = balanced_table(counts, 6)
  seeded = balanced_table(counts, 6, seed=11)
  assert np.any(plain != seeded)
  # The seeded tie order is a permutation of the experts: the same partition, relabelled.
  relabel = {}
  for a, b in zip(plain, seeded):
    assert relabel.setdefault(a, b) == b
  assert sorted(relabel.values()) == list(range(6))
  np.testing.assert_array_equal(seeded, balanced_table(counts, 6, seed=11))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_table_loads_differ_by_at_most_the_largest_count(seed):
  rng = np.random.default_rng(seed)
  counts = (rng.zipf(1.3, 500) % 10000).astype(np.int64)  # Zipf-like token frequencies
  table = balanced_table(counts, 8, seed=seed)
  loads = np.bincount(table, weights=counts, minlength=8)
  assert loads.max() - loads.min() <= counts.max()
  # Far better than the random table on the same counts, unless one token dominates.
  random_loads = np.bincount(random_table(500, 8, seed), weights=counts, minlength=8)
  assert loads.max() - loads.min() <= random_loads.max() - random_loads.min()


@pytest.mark.parametrize("counts,num_experts,message", [
    (np.array([[1, 2]]), 2, "1-D"),
    (np.array([], np.int64), 2, "non-empty"),
    (np.array([1, -1]), 2, "non-negative integer"),
    (np.array([1.5, 2.0]), 2, "non-negative integer"),
    (np.array([1, 2]), 0, "num_experts >= 1"),
])
def test_balanced_table_rejects_bad_input(counts, num_experts, message):
  with pytest.raises(ValueError, match=message):
    balanced_table(counts, num_experts)


# ======================================================================= through MoeLayer


def _layer(dispatch="index", **kwargs):
  kwargs.setdefault("capacity_factor_train", 1.0)
  return make_layer("hash", dispatch=dispatch, **kwargs)


def test_layer_holds_the_table_and_needs_vocab_size_and_token_ids():
  layer = _layer(hash=HashConfig(seed=4))
  np.testing.assert_array_equal(layer.hash_table[...], random_table(VOCAB, E, seed=4))
  router = RouterConfig(kind="hash", num_experts=E)
  with pytest.raises(ValueError, match="routes by token id: MoeLayer needs vocab_size"):
    MoeLayer(16, MoeConfig(router=router, ffn_dim=32, group_size=8), rngs=nnx.Rngs(0))
  x, mask, _ = inputs()
  with pytest.raises(ValueError, match="call the layer with token_ids_BL"):
    layer(x, padding_mask_BL=mask)


def test_an_installed_table_routes_the_layer():
  """What the trainer does for `hash.table="balanced"`: replace the table, routing follows."""
  layer = _layer(capacity_factor_eval=8.0)  # C = S: nothing dropped
  ids = token_ids()
  _, mask, _ = inputs()
  counts = np.bincount(np.asarray(ids)[np.asarray(mask)], minlength=VOCAB)
  layer.hash_table[...] = jnp.asarray(balanced_table(counts, E))
  _, aux = forward(layer, ids=ids)
  # Balanced on exactly these tokens: each expert's share within max count / tokens of 1/E.
  load = np.asarray(aux.metrics["expert_load"])
  assert np.abs(load - 1 / E).max() <= counts.max() / counts.sum()
  layer.hash_table[...] = jnp.zeros((VOCAB,), jnp.int32)  # every id to expert 0
  _, aux = forward(layer, ids=ids)
  np.testing.assert_allclose(aux.metrics["expert_load"], np.eye(E)[0], atol=0)


def test_router_learns_from_the_z_loss_only():
  ids = token_ids()
  (_, _), (grads, _) = single_device_results(_layer(z_loss_weight=0.0), ids)
  np.testing.assert_array_equal(grads["router"][...], 0.0)
  (_, _), (grads, _) = single_device_results(_layer(), ids)
  assert np.abs(np.asarray(grads["router"][...])).max() > 0


def test_einsum_and_index_layers_agree_with_gradients():
  results = dispatch_results(lambda dispatch: _layer(dispatch, activation="swiglu"), token_ids())
  assert float(results["index"][0][1][1].metrics["dropped_assignment_fraction"]) > 0.05
  assert_same_results(results["einsum"], results["index"], "hash")


_SHARDED = [
    ((2, 4, 1), dict()),
    ((1, 8, 1), dict(dispatch="einsum", hash=HashConfig(seed=9))),
    ((1, 4, 2), dict(capacity_factor_train=0.5, activation="gelu")),
]


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape,settings", _SHARDED, ids=[str(c[0]) for c in _SHARDED])
def test_sharded_matches_single_device(mesh_shape, settings):
  layer, ids = _layer(**settings), token_ids()
  want = single_device_results(layer, ids)
  assert float(want[0][1][1].metrics["dropped_assignment_fraction"]) > 0.05
  assert_same_results(sharded_results(layer, mesh_shape, ids), want, f"hash on {mesh_shape}")


def test_forward_holds_two_all_to_alls():
  ops = forward_all_to_alls(_layer(), (2, 4, 1), token_ids())
  assert len(ops) == 2, f"expected 2 all-to-alls, found {len(ops)}"
