"""How many parameters a model has, and how many of them one token uses.

An MoE layer holds E experts but routes each token to k of them, so its parameter count says
little about the compute per token. `count_params` splits the count three ways:

    total        every parameter, every expert counted
    embedding    the token embedding (V, M) and, with untied embeddings, the output projection
                 (M, V): a lookup and the logits, whatever the model's depth
    active       per token, without the embedding: every parameter outside the experts
                 (attention, norms, dense FFNs, routers) plus k/E of each MoE layer's expert
                 weights, i.e. the weights of the k experts one token is sent to

Parameters are told apart by their logical axes (`sharding.param`): "vocab" marks the embedding,
"expert" the stacked expert weights. Capacity limits are ignored (a dropped token uses no expert).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class ParamCount:
  total: int
  embedding: int
  active: int  # per token, without the embedding

  def as_metrics(self) -> dict[str, float]:
    """The counts as metric scalars, "model/params_*"."""
    return {"model/params_total": float(self.total),
            "model/params_embedding": float(self.embedding),
            "model/params_active_per_token": float(self.active)}

  def describe(self) -> str:
    """One line, e.g. 'parameters: 48,672 total, 3,200 of them embedding; active per token ...'."""
    return (f"parameters: {self.total:,} total, {self.embedding:,} of them embedding; "
            f"active per token: {self.active:,} (without the embedding; MoE layers count their "
            "router and the k of E experts a token is sent to)")


def count_params(params: Any, *, experts_per_token: int) -> ParamCount:
  """Counts a tree of `nnx.Param`s that carry `logical_axes` (e.g. `nnx.state(model, nnx.Param)`).

  Args:
    params: the parameters, concrete or abstract (only shapes and logical axes are read).
    experts_per_token: k, the experts each token is routed to (any value for a dense model).
  """
  total = embedding = active = 0
  for variable in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    shape = variable.shape
    axes = variable.get_metadata().get("logical_axes") or ()
    size = math.prod(shape)
    total += size
    if "vocab" in axes:
      embedding += size
    elif "expert" in axes:
      num_experts = shape[axes.index("expert")]
      active += size // num_experts * min(experts_per_token, num_experts)
    else:
      active += size
  # Expert choice and soft MoE apply a fractional number of experts per token on average.
  return ParamCount(total=total, embedding=embedding, active=round(active))
