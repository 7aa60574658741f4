"""Multi-head self-attention with rotary position embeddings (RoPE), causal or bidirectional.

Dimensions (docs/design.md): B batch, L query positions, T key positions, M model width, H heads,
D head width, R = D/2 rotated pairs of a head.

    x (B, L, M) -> q, k, v (B, L, H, D) -> RoPE on q and k at their absolute positions
      -> jax.nn.dot_product_attention: softmax(q.k / sqrt(D), masked) v -> (B, L, H, D)
      -> output projection (B, L, M)

The attention itself is `jax.nn.dot_product_attention`, so that a GPU can run it as one fused
cuDNN (flash) kernel: `model.attention_impl` picks the implementation.

    "auto"   "cudnn" on NVIDIA GPUs with bfloat16 compute and a head width cuDNN takes (a multiple
             of 8, at most 128), else "xla" (`resolve_impl`). JAX's own default would be XLA
             everywhere (jax 0.10 and 0.11), which on an H100 costs dense_base a third of its
             throughput (docs/benchmarks.md).
    "xla"    the plain XLA formulation: scores (B, H, L, T) materialised, any dtype, any device.
    "cudnn"  cuDNN's fused attention: NVIDIA GPUs only, bfloat16 compute only (`model.dtype`);
             XLA raises at compile time on other devices or unsupported shapes.

Masking: causal order goes through `is_causal` (cuDNN then skips the blocks above the diagonal),
padding through `mask`, (B, 1, L, T) bool: query l may attend key t iff key t is a real token or
t == l, so that a padding query still sees itself and no softmax row is empty. (cuDNN receives
that mask as an additive bias.) The combined rule is `attention_mask`.

Precision: the scores q.k and the softmax are float32 whatever the compute dtype (XLA's
formulation promotes the score matmul to float32 and runs the softmax in float32); the
probabilities are cast back to the compute dtype before they weight v.

Decoding with a key/value cache (`KvCache`, `Attention.decode`): the new tokens' keys and values
are written into a fixed-size cache at their absolute positions (RoPE rotates them there), and
each query attends every cached position up to its own. Decoding always uses "xla": one query row
gains nothing from a fused kernel.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import sharding
from moejax.moe import parse_dtype

if TYPE_CHECKING:
  from moejax.model import ModelConfig


class AttentionImpl(enum.Enum):
  """`model.attention_impl`: which implementation of `jax.nn.dot_product_attention` runs."""

  AUTO = "auto"  # cuDNN where it applies, else XLA (resolve_impl)
  XLA = "xla"
  CUDNN = "cudnn"  # NVIDIA GPUs, bfloat16 compute


def resolve_impl(impl: AttentionImpl, *, dtype, head_dim: int, platform: str | None = None
                 ) -> AttentionImpl:
  """What "auto" runs: cuDNN's fused attention on GPUs for bfloat16 and head widths it takes
  (multiples of 8 up to 128), XLA otherwise. Explicit choices are returned unchanged."""
  if impl is not AttentionImpl.AUTO:
    return impl
  platform = platform or jax.default_backend()
  fits_cudnn = (platform == "gpu" and jnp.dtype(dtype) == jnp.bfloat16 and head_dim % 8 == 0
                and head_dim <= 128)
  return AttentionImpl.CUDNN if fits_cudnn else AttentionImpl.XLA


# ----------------------------------------------------------------------------- pure functions


def apply_rope(x_BLHD: jax.Array, positions_L: jax.Array, base: float) -> jax.Array:
  """Rotary position embedding: rotates the pair (x[i], x[i + D/2]) by angle pos * base^(-2i/D).

  q.k of two rotated vectors then depends on their positions only through the difference.
  `positions_L` are the absolute positions of the L tokens.
  """
  D = x_BLHD.shape[-1]
  half = D // 2
  inv_freq_R = base ** (-jnp.arange(half, dtype=jnp.float32) / half)  # R = D/2 rotation pairs
  angle_LR = positions_L.astype(jnp.float32)[:, None] * inv_freq_R[None, :]
  cos_1L1R = jnp.cos(angle_LR)[None, :, None, :]
  sin_1L1R = jnp.sin(angle_LR)[None, :, None, :]
  x32_BLHD = x_BLHD.astype(jnp.float32)
  x1_BLHR, x2_BLHR = x32_BLHD[..., :half], x32_BLHD[..., half:]
  rotated_BLHD = jnp.concatenate(
      [x1_BLHR * cos_1L1R - x2_BLHR * sin_1L1R, x2_BLHR * cos_1L1R + x1_BLHR * sin_1L1R], axis=-1)
  return rotated_BLHD.astype(x_BLHD.dtype)


def padding_mask(length: int, mask_BL: jax.Array | None) -> jax.Array | None:
  """Bool (B, 1, L, T), or None without padding: key t is real, or t == l (a padding query
  sees itself, so no softmax row is empty)."""
  if mask_BL is None:
    return None
  self_LT = jnp.eye(length, dtype=jnp.bool_)
  return (mask_BL.astype(jnp.bool_)[:, None, :] | self_LT[None])[:, None]


def attention_mask(length: int, mask_BL: jax.Array | None, *, causal: bool = True
                   ) -> jax.Array:
  """Bool (B or 1, L, T): query l may attend key t iff (t <= l, when causal) and (key t is real
  or t == l). What `Attention` applies through `is_causal` and `padding_mask`.

  Real queries see only real keys; a padding query sees at least itself, so no row is empty.
  """
  if causal:
    order_LT = jnp.tril(jnp.ones((length, length), jnp.bool_))
  else:
    order_LT = jnp.ones((length, length), jnp.bool_)
  padding_B1LT = padding_mask(length, mask_BL)
  return order_LT[None] if padding_B1LT is None else order_LT[None] & padding_B1LT[:, 0]


# ----------------------------------------------------------------------------- the cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KvCache:
  """One attention layer's keys and values for decoding (RoPE already applied to the keys).

  `keys_BTHD` / `values_BTHD` hold T = the longest sequence to decode (prompt + new tokens);
  positions at or after `length` are not written yet and never attended.
  """

  keys_BTHD: jax.Array
  values_BTHD: jax.Array
  length: jax.Array  # int32 scalar: the positions written so far

  @classmethod
  def empty(cls, batch: int, max_length: int, num_heads: int, head_dim: int, dtype) -> KvCache:
    zeros = jnp.zeros((batch, max_length, num_heads, head_dim), dtype)
    return cls(keys_BTHD=zeros, values_BTHD=zeros, length=jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------- the module


class Attention(nnx.Module):
  """Multi-head self-attention with RoPE; scores and softmax in float32 (module docstring)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    M, H, D = config.model_dim, config.num_heads, config.head_dim
    pdt = parse_dtype("model.param_dtype", config.param_dtype)
    self.dtype = parse_dtype("model.dtype", config.dtype)
    self.rope_base = config.rope_base
    self.causal = config.causal
    self.implementation = resolve_impl(AttentionImpl(config.attention_impl), dtype=self.dtype,
                                       head_dim=D).value
    init_in = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0,
                                                   out_axis=(1, 2))
    init_out = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                    in_axis=(0, 1), out_axis=2)
    qkv_axes = ("embed", "heads", "kv")
    self.wq = sharding.param(init_in(rngs.params(), (M, H, D), pdt), qkv_axes)
    self.wk = sharding.param(init_in(rngs.params(), (M, H, D), pdt), qkv_axes)
    self.wv = sharding.param(init_in(rngs.params(), (M, H, D), pdt), qkv_axes)
    self.wo = sharding.param(init_out(rngs.params(), (H, D, M), pdt), ("heads", "kv", "embed"))

  def _qkv(self, x_BLM: jax.Array, positions_L: jax.Array):
    dt = self.dtype
    q_BLHD = jnp.einsum("BLM,MHD->BLHD", x_BLM, self.wq[...].astype(dt))
    k_BLHD = jnp.einsum("BLM,MHD->BLHD", x_BLM, self.wk[...].astype(dt))
    v_BLHD = jnp.einsum("BLM,MHD->BLHD", x_BLM, self.wv[...].astype(dt))
    return (apply_rope(q_BLHD, positions_L, self.rope_base),
            apply_rope(k_BLHD, positions_L, self.rope_base), v_BLHD)

  def _project_out(self, out_BLHD: jax.Array, x_BLM: jax.Array) -> jax.Array:
    return jnp.einsum("BLHD,HDM->BLM", out_BLHD, self.wo[...].astype(self.dtype),
                      out_sharding=sharding.batch_sharded_like(x_BLM, 3))

  def __call__(self, x_BLM: jax.Array, padding_B1LT: jax.Array | None) -> jax.Array:
    """(B, L, M) -> (B, L, M); `padding_B1LT` from `padding_mask` (None: every key real)."""
    L = x_BLM.shape[1]
    q_BLHD, k_BTHD, v_BTHD = self._qkv(x_BLM, jnp.arange(L, dtype=jnp.int32))
    out_BLHD = jax.nn.dot_product_attention(
        q_BLHD, k_BTHD, v_BTHD, mask=padding_B1LT, is_causal=self.causal,
        implementation=self.implementation)
    return self._project_out(out_BLHD, x_BLM)

  def decode(self, x_BLM: jax.Array, cache: KvCache) -> tuple[jax.Array, KvCache]:
    """The next L tokens (every row at positions cache.length ..) attending the cache and
    themselves, causally; returns their output (B, L, M) and the cache with them written.

    The caller keeps cache.length + L within the cache's T; every row must be real (no padding).
    """
    L = x_BLM.shape[1]
    start = cache.length
    positions_L = start + jnp.arange(L, dtype=jnp.int32)
    q_BLHD, k_BLHD, v_BLHD = self._qkv(x_BLM, positions_L)
    dt = cache.keys_BTHD.dtype
    keys_BTHD = jax.lax.dynamic_update_slice_in_dim(cache.keys_BTHD, k_BLHD.astype(dt), start, 1)
    values_BTHD = jax.lax.dynamic_update_slice_in_dim(cache.values_BTHD, v_BLHD.astype(dt),
                                                      start, 1)
    T = keys_BTHD.shape[1]
    allowed_11LT = (jnp.arange(T, dtype=jnp.int32)[None, :] <= positions_L[:, None])[None, None]
    out_BLHD = jax.nn.dot_product_attention(
        q_BLHD.astype(dt), keys_BTHD, values_BTHD, mask=allowed_11LT, implementation="xla")
    new_cache = KvCache(keys_BTHD=keys_BTHD, values_BTHD=values_BTHD, length=start + L)
    return self._project_out(out_BLHD.astype(self.dtype), x_BLM), new_cache
