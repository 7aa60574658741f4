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
