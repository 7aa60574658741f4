"""Tests of `moejax.routing`: hand-computed decisions, losses and metrics, properties, validation.

Hand cases choose router logits as `log(p)` for probabilities `p` that sum to 1, so the softmax
returns `p` (up to float32 rounding) and every expected weight is a simple fraction. Adding a
per-token constant to the logits leaves the softmax unchanged but moves logsumexp by that constant,
which makes the z-loss easy to compute by hand as well.

Expected `combine_GSEC` tensors are written out per token as E rows of C slots; the expected
`dispatch_GSEC` is the set of non-zero entries (every kept weight here is > 0).
"""

import dataclasses
import functools
import math
import zlib
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax.routing import RouterConfig, RouterKind, expert_capacity, route

ATOL = 1e-6


def _logits(probs, shift=None):
  """Logits whose softmax is `probs` (last axis); `shift` (one value per token) moves logsumexp."""
  logits = np.log(np.asarray(probs, np.float64))
  if shift is not None:
    logits = logits + np.asarray(shift, np.float64)[..., None]
  return jnp.asarray(logits, jnp.float32)


def _config(kind="switch", num_experts=3, **kwargs):
  kwargs.setdefault("min_capacity", 1)
  return RouterConfig(kind=kind, num_experts=num_experts, **kwargs)


@dataclasses.dataclass(frozen=True)
class Routed:
  """A routing decision with its derived tensors, losses and metrics, as numpy arrays."""

  expert_index_GSK: np.ndarray
  slot_GSK: np.ndarray
  keep_GSK: np.ndarray
  weight_GSK: np.ndarray
  capacity: int
  dispatch: np.ndarray
  combine: np.ndarray
  losses: dict
  metrics: dict


# Nearly every test compiles its own router configuration; these are tiny programs whose compile
# time dominates, so XLA's backend optimisations are skipped (compile time about halves; decisions
# are identical and sums differ by float32 rounding only).
@functools.partial(jax.jit, static_argnames=("config", "train"),
                   compiler_options={"xla_backend_optimization_level": 0})
def _route_jit(logits, padding_mask_GS, uniform_GS, *, config, train):
  decision = route(logits, config, train=train, padding_mask_GS=padding_mask_GS,
                   uniform_GS=uniform_GS)
  losses, metrics = decision.stats.summarize()
  return decision, decision.dispatch_GSEC(), decision.combine_GSEC(), losses, metrics


def _route(logits, config, *, train, padding_mask_GS=None, uniform_GS=None):
  """`route` plus everything derived from it, in one compiled call (eager op-by-op is slow)."""
  as_array = lambda x: None if x is None else jnp.asarray(x)
  decision, dispatch, combine, losses, metrics = jax.tree.map(np.asarray, _route_jit(
      as_array(logits), as_array(padding_mask_GS), as_array(uniform_GS), config=config,
      train=train))
  return Routed(decision.expert_index_GSK, decision.slot_GSK, decision.keep_GSK,
                decision.weight_GSK, decision.capacity, dispatch, combine, losses, metrics)


def _assert_combine(routed, expected_GSEC):
  """Checks combine (values) and dispatch (its support) against the hand-written tensor."""
  expected_GSEC = np.asarray(expected_GSEC, np.float64)
  assert routed.dispatch.dtype == np.bool_
  assert routed.combine.dtype == np.float32
  assert routed.dispatch.shape == expected_GSEC.shape, (routed.dispatch.shape, expected_GSEC.shape)
  np.testing.assert_array_equal(routed.dispatch, expected_GSEC > 0)
  np.testing.assert_allclose(routed.combine, expected_GSEC, atol=ATOL, rtol=0)


o = 0.0  # an empty slot, to keep the literal tensors readable


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
  config = _config(kind="gshard", num_experts=4, capacity_factor_train=1.25,
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
  config = _config(kind="switch", num_experts=3, capacity_factor_train=1.2, **kwargs)
  return _route(_logits(_SWITCH_PROBS, _SWITCH_SHIFT), config, train=True)


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
  _assert_combine(decision, expected)
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
  config = _config(num_experts=2, capacity_factor_train=0.5)  # ceil(0.5 * 4 / 2) = 1
  decision = _route(_logits(probs), config, train=True)
  np.testing.assert_array_equal(decision.keep_GSK[..., 0], [[True, False, True, False]])


# ======================================================================= GShard top-2, hand cases

# G=1, S=4, E=3. Top-2 gates renormalised: g1/(g1+g2), g2/(g1+g2).
_GSHARD_PROBS = [[
    [0.1, 0.6, 0.3],  # t0: e1, e2; gates 2/3, 1/3
    [0.5, 0.3, 0.2],  # t1: e0, e1; gates .625, .375
    [0.6, 0.3, 0.1],  # t2: e0, e1; gates 2/3, 1/3
    [0.2, 0.7, 0.1],  # t3: e1, e0; gates 7/9, 2/9
]]


def test_gshard_position_order_claims_token_by_token():
  # Capacity factor 0.75 -> C = ceil(2 * 0.75 * 4 / 3) = 2. Token by token, each token's first
  # choice then its second: t0 -> e1 (slot 0), e2 (0); t1 -> e0 (0), e1 (1); t2 -> e0 (1),
  # e1 full; t3 -> e1 full, e0 full. t3 loses both: the earlier tokens' second choices came first.
  config = _config(kind="gshard", capacity_factor_train=0.75)
  decision = _route(_logits(_GSHARD_PROBS), config, train=True)
  assert decision.capacity == 2
  _assert_combine(decision, [[
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
  config = _config(kind="gshard", capacity_factor_train=0.75, claim_order="choice")
  decision = _route(_logits(_GSHARD_PROBS), config, train=True)
  assert decision.capacity == 2
  expected = [[
      [[o, o], [2 / 3, o], [1 / 3, o]],  # t0
      [[0.625, o], [o, o], [o, o]],  # t1 (second choice e1 dropped)
      [[o, 2 / 3], [o, o], [o, o]],  # t2 (second choice e1 dropped)
      [[o, o], [o, 7 / 9], [o, o]],  # t3 (second choice e0 dropped)
  ]]
  _assert_combine(decision, expected)
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
  config = _config(kind="gshard", capacity_factor_train=1.125, claim_order=claim_order)
  decision = _route(_logits(_GSHARD_PROBS), config, train=True)
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
  _assert_combine(decision, expected)


def test_gshard_random_policy_frees_a_slot_for_a_later_token():
  # As above (C = 3), threshold 0.5, so a second expert is kept iff uniform < g2 / 0.5:
  #   t0: 0.00 < (1/3)/.5 = .667 kept;  t1: 0.99 < .375/.5 = .75 switched off;
  #   t2: 0.00 < .667 kept;             t3: 0.00 < (2/9)/.5 = .444 kept.
  # t1's second choice no longer claims e1 slot 1, so t3's first choice gets e1's last slot.
  # The first gate stays renormalised over the two experts (t1 keeps .625).
  config = _config(kind="gshard", capacity_factor_train=1.125, second_expert_policy="random",
                   second_expert_threshold=0.5)
  uniform = jnp.array([[0.0, 0.99, 0.0, 0.0]], jnp.float32)
  decision = _route(_logits(_GSHARD_PROBS), config, train=True, uniform_GS=uniform)
  expected = [[
      [[o, o, o], [2 / 3, o, o], [1 / 3, o, o]],  # t0
      [[0.625, o, o], [o, o, o], [o, o, o]],  # t1 (second expert switched off)
      [[o, 2 / 3, o], [o, 1 / 3, o], [o, o, o]],  # t2
      [[o, o, 2 / 9], [o, o, 7 / 9], [o, o, o]],  # t3
  ]]
  _assert_combine(decision, expected)


def test_gshard_random_policy_uses_renormalised_second_gate():
  # Capacity factor 2 -> C = ceil(16 / 3) = 6, capped at S = 4: nothing dropped by capacity.
  # Threshold 0.5: keep iff uniform < g2 / 0.5 with g2 = [1/3, .375, 1/3, 2/9]:
  #   t0: .7 >= .667 off;  t1: .5 < .75 kept;  t2: .6 < .667 kept;  t3: .9 >= .444 off.
  # (With the raw probability p2 = .3 instead of g2, t2 would be switched off: .6 >= .3/.5.)
  config = _config(kind="gshard", capacity_factor_train=2.0, capacity_factor_eval=2.0,
                   second_expert_policy="random", second_expert_threshold=0.5)
  uniform = jnp.array([[0.7, 0.5, 0.6, 0.9]], jnp.float32)
  decision = _route(_logits(_GSHARD_PROBS), config, train=True, uniform_GS=uniform)
  assert decision.capacity == 4
  # Slots token by token: t0 -> e1 (0); t1 -> e0 (0), e1 (1); t2 -> e0 (1), e1 (2); t3 -> e1 (3).
  expected = [[
      [[o, o, o, o], [2 / 3, o, o, o], [o, o, o, o]],  # t0
      [[0.625, o, o, o], [o, 0.375, o, o], [o, o, o, o]],  # t1
      [[o, 2 / 3, o, o], [o, o, 1 / 3, o], [o, o, o, o]],  # t2
      [[o, o, o, o], [o, o, o, 7 / 9], [o, o, o, o]],  # t3
  ]]
  _assert_combine(decision, expected)
  metrics = decision.metrics
  np.testing.assert_allclose(metrics["dropped_fraction"], 0.0, atol=ATOL)

  # In evaluation the random policy is off: every second expert is used, uniforms or not.
  expected_eval = [[
      [[o, o, o, o], [2 / 3, o, o, o], [1 / 3, o, o, o]],  # t0
      [[0.625, o, o, o], [o, 0.375, o, o], [o, o, o, o]],  # t1
      [[o, 2 / 3, o, o], [o, o, 1 / 3, o], [o, o, o, o]],  # t2
      [[o, o, 2 / 9, o], [o, o, o, 7 / 9], [o, o, o, o]],  # t3
  ]]
  _assert_combine(_route(_logits(_GSHARD_PROBS), config, train=False, uniform_GS=uniform),
                  expected_eval)
  _assert_combine(_route(_logits(_GSHARD_PROBS), config, train=False), expected_eval)


def test_gshard_random_policy_probability_saturates_at_one():
  # Threshold 0.2 (the default): g2 / 0.2 >= 1 for every token here (min g2 = 2/9), so even
  # uniforms of 0.99 keep every second expert.
  config = _config(kind="gshard", capacity_factor_train=2.0, second_expert_policy="random")
  uniform = jnp.full((1, 4), 0.99, jnp.float32)
  decision = _route(_logits(_GSHARD_PROBS), config, train=True, uniform_GS=uniform)
  assert np.all(decision.keep_GSK)


def test_gshard_random_policy_needs_uniforms_in_training():
  config = _config(kind="gshard", second_expert_policy="random")
  with pytest.raises(ValueError, match="uniform"):
    _route(_logits(_GSHARD_PROBS), config, train=True)


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
  config = _config(kind="topk", num_experts=4, k=3, normalize_weights=normalize,
                   capacity_factor_train=0.5, claim_order=claim_order)
  decision = _route(_logits(_TOPK_PROBS), config, train=True)
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
  _assert_combine(decision, expected)
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
  config = _config(kind="topk", num_experts=3, k=1, normalize_weights=False,
                   capacity_factor_train=1.2)
  topk = _route(_logits(_SWITCH_PROBS, _SWITCH_SHIFT), config, train=True)
  np.testing.assert_array_equal(topk.dispatch, switch.dispatch)
  np.testing.assert_allclose(topk.combine, switch.combine, atol=ATOL)


def test_topk1_normalised_weight_is_one():
  # Spec: with normalize_weights the k weights are renormalised to sum to 1 (Mixtral), for any
  # k >= 1. For k = 1 that is a weight of exactly 1 for every kept token (as in Mixtral's
  # `routing_weights /= routing_weights.sum(-1)`), not the raw probability.
  config = _config(kind="topk", num_experts=3, k=1, normalize_weights=True,
                   capacity_factor_train=1.2)
  decision = _route(_logits(_SWITCH_PROBS), config, train=True)
  expected = [[
      [[1.0, o], [o, o], [o, o]],  # t0
      [[o, 1.0], [o, o], [o, o]],  # t1
      [[o, o], [1.0, o], [o, o]],  # t2
      [[o, o], [o, o], [o, o]],  # t3 (dropped)
      [[o, o], [o, o], [1.0, o]],  # t4
  ]]
  _assert_combine(decision, expected)


def test_topk_equal_to_num_experts_routes_to_every_expert():
  probs = [[[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]]]
  config = _config(kind="topk", num_experts=4, k=4, normalize_weights=True,
                   capacity_factor_train=1.0)  # C = ceil(4 * 2 / 4) = 2 = S
  decision = _route(_logits(probs), config, train=True)
  np.testing.assert_array_equal(decision.expert_index_GSK, [[[0, 1, 2, 3], [3, 2, 1, 0]]])
  assert np.all(decision.keep_GSK)
  np.testing.assert_allclose(decision.weight_GSK, [[[.4, .3, .2, .1], [.4, .3, .2, .1]]],
                             atol=ATOL)


# ======================================================================= padding


_PAD_PROBS = [[[0.6, 0.4], [0.9, 0.1], [0.7, 0.3], [0.8, 0.2], [0.3, 0.7]]]


def test_padding_takes_no_capacity_and_later_tokens_move_up():
  # Switch, E=2, S=5, capacity factor 0.8 -> C = ceil(0.8 * 5 / 2) = 2 (padding still counts in S).
  config = _config(num_experts=2, capacity_factor_train=0.8)
  # Without padding: e0 <- t0 (0), t1 (1); t2, t3 dropped; e1 <- t4 (0).
  no_pad = _route(_logits(_PAD_PROBS), config, train=True)
  _assert_combine(no_pad, [[
      [[0.6, o], [o, o]],
      [[o, 0.9], [o, o]],
      [[o, o], [o, o]],
      [[o, o], [o, o]],
      [[o, o], [0.7, o]],
  ]])
  # t1 is padding: it takes nothing and t2 moves up into e0 slot 1.
  mask = jnp.array([[True, False, True, True, True]])
  decision = _route(_logits(_PAD_PROBS), config, train=True, padding_mask_GS=mask)
  _assert_combine(decision, [[
      [[0.6, o], [o, o]],  # t0
      [[o, o], [o, o]],  # t1: padding
      [[o, 0.7], [o, o]],  # t2: moved up
      [[o, o], [o, o]],  # t3: dropped
      [[o, o], [0.7, o]],  # t4
  ]])
  assert not np.any(decision.keep_GSK[0, 1])
  assert float(decision.weight_GSK[0, 1, 0]) == 0.0
  losses, metrics = decision.losses, decision.metrics
  # Real tokens t0, t2, t3, t4. f = [3, 1] / 4; P = [(.6+.7+.8+.3)/4, (.4+.3+.2+.7)/4] = [.6, .4].
  # load balancing = 2 * (.75 * .6 + .25 * .4) = 2 * .55 = 1.1.
  np.testing.assert_allclose(losses["load_balancing_loss"], 1.1, atol=1e-5)
  np.testing.assert_allclose(metrics["expert_load"], [0.75, 0.25], atol=ATOL)
  np.testing.assert_allclose(metrics["dropped_fraction"], 0.25, atol=ATOL)  # t3 of 4 real tokens
  np.testing.assert_allclose(metrics["router_confidence"], (0.6 + 0.7 + 0.8 + 0.7) / 4, atol=ATOL)
  np.testing.assert_allclose(metrics["capacity_utilisation"], 3 / 4, atol=ATOL)  # 3 / (2 * 2)


def test_padded_gshard_token_claims_neither_choice():
  # t1 padded: its first (e0) and second (e1) choices take nothing; C = 2 as in the first case.
  # t0 -> e1 (0), e2 (0); t2 -> e0 (0), e1 (1); t3 -> e1 full, e0 (1).
  config = _config(kind="gshard", capacity_factor_train=0.75)
  mask = jnp.array([[True, False, True, True]])
  decision = _route(_logits(_GSHARD_PROBS), config, train=True, padding_mask_GS=mask)
  _assert_combine(decision, [[
      [[o, o], [2 / 3, o], [1 / 3, o]],  # t0
      [[o, o], [o, o], [o, o]],  # t1: padding
      [[2 / 3, o], [o, 1 / 3], [o, o]],  # t2: moved up to e0 slot 0, its second choice fits
      [[o, 2 / 9], [o, o], [o, o]],  # t3: its second choice now fits at e0
  ]])


# Two groups, E=2, S=4. Group 0: t3 padded. Group 1: only t0 real.
_LOSS_PROBS = [
    [[0.6, 0.4], [0.3, 0.7], [0.8, 0.2], [0.1, 0.9]],
    [[0.25, 0.75], [0.5, 0.5], [0.9, 0.1], [0.2, 0.8]],
]
_LOSS_SHIFT = [[1.0, 2.0, 3.0, 10.0], [-2.0, 5.0, 5.0, 5.0]]


def test_losses_with_padding_by_hand():
  mask = jnp.array([[True, True, True, False], [True, False, False, False]])
  config = _config(num_experts=2, capacity_factor_train=2.0)
  decision = _route(_logits(_LOSS_PROBS, _LOSS_SHIFT), config, train=True, padding_mask_GS=mask)
  losses, metrics = decision.losses, decision.metrics
  # Group 0 (t0, t1, t2): f = [2, 1] / 3; P = [(.6+.3+.8)/3, (.4+.7+.2)/3] = [1.7, 1.3] / 3;
  #   LB0 = 2 * (2/3 * 1.7/3 + 1/3 * 1.3/3) = 2 * 4.7 / 9 = 9.4 / 9.
  # Group 1 (t0): f = [0, 1]; P = [.25, .75]; LB1 = 2 * .75 = 1.5.
  # Mean over the two groups.
  np.testing.assert_allclose(losses["load_balancing_loss"], (9.4 / 9 + 1.5) / 2, atol=1e-5)
  # z-loss over the 4 real tokens: logsumexp = 1, 2, 3 and -2: (1 + 4 + 9 + 4) / 4 = 4.5.
  np.testing.assert_allclose(losses["router_z_loss"], 4.5, atol=1e-5)
  # Confidence: (.6 + .7 + .8 + .75) / 4.
  np.testing.assert_allclose(metrics["router_confidence"], 2.85 / 4, atol=ATOL)
  p = np.array([[0.6, 0.4], [0.3, 0.7], [0.8, 0.2], [0.25, 0.75]])
  np.testing.assert_allclose(metrics["router_entropy"], np.mean(-np.sum(p * np.log(p), -1)),
                             atol=1e-5)
  # Assignments [2, 2] / 4; C = ceil(2 * 4 / 2) = 4: nothing dropped; 4 kept of 2 * 2 * 4 slots.
  np.testing.assert_allclose(metrics["expert_load"], [0.5, 0.5], atol=ATOL)
  np.testing.assert_allclose(metrics["dropped_fraction"], 0.0, atol=ATOL)
  np.testing.assert_allclose(metrics["capacity_utilisation"], 4 / 16, atol=ATOL)


def test_all_padding_group_counts_in_no_loss():
  # Group 1 entirely padding: the load-balancing loss is group 0's alone (not halved by an empty
  # group), and the z-loss is the mean over group 0's three real tokens: (1 + 4 + 9) / 3.
  mask = jnp.array([[True, True, True, False], [False, False, False, False]])
  config = _config(num_experts=2, capacity_factor_train=2.0)
  decision = _route(_logits(_LOSS_PROBS, _LOSS_SHIFT), config, train=True, padding_mask_GS=mask)
  losses, metrics = decision.losses, decision.metrics
  np.testing.assert_allclose(losses["load_balancing_loss"], 9.4 / 9, atol=1e-5)
  np.testing.assert_allclose(losses["router_z_loss"], 14 / 3, atol=1e-5)
  np.testing.assert_allclose(metrics["expert_load"], [2 / 3, 1 / 3], atol=ATOL)
  np.testing.assert_allclose(metrics["router_confidence"], 2.1 / 3, atol=ATOL)
  assert not np.any(decision.dispatch[1])


def test_everything_padding_gives_finite_zero_losses():
  mask = jnp.zeros((2, 4), jnp.bool_)
  config = _config(num_experts=2, capacity_factor_train=2.0)
  decision = _route(_logits(_LOSS_PROBS, _LOSS_SHIFT), config, train=True, padding_mask_GS=mask)
  losses, metrics = decision.losses, decision.metrics
  for name, value in {**losses, **metrics}.items():
    assert np.all(np.isfinite(value)), name
  assert float(losses["load_balancing_loss"]) == 0.0
  assert float(losses["router_z_loss"]) == 0.0
  assert float(metrics["dropped_fraction"]) == 0.0


def test_dropped_assignment_fraction_is_zero_without_assignments():
  # All tokens are padding: there is no assignment, so none was dropped (0 of 0), just as
  # dropped_fraction is 0. Padding must not show up as 100% of assignments dropped.
  mask = jnp.zeros((2, 4), jnp.bool_)
  config = _config(num_experts=2, capacity_factor_train=2.0)
  decision = _route(_logits(_LOSS_PROBS, _LOSS_SHIFT), config, train=True, padding_mask_GS=mask)
  assert float(decision.metrics["dropped_assignment_fraction"]) == 0.0


def test_padding_logits_do_not_change_losses_or_metrics():
  mask = jnp.array([[True, True, True, False], [True, False, False, False]])
  config = _config(num_experts=2, capacity_factor_train=2.0)
  reference = _route(_logits(_LOSS_PROBS, _LOSS_SHIFT), config, train=True, padding_mask_GS=mask)
  logits = np.asarray(_logits(_LOSS_PROBS, _LOSS_SHIFT)).copy()
  logits[0, 3] = [40.0, -30.0]
  logits[1, 1:] = [[-50.0, 7.0], [3.0, 3.0], [0.0, 60.0]]
  other = _route(jnp.asarray(logits), config, train=True, padding_mask_GS=mask)
  _compare_summaries(other, reference)


def test_non_finite_padding_logits_do_not_leak():
  # Spec: padded tokens count in no loss or metric. Padding positions whose logits are -inf (a
  # common way of masking) or NaN must therefore give the same numbers as any other padding.
  mask = jnp.array([[True, True, True, False], [True, False, False, False]])
  config = _config(num_experts=2, capacity_factor_train=2.0)
  reference = _route(_logits(_LOSS_PROBS, _LOSS_SHIFT), config, train=True, padding_mask_GS=mask)
  logits = np.asarray(_logits(_LOSS_PROBS, _LOSS_SHIFT)).copy()
  logits[0, 3] = [-np.inf, -np.inf]
  logits[1, 1] = [np.nan, np.nan]
  other = _route(jnp.asarray(logits), config, train=True, padding_mask_GS=mask)
  np.testing.assert_array_equal(other.dispatch, reference.dispatch)
  _compare_summaries(other, reference)


@functools.partial(jax.jit, static_argnames="config")
def _route_grad(logits, padding_mask_GS, cotangent_GSK, *, config):
  """d/dlogits of sum(weight * cotangent) + load-balancing loss + z-loss, in training."""

  def objective(logits):
    decision = route(logits, config, train=True, padding_mask_GS=padding_mask_GS)
    losses, _ = decision.stats.summarize()
    return (jnp.sum(decision.weight_GSK * cotangent_GSK) + losses["load_balancing_loss"] +
            losses["router_z_loss"])

  return jax.grad(objective)(logits)


@pytest.mark.parametrize("bad", [[np.nan, 0.0, 0.0, 0.0], [0.0, np.inf, 0.0, 0.0],
                                 [-np.inf] * 4, [np.inf, -np.inf, 1.0, 2.0]],
                         ids=["nan", "inf", "all_minus_inf", "plus_and_minus_inf"])
def test_non_finite_logits_of_a_real_token_route_it_as_padding(bad):
  # Spec: a real token whose logits are not all finite claims no capacity and counts in no loss or
  # metric, and its logits get a zero gradient; everything else equals the same batch with that
  # token marked as padding. Without this, its NaN probabilities reach the group's losses (and
  # through them every token's gradient) and it takes a slot that another token would get.
  G, S, E = 2, 8, 4
  config = _config("gshard", num_experts=E, capacity_factor_train=0.5)  # C = 2: tokens overflow
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(G, S, E)).astype(np.float32) * 2.0
  logits[:, :, 0] += 2.0  # expert 0 is popular, so its slots run out
  mask = np.ones((G, S), bool)
  mask[1, 5] = False
  cotangent = jnp.asarray(rng.normal(size=(G, S, 2)), jnp.float32)
  as_padding = mask.copy()
  as_padding[0, 1] = False
  bad_logits = logits.copy()
  bad_logits[0, 1] = bad
  got = _route(bad_logits, config, train=True, padding_mask_GS=mask)
  want = _route(logits, config, train=True, padding_mask_GS=as_padding)
  full = _route(logits, config, train=True, padding_mask_GS=mask)
  assert not np.array_equal(full.keep_GSK, want.keep_GSK), "the token's slot goes to no other token"
  np.testing.assert_array_equal(got.keep_GSK, want.keep_GSK)
  np.testing.assert_array_equal(got.slot_GSK[got.keep_GSK], want.slot_GSK[want.keep_GSK])
  np.testing.assert_array_equal(got.weight_GSK, want.weight_GSK)
  np.testing.assert_array_equal(got.dispatch, want.dispatch)
  for name, value in {**want.losses, **want.metrics}.items():
    assert np.all(np.isfinite(value)), name
    np.testing.assert_array_equal({**got.losses, **got.metrics}[name], value, err_msg=name)
  grad_got = np.asarray(_route_grad(jnp.asarray(bad_logits), jnp.asarray(mask), cotangent,
                                    config=config))
  grad_want = np.asarray(_route_grad(jnp.asarray(logits), jnp.asarray(as_padding), cotangent,
                                     config=config))
  assert np.all(np.isfinite(grad_got)), "non-finite logits of one token made gradients non-finite"
  assert np.all(grad_got[0, 1] == 0.0) and np.abs(grad_got).max() > 1e-3
  np.testing.assert_allclose(grad_got, grad_want, rtol=1e-6, atol=1e-7)


def _compare_summaries(decision, reference):
  for got, want in [(decision.losses, reference.losses), (decision.metrics, reference.metrics)]:
    for name in want:
      np.testing.assert_allclose(got[name], want[name], atol=1e-5, err_msg=name)


# ======================================================================= batch-prioritized


_BPR_PROBS = [[[0.6, 0.4], [0.9, 0.1], [0.3, 0.7], [0.2, 0.8]]]


def test_batch_prioritized_confident_late_token_beats_early_unconfident_one():
  # Switch, E=2, S=4, capacity factor 0.5 -> C = 1.
  # Position order: e0 <- t0 (.6), t1 (.9) dropped; e1 <- t2 (.7), t3 (.8) dropped.
  # Priority order (first-choice gate, descending): t1 (.9), t3 (.8), t2 (.7), t0 (.6).
  base = dict(num_experts=2, capacity_factor_train=0.5)
  by_position = _route(_logits(_BPR_PROBS), _config(**base), train=True)
  _assert_combine(by_position, [[
      [[0.6], [o]], [[o], [o]], [[o], [0.7]], [[o], [o]],
  ]])
  by_priority = _route(_logits(_BPR_PROBS), _config(batch_prioritized=True, **base), train=True)
  _assert_combine(by_priority, [[
      [[o], [o]], [[0.9], [o]], [[o], [o]], [[o], [0.8]],
  ]])


def test_batch_prioritized_slots_follow_priority_and_ties_keep_position_order():
  # C = 2 (capacity factor 1.0): slots are handed out in priority order.
  config = _config(num_experts=2, capacity_factor_train=1.0, batch_prioritized=True)
  _assert_combine(_route(_logits(_BPR_PROBS), config, train=True), [[
      [[o, 0.6], [o, o]],  # t0: second at e0
      [[0.9, o], [o, o]],  # t1: first at e0
      [[o, o], [o, 0.7]],  # t2: second at e1
      [[o, o], [0.8, o]],  # t3: first at e1
  ]])
  # t0, t1, t3 tie at .6 (identical logits); t2 (.7) goes first, then the tied tokens by position.
  tied = [[[0.6, 0.4], [0.6, 0.4], [0.7, 0.3], [0.6, 0.4]]]
  _assert_combine(_route(_logits(tied), config, train=True), [[
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
  config = _config(kind="gshard", capacity_factor_train=1.125, batch_prioritized=True,
                   claim_order="choice")
  _assert_combine(_route(_logits(probs), config, train=True), [[
      [[o, o, o], [o, 2 / 3, o], [1 / 3, o, o]],  # t0
      [[o, 0.625, o], [o, o, o], [o, o, o]],  # t1
      [[0.8 / 0.95, o, o], [o, o, 0.15 / 0.95], [o, o, o]],  # t2
      [[o, o, 2 / 9], [7 / 9, o, o], [o, o, o]],  # t3
  ]])


def test_batch_prioritized_position_order_takes_whole_tokens_by_priority():
  # As above (C = 3, priority order t2, t3, t0, t1), each token's choices in turn:
  # t2 -> e0 (0), e1 (0); t3 -> e1 (1), e0 (1); t0 -> e1 (2), e2 (0); t1 -> e0 (2), e1 full.
  probs = [[[0.1, 0.6, 0.3], [0.5, 0.3, 0.2], [0.8, 0.15, 0.05], [0.2, 0.7, 0.1]]]
  config = _config(kind="gshard", capacity_factor_train=1.125, batch_prioritized=True)
  _assert_combine(_route(_logits(probs), config, train=True), [[
      [[o, o, o], [o, o, 2 / 3], [1 / 3, o, o]],  # t0
      [[o, o, 0.625], [o, o, o], [o, o, o]],  # t1
      [[0.8 / 0.95, o, o], [0.15 / 0.95, o, o], [o, o, o]],  # t2
      [[o, 2 / 9, o], [o, 7 / 9, o], [o, o, o]],  # t3
  ]])


def test_batch_prioritized_works_per_group():
  # Two groups with opposite confidence orders; C = 1.
  probs = [[[0.6, 0.4], [0.9, 0.1]], [[0.9, 0.1], [0.6, 0.4]]]
  config = _config(num_experts=2, capacity_factor_train=1.0, batch_prioritized=True)
  decision = _route(_logits(probs), config, train=True)  # C = ceil(2 / 2) = 1
  np.testing.assert_array_equal(decision.keep_GSK[..., 0], [[False, True], [True, False]])


# ======================================================================= train vs eval capacity


def test_train_and_eval_capacity_factors():
  config = _config(num_experts=2, capacity_factor_train=0.5, capacity_factor_eval=1.0)
  train = _route(_logits(_BPR_PROBS), config, train=True)  # C = ceil(0.5 * 4 / 2) = 1
  evaluate = _route(_logits(_BPR_PROBS), config, train=False)  # C = ceil(1.0 * 4 / 2) = 2
  assert (train.capacity, evaluate.capacity) == (1, 2)
  _assert_combine(train, [[[[0.6], [o]], [[o], [o]], [[o], [0.7]], [[o], [o]]]])
  _assert_combine(evaluate, [[
      [[0.6, o], [o, o]], [[o, 0.9], [o, o]], [[o, o], [0.7, o]], [[o, o], [o, 0.8]],
  ]])


def test_min_capacity_raises_capacity():
  # All four tokens choose e0. Factor 0.01 gives ceil(0.02) = 1, min_capacity 3 gives C = 3.
  probs = [[[0.6, 0.4], [0.9, 0.1], [0.7, 0.3], [0.8, 0.2]]]
  config = _config(num_experts=2, capacity_factor_train=0.01, min_capacity=3)
  decision = _route(_logits(probs), config, train=True)
  assert decision.capacity == 3
  _assert_combine(decision, [[
      [[0.6, o, o], [o, o, o]],
      [[o, 0.9, o], [o, o, o]],
      [[o, o, 0.7], [o, o, o]],
      [[o, o, o], [o, o, o]],  # fourth at e0: dropped
  ]])


# ======================================================================= dtypes and shapes


def test_low_precision_logits_are_routed_in_float32():
  logits = _logits(_GSHARD_PROBS).astype(jnp.bfloat16)
  decision = _route(logits, _config(kind="gshard", capacity_factor_train=2.0), train=True)
  assert decision.weight_GSK.dtype == np.float32
  assert decision.combine.dtype == np.float32
  np.testing.assert_allclose(np.sum(decision.weight_GSK, -1), 1.0, atol=ATOL)


def test_logits_with_wrong_number_of_experts_are_rejected():
  with pytest.raises(ValueError, match=r"router\.num_experts=4"):
    _route(jnp.zeros((1, 4, 3)), _config(num_experts=4), train=True)


# ======================================================================= reference + properties


def _softmax64(logits):
  logits = np.asarray(logits, np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  return probs / probs.sum(-1, keepdims=True)


def reference_route(logits_GSE, *, kind, k, normalize, capacity, mask_GS, batch_prioritized,
                    uniform_GS=None, threshold=None, claim_order="position"):
  """Independent sequential reference of the routing algorithm (numpy float64, Python loops).

  `uniform_GS` is given only when GShard's random second-expert policy is active. `claim_order`:
  "position" (each token's choices in turn, token after token) or "choice" (every first choice
  before any second choice). Returns (G, S, k) arrays: expert, gate (router weight before
  capacity), active, keep, slot (-1 where not kept).
  """
  probs = _softmax64(logits_GSE)
  G, S, E = probs.shape
  expert = np.zeros((G, S, k), np.int64)
  gate = np.zeros((G, S, k))
  active = np.zeros((G, S, k), bool)
  for g in range(G):
    for s in range(S):
      chosen = sorted(range(E), key=lambda e: (-probs[g, s, e], e))[:k]
      weights = probs[g, s, chosen]
      if kind == "gshard" or (kind == "topk" and normalize):
        weights = weights / weights.sum()
      expert[g, s], gate[g, s] = chosen, weights
      active[g, s] = bool(mask_GS[g, s])
      if uniform_GS is not None:
        active[g, s, 1] &= bool(uniform_GS[g, s] < weights[1] / threshold)
  keep = np.zeros((G, S, k), bool)
  slot = np.full((G, S, k), -1, np.int64)
  for g in range(G):
    order = list(range(S))
    if batch_prioritized:
      order.sort(key=lambda s: (-probs[g, s].max(), s))  # V-MoE: router confidence
    count = [0] * E
    if claim_order == "choice":  # every j-th choice before any (j+1)-th choice
      queue = [(s, j) for j in range(k) for s in order]
    else:  # token after token, each token's choices in preference order
      queue = [(s, j) for s in order for j in range(k)]
    for s, j in queue:
      if active[g, s, j]:
        e = expert[g, s, j]
        if count[e] < capacity:
          keep[g, s, j], slot[g, s, j] = True, count[e]
        count[e] += 1
  return dict(expert=expert, gate=gate, active=active, keep=keep, slot=slot, probs=probs)


def reference_combine(ref, num_experts, capacity):
  G, S, _ = ref["expert"].shape
  combine = np.zeros((G, S, num_experts, capacity))
  for g, s, j in zip(*np.nonzero(ref["keep"])):
    combine[g, s, ref["expert"][g, s, j], ref["slot"][g, s, j]] = ref["gate"][g, s, j]
  return combine


def reference_losses_and_metrics(ref, logits_GSE, mask_GS, capacity):
  logits = np.asarray(logits_GSE, np.float64)
  G, S, E = logits.shape
  probs, mask = ref["probs"], np.asarray(mask_GS, bool)
  safe_tokens = max(mask.sum(), 1)
  balance = []
  for g in range(G):
    if mask[g].any():
      f = np.bincount(ref["expert"][g, mask[g], 0], minlength=E) / mask[g].sum()
      p = probs[g, mask[g]].mean(0)
      balance.append(E * np.sum(f * p))
  top = logits.max(-1)
  lse = np.log(np.exp(logits - top[..., None]).sum(-1)) + top
  assigned = np.bincount(ref["expert"][ref["active"]], minlength=E)
  kept = ref["keep"].sum()
  entropy = -np.sum(probs * np.log(probs), -1)
  return {
      "load_balancing_loss": np.mean(balance) if balance else 0.0,
      "router_z_loss": np.sum(lse[mask] ** 2) / safe_tokens,
      "expert_load": assigned / max(assigned.sum(), 1),
      "dropped_fraction": (mask & ~ref["keep"].any(-1)).sum() / safe_tokens,
      "dropped_assignment_fraction": (1 - kept / assigned.sum()) if assigned.sum() else 0.0,
      "router_entropy": np.sum(entropy[mask]) / safe_tokens,
      "router_confidence": np.sum(probs.max(-1)[mask]) / safe_tokens,
      "capacity_utilisation": kept / (G * E * capacity),
  }


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
      probs = _softmax64(lg)
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
  got = _route(logits, config, train=train, padding_mask_GS=mask, uniform_GS=uniform)

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
  probs = _softmax64(logits)
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
