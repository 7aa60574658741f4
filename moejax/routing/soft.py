"""Soft MoE: every slot is a weighted mix of the group's tokens (Puigcerver et al. 2023).

"From Sparse to Soft Mixtures of Experts", Sec. 2.1-2.3. Each expert has p slots
(`soft.slots_per_expert`), each slot a learned vector: Phi (M, E*p). For a group's tokens X (S, M):

    logits = scale * l2norm(X) l2norm(Phi)      (Sec. 2.3: rows of X and columns of Phi
                                                 normalised over M, a learned scalar scale)
    D = softmax over the tokens (axis S)        (eq. 1, dispatch weights, per slot)
    C = softmax over the E*p slots, per token   (eq. 3, combine weights)
    X~ = D^T X                                  (eq. 2, each slot's input: a mix of tokens)
    Y~[e*p:(e+1)*p] = expert_e(X~[e*p:(e+1)*p])
    Y = C Y~                                    (eq. 4)

The logit layout is expert-major: column e*p + c is slot c of expert e. The decision is dense
(`dense_dispatch_GSEC`, `dense_combine_GSEC`; K = 0), which only the einsum dispatch form can
execute. The capacity is p, whatever the group size; nothing is ever dropped. `l2norm` adds
`NORM_EPS` under the square root, so that a zero token (padding) gives zero, not NaN.

Padding tokens get zero dispatch weight (they are masked before the softmax over S, so they take
no part in any slot) and zero combine rows. A group without a real token has all-zero dispatch
weights and outputs zero (no NaN).

Statistics: an expert's work is its p slots, so the "assigned" and "kept" load of expert e is the
dispatch mass it receives, sum over real tokens and its slots of D, which is exactly p in every
group holding a real token (counted as such, without rounding): `expert_load` is uniform,
`capacity_utilisation` is the fraction of groups holding a real token, `dropped_fraction` is 0 and
`experts_per_token` is E * p / (real tokens per group), the expert rows computed per token. What the router prefers shows in the entropy and
confidence of each token's combine mass per expert (its combine weights summed over each expert's
slots). The router z-loss is of the logsumexp over a token's E*p slot logits.

Causality: every slot mixes every token of the group, in training and evaluation: a causal
language model refuses this router unless `model.moe.router.allow_noncausal` is set.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moejax.routing import capacity as capacity_lib
from moejax.routing.config import RouterConfig, RouterKind
from moejax.routing.decision import RouterInputs, RoutingDecision
from moejax.routing.family import Family, register

NORM_EPS = 1e-6  # added to the squared norm in l2norm


def l2_normalize(a: jax.Array, axis: int) -> jax.Array:
  """a / sqrt(sum(a^2) + NORM_EPS) along `axis`."""
  return a * jax.lax.rsqrt(jnp.sum(jnp.square(a), axis=axis, keepdims=True) + NORM_EPS)


def soft_logits(x_GSM: jax.Array, phi_MX: jax.Array, inputs: RouterInputs) -> jax.Array:
  """scale * <x / |x|, phi / |phi|> for every token and slot (Sec. 2.3); X = E * p."""
  if inputs.scale is None:
    raise ValueError("soft MoE's normalised logits need the layer's learned scale (inputs.scale).")
  logits_GSX = jnp.einsum("GSM,MX->GSX", l2_normalize(x_GSM, -1), l2_normalize(phi_MX, 0))
  return inputs.scale * logits_GSX


def dispatch_weights(logits_GSX: jax.Array, mask_GS: jax.Array) -> jax.Array:
  """Softmax over the real tokens of each group, per slot; zero for padding and empty groups."""
  real_GS1 = mask_GS[..., None]
  # Select, never multiply: padding may hold NaN, and a selection passes it no gradient either.
  safe_GSX = jnp.where(real_GS1, logits_GSX, 0.0)
  max_G1X = jnp.max(jnp.where(real_GS1, safe_GSX, -jnp.inf), axis=1, keepdims=True)
  max_G1X = jax.lax.stop_gradient(jnp.where(jnp.isfinite(max_G1X), max_G1X, 0.0))
  exp_GSX = jnp.exp(jnp.where(real_GS1, safe_GSX - max_G1X, -jnp.inf))
  total_G1X = jnp.sum(exp_GSX, axis=1, keepdims=True)
  return exp_GSX / jnp.where(total_G1X > 0, total_G1X, 1.0)


def combine_weights(logits_GSX: jax.Array, mask_GS: jax.Array) -> jax.Array:
  """Softmax over a token's E*p slots; zero rows for padding."""
  real_GS1 = mask_GS[..., None]
  probs_GSX = jax.nn.softmax(jnp.where(real_GS1, logits_GSX, 0.0), axis=-1)
  return jnp.where(real_GS1, probs_GSX, 0.0)


def route_soft(logits_GSX, config: RouterConfig, *, train: bool, mask_GS,
               inputs: RouterInputs) -> RoutingDecision:
  """The dense dispatch and combine weights of eq. 1 and 3 (see the module docstring)."""
  del train, inputs  # soft MoE routes alike in training and evaluation
  G, S, X = logits_GSX.shape
  E, p = config.num_experts, config.soft.slots_per_expert
  # Padding may hold NaN: selected away first, so that not even its gradient is NaN.
  logits_GSX = jnp.where(mask_GS[..., None], logits_GSX, 0.0)
  dispatch_GSEC = dispatch_weights(logits_GSX, mask_GS).reshape(G, S, E, p)
  combine_GSEC = combine_weights(logits_GSX, mask_GS).reshape(G, S, E, p)
  empty_GSK = jnp.zeros((G, S, 0), jnp.int32)
  no_GSK = jnp.zeros((G, S, 0), jnp.bool_)
  # router_stats gives the z-loss, entropy and confidence; the load is the dispatch mass.
  stats = capacity_lib.router_stats(
      logits_GSE=logits_GSX, probs_GSE=jnp.sum(combine_GSEC, axis=-1), mask_GS=mask_GS,
      expert_index_GSK=empty_GSK, active_GSK=no_GSK, keep_GSK=no_GSK, capacity=p)
  # Each slot's dispatch weights sum to 1 over the real tokens: the mass is p per expert in a
  # group holding a real token, counted exactly (a float sum would add rounding noise to MaxVio).
  has_tokens_G1 = jnp.any(mask_GS, axis=1, keepdims=True)
  mass_GE = jnp.where(has_tokens_G1, jnp.full((G, E), p, jnp.float32), 0.0)
  stats = dataclasses.replace(stats, assigned_GE=mass_GE, kept_GE=mass_GE,
                              tokens_dropped_G=jnp.zeros((G,), jnp.float32))
  return RoutingDecision(
      expert_index_GSK=empty_GSK, slot_GSK=empty_GSK, keep_GSK=no_GSK,
      weight_GSK=jnp.zeros((G, S, 0), jnp.float32), stats=stats, num_experts=E, capacity=p,
      dense_dispatch_GSEC=dispatch_GSEC, dense_combine_GSEC=combine_GSEC)


register(RouterKind.SOFT, Family(
    route=route_soft, reads=frozenset({"soft"}),
    capacity=lambda config, group_size, train: config.soft.slots_per_expert, fixed_k=0,
    causal_train=False, causal_eval=False,
    logits_per_expert=lambda config: config.soft.slots_per_expert, normalized_logits=True,
    dense=True, logits=soft_logits))
