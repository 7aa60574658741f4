"""Token-choice routing with padding: padded tokens claim no capacity and count in no loss or
metric, whatever their logits (-inf and NaN included); a real token whose logits are not all finite
is routed as padding, with a zero gradient.

Hand cases as in test_routing.py: logits are log(p), and combine tensors are written per token as E
rows of C slots.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.routing import route
from routing_reference import (ATOL, GSHARD_PROBS, assert_combine, logits_from_probs, o, route_np,
                               router_config)


# ======================================================================= padding


_PAD_PROBS = [[[0.6, 0.4], [0.9, 0.1], [0.7, 0.3], [0.8, 0.2], [0.3, 0.7]]]


def test_padding_takes_no_capacity_and_later_tokens_move_up():
  # Switch, E=2, S=5, capacity factor 0.8 -> C = ceil(0.8 * 5 / 2) = 2 (padding still counts in S).
  config = router_config(num_experts=2, capacity_factor_train=0.8)
  # Without padding: e0 <- t0 (0), t1 (1); t2, t3 dropped; e1 <- t4 (0).
  no_pad = route_np(logits_from_probs(_PAD_PROBS), config, train=True)
  assert_combine(no_pad, [[
      [[0.6, o], [o, o]],
      [[o, 0.9], [o, o]],
      [[o, o], [o, o]],
      [[o, o], [o, o]],
      [[o, o], [0.7, o]],
  ]])
  # t1 is padding: it takes nothing and t2 moves up into e0 slot 1.
  mask = jnp.array([[True, False, True, True, True]])
  decision = route_np(logits_from_probs(_PAD_PROBS), config, train=True, padding_mask_GS=mask)
  assert_combine(decision, [[
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
  # t1 padded: its first (e0) and second (e1) choices take nothing; C = 2 as in the first GShard
  # case (test_routing.py).
  # t0 -> e1 (0), e2 (0); t2 -> e0 (0), e1 (1); t3 -> e1 full, e0 (1).
  config = router_config(kind="gshard", capacity_factor_train=0.75)
  mask = jnp.array([[True, False, True, True]])
  decision = route_np(logits_from_probs(GSHARD_PROBS), config, train=True, padding_mask_GS=mask)
  assert_combine(decision, [[
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


def _loss_decision(mask):
  """`_LOSS_PROBS` routed by Switch over 2 experts with room for every token (C = S)."""
  config = router_config(num_experts=2, capacity_factor_train=2.0)
  return route_np(logits_from_probs(_LOSS_PROBS, _LOSS_SHIFT), config, train=True,
                  padding_mask_GS=jnp.array(mask))


def test_losses_with_padding_by_hand():
  decision = _loss_decision([[True, True, True, False], [True, False, False, False]])
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
  decision = _loss_decision([[True, True, True, False], [False, False, False, False]])
  losses, metrics = decision.losses, decision.metrics
  np.testing.assert_allclose(losses["load_balancing_loss"], 9.4 / 9, atol=1e-5)
  np.testing.assert_allclose(losses["router_z_loss"], 14 / 3, atol=1e-5)
  np.testing.assert_allclose(metrics["expert_load"], [2 / 3, 1 / 3], atol=ATOL)
  np.testing.assert_allclose(metrics["router_confidence"], 2.1 / 3, atol=ATOL)
  assert not np.any(decision.dispatch[1])


def test_everything_padding_gives_finite_zero_losses():
  decision = _loss_decision(np.zeros((2, 4), bool))
  losses, metrics = decision.losses, decision.metrics
  for name, value in {**losses, **metrics}.items():
    assert np.all(np.isfinite(value)), name
  assert float(losses["load_balancing_loss"]) == 0.0
  assert float(losses["router_z_loss"]) == 0.0
  assert float(metrics["dropped_fraction"]) == 0.0


def test_dropped_assignment_fraction_is_zero_without_assignments():
  # All tokens are padding: there is no assignment, so none was dropped (0 of 0), just as
  # dropped_fraction is 0. Padding must not show up as 100% of assignments dropped.
  decision = _loss_decision(np.zeros((2, 4), bool))
  assert float(decision.metrics["dropped_assignment_fraction"]) == 0.0


def test_padding_logits_do_not_change_losses_or_metrics():
  mask = jnp.array([[True, True, True, False], [True, False, False, False]])
  config = router_config(num_experts=2, capacity_factor_train=2.0)
  reference = _loss_decision(mask)
  logits = np.asarray(logits_from_probs(_LOSS_PROBS, _LOSS_SHIFT)).copy()
  logits[0, 3] = [40.0, -30.0]
  logits[1, 1:] = [[-50.0, 7.0], [3.0, 3.0], [0.0, 60.0]]
  other = route_np(jnp.asarray(logits), config, train=True, padding_mask_GS=mask)
  _compare_summaries(other, reference)


def test_non_finite_padding_logits_do_not_leak():
  # Spec: padded tokens count in no loss or metric. Padding positions whose logits are -inf (a
  # common way of masking) or NaN must therefore give the same numbers as any other padding.
  mask = jnp.array([[True, True, True, False], [True, False, False, False]])
  config = router_config(num_experts=2, capacity_factor_train=2.0)
  reference = _loss_decision(mask)
  logits = np.asarray(logits_from_probs(_LOSS_PROBS, _LOSS_SHIFT)).copy()
  logits[0, 3] = [-np.inf, -np.inf]
  logits[1, 1] = [np.nan, np.nan]
  other = route_np(jnp.asarray(logits), config, train=True, padding_mask_GS=mask)
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
  # C = 2: tokens overflow
  config = router_config("gshard", num_experts=E, capacity_factor_train=0.5)
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
  got = route_np(bad_logits, config, train=True, padding_mask_GS=mask)
  want = route_np(logits, config, train=True, padding_mask_GS=as_padding)
  full = route_np(logits, config, train=True, padding_mask_GS=mask)
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
