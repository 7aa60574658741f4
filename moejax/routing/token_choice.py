"""Token-choice routers: each token picks k experts, then the shared capacity claim runs.

    switch   top-1, weight = the softmax probability of the chosen expert (Fedus et al. 2021)
    gshard   top-2, weights renormalised g1/(g1+g2), g2/(g1+g2); optional random second-expert
             policy (Lepikhin et al. 2020, Algorithm 1)
    topk     any k; weights renormalised (Mixtral) or the raw probabilities (Qwen-MoE, OLMoE)

Selection may read the aux-loss-free balancing bias (`balance`): experts are chosen by
probability + bias, weights stay the unbiased probabilities (Wang et al. 2024).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.routing import capacity as capacity_lib
from moejax.routing import losses
from moejax.routing.config import ClaimOrder, RouterConfig, RouterKind, SecondExpertPolicy
from moejax.routing.decision import RouterInputs, RoutingDecision
from moejax.routing.family import Family, register

BALANCED = frozenset({"balance"})
TOKEN_CAPACITY = frozenset({"capacity_factor_train", "capacity_factor_eval", "min_capacity",
                            "batch_prioritized", "claim_order"})


def token_capacity(config: RouterConfig, group_size: int, train: bool) -> int:
  """C = ceil(k * capacity_factor * S / E), at least min_capacity, at most S."""
  factor = config.capacity_factor_train if train else config.capacity_factor_eval
  return capacity_lib.expert_capacity(group_size, config.num_experts, config.k, factor,
                                      config.min_capacity)


def top_k(scores_GSE, k: int, bias_E=None):
  """The k best experts by score (+ bias when given), and the unbiased scores of those experts."""
  if bias_E is None:
    return jax.lax.top_k(scores_GSE, k)
  _, index_GSK = jax.lax.top_k(scores_GSE + bias_E, k)
  return jnp.take_along_axis(scores_GSE, index_GSK, axis=-1), index_GSK


def finish(config: RouterConfig, *, logits_GSE, probs_GSE, gates_GSK, expert_index_GSK, mask_GS,
           train: bool, active_GSK=None, group_losses_G=None, expert_sums_GE=None
           ) -> RoutingDecision:
  """Capacity claim, decision and stats for a token-choice selection (shared by the families).

  The Switch load-balancing loss is computed when the family reads its weight.
  """
  G, S, E = probs_GSE.shape
  K = expert_index_GSK.shape[-1]
  if active_GSK is None:
    active_GSK = jnp.broadcast_to(mask_GS[..., None], (G, S, K))
  group_losses_G = dict(group_losses_G or {})
  if "load_balancing_loss_weight" in config.family.reads:
    group_losses_G["load_balancing_loss"] = losses.load_balancing_G(
        probs_GSE, expert_index_GSK[..., 0], mask_GS)
  # V-MoE's priority score: the router's confidence, max_e p_e (before any renormalisation).
  priority_GS = probs_GSE.max(axis=-1) if config.batch_prioritized else None
  return capacity_lib.token_choice_decision(
      expert_index_GSK, gates_GSK, active_GSK,
      capacity=config.capacity(S, train=train), num_experts=E, priority_GS=priority_GS,
      choice_major=config.claim_order is ClaimOrder.CHOICE,
      stats_args=dict(logits_GSE=logits_GSE, probs_GSE=probs_GSE, mask_GS=mask_GS,
                      group_losses_G=group_losses_G, expert_sums_GE=expert_sums_GE))


def _softmax_top_k(logits_GSE, config: RouterConfig, *, train: bool, mask_GS,
                   inputs: RouterInputs, renormalize: bool, second_expert_policy=None):
  probs_GSE = jax.nn.softmax(logits_GSE, axis=-1)
  gates_GSK, expert_index_GSK = top_k(probs_GSE, config.k, inputs.bias_E)
  if renormalize:
    # With k = 1 this makes every weight 1: the task loss then sends the router no gradient
    # (only the aux losses train it), as the Mixtral convention implies for a single expert.
    gates_GSK = gates_GSK / jnp.sum(gates_GSK, axis=-1, keepdims=True)
  G, S, K = gates_GSK.shape
  active_GSK = jnp.broadcast_to(mask_GS[..., None], (G, S, K))
  if train and second_expert_policy is SecondExpertPolicy.RANDOM:
    if inputs.uniform_GS is None:
      raise ValueError("GShard's 'random' second-expert policy needs uniform_GS in training.")
    keep_second = inputs.uniform_GS < gates_GSK[..., 1] / config.second_expert_threshold
    active_GSK = active_GSK.at[..., 1].set(active_GSK[..., 1] & keep_second)
  return finish(config, logits_GSE=logits_GSE, probs_GSE=probs_GSE, gates_GSK=gates_GSK,
                expert_index_GSK=expert_index_GSK, mask_GS=mask_GS, train=train,
                active_GSK=active_GSK)


def route_switch(logits_GSE, config, *, train, mask_GS, inputs):
  return _softmax_top_k(logits_GSE, config, train=train, mask_GS=mask_GS, inputs=inputs,
                        renormalize=False)


def route_gshard(logits_GSE, config, *, train, mask_GS, inputs):
  return _softmax_top_k(logits_GSE, config, train=train, mask_GS=mask_GS, inputs=inputs,
                        renormalize=True, second_expert_policy=config.second_expert_policy)


def route_topk(logits_GSE, config, *, train, mask_GS, inputs):
  return _softmax_top_k(logits_GSE, config, train=train, mask_GS=mask_GS, inputs=inputs,
                        renormalize=config.normalize_weights)


_LB = (("load_balancing_loss", "load_balancing_loss_weight"),)
_SHARED = TOKEN_CAPACITY | BALANCED | {"load_balancing_loss_weight"}

register(RouterKind.SWITCH, Family(route=route_switch, reads=_SHARED, capacity=token_capacity,
                                   fixed_k=1, losses=_LB, biased=True))
register(RouterKind.GSHARD, Family(
    route=route_gshard, capacity=token_capacity, fixed_k=2, losses=_LB, biased=True,
    reads=_SHARED | {"second_expert_policy", "second_expert_threshold"},
    random_inputs=lambda config: (("uniform_GS",) if config.second_expert_policy is
                                  SecondExpertPolicy.RANDOM else ())))
register(RouterKind.TOPK, Family(route=route_topk, reads=_SHARED | {"k", "normalize_weights"},
                                 capacity=token_capacity, losses=_LB, biased=True))
