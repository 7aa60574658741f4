"""What the token-choice routing tests (tests/test_routing*.py) share; not a test module.

* The numpy / float64 reference of the token-choice claim, independent of `moejax.routing`:
  `reference_route` (softmax, top-k, renormalisation and claiming in Python loops, token by token
  or choice by choice, in position or priority order), `reference_combine` and
  `reference_losses_and_metrics`; `softmax64` is its softmax.
* `route_np`: `route` with its dispatch and combine tensors, losses and metrics, in one compiled
  call, as numpy arrays (a `Routed`); `router_config`: a `RouterConfig` with min_capacity 1 unless
  given.
* For hand cases: `logits_from_probs` (logits whose softmax is the written probabilities),
  `assert_combine` (combine and dispatch against a literal tensor, to `ATOL`; `o` is an empty
  slot), and the hand-case inputs that more than one test file uses.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from moejax.routing import RouterConfig, route

ATOL = 1e-6


def logits_from_probs(probs, shift=None):
  """Logits whose softmax is `probs` (last axis); `shift` (one value per token) moves logsumexp."""
  logits = np.log(np.asarray(probs, np.float64))
  if shift is not None:
    logits = logits + np.asarray(shift, np.float64)[..., None]
  return jnp.asarray(logits, jnp.float32)


def router_config(kind="switch", num_experts=3, **kwargs):
  kwargs.setdefault("min_capacity", 1)
  return RouterConfig(kind=kind, num_experts=num_experts, **kwargs)


@dataclasses.dataclass(frozen=True)
class Routed:
  """A routing decision with its derived tensors, losses and metrics, as numpy arrays."""

  expert_index_GSK: np.ndarray
  slot_GSK: np.ndarray
  keep_GSK: np.ndarray
  weight_GSK: np.ndarray
  capacity: int
  dispatch: np.ndarray
  combine: np.ndarray
  losses: dict
  metrics: dict


# Nearly every test compiles its own router configuration; these are tiny programs whose compile
# time dominates, so XLA's backend optimisations are skipped (compile time about halves; decisions
# are identical and sums differ by float32 rounding only).
@functools.partial(jax.jit, static_argnames=("config", "train"),
                   compiler_options={"xla_backend_optimization_level": 0})
def _route_jit(logits, padding_mask_GS, uniform_GS, *, config, train):
  decision = route(logits, config, train=train, padding_mask_GS=padding_mask_GS,
                   uniform_GS=uniform_GS)
  losses, metrics = decision.stats.summarize()
  return decision, decision.dispatch_GSEC(), decision.combine_GSEC(), losses, metrics


def route_np(logits, config, *, train, padding_mask_GS=None, uniform_GS=None):
  """`route` plus everything derived from it, in one compiled call (eager op-by-op is slow)."""
  as_array = lambda x: None if x is None else jnp.asarray(x)
  decision, dispatch, combine, losses, metrics = jax.tree.map(np.asarray, _route_jit(
      as_array(logits), as_array(padding_mask_GS), as_array(uniform_GS), config=config,
      train=train))
  return Routed(decision.expert_index_GSK, decision.slot_GSK, decision.keep_GSK,
                decision.weight_GSK, decision.capacity, dispatch, combine, losses, metrics)


def assert_combine(routed, expected_GSEC):
  """Checks combine (values) and dispatch (its support) against the hand-written tensor."""
  expected_GSEC = np.asarray(expected_GSEC, np.float64)
  assert routed.dispatch.dtype == np.bool_
  assert routed.combine.dtype == np.float32
  assert routed.dispatch.shape == expected_GSEC.shape, (routed.dispatch.shape, expected_GSEC.shape)
  np.testing.assert_array_equal(routed.dispatch, expected_GSEC > 0)
  np.testing.assert_allclose(routed.combine, expected_GSEC, atol=ATOL, rtol=0)


o = 0.0  # an empty slot, to keep the literal tensors readable


# ======================================================================= shared hand-case inputs

# G=1, S=4, E=3. Top-2 gates renormalised: g1/(g1+g2), g2/(g1+g2).
GSHARD_PROBS = [[
    [0.1, 0.6, 0.3],  # t0: e1, e2; gates 2/3, 1/3
    [0.5, 0.3, 0.2],  # t1: e0, e1; gates .625, .375
    [0.6, 0.3, 0.1],  # t2: e0, e1; gates 2/3, 1/3
    [0.2, 0.7, 0.1],  # t3: e1, e0; gates 7/9, 2/9
]]

# G=1, S=4, E=2; first choices e0, e0, e1, e1 with gates .6, .9, .7, .8 (batch priority
# t1, t3, t2, t0). Used by the batch-prioritized and the train vs eval capacity cases.
BPR_PROBS = [[[0.6, 0.4], [0.9, 0.1], [0.3, 0.7], [0.2, 0.8]]]


# ======================================================================= sequential reference


def softmax64(logits):
  logits = np.asarray(logits, np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  return probs / probs.sum(-1, keepdims=True)


def reference_route(logits_GSE, *, kind, k, normalize, capacity, mask_GS, batch_prioritized,
                    uniform_GS=None, threshold=None, claim_order="position"):
  """Independent sequential reference of the routing algorithm (numpy float64, Python loops).

  `uniform_GS` is given only when GShard's random second-expert policy is active. `claim_order`:
  "position" (each token's choices in turn, token after token) or "choice" (every first choice
  before any second choice). Returns (G, S, k) arrays: expert, gate (router weight before
  capacity), active, keep, slot (-1 where not kept).
  """
  probs = softmax64(logits_GSE)
  G, S, E = probs.shape
  expert = np.zeros((G, S, k), np.int64)
  gate = np.zeros((G, S, k))
  active = np.zeros((G, S, k), bool)
  for g in range(G):
    for s in range(S):
      chosen = sorted(range(E), key=lambda e: (-probs[g, s, e], e))[:k]
      weights = probs[g, s, chosen]
      if kind == "gshard" or (kind == "topk" and normalize):
        weights = weights / weights.sum()
      expert[g, s], gate[g, s] = chosen, weights
      active[g, s] = bool(mask_GS[g, s])
      if uniform_GS is not None:
        active[g, s, 1] &= bool(uniform_GS[g, s] < weights[1] / threshold)
  keep = np.zeros((G, S, k), bool)
  slot = np.full((G, S, k), -1, np.int64)
  for g in range(G):
    order = list(range(S))
    if batch_prioritized:
      order.sort(key=lambda s: (-probs[g, s].max(), s))  # V-MoE: router confidence
    count = [0] * E
    if claim_order == "choice":  # every j-th choice before any (j+1)-th choice
      queue = [(s, j) for j in range(k) for s in order]
    else:  # token after token, each token's choices in preference order
      queue = [(s, j) for s in order for j in range(k)]
    for s, j in queue:
      if active[g, s, j]:
        e = expert[g, s, j]
        if count[e] < capacity:
          keep[g, s, j], slot[g, s, j] = True, count[e]
        count[e] += 1
  return dict(expert=expert, gate=gate, active=active, keep=keep, slot=slot, probs=probs)


def reference_combine(ref, num_experts, capacity):
  G, S, _ = ref["expert"].shape
  combine = np.zeros((G, S, num_experts, capacity))
  for g, s, j in zip(*np.nonzero(ref["keep"])):
    combine[g, s, ref["expert"][g, s, j], ref["slot"][g, s, j]] = ref["gate"][g, s, j]
  return combine


def reference_losses_and_metrics(ref, logits_GSE, mask_GS, capacity):
  logits = np.asarray(logits_GSE, np.float64)
  G, S, E = logits.shape
  probs, mask = ref["probs"], np.asarray(mask_GS, bool)
  safe_tokens = max(mask.sum(), 1)
  balance = []
  for g in range(G):
    if mask[g].any():
      f = np.bincount(ref["expert"][g, mask[g], 0], minlength=E) / mask[g].sum()
      p = probs[g, mask[g]].mean(0)
      balance.append(E * np.sum(f * p))
  top = logits.max(-1)
  lse = np.log(np.exp(logits - top[..., None]).sum(-1)) + top
  assigned = np.bincount(ref["expert"][ref["active"]], minlength=E)
  kept = ref["keep"].sum()
  entropy = -np.sum(probs * np.log(probs), -1)
  return {
      "load_balancing_loss": np.mean(balance) if balance else 0.0,
      "router_z_loss": np.sum(lse[mask] ** 2) / safe_tokens,
      "expert_load": assigned / max(assigned.sum(), 1),
      "dropped_fraction": (mask & ~ref["keep"].any(-1)).sum() / safe_tokens,
      "dropped_assignment_fraction": (1 - kept / assigned.sum()) if assigned.sum() else 0.0,
      "router_entropy": np.sum(entropy[mask]) / safe_tokens,
      "router_confidence": np.sum(probs.max(-1)[mask]) / safe_tokens,
      "capacity_utilisation": kept / (G * E * capacity),
  }
