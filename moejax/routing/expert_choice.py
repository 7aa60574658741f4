"""Expert-choice routing: each expert picks the tokens it processes (Zhou et al. 2022).

"Mixture-of-Experts with Expert Choice Routing", Sec. 3.1: with S the token-to-expert affinity
scores of a group,

    S = softmax(X W_g)                       (eq. 1; softmax over the experts, per token)
    G, I = TopK(S^T, C)                      (eq. 2; per expert, its C best tokens)
    C = ceil(capacity_factor * S / E)        (eq. 3's k; the paper's default factor is 2)

and token s's output is sum over the experts e that picked it of S[s, e] * expert_e(x_s). A token
may reach 0..E experts; every expert fills exactly C slots (fewer only when the group holds fewer
than C real tokens). The load is balanced by construction, so no auxiliary loss is needed (the
router z-loss, common to every router, stays available).

The decision uses K = E: assignment k of a token is expert k, kept when expert k picked the token,
in the slot given by the token's rank in that expert's pick list, with weight S[token, k].
Padding tokens score -inf and are never picked; a group with fewer than C real tokens leaves the
remaining slots empty. Ties are broken in position order (`jax.lax.top_k` puts the lower index
first).

Statistics: an expert's pick is its assignment, so "assigned before capacity" and "kept" are the
same thing here: the picks (`assigned_GE == kept_GE`; nothing is assigned and then dropped). Hence
`expert_load` is the share of picks per expert (uniform in full groups), `dropped_fraction` the
fraction of real tokens that no expert picked, and `experts_per_token` the mean number of experts
that picked a real token (E * C / S in full groups).

Causality: an expert's pick of an early token depends on the scores of every later token of the
group, in training and in evaluation: a causal language model refuses this router unless
`model.moe.router.allow_noncausal` is set.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.routing import capacity as capacity_lib
from moejax.routing.config import RouterConfig, RouterKind
from moejax.routing.decision import RouterInputs, RoutingDecision
from moejax.routing.family import CAPACITY_FIELDS, Family, register


def expert_choice_capacity(config: RouterConfig, group_size: int, train: bool) -> int:
  """C = ceil(capacity_factor * S / E), at least min_capacity, at most S (eq. 3)."""
  factor = config.capacity_factor_train if train else config.capacity_factor_eval
  return capacity_lib.expert_capacity(group_size, config.num_experts, 1, factor,
                                      config.min_capacity)


def route_expert_choice(logits_GSE, config: RouterConfig, *, train: bool, mask_GS,
                        inputs: RouterInputs) -> RoutingDecision:
  """Each expert takes its top-C real tokens of the group by softmax affinity (eq. 1-3)."""
  del inputs  # expert choice reads nothing besides the logits
  G, S, E = logits_GSE.shape
  C = config.capacity(S, train=train)
  # Padding may hold NaN: selected away first, so that not even its gradient is NaN.
  logits_GSE = jnp.where(mask_GS[..., None], logits_GSE, 0.0)
  probs_GSE = jax.nn.softmax(logits_GSE, axis=-1)
  # Padding scores -inf: it is never picked.
  scores_GES = jnp.swapaxes(jnp.where(mask_GS[..., None], probs_GSE, -jnp.inf), 1, 2)
  _, token_GEC = jax.lax.top_k(scores_GES, C)
  # slot_GES[g, e, s]: the rank of token s in expert e's picks, C where e did not pick s. Where a
  # group has fewer than C real tokens, the last picks are padding: the mask drops them.
  g_G11 = jnp.arange(G)[:, None, None]
  e_1E1 = jnp.arange(E)[None, :, None]
  rank_GEC = jnp.broadcast_to(jnp.arange(C, dtype=jnp.int32), (G, E, C))
  slot_GES = jnp.full((G, E, S), C, jnp.int32).at[g_G11, e_1E1, token_GEC].set(rank_GEC)
  slot_GSK = jnp.swapaxes(slot_GES, 1, 2)
  keep_GSK = (slot_GSK < C) & mask_GS[..., None]
  slot_GSK = jnp.where(keep_GSK, slot_GSK, 0)
  weight_GSK = jnp.where(keep_GSK, probs_GSE, 0.0)
  expert_index_GSK = jnp.broadcast_to(jnp.arange(E, dtype=jnp.int32), (G, S, E))
  # A pick is an assignment: assigned == kept (see the module docstring).
  stats = capacity_lib.router_stats(
      logits_GSE=logits_GSE, probs_GSE=probs_GSE, mask_GS=mask_GS,
      expert_index_GSK=expert_index_GSK, active_GSK=keep_GSK, keep_GSK=keep_GSK, capacity=C)
  return RoutingDecision(expert_index_GSK=expert_index_GSK, slot_GSK=slot_GSK, keep_GSK=keep_GSK,
                         weight_GSK=weight_GSK, stats=stats, num_experts=E, capacity=C)


register(RouterKind.EXPERT_CHOICE, Family(
    route=route_expert_choice, reads=CAPACITY_FIELDS, capacity=expert_choice_capacity, fixed_k=0,
    causal_train=False, causal_eval=False))
