"""Expert capacity and the capacity claim shared by every token-choice router.

Assignments claim their expert's slots one after another in a fixed order, and those past the
capacity C are dropped. The order (`RouterConfig.claim_order`, which matters for k >= 2):

* "position" (the default): token by token in position order, each token's k choices in
  preference order. A token's slots then depend only on itself and earlier tokens of its group:
  causal, as a causal language model needs.
* "choice": every first choice before any second choice, each in position order (GShard,
  Lepikhin et al. 2020, Algorithm 1). First choices are dropped less, but a later token's first
  choice can push out an earlier token's second: not causal once capacity drops assignments.

With batch-prioritized routing (V-MoE, Riquelme et al. 2021, Sec. 4.1) tokens take their turns in
descending router confidence instead of position (not causal either).

Worked example (S=4 tokens, E=2 experts, top-1, C=1):
    argmax experts   [0, 0, 1, 0]
    position order:  token 0 takes expert 0 slot 0; token 1 is over capacity at expert 0 (dropped);
                     token 2 takes expert 1 slot 0; token 3 is dropped.
    keep             [T, F, T, F]

Top-2, E=3, C=1, choices (t0: e0, e1), (t1: e1, e2):
    position order:  t0 -> e0, t0 -> e1, t1 -> e1 dropped, t1 -> e2: t1 loses its first choice.
    choice order:    t0 -> e0, t1 -> e1, t0 -> e1 dropped, t1 -> e2: t0 loses its second choice
                     to a later token.
"""

from __future__ import annotations

import math
from fractions import Fraction

import jax
import jax.numpy as jnp

from moejax.routing.decision import RoutingDecision, RoutingStats


def expert_capacity(group_size: int, num_experts: int, k: int, capacity_factor: float,
                    min_capacity: int = 1) -> int:
  """C = max(min_capacity, ceil(k * capacity_factor * S / E)), capped at S.

  An expert can never receive more than S tokens of one group (a token picks an expert at most
  once), so slots beyond S would stay empty: the cap changes no result, only memory. The factor is
  read as a decimal (1.1 is 11/10, not the nearest float) so that ceil is exact.
  """
  factor = Fraction(str(capacity_factor))
  capacity = math.ceil(k * factor * group_size / num_experts)
  return min(max(min_capacity, capacity), group_size)


def claim_slots(expert_index_GSK, active_GSK, num_experts, priority_GS=None, *,
                choice_major: bool = False):
  """Position of each active assignment in its expert's queue (0-based); inactive ones get 0.

  Queue order: tokens in position order, or in descending `priority_GS` (stable, so ties keep
  position order); each token's assignments in k order ("position" claim order), or all k=0
  assignments before any k=1, ... (`choice_major`, GShard's order).
  """
  G, S, K = expert_index_GSK.shape
  mask_GSKE = jax.nn.one_hot(expert_index_GSK, num_experts, dtype=jnp.int32)
  mask_GSKE = mask_GSKE * active_GSK[..., None].astype(jnp.int32)
  if priority_GS is not None:
    order_GS = jnp.argsort(-priority_GS, axis=1, stable=True)
    mask_GSKE = jnp.take_along_axis(mask_GSKE, order_GS[:, :, None, None], axis=1)
  # The queue: (G, S, K, E) token-major, or swapped to (G, K, S, E) choice-major, flattened to
  # (G, Q, E); a running count along Q gives each assignment its place in its expert's queue.
  # The swap is its own inverse.
  axes = (0, 2, 1, 3) if choice_major else (0, 1, 2, 3)
  queue = jnp.transpose(mask_GSKE, axes)
  position = jnp.cumsum(queue.reshape(G, S * K, num_experts), axis=1).reshape(queue.shape) - 1
  position_GSKE = jnp.transpose(position, axes)
  if priority_GS is not None:
    inverse_GS = jnp.argsort(order_GS, axis=1)
    position_GSKE = jnp.take_along_axis(position_GSKE, inverse_GS[:, :, None, None], axis=1)
    mask_GSKE = jnp.take_along_axis(mask_GSKE, inverse_GS[:, :, None, None], axis=1)
  return jnp.sum(position_GSKE * mask_GSKE, axis=-1)


def token_choice_decision(expert_index_GSK, gates_GSK, active_GSK, *, capacity: int,
                          num_experts: int, stats_args: dict,
                          priority_GS=None, choice_major: bool = False) -> RoutingDecision:
  """The decision of a token-choice router: claim capacity, keep what fits, weight it.

  Args:
    expert_index_GSK / gates_GSK: each token's k chosen experts and their combine weights.
    active_GSK: assignments that compete for capacity (real tokens; policies may switch some off).
    capacity: C.
    stats_args: keyword arguments of `router_stats` besides the decision's own arrays.
    priority_GS: claim capacity in descending priority instead of position order.
    choice_major: every first choice claims before any second choice (GShard's order).
  """
  slot_GSK = claim_slots(expert_index_GSK, active_GSK, num_experts, priority_GS,
                         choice_major=choice_major)
  keep_GSK = active_GSK & (slot_GSK < capacity)
  weight_GSK = jnp.where(keep_GSK, gates_GSK, 0.0)
  slot_GSK = jnp.where(keep_GSK, slot_GSK, 0)
  stats = router_stats(expert_index_GSK=expert_index_GSK, active_GSK=active_GSK,
                       keep_GSK=keep_GSK, capacity=capacity, **stats_args)
  return RoutingDecision(expert_index_GSK=expert_index_GSK, slot_GSK=slot_GSK, keep_GSK=keep_GSK,
                         weight_GSK=weight_GSK, stats=stats, num_experts=num_experts,
                         capacity=capacity)


def router_stats(*, logits_GSE, probs_GSE, mask_GS, expert_index_GSK, active_GSK, keep_GSK,
                 capacity: int, group_losses_G=None, expert_sums_GE=None) -> RoutingStats:
  """The statistics every router reports (see `RoutingStats`); padding counts in none of them.

  `probs_GSE` is the router's distribution over experts (entropy and confidence are of it);
  `logits_GSE` give the z-loss.
  """
  E = logits_GSE.shape[-1]
  # Padding may hold any logits, even inf or NaN: select (not multiply) so none of it leaks.
  valid = lambda a: jnp.where(mask_GS.reshape(mask_GS.shape + (1,) * (a.ndim - 2)), a, 0.0)
  # Router z-loss (Zoph et al. 2022, ST-MoE eq. 5): mean over tokens of logsumexp(logits)^2.
  z_GS = jax.nn.logsumexp(logits_GSE, axis=-1) ** 2
  log_probs_GSE = jnp.log(jnp.maximum(probs_GSE, jnp.finfo(jnp.float32).tiny))
  entropy_GS = -jnp.sum(jnp.where(probs_GSE > 0, probs_GSE * log_probs_GSE, 0.0), axis=-1)
  assign_GSKE = jax.nn.one_hot(expert_index_GSK, E, dtype=jnp.float32)
  assigned_GE = jnp.einsum("GSKE,GSK->GE", assign_GSKE, active_GSK.astype(jnp.float32))
  kept_GE = jnp.einsum("GSKE,GSK->GE", assign_GSKE, keep_GSK.astype(jnp.float32))
  dropped_GS = mask_GS & ~jnp.any(keep_GSK, axis=-1)
  return RoutingStats(
      num_tokens_G=jnp.sum(mask_GS.astype(jnp.float32), axis=1),
      z_loss_sum_G=jnp.sum(valid(z_GS), axis=1),
      entropy_sum_G=jnp.sum(valid(entropy_GS), axis=1),
      confidence_sum_G=jnp.sum(valid(jnp.max(probs_GSE, axis=-1)), axis=1),
      assigned_GE=assigned_GE,
      kept_GE=kept_GE,
      tokens_dropped_G=jnp.sum(dropped_GS.astype(jnp.float32), axis=1),
      group_losses_G=dict(group_losses_G or {}),
      expert_sums_GE=dict(expert_sums_GE or {}),
      capacity=capacity,
  )
