"""Shared experts: an always-on FFN beside the routed experts of an MoE layer.

DeepSeekMoE's shared expert isolation (Dai et al. 2024, arXiv 2401.06066, Sec. 3.2), used by
DeepSeek-V2/V3 and Qwen2-MoE: every real token goes through the shared experts, and their output
is added to the routed experts' weighted sum (DeepSeek-V3, arXiv 2412.19437, eq. 12, less the
residual connection, which the transformer block adds):

    y_t = sum_{shared j} FFN_j(x_t) + sum_{routed i} g_{i,t} FFN_i(x_t)

N_s shared experts of width F' add their outputs, which is one FFN of width N_s * F' whose weights
are theirs concatenated along F; moejax holds that one FFN (`model.moe.shared_ffn_dim` = N_s * F'),
as DeepSeek-V3's released model does. Fine-grained experts (many narrow routed experts) need
nothing beyond configuration: a larger `num_experts`, a smaller `ffn_dim`, a larger k.

The weights are not split over experts: (M, F) and (F, M) with logical axes ("embed", "mlp"), so F
splits over the "model" mesh axis as the dense FFN's does, and every "expert" shard holds a copy.
The FFN runs in the global view, outside the MoE layer's `shard_map`, on the tokens where they
already are: it adds no all-to-all (with F split over "model", one reduction over "model").
Padding tokens get a zero output, like the routed experts give them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from moejax import activation as activation_lib
from moejax import sharding
from moejax.activation import Activation


class SharedExperts(nnx.Module):
  """x (B, L, M) -> act(x W_in) W_out, or (silu(x W_gate) * x W_in) W_out for swiglu."""

  def __init__(self, model_dim: int, ffn_dim: int, activation: Activation, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32):
    M, F = model_dim, ffn_dim
    self.activation = activation
    init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    self.wi = sharding.param(init(rngs.params(), (M, F), param_dtype), ("embed", "mlp"))
    self.wo = sharding.param(init(rngs.params(), (F, M), param_dtype), ("mlp", "embed"))
    self.wg = nnx.data(None)
    if activation is Activation.SWIGLU:
      self.wg = sharding.param(init(rngs.params(), (M, F), param_dtype), ("embed", "mlp"))

  def __call__(self, x_BLM: jax.Array, *, dtype, padding_mask_BL: jax.Array | None = None
               ) -> jax.Array:
    """The shared experts' output (B, L, M) in `dtype`; zero for padding tokens."""
    x_BLM = x_BLM.astype(dtype)
    h_BLF = jnp.einsum("BLM,MF->BLF", x_BLM, self.wi[...].astype(dtype))
    gate_BLF = None
    if self.wg is not None:
      gate_BLF = jnp.einsum("BLM,MF->BLF", x_BLM, self.wg[...].astype(dtype))
    a_BLF = activation_lib.apply(self.activation, h_BLF, gate_BLF)
    y_BLM = jnp.einsum("BLF,FM->BLM", a_BLF, self.wo[...].astype(dtype),
                       out_sharding=_like_input(x_BLM))
    if padding_mask_BL is not None:
      y_BLM = jnp.where(padding_mask_BL.astype(jnp.bool_)[..., None], y_BLM,
                        jnp.zeros_like(y_BLM))
    return y_BLM


def _like_input(x_BLM: jax.Array):
  """`out_sharding` keeping x's layout, where an Explicit mesh needs it stated (F contracted over
  "model" leaves the output's sharding ambiguous); None elsewhere."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or AxisType.Explicit not in mesh.axis_types:
    return None
  return P(*jax.typeof(x_BLM).sharding.spec)
