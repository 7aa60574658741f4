"""Routers: pure functions from float32 router logits to one `RoutingDecision` type.

Dimension letters (docs/design.md): G groups, S tokens per group, E experts, K assignments per
token, C expert capacity (slots per expert per group).

    route(logits_GSX, config, train=, padding_mask_GS=, inputs=) -> RoutingDecision

looks the router kind up in the family table (`family.py`) and calls its routing function; every
family returns the same decision type (`decision.py`), which both dispatch forms execute (soft
MoE's dense decision: the einsum form only). The modules:

    config.py         RouterConfig and one typed group per family
    decision.py       RoutingDecision, RoutingStats (losses and metrics), RouterInputs
    capacity.py       expert capacity, the slot claim (position or choice order), batch priority
    losses.py         auxiliary losses, each citing its paper's equation
    token_choice.py   switch, gshard, topk
    deepseek.py       deepseek (sigmoid / softmax affinities, group-limited, routed scaling)
    expert_choice.py  experts pick their top-C tokens (K = E assignments per token)
    soft.py           soft MoE: dense dispatch and combine weights (einsum form only)
    sinkhorn.py       S-BASE: top-k on Sinkhorn-balanced scores in training
    noisy_topk.py     noisy top-k (Shazeer et al. 2017) and V-MoE's fixed-noise variant
    random_routing.py uniformly random experts
    hash_routing.py   expert from the token id (Roller et al. 2021)

A decision, for each token's k-th assignment:

* `expert_index_GSK` int32: the expert (k = 0 is the first choice);
* `slot_GSK` int32: the slot that assignment occupies in its expert's buffer, in [0, C) when kept;
* `keep_GSK` bool: the assignment fits in capacity, the token is not padding and has finite
  logits, and (GShard's "random" policy) the second expert was not switched off;
* `weight_GSK` float32: the combine weight, equal to the router weight where kept and 0 elsewhere;
* `stats`: per-group sums from which the auxiliary losses and metrics are computed.

The one-hot `dispatch_GSEC` / `combine_GSEC` tensors of the GShard formulation are derived from the
decision on demand, so one decision drives both dispatch forms.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.routing import token_choice  # noqa: F401  (registers its families)
from moejax.routing import deepseek  # noqa: F401
from moejax.routing import expert_choice  # noqa: F401  (registers expert_choice)
from moejax.routing import soft  # noqa: F401  (registers soft)
from moejax.routing import sinkhorn  # noqa: F401  (registers sinkhorn)
from moejax.routing import noisy_topk  # noqa: F401  (registers its family)
from moejax.routing import random_routing  # noqa: F401  (registers its family)
from moejax.routing import hash_routing  # noqa: F401  (registers its family)
from moejax.routing.capacity import expert_capacity
from moejax.routing.config import (BalanceConfig, ClaimOrder, DeepseekConfig, DeepseekScore,
                                   HashConfig, HashTableKind, NoiseKind, NoisyTopkConfig, RouterConfig,
                                   RouterKind, SecondExpertPolicy, SinkhornConfig, SoftConfig)
from moejax.routing.decision import RouterInputs, RoutingDecision, RoutingStats
from moejax.routing.family import REGISTRY, Family
from moejax.typed_config import ConfigError, parse_enum

__all__ = [
    "BalanceConfig", "ClaimOrder", "ConfigError", "DeepseekConfig", "DeepseekScore", "Family", "HashConfig",
    "HashTableKind", "NoiseKind", "NoisyTopkConfig", "REGISTRY", "RouterConfig", "RouterInputs",
    "RouterKind", "RoutingDecision", "RoutingStats", "SecondExpertPolicy", "SinkhornConfig",
    "SoftConfig", "aux_loss", "expert_capacity", "parse_enum", "route",
]


def route(logits_GSX: jax.Array, config: RouterConfig, *, train: bool,
          padding_mask_GS: jax.Array | None = None, uniform_GS: jax.Array | None = None,
          inputs: RouterInputs | None = None) -> RoutingDecision:
  """Routes each group's tokens to experts.

  Args:
    logits_GSX: router logits, X = E * family.logits_per_expert; computed in float32 (cast here).
    config: the router settings.
    train: selects the capacity factor and the training-only behaviour of a family (noise,
      GShard's random policy, Sinkhorn balancing).
    padding_mask_GS: True for real tokens, False for padding. Padding takes no capacity and counts
      in no loss or metric. None means every token is real. A token whose logits are not all
      finite (NaN, +inf or -inf) is routed as padding, and its logits get a zero gradient.
    uniform_GS: shorthand for `inputs.uniform_GS` (GShard's random second-expert policy).
    inputs: what else the family reads (token ids, noise, the balancing bias).
  """
  logits_GSX = logits_GSX.astype(jnp.float32)
  G, S, X = logits_GSX.shape
  family = config.family
  expected = config.num_experts * family.logits_per_expert(config)
  if X != expected:
    raise ValueError(f"logits have {X} entries on their last axis but {config.PATH}."
                     f"num_experts={config.num_experts} with kind={config.kind.value!r} needs "
                     f"{expected}.")
  # A token whose logits are not all finite is routed as padding; its logits are zeroed first, so
  # that no 0 * NaN in the forward or backward pass reaches another token.
  finite_GS = jnp.all(jnp.isfinite(logits_GSX), axis=-1)
  logits_GSX = jnp.where(finite_GS[..., None], logits_GSX, 0.0)
  if padding_mask_GS is None:
    padding_mask_GS = finite_GS
  else:
    padding_mask_GS = padding_mask_GS.astype(jnp.bool_) & finite_GS
  inputs = inputs or RouterInputs()
  if uniform_GS is not None:
    inputs = RouterInputs(**{**vars(inputs), "uniform_GS": uniform_GS})
  return family.route(logits_GSX, config, train=train, mask_GS=padding_mask_GS.astype(jnp.bool_),
                      inputs=inputs)


def aux_loss(config: RouterConfig, losses: dict[str, jax.Array]) -> jax.Array:
  """The weighted sum of the auxiliary losses a layer adds to the training loss."""
  total = jnp.zeros((), jnp.float32)
  for name, weight in config.loss_weights().items():
    total = total + weight * losses[name]
  return total
