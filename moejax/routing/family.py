"""The router family table: what `route`, `MoeLayer` and the config read about each router kind.

A family is data, not a branch: its routing function, the config fields it reads, its capacity,
whether it is causal, and what the layer must hand it (extra logits, token ids, random numbers).
Each family module registers its record; nothing elsewhere looks at a router's name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

# RouterConfig fields that only some families read. A family lists those it reads in `reads`; the
# others must keep their defaults (typed_config.check_unused).
OPTIONAL_FIELDS = (
    "k", "normalize_weights", "capacity_factor_train", "capacity_factor_eval", "min_capacity",
    "batch_prioritized", "claim_order", "load_balancing_loss_weight", "second_expert_policy",
    "second_expert_threshold", "noisy_topk", "soft", "sinkhorn", "hash", "deepseek", "balance",
)
CAPACITY_FIELDS = frozenset({"capacity_factor_train", "capacity_factor_eval", "min_capacity"})


@dataclasses.dataclass(frozen=True)
class Family:
  """One router kind.

  Attributes:
    route: (logits_GSX float32, config, *, train, mask_GS, inputs: RouterInputs) ->
      RoutingDecision. X = E * logits_per_expert(config).
    reads: the OPTIONAL_FIELDS it reads.
    capacity: (config, group_size, train) -> C, the slots per expert and group.
    fixed_k: k for families that fix it (Switch 1, GShard 2, hash 1); None: `config.k` is
      required; 0: k is not a setting (each token reaches 0..E experts, or all slots).
    causal_train / causal_eval: whether a token's output depends only on itself and earlier
      tokens of its group (false where the router looks at the whole group).
    logits_per_expert: router logits per expert (noisy top-k's learned noise: 2; soft MoE: its
      slots per expert).
    normalized_logits: logits are scale * <x / |x|, w / |w|> (soft MoE's normalisation).
    random_inputs: (config) -> the `RouterInputs` fields the layer draws in training
      ("normal_GSE", ...).
    token_ids: the family reads token ids (and the layer's hash table).
    dense: the decision carries dense dispatch and combine weights (einsum form only).
    losses: auxiliary losses it returns, each with the RouterConfig path of its weight.
    biased: selection reads the aux-loss-free balancing bias when `balance.bias_update_rate` > 0.
    logits: (x_GSM float32, w_MX float32, inputs) -> logits_GSX, replacing x @ w (soft MoE).
    initial_table: (config, vocab_size) -> int32 (V,) expert per token id (token_ids families).
    validate: (config) -> None, raising ConfigError for settings of the family that only make
      sense together with the common fields (num_experts, k); called by RouterConfig.
  """

  route: Callable[..., Any]
  reads: frozenset[str]
  capacity: Callable[..., int]
  fixed_k: int | None = None
  causal_train: bool = True
  causal_eval: bool = True
  logits_per_expert: Callable[[Any], int] = lambda config: 1
  normalized_logits: bool = False
  random_inputs: Callable[[Any], tuple[str, ...]] = lambda config: ()
  token_ids: bool = False
  dense: bool = False
  losses: tuple[tuple[str, str], ...] = ()
  biased: bool = False
  logits: Callable[..., Any] | None = None
  initial_table: Callable[..., Any] | None = None
  validate: Callable[[Any], None] | None = None


REGISTRY: dict[Any, Family] = {}


def register(kind, family: Family) -> Family:
  unknown = set(family.reads) - set(OPTIONAL_FIELDS)
  if unknown:
    raise ValueError(f"family {kind}: reads unknown fields {sorted(unknown)}")
  REGISTRY[kind] = family
  return family
