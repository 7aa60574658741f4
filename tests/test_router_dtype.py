"""`model.moe.router.dtype`: the router matmul in float32 (the default) or bfloat16 (Switch
Transformer's unstable arm, Table 2), against numpy; routing after it is float32 either way."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from moejax import moe as moe_lib
from moejax.moe import MoeConfig, MoeLayer
from moejax.routing import ConfigError, RouterConfig, RouterInputs

M, E, F, S = 16, 8, 32, 8


def _bf16(a):
  return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def _x_and_w(seed=0):
  rng = np.random.default_rng(seed)
  # Logits of magnitude up to ~10, where bfloat16's rounding moves the softmax visibly.
  return (rng.standard_normal((2, S, M)).astype(np.float32) * 2.0,
          rng.standard_normal((M, E)).astype(np.float32))


def _logits(dtype, x, w):
  logits, finite = moe_lib._router_logits(jnp.asarray(x), None, jnp.asarray(w), RouterInputs(),
                                          RouterConfig(num_experts=E, dtype=dtype))
  assert logits.dtype == jnp.float32 and bool(jnp.all(finite))
  return np.asarray(logits)


def test_float32_logits_are_the_product():
  x, w = _x_and_w()
  want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  np.testing.assert_allclose(_logits("float32", x, w), want, rtol=1e-5, atol=1e-5)


def test_bfloat16_logits_are_the_rounded_product_of_rounded_operands():
  x, w = _x_and_w()
  exact = np.asarray(_bf16(x), np.float64) @ np.asarray(_bf16(w), np.float64)
  want = _bf16(exact)
  got = _logits("bfloat16", x, w)
  # Rounded once more than the float64 product: within one bfloat16 step (2^-7 relative).
  np.testing.assert_allclose(got, want, rtol=2.0**-7, atol=1e-6)
  assert np.array_equal(got, _bf16(got))  # every logit is a bfloat16 value
  # Not the float32 logits: the rounding moves them by up to ~2^-8 relative.
  float32 = _logits("float32", x, w)
  assert np.max(np.abs(got - float32)) > 1e-3 * np.max(np.abs(float32))


def test_a_bfloat16_router_layer_trains_close_to_the_float32_one():
  """Outputs and gradients stay finite and near the float32 router's (the decisions can differ
  where two logits are within bfloat16's rounding)."""
  x = jnp.asarray(np.random.default_rng(1).standard_normal((4, S, M)), jnp.float32)

  def loss_and_grads(dtype):
    router = RouterConfig(num_experts=E, dtype=dtype, min_capacity=S)
    layer = MoeLayer(M, MoeConfig(router=router, ffn_dim=F, group_size=S), rngs=nnx.Rngs(0))

    def loss(layer):
      y, aux = layer(x, train=True)
      return jnp.sum(y**2) + aux.aux_loss

    return nnx.value_and_grad(loss)(layer)

  (l32, g32), (l16, g16) = loss_and_grads("float32"), loss_and_grads("bfloat16")
  assert np.isfinite(float(l16)) and abs(float(l16) - float(l32)) < 5e-3 * abs(float(l32))
  router32, router16 = np.asarray(g32.router[...]), np.asarray(g16.router[...])
  assert np.all(np.isfinite(router16)) and router16.dtype == np.float32
  assert np.linalg.norm(router16 - router32) < 2e-2 * np.linalg.norm(router32)
  assert not np.array_equal(router16, router32)


def test_a_bad_router_dtype_names_the_field():
  with pytest.raises(ConfigError, match=r"model\.moe\.router\.dtype.*'float16'.*'float32', "
                                        r"'bfloat16'"):
    RouterConfig(dtype="float16")

