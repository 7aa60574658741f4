"""The routing decision every dispatch form executes, and the statistics routing returns.

Dimension letters (docs/design.md): G groups, S tokens per group, E experts, K assignments per
token, C expert capacity (slots per expert per group).

A `RoutingDecision` is a slot table seen from the tokens: for each token's k-th assignment, the
expert, the slot it fills in that expert's buffer, whether it is kept, and its combine weight.
Token-choice routers (Switch, GShard, top-k, ...) fill it through the capacity claim
(`capacity.py`); expert choice, where expert e picks tokens, uses K = E (assignment k of a token is
expert k, kept when that expert picked the token); soft MoE, whose slots mix every token of the
group, carries dense (G, S, E, C) dispatch and combine weights instead, which only the einsum form
can execute.

`RoutingStats` are per-group sums (leading axis G), so a sharded layer can return its local groups
and reduce them in the global view, giving exactly the single-device numbers; `summarize` turns
them into the auxiliary losses and the routing metrics.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RouterInputs:
  """What some router families read besides the logits; None where a family needs nothing.

  Random numbers are drawn by the layer in the global view (so every mesh sees the same ones).
  """

  uniform_GS: jax.Array | None = None  # one uniform [0, 1) number per token (GShard's policy)
  normal_GSE: jax.Array | None = None  # standard normal noise per token and expert (noisy top-k)
  uniform_GSE: jax.Array | None = None  # uniform [0, 1) per token and expert (random routing)
  token_ids_GS: jax.Array | None = None  # int32 token ids (hash routing)
  hash_table_V: jax.Array | None = None  # int32 expert of each vocabulary entry (hash routing)
  bias_E: jax.Array | None = None  # aux-loss-free balancing bias, added for selection only
  scale: jax.Array | None = None  # learned logit scale (soft MoE's normalised logits)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RoutingStats:
  """Per-group sums (leading axis G); `summarize` turns them into losses and metrics.

  `group_losses_G`: losses defined per group (the Switch load-balancing loss, the sequence-wise
  balance loss), averaged over the groups that hold a token. `expert_sums_GE`: per-expert sums
  whose squared coefficient of variation over the experts of the whole batch is a loss (the
  importance and load losses of Shazeer et al. 2017); the loss is named after the key + "_loss".
  """

  num_tokens_G: jax.Array  # non-padding tokens
  z_loss_sum_G: jax.Array  # sum over tokens of logsumexp(logits)^2
  entropy_sum_G: jax.Array  # sum over tokens of the router distribution's entropy
  confidence_sum_G: jax.Array  # sum over tokens of max_e p
  assigned_GE: jax.Array  # token-expert assignments per expert before capacity
  kept_GE: jax.Array  # assignments that fit in capacity
  tokens_dropped_G: jax.Array  # tokens none of whose assignments was kept
  group_losses_G: dict[str, jax.Array]
  expert_sums_GE: dict[str, jax.Array]
  capacity: int = dataclasses.field(metadata=dict(static=True))
  # Assignments a dispatch form's exchange buffer could not carry (dropless experts' fixed-size
  # exchange, moejax/dropless.py), per group; None for forms without one. Reported as the
  # `exchange_overflow` metric, a count summed over the batch.
  exchange_overflow_G: jax.Array | None = None

  def summarize(self) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Returns (losses, metrics), all float32 scalars except `expert_load` (E,)."""
    tokens = jnp.sum(self.num_tokens_G)
    denom = jnp.maximum(tokens, 1.0)
    nonempty = jnp.maximum(jnp.sum(self.num_tokens_G > 0), 1)
    losses = {name: jnp.sum(value_G) / nonempty for name, value_G in self.group_losses_G.items()}
    losses["router_z_loss"] = jnp.sum(self.z_loss_sum_G) / denom
    for name, sums_GE in self.expert_sums_GE.items():
      losses[f"{name}_loss"] = cv_squared(jnp.sum(sums_GE, axis=0))
    assigned_E = jnp.sum(self.assigned_GE, axis=0)
    kept_E = jnp.sum(self.kept_GE, axis=0)
    assigned, kept = jnp.sum(assigned_E), jnp.sum(kept_E)
    num_groups, num_experts = self.kept_GE.shape
    metrics = {
        "expert_load": assigned_E / jnp.maximum(assigned, 1.0),
        "dropped_fraction": jnp.sum(self.tokens_dropped_G) / denom,
        "dropped_assignment_fraction": (assigned - kept) / jnp.maximum(assigned, 1.0),
        "router_entropy": jnp.sum(self.entropy_sum_G) / denom,
        "router_confidence": jnp.sum(self.confidence_sum_G) / denom,
        "capacity_utilisation": kept / (num_groups * num_experts * self.capacity),
        # MaxVio (Wang et al. 2024): how far the busiest expert is above the mean load.
        "max_load_violation": (jnp.max(assigned_E) * num_experts / jnp.maximum(assigned, 1.0)
                               - jnp.where(assigned > 0, 1.0, 0.0)),
        "experts_without_tokens": jnp.sum(kept_E == 0).astype(jnp.float32),
        "experts_per_token": kept / denom,
    }
    if self.exchange_overflow_G is not None:
      metrics["exchange_overflow"] = jnp.sum(self.exchange_overflow_G)
    return losses, metrics


def cv_squared(x_E: jax.Array) -> jax.Array:
  """Squared coefficient of variation, var(x) / mean(x)^2 (0 when x is all zero)."""
  mean = jnp.mean(x_E)
  return jnp.where(mean > 0, jnp.var(x_E) / jnp.maximum(mean, 1e-30) ** 2, 0.0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RoutingDecision:
  """Which slot of which expert each token's assignments fill, and with what weight.

  Sparse decisions (every family but soft MoE) set the (G, S, K) fields and leave the dense ones
  None; soft MoE sets `dense_dispatch_GSEC` / `dense_combine_GSEC` and K = 0.
  """

  expert_index_GSK: jax.Array  # int32: the expert of assignment k
  slot_GSK: jax.Array  # int32: its slot in [0, C) where kept, else 0
  keep_GSK: jax.Array  # bool: the assignment is carried out
  weight_GSK: jax.Array  # float32: combine weight where kept, else 0
  stats: RoutingStats
  num_experts: int = dataclasses.field(metadata=dict(static=True))
  capacity: int = dataclasses.field(metadata=dict(static=True))
  dense_dispatch_GSEC: jax.Array | None = None
  dense_combine_GSEC: jax.Array | None = None

  @property
  def is_dense(self) -> bool:
    return self.dense_dispatch_GSEC is not None

  def routed_GS(self) -> jax.Array:
    """Bool (G, S): the token reaches at least one expert."""
    if self.is_dense:
      return jnp.any(self.dense_dispatch_GSEC != 0, axis=(-2, -1))
    return jnp.any(self.keep_GSK, axis=-1)

  def dispatch_GSEC(self) -> jax.Array:
    """(G, S, E, C): token s of group g fills slot c of expert e (bool), or its weight in it."""
    if self.is_dense:
      return self.dense_dispatch_GSEC
    return jnp.any(self._one_hot_GSKEC(), axis=2)

  def combine_GSEC(self) -> jax.Array:
    """Float32 (G, S, E, C): how much of slot (e, c) token s takes back."""
    if self.is_dense:
      return self.dense_combine_GSEC
    one_hot = self._one_hot_GSKEC().astype(self.weight_GSK.dtype)
    return jnp.einsum("GSKEC,GSK->GSEC", one_hot, self.weight_GSK)

  def _one_hot_GSKEC(self) -> jax.Array:
    expert_GSKE = jax.nn.one_hot(self.expert_index_GSK, self.num_experts, dtype=jnp.bool_)
    slot_GSKC = jax.nn.one_hot(self.slot_GSK, self.capacity, dtype=jnp.bool_)
    keep = self.keep_GSK[..., None, None]
    return expert_GSKE[..., :, None] & slot_GSKC[..., None, :] & keep
