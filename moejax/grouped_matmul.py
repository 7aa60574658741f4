"""Grouped matmul: rows sorted by group, each contiguous segment times its own group's matrix.

Dimension letters (docs/design.md): R rows, E groups (experts), M input width, N output width.

    grouped_matmul(x_RM, w_EMN, group_sizes_E, impl=, tile=) -> y_RN

Segment e holds rows [sum(group_sizes[:e]), sum(group_sizes[:e+1])), and y[r] = x[r] @ w[e] for
its rows; rows past sum(group_sizes) give zeros. This is what dropless experts run (moejax/
dropless.py): the token copies sorted by expert, no capacity, no empty slots.

Two implementations with the same numbers up to float rounding (`GroupedMatmulImpl`):

* PORTABLE, plain XLA for every backend: each segment is covered by row tiles, one 2-D matmul per
  tile, in loops over the segment's tiles (while loops whose trip counts are computed from the
  segment's size), inside one loop over the groups (so the program, and its compile time, do
  not grow with the number of groups). Most rows go through tiles of 16 * `tile` rows, the
  rest through at most one tile each of 8, 4 and 2 * `tile` and two of `tile` rows, so the
  matmuls stay large while the work is that of padding every segment to a multiple of `tile`
  (at most E * (tile - 1) extra rows). Nothing padded is materialised: a segment's last tile
  reaches over its end into the next rows (a tile that would pass row R moves back to end
  there), computes them, and writes only its own segment's rows into the output (a masked
  in-place update), so the order of the tiles does not matter and the output is written once.
  Its custom VJP is again grouped, one loop per group that carries both gradients: each tile
  writes its rows of dx = dy @ w[e]^T and adds its rows' x^T @ dy to dW[e] (in float32), with
  the narrower of the two tiles transposed into a real copy, the layout trick the index path's
  experts use on CPU (moejax/experts.py).
  On CPU, XLA's runtime runs independent ops at once, and two matmuls that each use every core
  run slower side by side than one after the other (docs/benchmarks.md). Every tile of the
  portable form depends on the one before it (the forward through the output it updates, the
  backward through dx and dW carried by one loop), so the tiles run one at a time (only a
  backward tile's own two matmuls, for dx and dW, may overlap).
* RAGGED_DOT, `jax.lax.ragged_dot`: a real grouped kernel on TPU; on CPU (and, by default, on
  NVIDIA GPUs) XLA lowers it to a dense masked matmul over every group, E times the FLOPs.

`resolve_impl(AUTO)` picks per platform from `AUTO_IMPL`, and logs its choice once per process.
"""

from __future__ import annotations

import enum
import functools

import jax
import jax.numpy as jnp
from absl import logging

from moejax.experts import materialized_transpose, sum_to_varying_axes_of


class GroupedMatmulImpl(enum.Enum):
  """Which grouped matmul dropless experts run (`model.moe.grouped_matmul`)."""

  AUTO = "auto"  # per platform, from AUTO_IMPL
  PORTABLE = "portable"  # tiled loop in plain XLA, custom grouped VJP
  RAGGED_DOT = "ragged_dot"  # jax.lax.ragged_dot


# What `auto` runs on each platform. CPU: the portable loop (ragged_dot is a dense masked matmul
# over all groups there, ~E times the FLOPs). TPU: ragged_dot, which XLA:TPU lowers to a grouped
# kernel. GPU: ragged_dot, measured on one H100 (benchmarks/grouped_matmul.py, docs/benchmarks.md):
# 6.1x a dense FFN's time against the portable loop's 9.2x in float32, 7.9x against 9.3x in bfloat16
# (both far behind the index form's 1.4-1.6x there).
AUTO_IMPL = {
    "cpu": GroupedMatmulImpl.PORTABLE,
    "tpu": GroupedMatmulImpl.RAGGED_DOT,
    "gpu": GroupedMatmulImpl.RAGGED_DOT,
}

_announced: set[tuple[str, GroupedMatmulImpl]] = set()


def resolve_impl(impl: GroupedMatmulImpl | str,
                 platform: str | None = None) -> GroupedMatmulImpl:
  """The implementation `impl` stands for on `platform` (default: JAX's default backend).

  The first resolution of each (platform, implementation) in a process is logged, so a run's log
  says which grouped matmul its experts ran.
  """
  impl = GroupedMatmulImpl(impl)
  platform = platform or jax.default_backend()
  chosen = impl
  if impl is GroupedMatmulImpl.AUTO:
    chosen = AUTO_IMPL.get(platform, GroupedMatmulImpl.PORTABLE)
  if (platform, chosen) not in _announced:
    _announced.add((platform, chosen))
    logging.info("moejax grouped matmul on %s: %s (model.moe.grouped_matmul=%s)", platform,
                 chosen.value, impl.value)
  return chosen


def grouped_matmul(x_RM: jax.Array, w_EMN: jax.Array, group_sizes_E: jax.Array, *,
                   impl: GroupedMatmulImpl | str = GroupedMatmulImpl.AUTO,
                   tile: int = 64) -> jax.Array:
  """y[r] = x[r] @ w[e] for the rows r of segment e; zeros past the last segment (module doc).

  Args:
    x_RM: rows sorted by group.
    w_EMN: one matrix per group.
    group_sizes_E: int32 rows per group, summing to at most R.
    impl: the implementation (AUTO resolves per platform).
    tile: rows per tile of the portable implementation.
  """
  impl = resolve_impl(impl)
  group_sizes_E = group_sizes_E.astype(jnp.int32)
  if impl is GroupedMatmulImpl.RAGGED_DOT:
    return jax.lax.ragged_dot(x_RM, w_EMN, group_sizes_E)
  return _portable(x_RM, w_EMN, group_sizes_E, tile)


# ----------------------------------------------------------------------------- portable


# Besides `tile`, the portable loop uses tiles of tile * 2**j rows for j up to this, so that most
# of a segment runs as large matmuls while the padding stays below `tile` rows per segment.
_DOUBLINGS = 4


def _pieces(start, size, tile: int, num_rows: int):
  """How the portable loop covers rows [start, start + size): [(tile rows, first row, count)].

  count tiles of tile * 2**_DOUBLINGS rows, then (binary digits of the rest) at most one tile
  each of tile * 2**j rows for j = _DOUBLINGS - 1 ... 1, then ceil(rest / tile) <= 2 tiles of
  `tile` rows, the last of which may reach past the segment's end. Tile sizes larger than the
  `num_rows` rows are left out (their count would be 0).
  """
  pieces, offset = [], start
  for j in range(_DOUBLINGS, 0, -1):
    rows = tile << j
    if rows > num_rows:
      continue
    count = size // rows if j == _DOUBLINGS else (size // rows) % 2
    pieces.append((rows, offset, count))
    offset = offset + count * rows
  rest = start + size - offset
  pieces.append((tile, offset, (rest + tile - 1) // tile))
  return pieces


def _segments(group_sizes_E):
  """Each segment's first row and its end (int32, (E,))."""
  ends_E = jnp.cumsum(group_sizes_E)
  return ends_E - group_sizes_E, ends_E


def _tile(first, i, rows: int, num_rows: int, start, end):
  """Tile i of a piece: its first row and which of its rows it computes for the segment.

  The tile covers rows [r, r + rows), r = first + i * rows, of the segment [start, end); one
  that would reach past row R is moved back to end at R, and the rows it then shares with the
  segment's earlier tiles (before r) are left to them, so every row counts once in dW.
  """
  r = first + i * rows
  r0 = jnp.minimum(r, num_rows - rows)
  row_t = r0 + jnp.arange(rows, dtype=r0.dtype)
  return r0, (row_t >= jnp.maximum(start, r)) & (row_t < end)


def _write_rows(buf_RX, tile_tX, r0, inside_t):
  """buf with the tile's rows inside its segment written at r0; its other rows left as they are.

  Rows outside the segment belong to other groups (or to none): each group writes only its own
  rows, so the tiles may reach over segment boundaries and the order of the writes is free.
  """
  old_tX = jax.lax.dynamic_slice_in_dim(buf_RX, r0, tile_tX.shape[0], axis=0)
  new_tX = jnp.where(inside_t[:, None], tile_tX.astype(buf_RX.dtype), old_tX)
  return jax.lax.dynamic_update_slice_in_dim(buf_RX, new_tX, r0, axis=0)


def _zeros_rows(rows_like, cols_like, dtype):
  """Zeros (R, X) varying over the mesh axes of both operands (a loop carry's type inside
  shard_map)."""
  return (jnp.zeros_like(rows_like[:, :1], dtype) + jnp.zeros_like(cols_like, dtype)[None, :])


def _forward_loop(x_RM, w_EMN, group_sizes_E, tile: int):
  """y = x @ w[e] on segment e, tile by tile, one segment after another; zeros past the end.

  The output starts as zeros and each tile writes the rows of its own segment (`_write_rows`).
  The segments are an outer loop over e (w[e] sliced in it), so the program holds one set of
  tile loops whatever the number of groups: its compile time does not grow with E.
  """
  R = x_RM.shape[0]
  tile = min(tile, R)
  starts_E, ends_E = _segments(group_sizes_E)
  y_RN = _zeros_rows(x_RM, w_EMN[0, 0, :], jnp.result_type(x_RM.dtype, w_EMN.dtype))

  def group(e, y_RN):
    w_MN = jax.lax.dynamic_index_in_dim(w_EMN, e, keepdims=False)
    start, end = starts_E[e], ends_E[e]
    for rows, first, count in _pieces(start, group_sizes_E[e], tile, R):

      def body(i, y_RN, rows=rows, first=first):
        r0, inside_t = _tile(first, i, rows, R, start, end)
        x_tM = jax.lax.dynamic_slice_in_dim(x_RM, r0, rows, axis=0)
        return _write_rows(y_RN, x_tM @ w_MN, r0, inside_t)

      y_RN = jax.lax.fori_loop(0, count, body, y_RN)
    return y_RN

  return jax.lax.fori_loop(0, w_EMN.shape[0], group, y_RN)


def _backward_loop(x_RM, w_EMN, group_sizes_E, dy_RN, tile: int):
  """dx = dy @ w[e]^T on segment e and dW[e] = x[seg e]^T @ dy[seg e], in one pass over the tiles.

  Each tile writes its segment's rows of dx (as in `_forward_loop`) and adds its contribution to
  dW[e], accumulated in float32, from x's and dy's rows masked to the segment. Of the two, the
  narrower tile is transposed into a real copy, so that the weight gradient is a row-major matmul
  (the layout trick of the index path's experts, moejax/experts.py): x^T @ dy when x is the
  narrower, else dW[e]^T = dy^T @ x, all transposed once at the end. One loop carries dx and dW,
  so the tiles run strictly one after another (see the module doc); as in the forward, the
  segments are an outer loop over e.
  """
  R = x_RM.shape[0]
  tile = min(tile, R)
  starts_E, ends_E = _segments(group_sizes_E)
  x_narrower = x_RM.shape[1] <= dy_RN.shape[1]
  dx_RM = _zeros_rows(dy_RN, w_EMN[0, :, 0], jnp.result_type(dy_RN.dtype, w_EMN.dtype))
  zero_x = jnp.zeros_like(x_RM[0, :], jnp.float32)
  zero_dy = jnp.zeros_like(dy_RN[0, :], jnp.float32)
  zero_dw = (zero_x[:, None] + zero_dy[None, :] if x_narrower else
             zero_dy[:, None] + zero_x[None, :])
  dws = jnp.zeros((w_EMN.shape[0],) + zero_dw.shape, jnp.float32) + zero_dw[None]

  def group(e, carry):
    dx_RM, dws = carry
    w_MN = jax.lax.dynamic_index_in_dim(w_EMN, e, keepdims=False)
    start, end = starts_E[e], ends_E[e]
    inner = (dx_RM, zero_dw)
    for rows, first, count in _pieces(start, group_sizes_E[e], tile, R):

      def body(i, carry, rows=rows, first=first):
        dx_RM, dw = carry
        r0, inside_t = _tile(first, i, rows, R, start, end)
        mask = lambda a: jnp.where(inside_t[:, None], a, jnp.zeros_like(a))
        x_tM = mask(jax.lax.dynamic_slice_in_dim(x_RM, r0, rows, axis=0))
        dy_tN = mask(jax.lax.dynamic_slice_in_dim(dy_RN, r0, rows, axis=0))
        if x_narrower:
          dw = dw + jnp.matmul(materialized_transpose(x_tM), dy_tN,
                               preferred_element_type=jnp.float32)
        else:
          dw = dw + jnp.matmul(materialized_transpose(dy_tN), x_tM,
                               preferred_element_type=jnp.float32)
        return _write_rows(dx_RM, dy_tN @ w_MN.T, r0, inside_t), dw

      inner = jax.lax.fori_loop(0, count, body, inner)
    dx_RM, dw = inner
    return dx_RM, jax.lax.dynamic_update_index_in_dim(dws, dw, e, axis=0)

  dx_RM, dws = jax.lax.fori_loop(0, w_EMN.shape[0], group, (dx_RM, dws))
  return dx_RM, (dws if x_narrower else jnp.swapaxes(dws, 1, 2)).astype(w_EMN.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _portable(x_RM, w_EMN, group_sizes_E, tile):
  return _forward_loop(x_RM, w_EMN, group_sizes_E, tile)


def _portable_fwd(x_RM, w_EMN, group_sizes_E, tile):
  return _portable(x_RM, w_EMN, group_sizes_E, tile), (x_RM, w_EMN, group_sizes_E)


def _portable_bwd(tile, residuals, dy_RN):
  x_RM, w_EMN, group_sizes_E = residuals
  dx_RM, dw_EMN = _backward_loop(x_RM, w_EMN, group_sizes_E, dy_RN, tile)
  dx_RM = dx_RM.astype(x_RM.dtype)
  return (sum_to_varying_axes_of(x_RM, dx_RM), sum_to_varying_axes_of(w_EMN, dw_EMN), None)


_portable.defvjp(_portable_fwd, _portable_bwd)
