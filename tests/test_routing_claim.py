"""The token-choice claim: batch-prioritized claiming (V-MoE) by hand, and properties of random
batches for every kind, claim order, capacity factor and padding rate, checked against the
independent sequential reference (`routing_reference.reference_route`); the capacity formula
against integer arithmetic.
"""

import math
import zlib
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax.routing import RouterConfig, expert_capacity
from routing_reference import (ATOL, BPR_PROBS, assert_combine, logits_from_probs, o,
                               reference_combine, reference_losses_and_metrics, reference_route,
                               route_np, router_config, softmax64)


# ======================================================================= batch-prioritized

# G=1, S=4, E=2: BPR_PROBS (routing_reference.py; test_routing.py uses it too).


def test_batch_prioritized_confident_late_token_beats_early_unconfident_one():
  # Switch, E=2, S=4, capacity factor 0.5 -> C = 1.
  # Position order: e0 <- t0 (.6), t1 (.9) dropped; e1 <- t2 (.7), t3 (.8) dropped.
  # Priority order (first-choice gate, descending): t1 (.9), t3 (.8), t2 (.7), t0 (.6).
  base = dict(num_experts=2, capacity_factor_train=0.5)
  by_position = route_np(logits_from_probs(BPR_PROBS), router_config(**base), train=True)
  assert_combine(by_position, [[
      [[0.6], [o]], [[o], [o]], [[o], [0.7]], [[o], [o]],
  ]])
  by_priority = route_np(logits_from_probs(BPR_PROBS),
                         router_config(batch_prioritized=True, **base), train=True)
  assert_combine(by_priority, [[
      [[o], [o]], [[0.9], [o]], [[o], [o]], [[o], [0.8]],
  ]])


def test_batch_prioritized_slots_follow_priority_and_ties_keep_position_order():
  # C = 2 (capacity factor 1.0): slots are handed out in priority order.
  config = router_config(num_experts=2, capacity_factor_train=1.0, batch_prioritized=True)
  assert_combine(route_np(logits_from_probs(BPR_PROBS), config, train=True), [[
      [[o, 0.6], [o, o]],  # t0: second at e0
      [[0.9, o], [o, o]],  # t1: first at e0
      [[o, o], [o, 0.7]],  # t2: second at e1
      [[o, o], [0.8, o]],  # t3: first at e1
  ]])
  # t0, t1, t3 tie at .6 (identical logits); t2 (.7) goes first, then the tied tokens by position.
  tied = [[[0.6, 0.4], [0.6, 0.4], [0.7, 0.3], [0.6, 0.4]]]
  assert_combine(route_np(logits_from_probs(tied), config, train=True), [[
      [[o, 0.6], [o, o]],  # t0
      [[o, o], [o, o]],  # t1: dropped (tie with t0, later position)
      [[0.7, o], [o, o]],  # t2
      [[o, o], [o, o]],  # t3: dropped
  ]])


def test_batch_prioritized_gshard_orders_second_choices_by_priority_too():
  # E=3, S=4, capacity factor 1.125 -> C = 3. First gates: t0 2/3, t1 .625, t2 .8/.95, t3 7/9.
  # Priority order: t2, t3, t0, t1.
  # First choices: e0 <- t2 (0), t1 (1); e1 <- t3 (0), t0 (1).
  # Second choices in priority order: t2 -> e1 (2); t3 -> e0 (2); t0 -> e2 (0); t1 -> e1 full.
  # (By position t1's second choice would take e1 slot 2 and t2's would be dropped.)
  probs = [[[0.1, 0.6, 0.3], [0.5, 0.3, 0.2], [0.8, 0.15, 0.05], [0.2, 0.7, 0.1]]]
  config = router_config(kind="gshard", capacity_factor_train=1.125, batch_prioritized=True,
                         claim_order="choice")
  assert_combine(route_np(logits_from_probs(probs), config, train=True), [[
      [[o, o, o], [o, 2 / 3, o], [1 / 3, o, o]],  # t0
      [[o, 0.625, o], [o, o, o], [o, o, o]],  # t1
      [[0.8 / 0.95, o, o], [o, o, 0.15 / 0.95], [o, o, o]],  # t2
      [[o, o, 2 / 9], [7 / 9, o, o], [o, o, o]],  # t3
  ]])


def test_batch_prioritized_position_order_takes_whole_tokens_by_priority():
  # As above (C = 3, priority order t2, t3, t0, t1), each token's choices in turn:
  # t2 -> e0 (0), e1 (0); t3 -> e1 (1), e0 (1); t0 -> e1 (2), e2 (0); t1 -> e0 (2), e1 full.
  probs = [[[0.1, 0.6, 0.3], [0.5, 0.3, 0.2], [0.8, 0.15, 0.05], [0.2, 0.7, 0.1]]]
  config = router_config(kind="gshard", capacity_factor_train=1.125, batch_prioritized=True)
  assert_combine(route_np(logits_from_probs(probs), config, train=True), [[
      [[o, o, o], [o, o, 2 / 3], [1 / 3, o, o]],  # t0
      [[o, o, 0.625], [o, o, o], [o, o, o]],  # t1
      [[0.8 / 0.95, o, o], [0.15 / 0.95, o, o], [o, o, o]],  # t2
      [[o, 2 / 9, o], [o, 7 / 9, o], [o, o, o]],  # t3
  ]])


def test_batch_prioritized_works_per_group():
  # Two groups with opposite confidence orders; C = 1.
  probs = [[[0.6, 0.4], [0.9, 0.1]], [[0.9, 0.1], [0.6, 0.4]]]
  config = router_config(num_experts=2, capacity_factor_train=1.0, batch_prioritized=True)
  decision = route_np(logits_from_probs(probs), config, train=True)  # C = ceil(2 / 2) = 1
  np.testing.assert_array_equal(decision.keep_GSK[..., 0], [[False, True], [True, False]])


# ======================================================================= properties vs reference


def _min_gap(values):
  values = np.sort(np.asarray(values, np.float64).ravel())
  return np.min(np.diff(values)) if values.size > 1 else np.inf


def _random_inputs(rng, G, S, E, gate_fn, *, pad_rate, check_priority, threshold=None):
  """Random logits, padding and uniforms for G groups, redrawn per group until no near-tie (in
  probabilities, in first-gate priorities, or uniform vs g2/threshold) could let float32 and float64
  rounding disagree. The last group is all padding when pad_rate > 0."""
  logits = np.zeros((G, S, E), np.float32)
  mask = np.zeros((G, S), bool)
  uniform = np.zeros((G, S), np.float32)
  for g in range(G):
    while True:
      scale = rng.choice([0.3, 1.0, 3.0, 6.0])
      lg = (rng.normal(size=(S, E)) * scale).astype(np.float32)
      m = rng.random(S) >= pad_rate
      if pad_rate > 0 and g == G - 1:
        m[:] = False
      u = rng.random(S).astype(np.float32)
      probs = softmax64(lg)
      if min(_min_gap(p) for p in probs) < 1e-4:
        continue
      gates = gate_fn(probs)
      if check_priority and _min_gap(probs[m].max(axis=-1)) < 1e-4:
        continue
      if threshold is not None and np.min(np.abs(u - gates[:, 1] / threshold)) < 1e-4:
        continue
      break
    logits[g], mask[g], uniform[g] = lg, m, u
  return logits, mask, uniform


# (kind, E, k, normalize, factor, min_capacity, batch_prioritized, train, policy, threshold, S, pad,
#  claim order). Factors are dyadic, so Fraction(factor) is exact for the reference capacity.
_PROPERTY_CASES = [
    ("switch", 4, 1, False, 1.0, 1, False, True, "all", 0.2, 8, 0.0, "position"),
    ("switch", 4, 1, False, 0.5, 1, True, True, "all", 0.2, 8, 0.3, "position"),
    ("switch", 2, 1, False, 0.25, 2, False, False, "all", 0.2, 6, 0.3, "position"),
    ("switch", 6, 1, False, 1.25, 1, True, False, "all", 0.2, 8, 0.7, "position"),
    ("switch", 3, 1, False, 3.0, 1, False, True, "all", 0.2, 4, 0.3, "position"),
    ("gshard", 4, 2, True, 1.0, 1, False, True, "all", 0.2, 8, 0.0, "choice"),
    ("gshard", 4, 2, True, 0.5, 1, True, True, "all", 0.2, 8, 0.3, "position"),
    ("gshard", 3, 2, True, 1.0, 1, False, True, "random", 0.3, 6, 0.3, "choice"),
    ("gshard", 6, 2, True, 0.75, 1, True, True, "random", 0.6, 8, 0.0, "choice"),
    ("gshard", 4, 2, True, 1.25, 1, False, False, "random", 0.1, 8, 0.3, "position"),
    ("gshard", 2, 2, True, 0.25, 3, False, True, "all", 0.2, 8, 0.3, "position"),
    ("gshard", 3, 2, True, 2.0, 1, True, True, "random", 0.3, 4, 0.3, "position"),
    ("topk", 4, 1, False, 1.0, 1, True, True, "all", 0.2, 8, 0.3, "position"),
    ("topk", 6, 2, True, 1.0, 1, False, True, "all", 0.2, 8, 0.3, "choice"),
    ("topk", 6, 2, False, 0.5, 1, True, True, "all", 0.2, 8, 0.0, "position"),
    ("topk", 4, 3, True, 0.5, 1, False, True, "all", 0.2, 6, 0.3, "position"),
    ("topk", 4, 3, False, 1.25, 1, True, False, "all", 0.2, 8, 0.3, "choice"),
    ("topk", 6, 4, True, 0.75, 1, True, True, "all", 0.2, 8, 0.7, "position"),
    ("topk", 6, 6, False, 1.0, 2, False, True, "all", 0.2, 8, 0.3, "choice"),
    ("topk", 3, 3, True, 1.0, 1, False, True, "all", 0.2, 3, 0.3, "position"),
    ("topk", 2, 1, False, 2.0, 1, True, True, "all", 0.2, 1, 0.0, "position"),
    ("topk", 6, 5, True, 0.25, 1, False, True, "all", 0.2, 8, 0.3, "choice"),
]


@pytest.mark.parametrize("case", _PROPERTY_CASES, ids=lambda c: "-".join(map(str, c)))
def test_router_properties_and_sequential_reference(case):
  kind, E, k, normalize, factor, min_capacity, prioritized, train, policy, threshold, S, pad, \
      claim_order = case
  G = 24
  other_factor = factor * 2 + 0.5  # the factor of the other mode must not be used
  # Settings of one kind only: a setting the kind does not read is refused.
  own = (dict(k=k, normalize_weights=normalize) if kind == "topk" else
         dict(second_expert_policy=policy, second_expert_threshold=threshold)
         if kind == "gshard" else {})
  config = RouterConfig(
      kind=kind, num_experts=E, capacity_factor_train=factor if train else other_factor,
      capacity_factor_eval=other_factor if train else factor, min_capacity=min_capacity,
      batch_prioritized=prioritized, **own, **({"claim_order": claim_order} if k > 1 else {}))
  random_second = kind == "gshard" and train and policy == "random"

  def gate_fn(probs):  # the router weights of the k choices, for the near-tie checks
    top = -np.sort(-probs, -1)[..., :k]
    return top / top.sum(-1, keepdims=True) if kind == "gshard" or normalize else top

  rng = np.random.default_rng(zlib.crc32(repr(case).encode()))
  logits, mask, uniform = _random_inputs(rng, G, S, E, gate_fn, pad_rate=pad,
                                         check_priority=prioritized,
                                         threshold=threshold if random_second else None)
  got = route_np(logits, config, train=train, padding_mask_GS=mask, uniform_GS=uniform)

  # Capacity: C = ceil(k * factor * S / E), at least min_capacity, at most S.
  C = min(max(min_capacity, math.ceil(k * Fraction(factor) * S / E)), S)
  assert got.capacity == C
  dispatch, combine, keep = got.dispatch, got.combine, got.keep_GSK
  expert, slot = got.expert_index_GSK, got.slot_GSK
  assert dispatch.shape == combine.shape == (G, S, E, C)

  # --- invariants of the output alone
  assert np.all(dispatch.sum(axis=(1, 3)) <= C)  # no expert gets more than C tokens per group
  assert np.all(dispatch.sum(axis=1) <= 1)  # a slot holds at most one token
  assert np.all(dispatch.sum(axis=(2, 3)) <= k)  # a token reaches at most k experts
  assert np.all(dispatch.sum(axis=3) <= 1)  # ... and each of them in one slot
  assert all(len(set(row)) == k for row in expert.reshape(-1, k).tolist())
  for g in range(G):
    taken = [(expert[g, s, j], slot[g, s, j]) for s, j in zip(*np.nonzero(keep[g]))]
    assert len(taken) == len(set(taken))  # kept slots unique per (group, expert)
    assert all(0 <= c < C for _, c in taken)
  assert not np.any(keep[~mask]) and not np.any(dispatch[~mask])  # padding never kept
  np.testing.assert_array_equal(dispatch, combine > 0)

  # --- kept weights equal an independent softmax / top-k / renormalisation
  probs = softmax64(logits)
  np.testing.assert_array_equal(expert, np.argsort(-probs, axis=-1, kind="stable")[..., :k])
  weights = np.take_along_axis(probs, expert, -1)
  if kind == "gshard" or (kind == "topk" and normalize):
    weights = weights / weights.sum(-1, keepdims=True)
  np.testing.assert_allclose(got.weight_GSK, np.where(keep, weights, 0.0), atol=ATOL)

  # --- the claiming order matches the sequential reference
  ref = reference_route(logits, kind=kind, k=k, normalize=normalize, capacity=C, mask_GS=mask,
                        batch_prioritized=prioritized, claim_order=claim_order,
                        uniform_GS=uniform if random_second else None, threshold=threshold)
  np.testing.assert_array_equal(keep, ref["keep"])
  np.testing.assert_array_equal(slot[keep], ref["slot"][keep])
  np.testing.assert_array_equal(dispatch, reference_combine(ref, E, C) > 0)
  np.testing.assert_allclose(combine, reference_combine(ref, E, C), atol=ATOL)

  # --- losses and metrics
  want = reference_losses_and_metrics(ref, logits, mask, C)
  for name, value in want.items():
    np.testing.assert_allclose({**got.losses, **got.metrics}[name], value, rtol=1e-5, atol=1e-5,
                               err_msg=name)

  # --- with room for everyone (C = S), nothing is dropped
  if C == S:
    np.testing.assert_array_equal(keep, ref["active"])
    assert float(got.metrics["dropped_fraction"]) == 0.0
    assert float(got.metrics["dropped_assignment_fraction"]) == pytest.approx(0.0, abs=1e-6)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(k=st.integers(1, 8), S=st.integers(1, 4096), E=st.integers(1, 256),
       hundredths=st.integers(1, 1000), min_capacity=st.integers(1, 64))
def test_expert_capacity_matches_integer_arithmetic(k, S, E, hundredths, min_capacity):
  factor = hundredths / 100  # a decimal factor such as 1.1 or 1.25
  exact = -(-(k * hundredths * S) // (100 * E))  # ceil(k * factor * S / E) in integers
  assert expert_capacity(S, E, k, factor, min_capacity) == min(max(min_capacity, exact), S)
