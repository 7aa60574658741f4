"""Dropless experts: a token-choice decision carried out with no capacity, nothing dropped.

Dimension letters (docs/design.md): G groups, S group size, K assignments per token, E experts,
M model width, F FFN width, X expert-parallel size; T = G*S local tokens, N = T*K token copies,
L = E/X local experts, Q rows of a receive buffer.

Per device (inside `jax.shard_map` when there is a mesh), `dropless_experts`:

    copies (T*K) sorted by expert (stable: ties keep token order; unrouted copies last)
      -> exchange over "expert" (X > 1): each device gets the copies routed to its L experts
      -> receive order: the received rows sorted by local expert (peer order within an expert)
      -> the experts as grouped matmuls over contiguous segments (moejax/grouped_matmul.py)
      -> the inverse moves back, each copy's output weighted by its router weight, summed per token

Every row move is a gather through an index map whose inverse is known, so backward passes gather
too (`dispatch.gather_rows`), as in the index dispatch form.

The decision comes from routing with capacity C = S (`MoeConfig.routing_config`), which no expert
can exceed in a group, so every assignment is kept and the routing metrics and aux losses are
those of the index form with capacity S (dropped fraction 0).

Exchange (`ExchangeKind`), when the expert axis has X > 1 devices:

* RAGGED: `jax.lax.ragged_all_to_all` moves exactly the routed copies (GPU/TPU; not implemented on
  XLA:CPU). The receive buffer holds the worst case, X*N rows; only memory, not traffic.
* BUFFER: a fixed-size `all_to_all` with B rows per (sender, receiver) pair, B = N (the worst case:
  one device's copies all routed to one peer's experts) unless `exchange_buffer_factor` sets
  B = ceil(factor * N / X). Copies past B are not sent: each is counted in the
  `exchange_overflow` metric (never silent), its token's output lacks that expert, and it counts
  as not kept in the routing metrics (dropped fractions, expert load kept).

Both exchanges read how many rows every peer sends to every expert from one all-gather of a (E,)
int32 count vector per device; the data moves in exactly two all-to-alls (there and back).
"""

from __future__ import annotations

import dataclasses
import enum
import math

import jax
import jax.numpy as jnp

from moejax import activation as activation_lib
from moejax import typed_config
from moejax.dispatch import gather_rows
from moejax.grouped_matmul import GroupedMatmulImpl, grouped_matmul
from moejax.routing import RouterConfig, RoutingDecision
from moejax.typed_config import ConfigError


class ExchangeKind(enum.Enum):
  """How dropless token copies reach other devices' experts (`model.moe.exchange`)."""

  AUTO = "auto"  # RAGGED on GPU/TPU, BUFFER on CPU
  RAGGED = "ragged"  # jax.lax.ragged_all_to_all: only the routed copies move
  BUFFER = "buffer"  # fixed-size all_to_all, B rows per device pair; overflow counted


# MoeConfig fields only dropless experts read, with their defaults.
DROPLESS_FIELDS = {"grouped_matmul": GroupedMatmulImpl.AUTO, "grouped_matmul_tile": 64,
                   "exchange": ExchangeKind.AUTO, "exchange_buffer_factor": None}
# Router fields of the capacity claim, which dropless experts skip.
CAPACITY_FIELDS = ("capacity_factor_train", "capacity_factor_eval", "min_capacity",
                   "batch_prioritized", "claim_order")


def check_capacity_form(config) -> None:
  """The index and einsum forms read none of the dropless settings of MoeConfig `config`."""
  for name, default in DROPLESS_FIELDS.items():
    if getattr(config, name) != default:
      raise ConfigError(typed_config.path_of(config, name), getattr(config, name),
                        f"is read only with {typed_config.path_of(config, 'dispatch')}="
                        f"'dropless'; leave it at its default {_show(default)}.")


def check_dropless_form(config) -> None:
  """Dropless experts need per-token expert choices, no capacity settings, no expert dropout."""
  router = config.router
  dispatch = typed_config.path_of(config, "dispatch")
  if router.family.dense or router.family.fixed_k == 0:
    other = "'einsum'" if router.family.dense else "'index' or 'einsum'"
    raise ConfigError(dispatch, "dropless", f"cannot execute {router.PATH}.kind="
                      f"{router.kind.value!r}, whose decision has no per-token expert choices "
                      f"(dropless experts run token-choice routers only); use {other}.")
  if config.expert_dropout > 0:
    raise ConfigError(typed_config.path_of(config, "expert_dropout"), config.expert_dropout,
                      f"is not supported with {dispatch}='dropless' (the dropout mask is drawn "
                      "per capacity slot); use 0.0, or dispatch 'index'.")
  for name in CAPACITY_FIELDS:
    default = getattr(RouterConfig, name)
    if getattr(router, name) != default:
      raise ConfigError(f"{router.PATH}.{name}", getattr(router, name),
                        f"is not read with {dispatch}='dropless', which has no capacity "
                        f"(nothing is dropped); leave it at its default {_show(default)}.")
  if config.grouped_matmul_tile < 1:
    raise ConfigError(typed_config.path_of(config, "grouped_matmul_tile"),
                      config.grouped_matmul_tile, "must be an integer >= 1.")
  factor = config.exchange_buffer_factor
  if factor is not None and not factor > 0:
    raise ConfigError(typed_config.path_of(config, "exchange_buffer_factor"), factor,
                      "must be a number > 0, or None for the worst case (nothing overflows).")


def _show(value):
  return repr(value.value) if isinstance(value, enum.Enum) else repr(value)


def resolve_exchange(kind: ExchangeKind, platform: str | None = None) -> ExchangeKind:
  if kind is not ExchangeKind.AUTO:
    return kind
  platform = platform or jax.default_backend()
  return ExchangeKind.BUFFER if platform == "cpu" else ExchangeKind.RAGGED


def pair_buffer_rows(num_copies: int, expert_shards: int, factor: float | None) -> int:
  """B, the rows a device sends any one peer in the BUFFER exchange (at most the worst case N)."""
  if factor is None:
    return num_copies
  return max(1, min(num_copies, math.ceil(factor * num_copies / expert_shards)))


def dropless_experts(decision: RoutingDecision, x_GSM, keep_EGCF, wi_EMF, wo_EFM, wg_EMF, *,
                     config, expert_axis: str | None, model_axis: str | None):
  """The routed experts' output (G, S, M) and the routing stats, with the exchange overflow.

  `config` is the layer's MoeConfig; `keep_EGCF` (expert dropout) must be None.
  """
  del keep_EGCF  # MoeConfig refuses expert dropout with dropless experts
  G, S, K = decision.expert_index_GSK.shape
  E, M = decision.num_experts, x_GSM.shape[-1]
  T, N = G * S, G * S * K
  X = 1 if expert_axis is None else jax.lax.axis_size(expert_axis)
  keep_N = decision.keep_GSK.reshape(N)
  expert_N = jnp.where(keep_N, decision.expert_index_GSK.reshape(N), E)
  # Stable sort by expert: position q of the sorted rows holds copy order_N[q].
  order_N = jnp.argsort(expert_N, stable=True).astype(jnp.int32)
  sorted_pos_N = jnp.zeros((N,), jnp.int32).at[order_N].set(jnp.arange(N, dtype=jnp.int32))
  counts_E = jnp.sum(jax.nn.one_hot(expert_N, E, dtype=jnp.int32), axis=0)
  ffn = _grouped_ffn(wi_EMF, wo_EFM, wg_EMF, config=config, model_axis=model_axis)
  x_TM = x_GSM.reshape(T, M)
  if X == 1:
    row_N = jnp.where(keep_N, sorted_pos_N, N)
    x_QM = _gather_copies(x_TM, row_N, N, K)
    y_QM = ffn(x_QM, counts_E)
    fits_N = keep_N
  else:
    exchange = _ragged if _exchange(config) is ExchangeKind.RAGGED else _buffered
    y_QM, row_N, fits_N = exchange(x_TM, keep_N, sorted_pos_N, counts_E, ffn, K=K, X=X,
                                   axis=expert_axis, config=config)
  y_NM = gather_rows(y_QM, row_N, _inverse(row_N, y_QM.shape[0])[:, None])
  weight_GSK = jnp.where(fits_N.reshape(G, S, K), decision.weight_GSK, 0.0)
  y_GSM = jnp.einsum("GSKM,GSK->GSM", y_NM.reshape(G, S, K, M), weight_GSK.astype(y_NM.dtype))
  return y_GSM, _stats_with_overflow(decision, keep_N & ~fits_N)


def _exchange(config) -> ExchangeKind:
  return resolve_exchange(config.exchange)


def _inverse(row_N, num_rows: int):
  """For each of `num_rows` rows, the copy that fills it (sentinel N: none); integer scatter."""
  N = row_N.shape[0]
  src = jnp.full((num_rows + 1,), N, jnp.int32)
  return src.at[row_N].set(jnp.arange(N, dtype=jnp.int32))[:-1]


def _gather_copies(x_TM, row_N, num_rows: int, K: int):
  """Rows (num_rows, M): row row_N[c] holds token c // K's input; empty rows are zero."""
  src_Q = _inverse(row_N, num_rows)
  N = row_N.shape[0]
  token_Q = jnp.where(src_Q < N, src_Q // K, x_TM.shape[0])
  return gather_rows(x_TM, token_Q, row_N.reshape(-1, K))


def _grouped_ffn(wi_EMF, wo_EFM, wg_EMF, *, config, model_axis):
  """rows (Q, M), group sizes (L,) -> each segment through its expert's FFN (Q, M)."""
  gmm = lambda x, w, sizes: grouped_matmul(x, w, sizes, impl=config.grouped_matmul,
                                           tile=config.grouped_matmul_tile)

  def ffn(x_QM, sizes_L):
    h_QF = gmm(x_QM, wi_EMF, sizes_L)
    gate_QF = None if wg_EMF is None else gmm(x_QM, wg_EMF, sizes_L)
    y_QM = gmm(activation_lib.apply(config.activation, h_QF, gate_QF), wo_EFM, sizes_L)
    if model_axis is not None:
      y_QM = jax.lax.psum(y_QM, model_axis)  # F is split over the model axis: partial sums
    return y_QM

  return ffn


def _receive_order(peer_start_X, recv_XL, num_rows: int):
  """Where each received row goes when the receive buffer is sorted by local expert.

  Rows from peer p start at peer_start_X[p] and come sorted by local expert, recv_XL[p, l] of
  them for expert l. Sorted, expert l's segment holds its rows from peer 0, then peer 1, ...
  Returns the destination of each buffer row (sentinel num_rows: an empty row) and the local
  group sizes (L,).
  """
  X, L = recv_XL.shape
  i_Q = jnp.arange(num_rows, dtype=jnp.int32)
  total_X = jnp.sum(recv_XL, axis=1)
  p_Q = jnp.clip(jnp.searchsorted(peer_start_X, i_Q, side="right") - 1, 0, X - 1)
  r_Q = i_Q - peer_start_X[p_Q]
  valid_Q = (r_Q >= 0) & (r_Q < total_X[p_Q])
  inclusive_XL = jnp.cumsum(recv_XL, axis=1)
  l_Q = jnp.minimum(jnp.sum(inclusive_XL[p_Q] <= r_Q[:, None], axis=1), L - 1)
  within_Q = r_Q - (inclusive_XL - recv_XL)[p_Q, l_Q]
  sizes_L = jnp.sum(recv_XL, axis=0)
  earlier_peers_XL = jnp.cumsum(recv_XL, axis=0) - recv_XL
  dest_Q = (jnp.cumsum(sizes_L) - sizes_L)[l_Q] + earlier_peers_XL[p_Q, l_Q] + within_Q
  return jnp.where(valid_Q, dest_Q, num_rows).astype(jnp.int32), sizes_L


def _local_experts(x_recv_QM, peer_start_X, recv_XL, ffn):
  """The local experts over a receive buffer: sort by expert, grouped FFN, back to buffer order."""
  Q = x_recv_QM.shape[0]
  dest_Q, sizes_L = _receive_order(peer_start_X, recv_XL, Q)
  src_Q = _inverse(dest_Q, Q)
  x_QM = gather_rows(x_recv_QM, src_Q, dest_Q[:, None])
  y_QM = ffn(x_QM, sizes_L)
  return gather_rows(y_QM, dest_Q, src_Q[:, None])


def _peer_counts(counts_E, X: int, axis: str):
  """All devices' per-expert counts (X, E) [sender, expert], and this device's index."""
  return jax.lax.all_gather(counts_E, axis, tiled=False), jax.lax.axis_index(axis)


def _buffered(x_TM, keep_N, sorted_pos_N, counts_E, ffn, *, K, X, axis, config):
  """BUFFER exchange: (X, B, M) all_to_all there and back. Returns rows, row of each copy, fit."""
  N, M = keep_N.shape[0], x_TM.shape[-1]
  E = counts_E.shape[0]
  L = E // X
  B = pair_buffer_rows(N, X, config.exchange_buffer_factor)
  n_X = jnp.sum(counts_E.reshape(X, L), axis=1)
  start_X = jnp.cumsum(n_X) - n_X
  # The destination device of a kept copy, and its rank among the copies sent there.
  device_N = jnp.searchsorted(jnp.cumsum(n_X), sorted_pos_N, side="right").astype(jnp.int32)
  device_N = jnp.minimum(device_N, X - 1)
  rank_N = sorted_pos_N - start_X[device_N]
  fits_N = keep_N & (rank_N < B)
  row_N = jnp.where(fits_N, device_N * B + rank_N, X * B).astype(jnp.int32)
  x_send = _gather_copies(x_TM, row_N, X * B, K).reshape(X, B, M)
  x_recv = jax.lax.all_to_all(x_send, axis, 0, 0, tiled=True)
  all_counts_XE, me = _peer_counts(counts_E, X, axis)
  sent_XL = jax.lax.dynamic_slice_in_dim(all_counts_XE, me * L, L, axis=1)
  # Each peer's rows for my experts, cut at B in its send order (experts in order).
  before_XL = jnp.cumsum(sent_XL, axis=1) - sent_XL
  recv_XL = jnp.clip(B - before_XL, 0, sent_XL)
  peer_start_X = jnp.arange(X, dtype=jnp.int32) * B
  y_recv = _local_experts(x_recv.reshape(X * B, M), peer_start_X, recv_XL, ffn)
  y_back = jax.lax.all_to_all(y_recv.reshape(X, B, M), axis, 0, 0, tiled=True)
  return y_back.reshape(X * B, M), row_N, fits_N


def _ragged(x_TM, keep_N, sorted_pos_N, counts_E, ffn, *, K, X, axis, config):
  """RAGGED exchange: ragged_all_to_all there and back; nothing overflows."""
  del config
  N, M = keep_N.shape[0], x_TM.shape[-1]
  E = counts_E.shape[0]
  L = E // X
  row_N = jnp.where(keep_N, sorted_pos_N, N).astype(jnp.int32)
  x_sorted = _gather_copies(x_TM, row_N, N, K)
  all_counts_XE, me = _peer_counts(counts_E, X, axis)
  n_XX = jnp.sum(all_counts_XE.reshape(X, X, L), axis=2)  # [sender, receiver] rows
  send_start_XX = jnp.cumsum(n_XX, axis=1) - n_XX  # where a sender's block for j starts
  recv_start_XX = jnp.cumsum(n_XX, axis=0) - n_XX  # where sender p's rows land on receiver j
  Q = X * N
  x_recv = jax.lax.ragged_all_to_all(
      x_sorted, jnp.zeros((Q, M), x_sorted.dtype), send_start_XX[me], n_XX[me],
      recv_start_XX[me], n_XX[:, me], axis_name=axis)
  recv_XL = jax.lax.dynamic_slice_in_dim(all_counts_XE, me * L, L, axis=1)
  y_recv = _local_experts(x_recv, recv_start_XX[:, me], recv_XL, ffn)
  y_back = jax.lax.ragged_all_to_all(
      y_recv, jnp.zeros((N, M), y_recv.dtype), recv_start_XX[:, me], n_XX[:, me],
      send_start_XX[:, me], n_XX[me], axis_name=axis)
  return y_back, row_N, keep_N


def _stats_with_overflow(decision: RoutingDecision, overflow_N):
  """The decision's stats with the copies the exchange could not send counted as not kept."""
  stats = decision.stats
  G, S, K = decision.expert_index_GSK.shape
  overflow_GSK = overflow_N.reshape(G, S, K)
  lost_GE = jnp.einsum("GSKE,GSK->GE", jax.nn.one_hot(decision.expert_index_GSK,
                                                      decision.num_experts, dtype=jnp.float32),
                       overflow_GSK.astype(jnp.float32))
  kept_GSK = decision.keep_GSK & ~overflow_GSK
  newly_dropped_GS = jnp.any(decision.keep_GSK, axis=-1) & ~jnp.any(kept_GSK, axis=-1)
  return dataclasses.replace(
      stats, kept_GE=stats.kept_GE - lost_GE,
      tokens_dropped_G=stats.tokens_dropped_G + jnp.sum(newly_dropped_GS, axis=1,
                                                        dtype=jnp.float32),
      exchange_overflow_G=jnp.sum(overflow_GSK, axis=(1, 2), dtype=jnp.float32))
