"""Random routing: each token goes to k distinct experts drawn uniformly at random.

A baseline (how much does a learned choice of experts buy?) and a load-test tool (uniform expert
load, whatever the data). The choice never looks at the token:

* training: the k largest of `uniform_GSE` (one uniform number per token and expert, drawn by the
  layer from its router rng stream, a fresh draw every step): a uniformly random k-subset.
* evaluation: the same rule on fixed pseudo-random numbers, u(s, e) = hash(s * E + e) / 2^32 for
  the token's position s in its routing group and expert e (`position_uniform_SE`, a 32-bit
  integer hash). Evaluation is then deterministic (two evaluations of one checkpoint agree, and
  evaluation losses of different checkpoints are comparable), identical on every mesh, and still a
  uniform choice that ignores the token's content; its price is that every group routes position s
  to the same k experts (with one group per sequence: position s of every sequence). A caller of
  `route` that passes `uniform_GSE` in evaluation gets that draw instead.

Weights: the router's softmax probabilities of the chosen experts, renormalised over the k when
`normalize_weights` is set (as `topk`). So `random` differs from `topk` in the choice of experts
only: the combine weights (and with them the router's gradient from the task loss) are those a
learned router would give to these experts, which makes it an ablation of the selection alone.
With k = 1 and `normalize_weights=True` (the default) every weight is 1: pure random routing, and
the router projection then learns from the z-loss only. There is no load-balancing loss (the
choice does not depend on the router, so balancing it has nothing to act on); router entropy and
confidence are reported for the router's distribution, which the choice ignores.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moejax.routing import token_choice
from moejax.routing.config import RouterConfig, RouterKind
from moejax.routing.decision import RouterInputs, RoutingDecision
from moejax.routing.family import Family, register

# Odd constants of a 32-bit integer finaliser (murmur3's fmix32) and a fixed seed.
_MIX_1, _MIX_2, _SEED = 0x85EBCA6B, 0xC2B2AE35, 0x9E3779B9


def _mix32(h: np.ndarray) -> np.ndarray:
  """A bijective 32-bit hash whose output bits each depend on every input bit (uint32 arrays)."""
  h = h ^ (h >> np.uint32(16))
  h = h * np.uint32(_MIX_1)  # uint32 arithmetic wraps modulo 2^32
  h = h ^ (h >> np.uint32(13))
  h = h * np.uint32(_MIX_2)
  return h ^ (h >> np.uint32(16))


def position_uniform_SE(group_size: int, num_experts: int) -> np.ndarray:
  """Fixed numbers in [0, 1) for each position in a group and expert: evaluation's "random" draw.

  u(s, e) = mix32((s * E + e) xor seed) / 2^32, kept to 24 bits (exact in float32). A tie
  (chance about 2^-24 per pair) goes to the lower expert index, as in `jax.lax.top_k`; the k chosen
  experts are distinct in any case. Computed with numpy when the router is traced: a constant of
  the compiled program.
  """
  index_SE = (np.arange(group_size, dtype=np.uint32)[:, None] * np.uint32(num_experts)
              + np.arange(num_experts, dtype=np.uint32)[None, :])
  bits_SE = _mix32(index_SE ^ np.uint32(_SEED))
  return (bits_SE >> np.uint32(8)).astype(np.float32) / np.float32(1 << 24)


def route_random(logits_GSE, config: RouterConfig, *, train: bool, mask_GS,
                 inputs: RouterInputs) -> RoutingDecision:
  """Random routing (module docstring)."""
  G, S, E = logits_GSE.shape
  if inputs.uniform_GSE is not None:
    uniform_GSE = inputs.uniform_GSE
  elif train:
    raise ValueError(f"{config.PATH}.kind='random' needs uniform_GSE (one uniform number per "
                     "token and expert) in training.")
  else:
    uniform_GSE = jnp.broadcast_to(jnp.asarray(position_uniform_SE(S, E)), (G, S, E))
  _, expert_index_GSK = jax.lax.top_k(uniform_GSE, config.k)
  probs_GSE = jax.nn.softmax(logits_GSE, axis=-1)
  if config.normalize_weights:
    # The renormalised probabilities, as a softmax over the k chosen logits: with k = 1 the weight
    # is exactly 1 and its gradient exactly 0 (p / p would leave rounding noise in both).
    gates_GSK = jax.nn.softmax(jnp.take_along_axis(logits_GSE, expert_index_GSK, axis=-1), axis=-1)
  else:
    gates_GSK = jnp.take_along_axis(probs_GSE, expert_index_GSK, axis=-1)
  return token_choice.finish(config, logits_GSE=logits_GSE, probs_GSE=probs_GSE,
                             gates_GSK=gates_GSK, expert_index_GSK=expert_index_GSK,
                             mask_GS=mask_GS, train=train)


_CAPACITY = token_choice.TOKEN_CAPACITY - {"batch_prioritized"}

register(RouterKind.RANDOM, Family(
    route=route_random, capacity=token_choice.token_capacity,
    reads=_CAPACITY | {"k", "normalize_weights"},
    random_inputs=lambda config: ("uniform_GSE",)))
