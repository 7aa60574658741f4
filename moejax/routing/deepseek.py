"""DeepSeek routing: sigmoid or softmax affinities, group-limited top-k, routed scaling.

DeepSeek-V2 (arXiv 2405.04434, Sec. 2.1.2-2.1.3) and DeepSeek-V3 (arXiv 2412.19437, Sec. 2.1.2,
eq. 12-20). For token t and routed expert i (E experts, k per token):

    s_{i,t} = sigmoid(u_t . e_i)          V3 eq. 15 (`score="sigmoid"`)
            = softmax_i(u_t . e_i)        V2 eq. 11 (`score="softmax"`)
    selection: the k largest s_{i,t} + b_i among the experts of the kept groups    (V3 eq. 16)
    g_{i,t} = s_{i,t} / sum_{j selected} s_{j,t}   (V3 eq. 13-14; `normalize_weights`)
            = s_{i,t}                               (V2 eq. 10; normalize_weights=False)
    weight_{i,t} = routed_scaling_factor * g_{i,t}

b is the aux-loss-free balancing bias (`inputs.bias_E`; None when `balance` is off): it only
chooses experts, never enters a weight.

Group-limited routing (`num_groups` > 1): the E experts form `num_groups` contiguous groups of
E / num_groups (V3: the experts of one node; V2: of one device). A group's score is the sum of
its `group_score_experts` largest s + b. V3's node-limited routing (Sec. 2.1.2) ranks nodes by
the sum of their K_r / M highest affinities: 8 experts on at most M = 4 nodes (Sec. 4.2), so 2,
as in DeepSeek's published `noaux_tc` routing code; V2's device-limited routing (Sec. 2.1.3) ranks
devices by their single highest affinity (`group_score_experts=1`). Each token keeps its
`topk_groups` best groups and selects its k experts among theirs only: the other experts'
selection scores become -inf, as the paper describes. (DeepSeek-V3's modeling code on the model
hub and earlier transformers releases set them to 0.0 instead; with sigmoid scores and a
non-negative bias every kept score is positive, so the two agree there. transformers 5.24, which
tests/test_deepseek_reference.py checks against, uses -inf.)

The sequence-wise balance loss (V3 eq. 17-20), per routing group (a sequence when group_size =
seq_len), is in `losses.sequence_balance_G`; its weight is
`deepseek.sequence_balance_loss_weight`. Capacity is the shared token-choice claim
(`token_choice.finish`): every first choice (the best by s + b) before any second choice.

Router statistics (entropy, confidence, batch priority) read the normalised affinities
s_{i,t} / sum_j s_{j,t} (the P_i of eq. 19-20); for softmax scores that is s itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.routing import losses
from moejax.routing import token_choice
from moejax.routing.config import DeepseekScore, RouterConfig, RouterKind
from moejax.routing.decision import RouterInputs, RoutingDecision
from moejax.routing.family import Family, register
from moejax.typed_config import ConfigError


def score(logits_GSE: jax.Array, kind: DeepseekScore) -> jax.Array:
  """The affinities s (G, S, E): sigmoid per expert (V3) or softmax over the experts (V2)."""
  if kind is DeepseekScore.SIGMOID:
    return jax.nn.sigmoid(logits_GSE)
  return jax.nn.softmax(logits_GSE, axis=-1)


def group_limited_scores(select_GSE: jax.Array, *, num_groups: int, topk_groups: int,
                         group_score_experts: int) -> jax.Array:
  """`select_GSE` with the experts outside each token's `topk_groups` best groups set to -inf.

  A group's score is the sum of its `group_score_experts` largest selection scores.
  """
  G, S, E = select_GSE.shape
  if num_groups == 1:
    return select_GSE
  grouped_GSNP = select_GSE.reshape(G, S, num_groups, E // num_groups)
  top_GSNQ, _ = jax.lax.top_k(grouped_GSNP, group_score_experts)
  group_score_GSN = jnp.sum(top_GSNQ, axis=-1)
  _, kept_GSR = jax.lax.top_k(group_score_GSN, topk_groups)
  kept_GSN = jnp.any(jax.nn.one_hot(kept_GSR, num_groups, dtype=jnp.bool_), axis=-2)
  kept_GSE = jnp.repeat(kept_GSN, E // num_groups, axis=-1)
  return jnp.where(kept_GSE, select_GSE, -jnp.inf)


def select(logits_GSE: jax.Array, config: RouterConfig, bias_E: jax.Array | None = None):
  """(s_GSE, expert_index_GSK, weight_GSK): the affinities, the chosen experts and their weights.

  Experts are ordered by descending selection score s + b (k = 0 first).
  """
  ds = config.deepseek
  s_GSE = score(logits_GSE, ds.score)
  select_GSE = s_GSE if bias_E is None else s_GSE + bias_E.astype(jnp.float32)
  select_GSE = group_limited_scores(select_GSE, num_groups=ds.num_groups,
                                    topk_groups=ds.topk_groups,
                                    group_score_experts=ds.group_score_experts)
  _, expert_index_GSK = jax.lax.top_k(select_GSE, config.k)
  weight_GSK = jnp.take_along_axis(s_GSE, expert_index_GSK, axis=-1)
  if config.normalize_weights:
    # + 1e-20, as in the transformers DeepseekV3 implementation: no 0/0 when every selected
    # affinity underflows, and no change in float32 to any sum above about 1e-12.
    weight_GSK = weight_GSK / (jnp.sum(weight_GSK, axis=-1, keepdims=True) + 1e-20)
  return s_GSE, expert_index_GSK, weight_GSK * ds.routed_scaling_factor


def route_deepseek(logits_GSE, config: RouterConfig, *, train: bool, mask_GS,
                   inputs: RouterInputs) -> RoutingDecision:
  """DeepSeek-V2/V3 routing of each group's tokens (module docstring), then the capacity claim."""
  s_GSE, expert_index_GSK, weight_GSK = select(logits_GSE, config, inputs.bias_E)
  if config.deepseek.score is DeepseekScore.SIGMOID:
    probs_GSE = s_GSE / jnp.sum(s_GSE, axis=-1, keepdims=True)
  else:
    probs_GSE = s_GSE
  balance_G = losses.sequence_balance_G(probs_GSE, expert_index_GSK, mask_GS)
  return token_choice.finish(
      config, logits_GSE=logits_GSE, probs_GSE=probs_GSE, gates_GSK=weight_GSK,
      expert_index_GSK=expert_index_GSK, mask_GS=mask_GS, train=train,
      group_losses_G={"sequence_balance_loss": balance_G})


def validate(config: RouterConfig) -> None:
  """Checks the settings that tie `deepseek` to the number of experts and k."""
  ds = config.deepseek
  E = config.num_experts
  if E % ds.num_groups:
    raise ConfigError(f"{ds.PATH}.num_groups", ds.num_groups,
                      f"must divide {config.PATH}.num_experts={E}: the experts form "
                      "num_groups groups of equal size.")
  per_group = E // ds.num_groups
  if ds.num_groups > 1 and ds.group_score_experts > per_group:
    raise ConfigError(f"{ds.PATH}.group_score_experts", ds.group_score_experts,
                      f"must be in [1, num_experts / num_groups = {per_group}], the experts of "
                      "one group.")
  reachable = ds.topk_groups * per_group
  if config.k > reachable:
    raise ConfigError(f"{config.PATH}.k", config.k,
                      f"must be <= {ds.PATH}.topk_groups * num_experts / num_groups = "
                      f"{ds.topk_groups} * {per_group} = {reachable}, the experts of the kept "
                      "groups.")


register(RouterKind.DEEPSEEK, Family(
    route=route_deepseek, capacity=token_choice.token_capacity, biased=True, validate=validate,
    reads=token_choice.TOKEN_CAPACITY | token_choice.BALANCED
    | {"k", "normalize_weights", "deepseek"},
    losses=(("sequence_balance_loss", "deepseek.sequence_balance_loss_weight"),)))
