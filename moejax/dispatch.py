"""How tokens reach experts: one routing decision, executed two ways with identical results.

A dispatcher has two methods:
  dispatch(x_GSM) -> x_EGCM   each expert's capacity buffer, one per group; empty slots are zero
  combine(y_EGCM) -> y_GSM    each token's weighted sum of its kept experts' outputs

`EinsumDispatcher` is the GShard formulation: the one-hot (G, S, E, C) dispatch and combine
tensors contracted with einsum. Simple and MXU-friendly, but it spends 2*G*S*E*C*M FLOPs per einsum
(four per training step: dispatch and combine, forward and backward).

`IndexDispatcher` never materialises the one-hot. It turns the decision into two index maps over
flattened rows,
  dest_GSK  : row of the (E*G*C) expert buffer each assignment goes to (sentinel E*G*C: dropped)
  src_EGC   : assignment (g*S*K + s*K + k) that fills each buffer row (sentinel G*S*K: empty)
and moves rows with gathers only. Because kept assignments and filled slots are in one-to-one
correspondence, the transpose of each gather is again a gather through the other map
(`gather_rows` and `combine_rows` have custom VJPs), so neither the forward nor the backward pass
scatters M-wide rows, and the K rows of a token are summed as they are gathered.

Seen from the tokens, that costs T*K row gathers per pass, most of them of the empty row when K is
large and few assignments are kept: expert choice has K = E (a token may reach any expert) but
fills only E*G*C rows, about capacity_factor rows per token. Where the token table holds at least
`BUFFER_SIDE_RATIO` times as many assignments as the buffer has rows, the dispatcher works from the
buffer side instead: dispatch gathers the buffer's rows (its transpose, a scatter-add of R rows)
and combine scatter-adds each row, times its weight, onto its token (its transpose, a gather of R
rows). Both sides give the same values; a token's rows are summed in buffer order there rather
than in k order, so results can differ in the last bit (and, on GPUs, XLA's scatter-add may sum
them in a different order from run to run).

Non-finite values: a token that reaches no expert (padding, dropped, or not routed because it
holds NaN/inf) may hold anything, and so may the cotangent of its output; neither form lets it
reach another token's output or gradient. The index form never touches such rows; the einsum form,
whose contractions multiply them by zero one-hot entries (0 * NaN = NaN), selects them away in
dispatch and selects the unrouted outputs in combine. A non-finite expert output in a filled
slot is a different matter: the einsum combine spreads it over the group's tokens, the index
combine gives it to the slot's own token only.
"""

from __future__ import annotations

import enum
from typing import Protocol

import jax
import jax.numpy as jnp

from moejax.routing import RoutingDecision
from moejax.typed_config import ConfigError


class DispatchKind(enum.Enum):
  EINSUM = "einsum"
  INDEX = "index"
  DROPLESS = "dropless"  # no capacity: sort by expert, grouped matmul (moejax/dropless.py)


class Dispatcher(Protocol):

  def dispatch(self, x_GSM: jax.Array) -> jax.Array:
    ...

  def combine(self, y_EGCM: jax.Array) -> jax.Array:
    ...


class EinsumDispatcher:
  """Dispatch and combine by contracting with the one-hot (G, S, E, C) tensors."""

  def __init__(self, decision: RoutingDecision):
    self.dispatch_GSEC = decision.dispatch_GSEC()
    self.combine_GSEC = decision.combine_GSEC()
    self.routed_GS = decision.routed_GS()
    self.dense = decision.is_dense

  def dispatch(self, x_GSM: jax.Array) -> jax.Array:
    # Tokens that reach no expert (padding, dropped, non-finite) may hold anything, even NaN:
    # select them away, since a zero one-hot entry times NaN would still poison the whole buffer.
    x_GSM = jnp.where(self.routed_GS[..., None], x_GSM, jnp.zeros_like(x_GSM))
    dispatch_GSEC = self.dispatch_GSEC.astype(x_GSM.dtype)
    return jnp.einsum("GSEC,GSM->EGCM", dispatch_GSEC, x_GSM)

  def combine(self, y_EGCM: jax.Array) -> jax.Array:
    """Equals einsum("EGCM,GSEC->GSM", y, combine_GSEC), with one big contraction fewer.

    A slot holds at most one token, so its weight w_EGC is the sum of combine_GSEC over S.
    Scaling the slots by w and contracting with the constant dispatch tensor gives the same
    result, and the weights' gradient becomes the cheap sum_M(dy_EGCM * y_EGCM) instead of a
    (G, S, E, C, M) contraction.
    """
    if self.dense:  # soft MoE: every token takes a mixture of every slot
      return jnp.einsum("EGCM,GSEC->GSM", y_EGCM, self.combine_GSEC.astype(y_EGCM.dtype))
    weight_EGC = jnp.einsum("GSEC->EGC", self.combine_GSEC).astype(y_EGCM.dtype)
    dispatch_GSEC = jax.lax.stop_gradient(self.dispatch_GSEC.astype(y_EGCM.dtype))
    y_GSM = jnp.einsum("EGCM,GSEC->GSM", y_EGCM * weight_EGC[..., None], dispatch_GSEC)
    # An unrouted token's output is zero either way; the select keeps its cotangent, which may be
    # NaN (a NaN padding token's loss times a zero mask), out of the backward contraction, which
    # would otherwise spread 0 * NaN over every slot of the group.
    return jnp.where(self.routed_GS[..., None], y_GSM, jnp.zeros_like(y_GSM))


# Work from the buffer side (see the module docstring) where T*K >= BUFFER_SIDE_RATIO * R. On
# XLA:CPU a scatter-add row costs about 8 gathered rows, and benchmarks/index_sides.py (dispatch +
# combine, forward+backward, T=8192, M=512) finds the buffer side at 5.2x the token side's time
# for top-1 (T*K/R = 0.8), 1.26x for expert choice at capacity factor 2 (T*K/R = 4) and 0.76x at
# factor 1 (T*K/R = 8): the sides break even near 6.
BUFFER_SIDE_RATIO = 6


class IndexDispatcher:
  """Dispatch and combine with row gathers through two index maps (see module docstring)."""

  def __init__(self, decision: RoutingDecision, buffer_side: bool | None = None):
    """`buffer_side`: work from the buffer side (module docstring); None chooses by the ratio
    of the token table's assignments to the buffer's rows (`BUFFER_SIDE_RATIO`)."""
    if decision.is_dense:
      raise ConfigError("model.moe.dispatch", "index", "cannot execute a dense routing decision "
                        "(soft MoE mixes every token into every slot); use 'einsum'.")
    G, S, K = decision.expert_index_GSK.shape
    E, C = decision.num_experts, decision.capacity
    self.shape = (G, S, K, E, C)
    self.weight_GSK = decision.weight_GSK
    g_G11 = jnp.arange(G, dtype=jnp.int32)[:, None, None]
    row_GSK = (decision.expert_index_GSK * G + g_G11) * C + decision.slot_GSK
    self.dest_GSK = jnp.where(decision.keep_GSK, row_GSK, E * G * C).astype(jnp.int32)
    # Invert dest: each kept assignment writes its own id into the row it fills. Integer scatter
    # of G*S*K entries (no M-wide rows); dropped assignments land in the sentinel row, cut off.
    assignment_ids = jnp.arange(G * S * K, dtype=jnp.int32)
    src = jnp.full((E * G * C + 1,), G * S * K, jnp.int32)
    self.src_EGC = src.at[self.dest_GSK.reshape(-1)].set(assignment_ids)[:-1]
    # Buffer row r holds token src_EGC[r] // K (G*S: empty).
    self.token_EGC = jnp.where(self.src_EGC < G * S * K, self.src_EGC // K, G * S)
    if buffer_side is None:
      buffer_side = G * S * K >= BUFFER_SIDE_RATIO * E * G * C
    self.buffer_side = buffer_side

  def dispatch(self, x_GSM: jax.Array) -> jax.Array:
    G, S, K, E, C = self.shape
    M = x_GSM.shape[-1]
    x_TM = x_GSM.reshape(G * S, M)
    if self.buffer_side:  # the backward scatter-adds the R buffer rows onto their tokens
      return _take(x_TM, self.token_EGC).reshape(E, G, C, M)
    # The backward sums each token's K buffer rows, gathered through dest.
    out = gather_rows(x_TM, self.token_EGC, self.dest_GSK.reshape(G * S, K))
    return out.reshape(E, G, C, M)

  def combine(self, y_EGCM: jax.Array) -> jax.Array:
    G, S, K, E, C = self.shape
    M = y_EGCM.shape[-1]
    y_RM = y_EGCM.reshape(E * G * C, M)
    weight_TK = self.weight_GSK.reshape(G * S, K).astype(y_EGCM.dtype)
    if self.buffer_side:  # the backward gathers each row's token cotangent
      weight_R = jnp.take(weight_TK.reshape(-1), self.src_EGC, mode="fill", fill_value=0)
      out_TM = jnp.zeros((G * S, M), y_RM.dtype).at[self.token_EGC].add(
          y_RM * weight_R[:, None], mode="drop")
    else:
      out_TM = combine_rows(y_RM, weight_TK, self.dest_GSK.reshape(G * S, K), self.src_EGC)
    return out_TM.reshape(G, S, M)


@jax.custom_vjp
def gather_rows(table_NM: jax.Array, index_P: jax.Array, inverse_NR: jax.Array) -> jax.Array:
  """out[p] = table[index[p]], zero where index[p] == N.

  `inverse_NR` lists, for each table row n, the output rows p with index[p] == n (padded with the
  sentinel P). The VJP is then the gather d_table[n] = sum_r d_out[inverse[n, r]].
  """
  return _take(table_NM, index_P)


def _gather_rows_fwd(table_NM, index_P, inverse_NR):
  return gather_rows(table_NM, index_P, inverse_NR), (index_P, inverse_NR)


def _gather_rows_bwd(residuals, d_out_PM):
  index_P, inverse_NR = residuals
  return _sum_of_gathers(d_out_PM, inverse_NR), None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def _take(table_NM: jax.Array, index_P: jax.Array) -> jax.Array:
  return jnp.take(table_NM, index_P, axis=0, mode="fill", fill_value=0)


def _sum_of_gathers(table_NM: jax.Array, index_PR: jax.Array, weight_PR: jax.Array | None = None
                    ) -> jax.Array:
  """out[p] = sum_r weight[p, r] * table[index[p, r]] (weight 1 when None; rows past the table
  are zero), one gather per r summed as it goes: XLA fuses them with the sum, so the (P, R, M)
  rows are never written out."""
  out_PM = None
  for r in range(index_PR.shape[1]):
    rows_PM = _take(table_NM, index_PR[:, r])
    if weight_PR is not None:
      rows_PM = rows_PM * weight_PR[:, r, None]
    out_PM = rows_PM if out_PM is None else out_PM + rows_PM
  return out_PM


@jax.custom_vjp
def combine_rows(y_RM: jax.Array, weight_TK: jax.Array, dest_TK: jax.Array, src_R: jax.Array
                 ) -> jax.Array:
  """out[t] = sum_k weight[t, k] * y[dest[t, k]] (dest == R: dropped, contributes zero).

  `src_R` inverts dest: the assignment t*K + k that fills buffer row r (T*K: empty). The VJP is
  then two gathers with no M-wide intermediate: d_y[r] = weight[a] * d_out[a // K] for a = src[r],
  and d_weight[t, k] = <d_out[t], y[dest[t, k]]>.
  """
  return _sum_of_gathers(y_RM, dest_TK, weight_TK)


def _combine_rows_fwd(y_RM, weight_TK, dest_TK, src_R):
  return combine_rows(y_RM, weight_TK, dest_TK, src_R), (y_RM, weight_TK, dest_TK, src_R)


def _combine_rows_bwd(residuals, d_out_TM):
  y_RM, weight_TK, dest_TK, src_R = residuals
  T, K = dest_TK.shape
  filled_R = src_R < T * K
  token_R = jnp.where(filled_R, src_R // K, T)
  weight_R = jnp.take(weight_TK.reshape(-1), src_R, mode="fill", fill_value=0)
  d_y_RM = _take(d_out_TM, token_R) * weight_R[:, None]
  d_weight_TK = jnp.stack([jnp.sum(_take(y_RM, dest_TK[:, k]) * d_out_TM, axis=-1)
                           for k in range(K)], axis=1)
  return d_y_RM, d_weight_TK.astype(weight_TK.dtype), None, None


combine_rows.defvjp(_combine_rows_fwd, _combine_rows_bwd)


def make_dispatcher(kind: DispatchKind, decision: RoutingDecision) -> Dispatcher:
  if kind is DispatchKind.EINSUM:
    return EinsumDispatcher(decision)
  if kind is DispatchKind.INDEX:
    return IndexDispatcher(decision)
  raise ValueError(f"dispatch={kind!r} has no capacity buffers; make_dispatcher executes "
                   "'einsum' and 'index' (dropless experts: moejax/dropless.py).")
