"""FFN activations shared by the experts, the shared experts and the dense FFN's settings."""

from __future__ import annotations

import enum

import jax


class Activation(enum.Enum):
  RELU = "relu"
  GELU = "gelu"
  SWIGLU = "swiglu"  # silu(x W_gate) * (x W_in); adds an (M, F) gate per FFN


def apply(kind: Activation, h, gate=None):
  """The hidden activations from the input projection h (and, for swiglu, the gate x W_gate)."""
  if kind is Activation.RELU:
    return jax.nn.relu(h)
  if kind is Activation.GELU:
    return jax.nn.gelu(h)
  return jax.nn.silu(gate) * h
