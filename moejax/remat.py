"""Rematerialisation of transformer blocks: trade recomputation for activation memory.

`model.remat` chooses what the backward pass keeps from each block's forward pass:

    none           everything the autodiff keeps (fastest, most memory)
    full           only the block's input: the whole block is recomputed in the backward pass
                   (about one more forward pass, the least memory)
    save_matmuls   the outputs of matmuls without batch dimensions (the projections, FFN and
                   expert matmuls); attention scores, softmax, norms and activations are
                   recomputed. Most of the saving at a small share of the cost.

The model's numbers do not change: gradients are the same up to the order of floating-point
operations (tests/test_remat.py checks them against remat="none").
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import jax
from flax import nnx


class Remat(enum.Enum):
  NONE = "none"
  FULL = "full"
  SAVE_MATMULS = "save_matmuls"


# Remat -> the jax.checkpoint policy (what is saved); NONE wraps nothing.
_POLICIES: dict[Remat, Callable | None] = {
    Remat.FULL: jax.checkpoint_policies.nothing_saveable,
    Remat.SAVE_MATMULS: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def wrap(call: Callable, remat: Remat) -> Callable:
  """`call(module, *arrays)` rematerialised under `remat`'s policy (unchanged for NONE)."""
  if remat is Remat.NONE:
    return call
  return nnx.remat(call, policy=_POLICIES[remat])
