"""Tests of moejax.attention: jax.nn.dot_product_attention against the attention formula in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import attention as attention_lib
from moejax.attention import Attention, AttentionImpl
from moejax.model import ModelConfig
from moejax.objective import Objective
from moejax.typed_config import ConfigError

B, L, M, H, D = 3, 7, 16, 2, 8
BASE = 10000.0


def _config(**overrides) -> ModelConfig:
  fields = dict(vocab_size=32, num_layers=1, model_dim=M, num_heads=H, head_dim=D, ffn_dim=32)
  fields.update(overrides)
  return ModelConfig(**fields)


def _numpy_rope(x_BLHD, base):
  """Each pair (x[i], x[i + D/2]) of the token at position l rotated by l * base^(-2i/D)."""
  half = x_BLHD.shape[-1] // 2
  theta_LR = np.arange(x_BLHD.shape[1])[:, None] * base ** (-np.arange(half) / half)
  cos, sin = np.cos(theta_LR)[None, :, None], np.sin(theta_LR)[None, :, None]
  x1, x2 = x_BLHD[..., :half], x_BLHD[..., half:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _numpy_attention(x_BLM, wq, wk, wv, wo, mask_BL, causal):
  """softmax(q.k / sqrt(D) over the allowed keys) v, then the output projection, in float64.

  Allowed: t <= l when causal, and key t real or t == l (a padding query sees itself).
  """
  x = x_BLM.astype(np.float64)
  q = _numpy_rope(np.einsum("blm,mhd->blhd", x, wq), BASE)
  k = _numpy_rope(np.einsum("blm,mhd->blhd", x, wk), BASE)
  v = np.einsum("blm,mhd->blhd", x, wv)
  scores = np.einsum("blhd,bthd->bhlt", q, k) / np.sqrt(D)
  allowed = np.ones((B, L, L), bool)
  if causal:
    allowed &= np.tril(np.ones((L, L), bool))[None]
  if mask_BL is not None:
    allowed &= mask_BL[:, None, :] | np.eye(L, dtype=bool)[None]
  scores = np.where(allowed[:, None], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum("bhlt,bthd->blhd", probs, v)
  return np.einsum("blhd,hdm->blm", out, wo)


@pytest.mark.parametrize("impl", ["auto", "xla"])
@pytest.mark.parametrize("objective", ["causal_lm", "masked_lm"])
@pytest.mark.parametrize("padded", [False, True], ids=["no_padding", "padding"])
def test_attention_equals_the_formula_in_numpy(impl, objective, padded):
  config = _config(attention_impl=impl, objective=objective)
  layer = Attention(config, rngs=nnx.Rngs(0))
  x_BLM = np.random.default_rng(1).normal(size=(B, L, M)).astype(np.float32)
  # Row 0 real, row 1 padded at the end, row 2 padded at the start and in the middle.
  mask_BL = np.ones((B, L), bool)
  mask_BL[1, 4:] = False
  mask_BL[2, [0, 1, 4]] = False
  mask_BL = mask_BL if padded else None
  padding = None if mask_BL is None else attention_lib.padding_mask(L, jnp.asarray(mask_BL))
  got = nnx.jit(lambda layer, x, p: layer(x, p))(layer, jnp.asarray(x_BLM), padding)
  weights = [np.asarray(w[...], np.float64) for w in (layer.wq, layer.wk, layer.wv, layer.wo)]
  expected = _numpy_attention(x_BLM, *weights, mask_BL, causal=objective == "causal_lm")
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-5, atol=2e-5)


def test_attention_mask_combines_order_and_padding():
  mask_BL = jnp.array([[True, False, True]])
  np.testing.assert_array_equal(attention_lib.padding_mask(3, mask_BL)[0, 0],
                                [[1, 0, 1], [1, 1, 1], [1, 0, 1]])
  assert attention_lib.padding_mask(3, None) is None
  np.testing.assert_array_equal(attention_lib.attention_mask(3, mask_BL)[0],
                                [[1, 0, 0], [1, 1, 0], [1, 0, 1]])


def test_attention_impl_reaches_dot_product_attention():
  """"cudnn" is passed to JAX: on a machine without an NVIDIA GPU, XLA refuses it."""
  config = _config(attention_impl="cudnn", dtype="bfloat16")
  assert Attention(config, rngs=nnx.Rngs(0)).implementation == "cudnn"
  on_gpu = jax.default_backend() == "gpu"
  assert Attention(_config(), rngs=nnx.Rngs(0)).implementation == "xla"  # float32: XLA anywhere
  assert Attention(_config(dtype="bfloat16"), rngs=nnx.Rngs(0)).implementation == (
      "cudnn" if on_gpu else "xla")
  if jax.default_backend() == "gpu":
    pytest.skip("a GPU may run cuDNN attention; the refusal is a CPU fact")
  layer = Attention(config, rngs=nnx.Rngs(0))
  with pytest.raises(Exception, match="(?i)cudnn|gpu|cuda"):
    layer(jnp.ones((1, 8, M), jnp.bfloat16), None)


@pytest.mark.parametrize("platform, dtype, head_dim, expected", [
    ("gpu", jnp.bfloat16, 64, "cudnn"), ("gpu", jnp.bfloat16, 128, "cudnn"),
    ("gpu", jnp.float32, 64, "xla"), ("gpu", jnp.bfloat16, 160, "xla"),
    ("gpu", jnp.bfloat16, 36, "xla"), ("cpu", jnp.bfloat16, 64, "xla"),
    ("tpu", jnp.bfloat16, 64, "xla"),
])
def test_auto_runs_cudnn_on_gpus_in_bfloat16(platform, dtype, head_dim, expected):
  resolved = attention_lib.resolve_impl(AttentionImpl.AUTO, dtype=dtype, head_dim=head_dim,
                                        platform=platform)
  assert resolved.value == expected
  assert attention_lib.resolve_impl(AttentionImpl.XLA, dtype=dtype, head_dim=head_dim,
                                    platform=platform) is AttentionImpl.XLA


def test_attention_impl_is_validated():
  with pytest.raises(ConfigError, match=r"model\.attention_impl='flash' is not allowed; choose "
                     r"one of 'auto', 'xla', 'cudnn'"):
    _config(attention_impl="flash")
  with pytest.raises(ConfigError, match=r"model\.attention_impl='cudnn' needs "
                     r"model\.dtype='bfloat16'"):
    _config(attention_impl="cudnn")
  assert _config(attention_impl="cudnn", dtype="bfloat16").attention_impl is AttentionImpl.CUDNN
  assert _config(objective=Objective.MASKED_LM).attention_impl is AttentionImpl.AUTO
