"""Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models", Sec. 3).

Each token goes to one expert, a fixed function of its token id: expert = table[token_id], with
`table` an int32 (V,) lookup held by the layer (`RouterState`, in checkpoints, no gradient). The
hash layer's output is that expert's FFN applied directly, h_t = FFN_{table[x_t]}(h_t) (Sec. 3):
the combine weight is 1. Capacity and the claim are the shared token-choice ones (k = 1, position
order), so a token may still be dropped when its expert's slots of the group are full.

Tables (`hash.table`), both from Sec. 3's hashing functions:

* "random": a uniformly random expert per vocabulary id, seeded by `hash.seed`
  (`random_table`); the layer starts from it (`initial_table`).
* "balanced": `balanced_table(counts_V, E, seed)` from the training split's token counts
  (`moejax.data.count_tokens`): tokens in descending frequency, each to the currently least-loaded
  expert, so that experts see nearly equal numbers of training tokens. The layer cannot count
  tokens: it starts from the random table, and the balanced one is installed into its
  `hash_table` before the first training step.

What this means for the router: the layer still computes router logits, and the z-loss, router
entropy and confidence are of them, but neither the choice nor the weight reads them. The router
projection therefore gets no gradient from the task loss, only from the z-loss (which merely keeps
its logits small); its entropy describes a distribution that routes nothing. No load-balancing
loss: the choice cannot be trained.
"""

from __future__ import annotations

import heapq

import jax
import jax.numpy as jnp
import numpy as np

from moejax.routing import token_choice
from moejax.routing.config import RouterConfig, RouterKind
from moejax.routing.decision import RouterInputs, RoutingDecision
from moejax.routing.family import Family, register


def random_table(vocab_size: int, num_experts: int, seed: int) -> np.ndarray:
  """int32 (V,): a uniformly random expert for every vocabulary id (numpy PCG64, `seed`)."""
  return np.random.default_rng(seed).integers(0, num_experts, size=vocab_size, dtype=np.int32)


def balanced_table(counts_V, num_experts: int, seed: int | None = None) -> np.ndarray:
  """int32 (V,): token ids spread over experts so that each gets a near-equal share of the tokens.

  Greedy (Roller et al. 2021, Sec. 3, "Balanced assignment"): token ids in descending count (equal
  counts: ascending id) are each given to the expert that currently holds the fewest counted
  tokens; among experts with equal token totals, the one holding fewer ids (so that ids never
  seen in training, count 0, still spread evenly), then a fixed order of the experts: their
  index when `seed` is None, else a permutation drawn with `seed`.

  Args:
    counts_V: how often each token id occurs in the training split (non-negative integers).
    num_experts: E.
    seed: None for the index order of ties, or an int for a seeded order.
  """
  counts_V = np.asarray(counts_V)
  if counts_V.ndim != 1 or counts_V.size == 0:
    raise ValueError(f"balanced_table needs a non-empty 1-D array of token counts; got shape "
                     f"{counts_V.shape}.")
  if not np.issubdtype(counts_V.dtype, np.integer) or np.any(counts_V < 0):
    raise ValueError("balanced_table needs non-negative integer token counts.")
  if num_experts < 1:
    raise ValueError(f"balanced_table needs num_experts >= 1; got {num_experts}.")
  rank_E = (np.arange(num_experts) if seed is None else
            np.argsort(np.random.default_rng(seed).permutation(num_experts)))
  # Heap entries (tokens held, ids held, tie rank, expert); the smallest is the least loaded.
  heap = [(0, 0, int(rank_E[e]), e) for e in range(num_experts)]
  heapq.heapify(heap)
  table_V = np.zeros(counts_V.size, np.int32)
  for token in np.argsort(-counts_V, kind="stable"):
    tokens, ids, rank, expert = heapq.heappop(heap)
    table_V[token] = expert
    heapq.heappush(heap, (tokens + int(counts_V[token]), ids + 1, rank, expert))
  return table_V


def initial_table(config: RouterConfig, vocab_size: int) -> jnp.ndarray:
  """The table a layer starts from: the seeded random table (for "balanced", until installed)."""
  return jnp.asarray(random_table(vocab_size, config.num_experts, config.hash.seed))


def route_hash(logits_GSE, config: RouterConfig, *, train: bool, mask_GS,
               inputs: RouterInputs) -> RoutingDecision:
  """Hash routing (module docstring): expert = table[token id], weight 1.

  Token ids must lie in [0, V); padding tokens' ids are never read.
  """
  if inputs.token_ids_GS is None or inputs.hash_table_V is None:
    raise ValueError(f"{config.PATH}.kind='hash' routes by token id: it needs token_ids_GS and "
                     "hash_table_V.")
  token_ids_GS = jnp.where(mask_GS, inputs.token_ids_GS, 0)
  expert_index_GSK = jnp.take(inputs.hash_table_V.astype(jnp.int32), token_ids_GS,
                              mode="clip")[..., None]
  probs_GSE = jax.nn.softmax(logits_GSE, axis=-1)
  gates_GSK = jnp.ones(expert_index_GSK.shape, jnp.float32)
  return token_choice.finish(config, logits_GSE=logits_GSE, probs_GSE=probs_GSE,
                             gates_GSK=gates_GSK, expert_index_GSK=expert_index_GSK,
                             mask_GS=mask_GS, train=train)


_CAPACITY = token_choice.TOKEN_CAPACITY - {"batch_prioritized"}

register(RouterKind.HASH, Family(
    route=route_hash, capacity=token_choice.token_capacity, fixed_k=1, reads=_CAPACITY | {"hash"},
    token_ids=True, initial_table=initial_table))
