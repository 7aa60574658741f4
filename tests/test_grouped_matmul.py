"""The grouped matmul (moejax/grouped_matmul.py) against a numpy per-group loop, values and VJPs.

Segments include empty groups (first, middle and last), segments shorter than, equal to and not a
multiple of the tile, and rows past the last segment (which must come out zero, with zero input
gradient). The numpy reference works in float64; float32 results are compared at rtol=1e-5 with an
absolute tolerance of 1e-5 (all values are O(1) to O(10)).
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.grouped_matmul import (AUTO_IMPL, GroupedMatmulImpl, grouped_matmul,
                                   resolve_impl)

R, M, N = 40, 6, 5
SIZES = [
    [0, 7, 0, 16, 9, 0],  # empty first, middle and last groups; 8 rows past the end
    [40, 0, 0, 0, 0, 0],  # one group takes every row
    [1, 1, 1, 1, 1, 1],  # single rows
    [0, 0, 0, 0, 0, 0],  # nothing routed
    [0, 7, 0, 16, 17, 0],  # every row routed: the last segment's last tile reaches past row R
]


def _numpy_reference(x_RM, w_EMN, sizes, dy_RN):
  """y, dx, dw of y[r] = x[r] @ w[e(r)] by an explicit loop over groups, in float64."""
  x, w, dy = (np.asarray(a, np.float64) for a in (x_RM, w_EMN, dy_RN))
  y, dx, dw = np.zeros((R, N)), np.zeros((R, M)), np.zeros(w.shape)
  start = 0
  for e, size in enumerate(sizes):
    rows = slice(start, start + size)
    y[rows] = x[rows] @ w[e]
    dx[rows] = dy[rows] @ w[e].T
    dw[e] = x[rows].T @ dy[rows]
    start += size
  return y, dx, dw


def _arrays(num_groups, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((R, M)).astype(np.float32),
          rng.standard_normal((num_groups, M, N)).astype(np.float32),
          rng.standard_normal((R, N)).astype(np.float32))


@pytest.mark.parametrize("impl,tile", [("portable", 1), ("portable", 4), ("portable", 8),
                                       ("portable", 64), ("ragged_dot", 4)])
@pytest.mark.parametrize("sizes", SIZES, ids=["empty-groups", "one-group", "single-rows", "none", "all-rows"])
def test_matches_numpy_loop_with_gradients(impl, tile, sizes):
  x, w, dy = _arrays(len(sizes))
  impl = GroupedMatmulImpl(impl)
  group_sizes = jnp.asarray(sizes, jnp.int32)

  @jax.jit
  def value_and_vjp(x, w, dy):
    y, vjp = jax.vjp(lambda x, w: grouped_matmul(x, w, group_sizes, impl=impl, tile=tile), x, w)
    return (y, *vjp(dy))

  y, dx, dw = value_and_vjp(x, w, dy)
  want_y, want_dx, want_dw = _numpy_reference(x, w, sizes, dy)
  for name, got, want in (("y", y, want_y), ("dx", dx, want_dx), ("dw", dw, want_dw)):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5, err_msg=name)
  past_end = sum(sizes)
  assert not np.any(np.asarray(y)[past_end:]) and not np.any(np.asarray(dx)[past_end:])


def test_portable_custom_vjp_matches_autodiff_of_the_same_loop():
  """The hand-written backward equals JAX's own derivative of a per-group masked product."""
  sizes = SIZES[0]
  x, w, dy = _arrays(len(sizes), seed=1)
  group_of_row = np.repeat(np.arange(len(sizes) + 1), sizes + [R - sum(sizes)])

  def masked(x, w):  # every row times every group's matrix, keeping its own group's product
    one_hot = jax.nn.one_hot(group_of_row, len(sizes), dtype=x.dtype)
    return jnp.einsum("RE,REN->RN", one_hot, jnp.einsum("RM,EMN->REN", x, w))

  portable = lambda x, w: grouped_matmul(x, w, jnp.asarray(sizes), impl="portable", tile=4)
  got = jax.vjp(portable, x, w)[1](dy)
  want = jax.vjp(masked, x, w)[1](dy)
  for name, g, e in zip(("dx", "dw"), got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-5, err_msg=name)


def test_bfloat16_accumulates_the_weight_gradient_in_float32():
  sizes = [40, 0]
  x, w, dy = _arrays(2, seed=2)
  x16, w16, dy16 = (jnp.asarray(a, jnp.bfloat16) for a in (x, w, dy))
  _, vjp = jax.vjp(lambda x, w: grouped_matmul(x, w, jnp.asarray(sizes), impl="portable",
                                               tile=4), x16, w16)
  _, dw = vjp(dy16)
  assert dw.dtype == jnp.bfloat16
  # The 10 tiles' partial sums are added in float32: the result is the float32 sum, rounded once.
  want = np.asarray(x16, np.float32).T @ np.asarray(dy16, np.float32)
  np.testing.assert_allclose(np.asarray(dw[0], np.float32), want, rtol=2 ** -8, atol=1e-2)


def test_auto_resolves_per_platform_and_logs_once(caplog):
  assert resolve_impl(GroupedMatmulImpl.AUTO, "cpu") is GroupedMatmulImpl.PORTABLE
  assert resolve_impl(GroupedMatmulImpl.AUTO, "tpu") is GroupedMatmulImpl.RAGGED_DOT
  assert resolve_impl(GroupedMatmulImpl.AUTO, "gpu") is AUTO_IMPL["gpu"]
  assert resolve_impl(GroupedMatmulImpl.RAGGED_DOT, "cpu") is GroupedMatmulImpl.RAGGED_DOT
  # absl's logger gets its own level once absl flags are parsed (an earlier test's main() does
  # that), so the capture names it: the root logger's level alone would not let INFO through.
  with caplog.at_level(logging.INFO, logger="absl"):
    for _ in range(3):
      resolve_impl(GroupedMatmulImpl.PORTABLE, "test-platform")
  announced = [r for r in caplog.records if "test-platform" in r.getMessage()]
  assert len(announced) == 1 and "portable" in announced[0].getMessage()
