"""Tests of `moejax.routing`'s token-choice routers: capacity arithmetic, Switch / GShard / top-k
hand cases, train vs eval capacity, dtypes and shapes, config validation.

Padding and non-finite logits: test_routing_padding.py; batch-prioritized claiming and the
properties against the sequential reference: test_routing_claim.py; the helpers and the reference
they share: routing_reference.py.

Hand cases choose router logits as `log(p)` for probabilities `p` that sum to 1, so the softmax
returns `p` (up to float32 rounding) and every expected weight is a simple fraction. Adding a
per-token constant to the logits leaves the softmax unchanged but moves logsumexp by that constant,
which makes the z-loss easy to compute by hand as well.

Expected `combine_GSEC` tensors are written out per token as E rows of C slots; the expected
`dispatch_GSEC` is the set of non-zero entries (every kept weight here is > 0).
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from moejax.routing import RouterConfig, RouterKind, expert_capacity
from routing_reference import (ATOL, BPR_PROBS, GSHARD_PROBS, assert_combine, logits_from_probs, o,
                               route_np, router_config)


# ======================================================================= capacity arithmetic


def test_expert_capacity_formula():
  # C = ceil(k * factor * S / E).
  assert expert_capacity(8, 4, 1, 1.0) == 2  # 8/4 = 2
  assert expert_capacity(8, 4, 1, 1.25) == 3  # 2.5 -> 3
  assert expert_capacity(8, 4, 2, 1.25) == 5  # 2 * 1.25 * 8 / 4 = 5 exactly
  assert expert_capacity(6, 4, 3, 0.5) == 3  # 3 * 0.5 * 6 / 4 = 2.25 -> 3
  assert expert_capacity(1024, 8, 1, 1.25) == 160


def test_expert_capacity_decimal_factor_is_exact():
  # 1.1 * 100 / 10 is exactly 11 in decimal, but 11.000000000000002 in binary floating point:
  # a float ceil would give 12.
  assert math.ceil(1 * 1.1 * 100 / 10) == 12  # the trap the code must avoid
  assert expert_capacity(100, 10, 1, 1.1) == 11
  assert expert_capacity(50, 55, 1, 1.1) == 1  # float: 1.0000000000000002 -> 2
  assert expert_capacity(20, 11, 2, 1.1) == 4  # 2 * 1.1 * 20 / 11 = 4 exactly
  assert expert_capacity(100, 3, 1, 0.3) == 10  # 0.3 * 100 / 3 = 10 exactly


def test_expert_capacity_min_capacity_and_cap_at_group_size():
  assert expert_capacity(4, 2, 1, 0.01, min_capacity=3) == 3  # ceil(0.02) = 1 < 3
  assert expert_capacity(4, 2, 1, 0.01) == 1  # min_capacity defaults to 1
  assert expert_capacity(4, 2, 2, 4.0) == 4  # ceil(16) = 16, capped at S = 4
  assert expert_capacity(4, 2, 1, 1.0, min_capacity=10) == 4  # min_capacity is capped at S too
  assert expert_capacity(1, 8, 1, 1.25) == 1


def test_config_capacity_uses_train_and_eval_factors():
  config = router_config(kind="gshard", num_experts=4, capacity_factor_train=1.25,
                         capacity_factor_eval=2.0, min_capacity=1)
  assert config.capacity(8, train=True) == 5  # 2 * 1.25 * 8 / 4
  assert config.capacity(8, train=False) == 8  # 2 * 2.0 * 8 / 4
  assert RouterConfig(num_experts=8).capacity(16, train=True) == 4  # ceil(2.5)=3 < min_capacity 4


# ======================================================================= Switch top-1, hand cases

# G=1, S=5, E=3; capacity factor 1.2 -> C = ceil(1.2 * 5 / 3) = 2.
_SWITCH_PROBS = [[
    [0.5, 0.3, 0.2],  # t0 -> e0
    [0.6, 0.3, 0.1],  # t1 -> e0
    [0.2, 0.7, 0.1],  # t2 -> e1
    [0.8, 0.1, 0.1],  # t3 -> e0: third token at e0, over capacity 2: dropped
    [0.1, 0.2, 0.7],  # t4 -> e2
]]
_SWITCH_SHIFT = [[1.0, 2.0, 0.0, -1.0, 3.0]]  # logsumexp of each token's logits


def _switch_decision(**kwargs):
  config = router_config(kind="switch", num_experts=3, capacity_factor_train=1.2, **kwargs)
  return route_np(logits_from_probs(_SWITCH_PROBS, _SWITCH_SHIFT), config, train=True)


def test_switch_top1_dispatch_and_combine():
  decision = _switch_decision()
  assert decision.capacity == 2
  # Combine weight = the argmax probability itself (Switch does not renormalise).
  expected = [[
      [[0.5, o], [o, o], [o, o]],  # t0: e0 slot 0
      [[o, 0.6], [o, o], [o, o]],  # t1: e0 slot 1
      [[o, o], [0.7, o], [o, o]],  # t2: e1 slot 0
      [[o, o], [o, o], [o, o]],  # t3: dropped (e0 full)
      [[o, o], [o, o], [0.7, o]],  # t4: e2 slot 0
  ]]
  assert_combine(decision, expected)
  np.testing.assert_array_equal(decision.expert_index_GSK[..., 0], [[0, 0, 1, 0, 2]])
  np.testing.assert_array_equal(decision.keep_GSK[..., 0], [[True, True, True, False, True]])
  np.testing.assert_array_equal(decision.slot_GSK[..., 0][decision.keep_GSK[..., 0]], [0, 1, 0, 0])


def test_switch_losses_and_metrics_by_hand():
  decision = _switch_decision()
  losses, metrics = decision.losses, decision.metrics
  # f = first-choice fractions = [3, 1, 1] / 5 (before capacity: t3 counts for e0).
  # P = mean probabilities: e0 (.5+.6+.2+.8+.1)/5 = .44, e1 (.3+.3+.7+.1+.2)/5 = .32,
  #     e2 (.2+.1+.1+.1+.7)/5 = .24.
  # load balancing = E * sum f P = 3 * (.6*.44 + .2*.32 + .2*.24) = 3 * .376 = 1.128.
  np.testing.assert_allclose(losses["load_balancing_loss"], 1.128, atol=1e-5)
  # z-loss = mean of logsumexp^2 = (1 + 4 + 0 + 1 + 9) / 5 = 3.
  np.testing.assert_allclose(losses["router_z_loss"], 3.0, atol=1e-5)
  # Load: assignments before capacity per expert / all assignments = [3, 1, 1] / 5.
  np.testing.assert_allclose(metrics["expert_load"], [0.6, 0.2, 0.2], atol=ATOL)
  # One of five tokens (t3) lost its only assignment.
  np.testing.assert_allclose(metrics["dropped_fraction"], 0.2, atol=ATOL)
  np.testing.assert_allclose(metrics["dropped_assignment_fraction"], 0.2, atol=ATOL)
  # Confidence = mean max probability = (.5 + .6 + .7 + .8 + .7) / 5 = .66.
  np.testing.assert_allclose(metrics["router_confidence"], 0.66, atol=ATOL)
  # Entropy = mean over tokens of -sum p log p.
  p = np.asarray(_SWITCH_PROBS[0])
  entropy = np.mean(-np.sum(p * np.log(p), axis=-1))
  np.testing.assert_allclose(metrics["router_entropy"], entropy, atol=1e-5)
  # Utilisation = kept / (G * E * C) = 4 / (1 * 3 * 2).
  np.testing.assert_allclose(metrics["capacity_utilisation"], 4 / 6, atol=ATOL)


def test_worked_example_of_the_module_docstring():
  # argmax experts [0, 0, 1, 0], C = 1: keep [T, F, T, F].
  probs = [[[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]]]
  config = router_config(num_experts=2, capacity_factor_train=0.5)  # ceil(0.5 * 4 / 2) = 1
  decision = route_np(logits_from_probs(probs), config, train=True)
  np.testing.assert_array_equal(decision.keep_GSK[..., 0], [[True, False, True, False]])


# ======================================================================= GShard top-2, hand cases

# G=1, S=4, E=3: GSHARD_PROBS (routing_reference.py; test_routing_padding.py uses it too).


def test_gshard_position_order_claims_token_by_token():
  # Capacity factor 0.75 -> C = ceil(2 * 0.75 * 4 / 3) = 2. Token by token, each token's first
  # choice then its second: t0 -> e1 (slot 0), e2 (0); t1 -> e0 (0), e1 (1); t2 -> e0 (1),
  # e1 full; t3 -> e1 full, e0 full. t3 loses both: the earlier tokens' second choices came first.
  config = router_config(kind="gshard", capacity_factor_train=0.75)
  decision = route_np(logits_from_probs(GSHARD_PROBS), config, train=True)
  assert decision.capacity == 2
  assert_combine(decision, [[
      [[o, o], [2 / 3, o], [1 / 3, o]],  # t0
      [[0.625, o], [o, 0.375], [o, o]],  # t1
      [[o, 2 / 3], [o, o], [o, o]],  # t2 (second choice e1 dropped)
      [[o, o], [o, o], [o, o]],  # t3 (dropped)
  ]])
  metrics = decision.metrics
  np.testing.assert_allclose(metrics["expert_load"], [3 / 8, 4 / 8, 1 / 8], atol=ATOL)
  np.testing.assert_allclose(metrics["dropped_fraction"], 1 / 4, atol=ATOL)  # t3
  np.testing.assert_allclose(metrics["dropped_assignment_fraction"], 3 / 8, atol=ATOL)
  np.testing.assert_allclose(metrics["capacity_utilisation"], 5 / 6, atol=ATOL)


def test_gshard_choice_order_claims_first_choices_before_second_choices():
  # C = 2 as above, with GShard's Algorithm 1 order (claim_order="choice").
  # First choices claim first: e1 <- t0 (slot 0), t3 (slot 1); e0 <- t1 (0), t2 (1).
  # Then second choices: t0 -> e2 slot 0; t1, t2 -> e1 full; t3 -> e0 full.
  # Token by token, t1's second choice would have taken e1 slot 1 before t3's first choice;
  # GShard gives every first choice precedence, so t3 keeps its first choice instead.
  config = router_config(kind="gshard", capacity_factor_train=0.75, claim_order="choice")
  decision = route_np(logits_from_probs(GSHARD_PROBS), config, train=True)
  assert decision.capacity == 2
  expected = [[
      [[o, o], [2 / 3, o], [1 / 3, o]],  # t0
      [[0.625, o], [o, o], [o, o]],  # t1 (second choice e1 dropped)
      [[o, 2 / 3], [o, o], [o, o]],  # t2 (second choice e1 dropped)
      [[o, o], [o, 7 / 9], [o, o]],  # t3 (second choice e0 dropped)
  ]]
  assert_combine(decision, expected)
  np.testing.assert_array_equal(decision.expert_index_GSK, [[[1, 2], [0, 1], [0, 1], [1, 0]]])
  metrics = decision.metrics
  # Assignments before capacity: e0 {t1, t2, t3'}, e1 {t0, t1', t2', t3}, e2 {t0'} -> [3, 4, 1] / 8.
  np.testing.assert_allclose(metrics["expert_load"], [3 / 8, 4 / 8, 1 / 8], atol=ATOL)
  np.testing.assert_allclose(metrics["dropped_fraction"], 0.0, atol=ATOL)  # every token kept one
  np.testing.assert_allclose(metrics["dropped_assignment_fraction"], 3 / 8, atol=ATOL)
  np.testing.assert_allclose(metrics["capacity_utilisation"], 5 / 6, atol=ATOL)  # 5 / (3 * 2)


@pytest.mark.parametrize("claim_order", ["position", "choice"])
def test_gshard_policy_all_with_capacity_three(claim_order):
  # Capacity factor 1.125 -> C = 2 * 1.125 * 4 / 3 = 3.
  config = router_config(kind="gshard", capacity_factor_train=1.125, claim_order=claim_order)
  decision = route_np(logits_from_probs(GSHARD_PROBS), config, train=True)
  assert decision.capacity == 3
  if claim_order == "position":
    # t0 -> e1 (0), e2 (0); t1 -> e0 (0), e1 (1); t2 -> e0 (1), e1 (2); t3 -> e1 full, e0 (2).
    expected = [[
        [[o, o, o], [2 / 3, o, o], [1 / 3, o, o]],  # t0
        [[0.625, o, o], [o, 0.375, o], [o, o, o]],  # t1
        [[o, 2 / 3, o], [o, o, 1 / 3], [o, o, o]],  # t2
        [[o, o, 2 / 9], [o, o, o], [o, o, o]],  # t3 (first choice dropped)
    ]]
  else:
    # First choices: e1 <- t0 (0), t3 (1); e0 <- t1 (0), t2 (1).
    # Second choices in position order: t0 -> e2 (0); t1 -> e1 (2); t2 -> e1 full; t3 -> e0 (2).
    expected = [[
        [[o, o, o], [2 / 3, o, o], [1 / 3, o, o]],  # t0
        [[0.625, o, o], [o, o, 0.375], [o, o, o]],  # t1
        [[o, 2 / 3, o], [o, o, o], [o, o, o]],  # t2 (second choice dropped)
        [[o, o, 2 / 9], [o, 7 / 9, o], [o, o, o]],  # t3
    ]]
  assert_combine(decision, expected)


def test_gshard_random_policy_frees_a_slot_for_a_later_token():
  # As above (C = 3), threshold 0.5, so a second expert is kept iff uniform < g2 / 0.5:
  #   t0: 0.00 < (1/3)/.5 = .667 kept;  t1: 0.99 < .375/.5 = .75 switched off;
  #   t2: 0.00 < .667 kept;             t3: 0.00 < (2/9)/.5 = .444 kept.
  # t1's second choice no longer claims e1 slot 1, so t3's first choice gets e1's last slot.
  # The first gate stays renormalised over the two experts (t1 keeps .625).
  config = router_config(kind="gshard", capacity_factor_train=1.125, second_expert_policy="random",
                         second_expert_threshold=0.5)
  uniform = jnp.array([[0.0, 0.99, 0.0, 0.0]], jnp.float32)
  decision = route_np(logits_from_probs(GSHARD_PROBS), config, train=True, uniform_GS=uniform)
  expected = [[
      [[o, o, o], [2 / 3, o, o], [1 / 3, o, o]],  # t0
      [[0.625, o, o], [o, o, o], [o, o, o]],  # t1 (second expert switched off)
      [[o, 2 / 3, o], [o, 1 / 3, o], [o, o, o]],  # t2
      [[o, o, 2 / 9], [o, o, 7 / 9], [o, o, o]],  # t3
  ]]
  assert_combine(decision, expected)


def test_gshard_random_policy_uses_renormalised_second_gate():
  # Capacity factor 2 -> C = ceil(16 / 3) = 6, capped at S = 4: nothing dropped by capacity.
  # Threshold 0.5: keep iff uniform < g2 / 0.5 with g2 = [1/3, .375, 1/3, 2/9]:
  #   t0: .7 >= .667 off;  t1: .5 < .75 kept;  t2: .6 < .667 kept;  t3: .9 >= .444 off.
  # (With the raw probability p2 = .3 instead of g2, t2 would be switched off: .6 >= .3/.5.)
  config = router_config(kind="gshard", capacity_factor_train=2.0, capacity_factor_eval=2.0,
                         second_expert_policy="random", second_expert_threshold=0.5)
  uniform = jnp.array([[0.7, 0.5, 0.6, 0.9]], jnp.float32)
  decision = route_np(logits_from_probs(GSHARD_PROBS), config, train=True, uniform_GS=uniform)
  assert decision.capacity == 4
  # Slots token by token: t0 -> e1 (0); t1 -> e0 (0), e1 (1); t2 -> e0 (1), e1 (2); t3 -> e1 (3).
  expected = [[
      [[o, o, o, o], [2 / 3, o, o, o], [o, o, o, o]],  # t0
      [[0.625, o, o, o], [o, 0.375, o, o], [o, o, o, o]],  # t1
      [[o, 2 / 3, o, o], [o, o, 1 / 3, o], [o, o, o, o]],  # t2
      [[o, o, o, o], [o, o, o, 7 / 9], [o, o, o, o]],  # t3
  ]]
  assert_combine(decision, expected)
  metrics = decision.metrics
  np.testing.assert_allclose(metrics["dropped_fraction"], 0.0, atol=ATOL)

  # In evaluation the random policy is off: every second expert is used, uniforms or not.
  expected_eval = [[
      [[o, o, o, o], [2 / 3, o, o, o], [1 / 3, o, o, o]],  # t0
      [[0.625, o, o, o], [o, 0.375, o, o], [o, o, o, o]],  # t1
      [[o, 2 / 3, o, o], [o, o, 1 / 3, o], [o, o, o, o]],  # t2
      [[o, o, 2 / 9, o], [o, o, o, 7 / 9], [o, o, o, o]],  # t3
  ]]
  assert_combine(route_np(logits_from_probs(GSHARD_PROBS), config, train=False, uniform_GS=uniform),
                 expected_eval)
  assert_combine(route_np(logits_from_probs(GSHARD_PROBS), config, train=False), expected_eval)


def test_gshard_random_policy_probability_saturates_at_one():
  # Threshold 0.2 (the default): g2 / 0.2 >= 1 for every token here (min g2 = 2/9), so even
  # uniforms of 0.99 keep every second expert.
  config = router_config(kind="gshard", capacity_factor_train=2.0, second_expert_policy="random")
  uniform = jnp.full((1, 4), 0.99, jnp.float32)
  decision = route_np(logits_from_probs(GSHARD_PROBS), config, train=True, uniform_GS=uniform)
  assert np.all(decision.keep_GSK)


def test_gshard_random_policy_needs_uniforms_in_training():
  config = router_config(kind="gshard", second_expert_policy="random")
  with pytest.raises(ValueError, match="uniform"):
    route_np(logits_from_probs(GSHARD_PROBS), config, train=True)


# ======================================================================= top-k, hand cases

# G=1, S=4, E=4, k=3; capacity factor 0.5 -> C = ceil(3 * 0.5 * 4 / 4) = ceil(1.5) = 2.
# Each token's top-3 probabilities sum to 0.9.
_TOPK_PROBS = [[
    [0.4, 0.3, 0.2, 0.1],  # t0: e0, e1, e2
    [0.1, 0.4, 0.3, 0.2],  # t1: e1, e2, e3
    [0.5, 0.1, 0.25, 0.15],  # t2: e0, e2, e3
    [0.2, 0.1, 0.3, 0.4],  # t3: e3, e2, e0
]]
# Claim order "position", token by token:
#   t0: e0 (slot 0), e1 (0), e2 (0);  t1: e1 (1), e2 (1), e3 (0);  t2: e0 (1), e2 full, e3 (1);
#   t3: e3 full, e2 full, e0 full (dropped: the earlier tokens filled its experts).
# Claim order "choice", k-major:
#   k=0: t0 e0 (slot 0), t1 e1 (0), t2 e0 (1), t3 e3 (0)
#   k=1: t0 e1 (1), t1 e2 (0), t2 e2 (1), t3 e2 full
#   k=2: t0 e2 full, t1 e3 (1), t2 e3 full, t3 e0 full
# t0's third choice is dropped at e2 because the later tokens' second choices claimed it first.


@pytest.mark.parametrize("claim_order", ["position", "choice"])
@pytest.mark.parametrize("normalize", [True, False], ids=["mixtral", "qwen"])
def test_topk3_dispatch_and_combine(normalize, claim_order):
  config = router_config(kind="topk", num_experts=4, k=3, normalize_weights=normalize,
                         capacity_factor_train=0.5, claim_order=claim_order)
  decision = route_np(logits_from_probs(_TOPK_PROBS), config, train=True)
  assert decision.capacity == 2
  # Mixtral renormalises the three weights (divide by 0.9); Qwen/OLMoE keep the probabilities.
  d = 0.9 if normalize else 1.0
  if claim_order == "position":
    expected = [[
        [[0.4 / d, o], [0.3 / d, o], [0.2 / d, o], [o, o]],  # t0
        [[o, o], [o, 0.4 / d], [o, 0.3 / d], [0.2 / d, o]],  # t1
        [[o, 0.5 / d], [o, o], [o, o], [o, 0.15 / d]],  # t2
        [[o, o], [o, o], [o, o], [o, o]],  # t3
    ]]
  else:
    expected = [[
        [[0.4 / d, o], [o, 0.3 / d], [o, o], [o, o]],  # t0
        [[o, o], [0.4 / d, o], [0.3 / d, o], [o, 0.2 / d]],  # t1
        [[o, 0.5 / d], [o, o], [o, 0.25 / d], [o, o]],  # t2
        [[o, o], [o, o], [o, o], [0.4 / d, o]],  # t3
    ]]
  assert_combine(decision, expected)
  np.testing.assert_array_equal(decision.expert_index_GSK,
                                [[[0, 1, 2], [1, 2, 3], [0, 2, 3], [3, 2, 0]]])
  # The router weights of all three choices (kept or not) before capacity:
  gates = np.sort(np.asarray(_TOPK_PROBS[0]), axis=-1)[:, ::-1][:, :3] / d
  kept = np.asarray(decision.keep_GSK[0])
  np.testing.assert_allclose(np.asarray(decision.weight_GSK[0]), np.where(kept, gates, 0.0),
                             atol=ATOL)
  metrics = decision.metrics
  # Assignments per expert: e0 {t0, t2, t3''}, e1 {t0', t1}, e2 {t0'', t1', t2', t3'},
  # e3 {t1'', t2'', t3} -> [3, 2, 4, 3] / 12; kept 8 of 12; 8 / (4 * 2) slots used.
  np.testing.assert_allclose(metrics["expert_load"], np.array([3, 2, 4, 3]) / 12, atol=ATOL)
  # Token by token t3 keeps nothing; k-major every token keeps its first choice.
  np.testing.assert_allclose(metrics["dropped_fraction"],
                             0.25 if claim_order == "position" else 0.0, atol=ATOL)
  np.testing.assert_allclose(metrics["dropped_assignment_fraction"], 4 / 12, atol=ATOL)
  np.testing.assert_allclose(metrics["capacity_utilisation"], 1.0, atol=ATOL)


def test_topk1_unnormalised_matches_switch():
  switch = _switch_decision()
  config = router_config(kind="topk", num_experts=3, k=1, normalize_weights=False,
                         capacity_factor_train=1.2)
  topk = route_np(logits_from_probs(_SWITCH_PROBS, _SWITCH_SHIFT), config, train=True)
  np.testing.assert_array_equal(topk.dispatch, switch.dispatch)
  np.testing.assert_allclose(topk.combine, switch.combine, atol=ATOL)


def test_topk1_normalised_weight_is_one():
  # Spec: with normalize_weights the k weights are renormalised to sum to 1 (Mixtral), for any
  # k >= 1. For k = 1 that is a weight of exactly 1 for every kept token (as in Mixtral's
  # `routing_weights /= routing_weights.sum(-1)`), not the raw probability.
  config = router_config(kind="topk", num_experts=3, k=1, normalize_weights=True,
                         capacity_factor_train=1.2)
  decision = route_np(logits_from_probs(_SWITCH_PROBS), config, train=True)
  expected = [[
      [[1.0, o], [o, o], [o, o]],  # t0
      [[o, 1.0], [o, o], [o, o]],  # t1
      [[o, o], [1.0, o], [o, o]],  # t2
      [[o, o], [o, o], [o, o]],  # t3 (dropped)
      [[o, o], [o, o], [1.0, o]],  # t4
  ]]
  assert_combine(decision, expected)


def test_topk_equal_to_num_experts_routes_to_every_expert():
  probs = [[[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]]]
  config = router_config(kind="topk", num_experts=4, k=4, normalize_weights=True,
                         capacity_factor_train=1.0)  # C = ceil(4 * 2 / 4) = 2 = S
  decision = route_np(logits_from_probs(probs), config, train=True)
  np.testing.assert_array_equal(decision.expert_index_GSK, [[[0, 1, 2, 3], [3, 2, 1, 0]]])
  assert np.all(decision.keep_GSK)
  np.testing.assert_allclose(decision.weight_GSK, [[[.4, .3, .2, .1], [.4, .3, .2, .1]]],
                             atol=ATOL)


# ======================================================================= train vs eval capacity


def test_train_and_eval_capacity_factors():
  config = router_config(num_experts=2, capacity_factor_train=0.5, capacity_factor_eval=1.0)
  # C = ceil(0.5 * 4 / 2) = 1 in training, ceil(1.0 * 4 / 2) = 2 in evaluation.
  train = route_np(logits_from_probs(BPR_PROBS), config, train=True)
  evaluate = route_np(logits_from_probs(BPR_PROBS), config, train=False)
  assert (train.capacity, evaluate.capacity) == (1, 2)
  assert_combine(train, [[[[0.6], [o]], [[o], [o]], [[o], [0.7]], [[o], [o]]]])
  assert_combine(evaluate, [[
      [[0.6, o], [o, o]], [[o, 0.9], [o, o]], [[o, o], [0.7, o]], [[o, o], [o, 0.8]],
  ]])


def test_min_capacity_raises_capacity():
  # All four tokens choose e0. Factor 0.01 gives ceil(0.02) = 1, min_capacity 3 gives C = 3.
  probs = [[[0.6, 0.4], [0.9, 0.1], [0.7, 0.3], [0.8, 0.2]]]
  config = router_config(num_experts=2, capacity_factor_train=0.01, min_capacity=3)
  decision = route_np(logits_from_probs(probs), config, train=True)
  assert decision.capacity == 3
  assert_combine(decision, [[
      [[0.6, o, o], [o, o, o]],
      [[o, 0.9, o], [o, o, o]],
      [[o, o, 0.7], [o, o, o]],
      [[o, o, o], [o, o, o]],  # fourth at e0: dropped
  ]])


# ======================================================================= dtypes and shapes


def test_low_precision_logits_are_routed_in_float32():
  logits = logits_from_probs(GSHARD_PROBS).astype(jnp.bfloat16)
  decision = route_np(logits, router_config(kind="gshard", capacity_factor_train=2.0), train=True)
  assert decision.weight_GSK.dtype == np.float32
  assert decision.combine.dtype == np.float32
  np.testing.assert_allclose(np.sum(decision.weight_GSK, -1), 1.0, atol=ATOL)


def test_logits_with_wrong_number_of_experts_are_rejected():
  with pytest.raises(ValueError, match=r"router\.num_experts=4"):
    route_np(jnp.zeros((1, 4, 3)), router_config(num_experts=4), train=True)


# ======================================================================= config validation


@pytest.mark.parametrize("kwargs, field, value", [
    (dict(kind="bogus"), "kind", "'bogus'"),
    (dict(kind="gshard", second_expert_policy="sometimes"), "second_expert_policy",
     "'sometimes'"),
    (dict(num_experts=0), "num_experts", "0"),
    (dict(num_experts=-2), "num_experts", "-2"),
    (dict(kind="topk", num_experts=4, k=0), "k", "0"),
    (dict(kind="topk", num_experts=4, k=-1), "k", "-1"),
    (dict(kind="topk", num_experts=4, k=5), "k", "5"),
    (dict(kind="topk", num_experts=4, k=2.5), "k", "2.5"),
    (dict(kind="topk", num_experts=4), "k", "None"),
    (dict(kind="switch", num_experts=4, k=2), "k", "2"),
    (dict(kind="gshard", num_experts=4, k=1), "k", "1"),
    (dict(kind="gshard", num_experts=4, k=3), "k", "3"),
    (dict(kind="gshard", num_experts=1), "k", "2"),  # top-2 needs E >= 2
    (dict(capacity_factor_train=0.0), "capacity_factor_train", "0.0"),
    (dict(capacity_factor_train=-1.25), "capacity_factor_train", "-1.25"),
    (dict(capacity_factor_train=float("nan")), "capacity_factor_train", "nan"),
    (dict(capacity_factor_eval=0), "capacity_factor_eval", "0"),
    (dict(capacity_factor_eval=-2.0), "capacity_factor_eval", "-2.0"),
    (dict(min_capacity=0), "min_capacity", "0"),
    (dict(min_capacity=1.5), "min_capacity", "1.5"),
    (dict(jitter_eps=-0.1), "jitter_eps", "-0.1"),
    (dict(jitter_eps=1.0), "jitter_eps", "1.0"),
    (dict(second_expert_threshold=0.0), "second_expert_threshold", "0.0"),
    (dict(load_balancing_loss_weight=-0.01), "load_balancing_loss_weight", "-0.01"),
    (dict(z_loss_weight=-1e-3), "z_loss_weight", "-0.001"),
])
def test_invalid_config_raises_value_error_naming_field_and_value(kwargs, field, value):
  with pytest.raises(ValueError) as error:
    RouterConfig(**kwargs)
  message = str(error.value)
  assert f"router.{field}={value}" in message, message


def test_unknown_enum_value_lists_the_allowed_ones():
  with pytest.raises(ValueError) as error:
    RouterConfig(kind="bogus")
  for allowed in ("'switch'", "'gshard'", "'topk'"):
    assert allowed in str(error.value)


def test_infinite_capacity_factor_fails_fast_or_means_no_limit():
  # An infinite factor is either rejected when the config is built (naming the field, like any
  # other bad value) or means "no capacity limit", i.e. C = S. It must not pass validation and
  # then fail later inside route() with a message that names neither the field nor the value.
  try:
    config = RouterConfig(num_experts=2, capacity_factor_train=float("inf"))
  except ValueError as error:
    assert "router.capacity_factor_train=inf" in str(error)
    return
  assert config.capacity(4, train=True) == 4


def test_valid_configs_normalise_fields():
  config = RouterConfig(kind="gshard", num_experts=4, second_expert_policy="random")
  assert config.kind is RouterKind.GSHARD
  assert config.k == 2
  assert config.second_expert_policy.value == "random"
  assert RouterConfig(kind="switch", num_experts=4).k == 1
  assert RouterConfig(kind="switch", num_experts=4, k=1).k == 1
  assert RouterConfig(kind="topk", num_experts=4, k=4).k == 4
  hash(config)  # usable as a static jit argument
