"""Auxiliary losses, each next to the paper equation it implements.

Per-group losses return one value per group (G,); `RoutingStats.summarize` averages them over the
groups that hold a token. Padding counts in none of them: every sum is over real tokens only, and
padded values are selected away (not multiplied by zero), so NaN padding cannot leak in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _real(mask_GS, a):
  """`a` with padded tokens' entries set to 0 (a selection, safe for NaN/inf padding)."""
  return jnp.where(mask_GS.reshape(mask_GS.shape + (1,) * (a.ndim - 2)), a, 0.0)


def load_balancing_G(probs_GSE, first_expert_GS, mask_GS) -> jax.Array:
  """Switch load-balancing loss per group (Fedus et al. 2021, eq. 4-6): E * sum_i f_i P_i.

  f_i: the fraction of the group's real tokens whose first choice is expert i (before capacity);
  P_i: the mean router probability of expert i over those tokens. 1 at perfect balance; 0 for a
  group without real tokens.
  """
  E = probs_GSE.shape[-1]
  tokens_G1 = jnp.maximum(jnp.sum(mask_GS.astype(jnp.float32), axis=1), 1.0)[:, None]
  first_GSE = _real(mask_GS, jax.nn.one_hot(first_expert_GS, E, dtype=jnp.float32))
  f_GE = jnp.sum(first_GSE, axis=1) / tokens_G1
  p_GE = jnp.sum(_real(mask_GS, probs_GSE), axis=1) / tokens_G1
  return E * jnp.sum(f_GE * p_GE, axis=-1)


def sequence_balance_G(probs_GSE, expert_index_GSK, mask_GS) -> jax.Array:
  """DeepSeek-V3's sequence-wise balance loss per group (arXiv 2412.19437, eq. 17-20).

  L = sum_i f_i P_i, with f_i = E / (K T) * (number of the group's T real tokens that select
  expert i) and P_i = (1/T) sum_t s'_{i,t}, where `probs_GSE` holds s'_{i,t} = s_{i,t} / sum_j
  s_{j,t}. A token "selects" i when i is among its K routed experts (before capacity; with the
  balancing bias and group limit applied, which eq. 18's TopK over s equals when both are off).
  1 at perfect balance; 0 for a group without real tokens. The weight alpha of eq. 17 is the
  config's `deepseek.sequence_balance_loss_weight`.
  """
  E = probs_GSE.shape[-1]
  K = expert_index_GSK.shape[-1]
  tokens_G1 = jnp.maximum(jnp.sum(mask_GS.astype(jnp.float32), axis=1), 1.0)[:, None]
  selected_GSE = jnp.sum(jax.nn.one_hot(expert_index_GSK, E, dtype=jnp.float32), axis=2)
  f_GE = E / K * jnp.sum(_real(mask_GS, selected_GSE), axis=1) / tokens_G1
  p_GE = jnp.sum(_real(mask_GS, probs_GSE), axis=1) / tokens_G1
  return jnp.sum(f_GE * p_GE, axis=-1)
