"""Routers: pure functions from router logits to a routing decision.

Dimension letters (DESIGN.md): G groups, S tokens per group, E experts, K experts per token,
C expert capacity (slots per expert per group).

A router turns `logits_GSE` (float32) into a `RoutingDecision`:

* `expert_index_GSK` int32: the k-th expert chosen by each token (k = 0 is its first choice);
* `slot_GSK` int32: the slot that assignment occupies in its expert's buffer, in [0, C) when kept;
* `keep_GSK` bool: the assignment fits in capacity, the token is not padding and has finite
  logits, and (GShard's "random" policy) the second expert was not switched off;
* `weight_GSK` float32: the combine weight, equal to the router weight where kept and 0 elsewhere;
* `stats`: per-group sums from which the auxiliary losses and metrics are computed.

The one-hot `dispatch_GSEC` / `combine_GSEC` tensors of the GShard formulation are derived from the
decision on demand (`RoutingDecision.dispatch_GSEC()`), so one decision drives both dispatch forms.

Capacity is claimed in a fixed order: every first choice before any second choice (GShard, Lepikhin
et al. 2020, Algorithm 1), and within one choice in position order, or by router confidence when
batch-prioritized routing is on (V-MoE, Riquelme et al. 2021, Sec. 4.1).

Worked example (S=4 tokens, E=2 experts, top-1, C=1):
    argmax experts   [0, 0, 1, 0]
    position order:  token 0 takes expert 0 slot 0; token 1 is over capacity at expert 0 (dropped);
                     token 2 takes expert 1 slot 0; token 3 is dropped.
    keep             [T, F, T, F]
"""

from __future__ import annotations

import dataclasses
import enum
import math
from fractions import Fraction

import jax
import jax.numpy as jnp


class RouterKind(enum.Enum):
  """Which routing algorithm a layer uses."""

  SWITCH = "switch"  # top-1, Fedus et al. 2021
  GSHARD = "gshard"  # top-2 with renormalised gates, Lepikhin et al. 2020
  TOPK = "topk"  # any k; Mixtral-style renormalised or Qwen/OLMoE-style raw softmax weights


class SecondExpertPolicy(enum.Enum):
  """GShard's treatment of each token's second expert (applied in training only)."""

  ALL = "all"  # always dispatch to the second expert
  RANDOM = "random"  # keep it with probability min(1, g2 / threshold)


def parse_enum(enum_cls: type[enum.Enum], field: str, value) -> enum.Enum:
  """Returns `enum_cls(value)`, or a ValueError naming the field, the value and what is allowed."""
  if isinstance(value, enum_cls):
    return value
  try:
    return enum_cls(value)
  except ValueError:
    allowed = ", ".join(repr(m.value) for m in enum_cls)
    raise ValueError(f"{field}={value!r} is not allowed; choose one of {allowed}.") from None


@dataclasses.dataclass(frozen=True)
class RouterConfig:
  """Typed, validated router settings.

  Attributes:
    kind: the routing algorithm (`RouterKind` or its string value).
    num_experts: E.
    k: experts per token for `TOPK`; `SWITCH` uses 1 and `GSHARD` uses 2 (leave `k` as None or
      set it to that value).
    normalize_weights: `TOPK` only: renormalise the k weights to sum to 1 (Mixtral) or keep the
      softmax probabilities (Qwen-MoE / OLMoE). GShard always renormalises; Switch never does.
    capacity_factor_train / capacity_factor_eval: C = ceil(k * factor * S / E).
    min_capacity: lower bound on C.
    batch_prioritized: claim capacity in order of router confidence instead of position.
    jitter_eps: multiplicative jitter on the router input in training, uniform in [1-eps, 1+eps].
    second_expert_policy / second_expert_threshold: GShard's second-expert policy.
    load_balancing_loss_weight / z_loss_weight: coefficients of the auxiliary losses.
  """

  kind: RouterKind = RouterKind.SWITCH
  num_experts: int = 8
  k: int | None = None
  normalize_weights: bool = True
  capacity_factor_train: float = 1.25
  capacity_factor_eval: float = 2.0
  min_capacity: int = 4
  batch_prioritized: bool = False
  jitter_eps: float = 0.0
  second_expert_policy: SecondExpertPolicy = SecondExpertPolicy.ALL
  second_expert_threshold: float = 0.2
  load_balancing_loss_weight: float = 1e-2
  z_loss_weight: float = 1e-3

  def __post_init__(self):
    kind = parse_enum(RouterKind, "router.kind", self.kind)
    object.__setattr__(self, "kind", kind)
    object.__setattr__(
        self,
        "second_expert_policy",
        parse_enum(SecondExpertPolicy, "router.second_expert_policy", self.second_expert_policy),
    )
    if not isinstance(self.num_experts, int) or self.num_experts < 1:
      raise ValueError(f"router.num_experts={self.num_experts!r} must be an integer >= 1.")
    fixed_k = {RouterKind.SWITCH: 1, RouterKind.GSHARD: 2}.get(kind)
    k = self.k if self.k is not None else fixed_k
    if k is None:
      raise ValueError("router.k=None: the 'topk' router needs k, an integer in [1, num_experts].")
    if fixed_k is not None and k != fixed_k:
      raise ValueError(
          f"router.k={k} is not allowed for router.kind={kind.value!r}, which routes each token "
          f"to exactly {fixed_k} expert(s); use kind='topk' for other k.")
    if not isinstance(k, int) or not 1 <= k <= self.num_experts:
      raise ValueError(
          f"router.k={k!r} must be an integer in [1, num_experts={self.num_experts}].")
    object.__setattr__(self, "k", k)
    for name in ("capacity_factor_train", "capacity_factor_eval"):
      value = getattr(self, name)
      if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"router.{name}={value!r} must be a finite number > 0.")
    if not isinstance(self.min_capacity, int) or self.min_capacity < 1:
      raise ValueError(f"router.min_capacity={self.min_capacity!r} must be an integer >= 1.")
    if not 0.0 <= self.jitter_eps < 1.0:
      raise ValueError(f"router.jitter_eps={self.jitter_eps!r} must be in [0, 1).")
    if not self.second_expert_threshold > 0:
      raise ValueError(
          f"router.second_expert_threshold={self.second_expert_threshold!r} must be > 0.")
    for name in ("load_balancing_loss_weight", "z_loss_weight"):
      if getattr(self, name) < 0:
        raise ValueError(f"router.{name}={getattr(self, name)!r} must be >= 0.")

  def capacity(self, group_size: int, *, train: bool) -> int:
    factor = self.capacity_factor_train if train else self.capacity_factor_eval
    return expert_capacity(group_size, self.num_experts, self.k, factor, self.min_capacity)


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


# ----------------------------------------------------------------------------- decision + stats


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RoutingStats:
  """Per-group sums (leading axis G); `summarize` turns them into losses and metrics.

  Keeping sums per group (not means) lets a sharded layer return its local groups and reduce them
  in the global view, giving exactly the single-device numbers.
  """

  num_tokens_G: jax.Array  # non-padding tokens
  load_balancing_G: jax.Array  # E * sum_i f_i P_i of the group (0 for an all-padding group)
  z_loss_sum_G: jax.Array  # sum over tokens of logsumexp(logits)^2
  entropy_sum_G: jax.Array  # sum over tokens of -sum_e p log p
  confidence_sum_G: jax.Array  # sum over tokens of max_e p
  assigned_GE: jax.Array  # token-expert assignments per expert before capacity
  kept_GE: jax.Array  # assignments that fit in capacity
  tokens_dropped_G: jax.Array  # tokens none of whose assignments was kept
  capacity: int = dataclasses.field(metadata=dict(static=True))

  def summarize(self) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Returns (losses, metrics), all float32 scalars except `expert_load` (E,)."""
    tokens = jnp.sum(self.num_tokens_G)
    denom = jnp.maximum(tokens, 1.0)
    nonempty = jnp.sum(self.num_tokens_G > 0)
    losses = {
        # Mean over groups that hold at least one token.
        "load_balancing_loss": jnp.sum(self.load_balancing_G) / jnp.maximum(nonempty, 1),
        "router_z_loss": jnp.sum(self.z_loss_sum_G) / denom,
    }
    assigned_E = jnp.sum(self.assigned_GE, axis=0)
    kept = jnp.sum(self.kept_GE)
    num_groups, num_experts = self.kept_GE.shape
    metrics = {
        "expert_load": assigned_E / jnp.maximum(jnp.sum(assigned_E), 1.0),
        "dropped_fraction": jnp.sum(self.tokens_dropped_G) / denom,
        "dropped_assignment_fraction":
            (jnp.sum(assigned_E) - kept) / jnp.maximum(jnp.sum(assigned_E), 1.0),
        "router_entropy": jnp.sum(self.entropy_sum_G) / denom,
        "router_confidence": jnp.sum(self.confidence_sum_G) / denom,
        "capacity_utilisation": kept / (num_groups * num_experts * self.capacity),
    }
    return losses, metrics


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RoutingDecision:
  """Which slot of which expert each token occupies, and with what weight. See module docstring."""

  expert_index_GSK: jax.Array
  slot_GSK: jax.Array
  keep_GSK: jax.Array
  weight_GSK: jax.Array
  stats: RoutingStats
  num_experts: int = dataclasses.field(metadata=dict(static=True))
  capacity: int = dataclasses.field(metadata=dict(static=True))

  def dispatch_GSEC(self) -> jax.Array:
    """Bool (G, S, E, C): token s of group g fills slot c of expert e."""
    return jnp.any(self._one_hot_GSKEC(), axis=2)

  def combine_GSEC(self) -> jax.Array:
    """Float32 (G, S, E, C): the dispatch tensor times each assignment's combine weight."""
    one_hot = self._one_hot_GSKEC().astype(self.weight_GSK.dtype)
    return jnp.einsum("GSKEC,GSK->GSEC", one_hot, self.weight_GSK)

  def _one_hot_GSKEC(self) -> jax.Array:
    expert_GSKE = jax.nn.one_hot(self.expert_index_GSK, self.num_experts, dtype=jnp.bool_)
    slot_GSKC = jax.nn.one_hot(self.slot_GSK, self.capacity, dtype=jnp.bool_)
    keep = self.keep_GSK[..., None, None]
    return expert_GSKE[..., :, None] & slot_GSKC[..., None, :] & keep


# ----------------------------------------------------------------------------- routing


def route(logits_GSE: jax.Array, config: RouterConfig, *, train: bool,
          padding_mask_GS: jax.Array | None = None,
          uniform_GS: jax.Array | None = None) -> RoutingDecision:
  """Routes each group's tokens to experts under the capacity limit.

  Args:
    logits_GSE: router logits; computed in float32 (cast here if not).
    config: the router settings.
    train: selects the capacity factor, and enables GShard's random second-expert policy.
    padding_mask_GS: True for real tokens, False for padding. Padding takes no capacity and counts
      in no loss or metric. None means every token is real.
    uniform_GS: uniform [0, 1) numbers, one per token, for the random second-expert policy; needed
      only when that policy is active (`train` and `second_expert_policy == RANDOM`).

  A token whose logits are not all finite (NaN, +inf or -inf anywhere) is routed as padding: it
  claims no capacity, gets weight 0, counts in no loss or metric, and its logits get a zero
  gradient. Its logits are replaced by zeros before any arithmetic, so that no 0 * NaN in the
  forward or backward pass (softmax, logsumexp, top-k) reaches another token's decision, loss,
  metric or gradient. Tokens with finite logits are routed as before.
  """
  logits_GSE = logits_GSE.astype(jnp.float32)
  G, S, E = logits_GSE.shape
  if E != config.num_experts:
    raise ValueError(
        f"logits have {E} experts on their last axis but router.num_experts={config.num_experts}.")
  finite_GS = jnp.all(jnp.isfinite(logits_GSE), axis=-1)
  logits_GSE = jnp.where(finite_GS[..., None], logits_GSE, 0.0)
  if padding_mask_GS is None:
    padding_mask_GS = finite_GS
  else:
    padding_mask_GS = padding_mask_GS.astype(jnp.bool_) & finite_GS
  K = config.k
  C = config.capacity(S, train=train)

  probs_GSE = jax.nn.softmax(logits_GSE, axis=-1)
  gates_GSK, expert_index_GSK = jax.lax.top_k(probs_GSE, K)
  if config.kind is RouterKind.GSHARD or (config.kind is RouterKind.TOPK and
                                           config.normalize_weights):
    # With k = 1 this makes every weight 1: the task loss then sends the router no gradient
    # (only the aux losses train it), as the Mixtral convention implies for a single expert.
    gates_GSK = gates_GSK / jnp.sum(gates_GSK, axis=-1, keepdims=True)

  active_GSK = jnp.broadcast_to(padding_mask_GS[..., None], (G, S, K))
  if (config.kind is RouterKind.GSHARD and train and
      config.second_expert_policy is SecondExpertPolicy.RANDOM):
    if uniform_GS is None:
      raise ValueError("GShard's 'random' second-expert policy needs uniform_GS in training.")
    keep_second = uniform_GS < gates_GSK[..., 1] / config.second_expert_threshold
    active_GSK = active_GSK.at[..., 1].set(active_GSK[..., 1] & keep_second)

  # V-MoE's priority score: the router's confidence, max_e p_e (before any renormalisation).
  priority_GS = probs_GSE.max(axis=-1) if config.batch_prioritized else None
  slot_GSK = _claim_slots(expert_index_GSK, active_GSK, E, priority_GS)
  keep_GSK = active_GSK & (slot_GSK < C)
  weight_GSK = jnp.where(keep_GSK, gates_GSK, 0.0)
  slot_GSK = jnp.where(keep_GSK, slot_GSK, 0)

  stats = _routing_stats(logits_GSE, probs_GSE, expert_index_GSK, padding_mask_GS, active_GSK,
                         keep_GSK, C)
  return RoutingDecision(expert_index_GSK=expert_index_GSK, slot_GSK=slot_GSK, keep_GSK=keep_GSK,
                         weight_GSK=weight_GSK, stats=stats, num_experts=E, capacity=C)


def _claim_slots(expert_index_GSK, active_GSK, num_experts, priority_GS=None):
  """Position of each active assignment in its expert's queue (0-based); inactive ones get 0.

  Queue order: all k=0 assignments, then k=1, ...; within one k, tokens in position order, or in
  descending `priority_GS` (stable, so ties keep position order).
  """
  G, S, K = expert_index_GSK.shape
  mask_GSKE = jax.nn.one_hot(expert_index_GSK, num_experts, dtype=jnp.int32)
  mask_GSKE = mask_GSKE * active_GSK[..., None].astype(jnp.int32)
  if priority_GS is not None:
    order_GS = jnp.argsort(-priority_GS, axis=1, stable=True)
    mask_GSKE = jnp.take_along_axis(mask_GSKE, order_GS[:, :, None, None], axis=1)
  # Queue order is k-major: (G, K, S, E) flattened to (G, K*S, E), then a running count.
  mask_GQE = jnp.transpose(mask_GSKE, (0, 2, 1, 3)).reshape(G, K * S, num_experts)
  position_GQE = jnp.cumsum(mask_GQE, axis=1) - 1
  position_GSKE = jnp.transpose(position_GQE.reshape(G, K, S, num_experts), (0, 2, 1, 3))
  if priority_GS is not None:
    inverse_GS = jnp.argsort(order_GS, axis=1)
    position_GSKE = jnp.take_along_axis(position_GSKE, inverse_GS[:, :, None, None], axis=1)
    mask_GSKE = jnp.take_along_axis(mask_GSKE, inverse_GS[:, :, None, None], axis=1)
  return jnp.sum(position_GSKE * mask_GSKE, axis=-1)


def _routing_stats(logits_GSE, probs_GSE, expert_index_GSK, mask_GS, active_GSK, keep_GSK,
                   capacity) -> RoutingStats:
  E = logits_GSE.shape[-1]
  m_GS = mask_GS.astype(jnp.float32)
  num_tokens_G = jnp.sum(m_GS, axis=1)
  # Padding counts nowhere: select, not multiply (its logits are finite, as route() zeroes
  # non-finite ones, but large finite logits can still give an infinite z).
  valid = lambda a: jnp.where(mask_GS.reshape(mask_GS.shape + (1,) * (a.ndim - 2)), a, 0.0)
  denom_G = jnp.maximum(num_tokens_G, 1.0)
  # Switch load-balancing loss (Fedus et al. 2021, eq. 4-6): f_i from first choices before capacity.
  first_GSE = jax.nn.one_hot(expert_index_GSK[..., 0], E, dtype=jnp.float32) * m_GS[..., None]
  f_GE = jnp.sum(first_GSE, axis=1) / denom_G[:, None]
  p_GE = jnp.sum(valid(probs_GSE), axis=1) / denom_G[:, None]
  load_balancing_G = E * jnp.sum(f_GE * p_GE, axis=-1)
  # Router z-loss (Zoph et al. 2022, ST-MoE eq. 5): mean over tokens of logsumexp(logits)^2.
  z_GS = jax.nn.logsumexp(logits_GSE, axis=-1) ** 2
  log_probs_GSE = jax.nn.log_softmax(logits_GSE, axis=-1)
  entropy_GS = -jnp.sum(probs_GSE * log_probs_GSE, axis=-1)
  assign_GSKE = jax.nn.one_hot(expert_index_GSK, E, dtype=jnp.float32)
  assigned_GE = jnp.einsum("GSKE,GSK->GE", assign_GSKE, active_GSK.astype(jnp.float32))
  kept_GE = jnp.einsum("GSKE,GSK->GE", assign_GSKE, keep_GSK.astype(jnp.float32))
  dropped_GS = mask_GS & ~jnp.any(keep_GSK, axis=-1)
  return RoutingStats(
      num_tokens_G=num_tokens_G,
      load_balancing_G=load_balancing_G,
      z_loss_sum_G=jnp.sum(valid(z_GS), axis=1),
      entropy_sum_G=jnp.sum(valid(entropy_GS), axis=1),
      confidence_sum_G=jnp.sum(valid(jnp.max(probs_GSE, axis=-1)), axis=1),
      assigned_GE=assigned_GE,
      kept_GE=kept_GE,
      tokens_dropped_G=jnp.sum(dropped_GS.astype(jnp.float32), axis=1),
      capacity=capacity,
  )
