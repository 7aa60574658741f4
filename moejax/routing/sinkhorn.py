"""S-BASE: token-choice routing on Sinkhorn-balanced scores in training (Clark et al. 2022).

"Unified Scaling Laws for Routed Language Models", Sec. 2.2 and Appendix A: BASE layers (Lewis et
al. 2021) assign tokens to experts by a balanced linear assignment; S-BASE approximates that
assignment with the Sinkhorn algorithm. For each group, with N real tokens and P = softmax(logits)
(each token's row sums to 1), Sinkhorn alternately rescales

    each expert's column so that it totals N / E   (every expert gets an equal share)
    each token's row so that it totals 1           (every token has unit mass)

for at most `sinkhorn.iterations` rounds, stopping a group once every expert's total is within
`sinkhorn.tolerance` (relative) of N / E. The rescalings are computed in log space (potentials u_S,
v_E: balanced = exp(logits + u + v)). In training, each token's k experts are the top-k of its row
of the balanced matrix; the combine weight is the unbalanced router's: the softmax probability of
each chosen expert, renormalised over the k when `normalize_weights` (with k = 1 that makes every
weight 1 and leaves the router no gradient from the task loss: S-BASE's top-1 sets
normalize_weights=False). In evaluation the choice is the plain top-k of the softmax. The shared
capacity claim (`token_choice.finish`) then runs as for every token-choice router.

Padding is excluded: it counts in no expert's total and its rows are zero. A group that has
converged is frozen (its potentials no longer change), so a group's result never depends on the
other groups on its device: the sharded layer equals the single-device one. The balancing is
not differentiated (it only selects); gradients reach the router through the weights.

Settings not read: the Switch load-balancing loss (S-BASE uses none: Sinkhorn balances the
training assignment by construction, and its weight would add a second, competing balancing
pressure) and the aux-loss-free bias (`balance`: a per-expert bias b scales expert e's column by
exp(b_e), which the expert-side normalisation removes exactly, so it could act in evaluation only).

Causality: the balanced assignment of a token depends on every token of its group in training;
evaluation (plain top-k) is as causal as `topk`. A causal language model refuses this router
unless `model.moe.router.allow_noncausal` is set.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.routing import token_choice
from moejax.routing.config import RouterConfig, RouterKind
from moejax.routing.decision import RouterInputs, RoutingDecision
from moejax.routing.family import Family, register


def _logsumexp(a, axis, where):
  """logsumexp over `axis` of the entries where `where` (-inf where there are none)."""
  masked = jnp.where(where, a, -jnp.inf)
  peak = jnp.max(masked, axis=axis, keepdims=True)
  peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
  total = jnp.sum(jnp.exp(masked - peak), axis=axis, keepdims=True)
  return jnp.squeeze(jnp.log(total) + peak, axis)


def sinkhorn_log_balance(logits_GSE: jax.Array, mask_GS: jax.Array, *, iterations: int,
                         tolerance: float) -> tuple[jax.Array, jax.Array]:
  """The log of the Sinkhorn-balanced matrix (rows total 1, columns N / E) and the rounds used.

  Returns (log_balanced_GSE, rounds_G): log_balanced is -inf at padding; rounds_G counts the
  rounds each group ran (0 for a group without real tokens). Not differentiable (a while loop).
  """
  E = logits_GSE.shape[-1]
  real_GS1 = mask_GS[..., None]
  logits_GSE = jnp.where(real_GS1, logits_GSE, 0.0)  # padding may hold NaN
  tokens_G1 = jnp.sum(mask_GS.astype(jnp.float32), axis=1, keepdims=True)
  log_target_G1 = jnp.log(tokens_G1 / E)  # -inf for an empty group, which starts done
  u_GS = -_logsumexp(logits_GSE, -1, True)  # start from the softmax: rows total 1

  def relative_error_G(u_GS, v_GE):
    log_total_GE = _logsumexp(logits_GSE + u_GS[..., None] + v_GE[:, None, :], 1, real_GS1)
    return jnp.max(jnp.abs(jnp.exp(log_total_GE - log_target_G1) - 1.0), axis=-1)

  def body(state):
    i, u_GS, v_GE, rounds_G, done_G = state
    new_v_GE = log_target_G1 - _logsumexp(logits_GSE + u_GS[..., None], 1, real_GS1)
    new_u_GS = -_logsumexp(logits_GSE + new_v_GE[:, None, :], -1, True)
    active_G = ~done_G
    u_GS = jnp.where(active_G[:, None], new_u_GS, u_GS)
    v_GE = jnp.where(active_G[:, None], new_v_GE, v_GE)
    rounds_G = rounds_G + active_G.astype(jnp.int32)
    done_G = done_G | (relative_error_G(u_GS, v_GE) <= tolerance)
    return i + 1, u_GS, v_GE, rounds_G, done_G

  def cond(state):
    i, _, _, _, done_G = state
    return (i < iterations) & ~jnp.all(done_G)

  # Initial values derived from both inputs, so that inside shard_map they vary over the mesh
  # axes the loop's outputs vary over (`zeros_like` keeps that type).
  zero_G1 = jnp.zeros_like(tokens_G1) + jnp.zeros_like(logits_GSE[:, 0, :1])
  state = (jnp.zeros((), jnp.int32), u_GS + zero_G1, jnp.zeros_like(logits_GSE[:, 0, :]) + zero_G1,
           zero_G1[:, 0].astype(jnp.int32), (tokens_G1 + zero_G1)[:, 0] == 0)
  _, u_GS, v_GE, rounds_G, _ = jax.lax.while_loop(cond, body, state)
  log_balanced_GSE = logits_GSE + u_GS[..., None] + v_GE[:, None, :]
  return jnp.where(real_GS1, log_balanced_GSE, -jnp.inf), rounds_G


def route_sinkhorn(logits_GSE, config: RouterConfig, *, train: bool, mask_GS,
                   inputs: RouterInputs) -> RoutingDecision:
  """Top-k on the balanced scores in training, on the softmax in evaluation; softmax weights."""
  del inputs  # no bias, noise or token ids (see the module docstring)
  # Padding may hold NaN: selected away first, so that not even its gradient is NaN.
  logits_GSE = jnp.where(mask_GS[..., None], logits_GSE, 0.0)
  probs_GSE = jax.nn.softmax(logits_GSE, axis=-1)
  if train:
    log_balanced_GSE, _ = sinkhorn_log_balance(
        jax.lax.stop_gradient(logits_GSE), mask_GS, iterations=config.sinkhorn.iterations,
        tolerance=config.sinkhorn.tolerance)
    # Padding rows (-inf) read as 0: their choice is inactive in the capacity claim anyway.
    _, expert_index_GSK = jax.lax.top_k(jnp.where(mask_GS[..., None], log_balanced_GSE, 0.0),
                                        config.k)
    gates_GSK = jnp.take_along_axis(probs_GSE, expert_index_GSK, axis=-1)
  else:
    gates_GSK, expert_index_GSK = jax.lax.top_k(probs_GSE, config.k)
  if config.normalize_weights:
    gates_GSK = gates_GSK / jnp.sum(gates_GSK, axis=-1, keepdims=True)
  return token_choice.finish(config, logits_GSE=logits_GSE, probs_GSE=probs_GSE,
                             gates_GSK=gates_GSK, expert_index_GSK=expert_index_GSK,
                             mask_GS=mask_GS, train=train)


register(RouterKind.SINKHORN, Family(
    route=route_sinkhorn, capacity=token_choice.token_capacity, causal_train=False,
    reads=token_choice.TOKEN_CAPACITY | {"k", "normalize_weights", "sinkhorn"}))
