"""The experts: stacked expert FFNs over their capacity buffers, and how their matmuls are issued.

Dimension letters (docs/design.md): E (local) experts, G groups, C capacity, M model width, F FFN
width, R rows of one expert's buffer (G * C).

`expert_ffn(x_EGCM, wi_EMF, wo_EFM, wg_EMF, ...)` applies expert e's FFN to its rows x[e]. On CPU
the per-expert matmuls are issued one expert after another with hand-written weight-gradient
layouts (`ExpertLoop.UNROLL`, the fastest there: benchmarks/moe_layer.py); on accelerators as one
batched matmul per weight. Every loop gives the same numbers.
"""

from __future__ import annotations

import enum
import functools

import jax
import jax.numpy as jnp

from moejax import activation as activation_lib
from moejax.activation import Activation


class ExpertLoop(enum.Enum):
  """How the stacked experts' matmuls are issued (see `expert_ffn`)."""

  AUTO = "auto"  # CPU: UNROLL up to 16 local experts, else SCAN; other platforms: BATCHED
  BATCHED = "batched"  # one batched matmul per weight
  SCAN = "scan"  # a loop (lax.map) of 2-D matmuls
  UNROLL = "unroll"  # one 2-D matmul per expert, unrolled at trace time



@jax.custom_vjp
def _project_in(x_RM: jax.Array, w_MF: jax.Array) -> jax.Array:
  """x @ w, whose weight gradient is computed as transpose(x) @ g with x's transpose materialised.

  XLA's CPU backend otherwise turns dW = x^T g into a dot contracting the operands' leading
  dimension and transposes g (R x F, the larger operand) for it. Transposing x (R x M) instead
  and issuing a plain row-major matmul runs the expert weight gradient about 1.2x faster on this
  CPU for the expert shapes of benchmarks/moe_layer.py. Used by `ExpertLoop.SCAN` (the unrolled
  loop's hand-written backward does the same); the numbers are those of plain autodiff.
  """
  return x_RM @ w_MF


def _project_in_fwd(x_RM, w_MF):
  return x_RM @ w_MF, (x_RM, w_MF)


def materialized_transpose(x_RM):
  """x^T as a real (small) copy, so that dW = x^T @ g is a row-major matmul on CPU.

  The barrier keeps XLA from folding the transpose into the dot, which would bring back the dot
  that transposes g instead.
  """
  return jax.lax.optimization_barrier(x_RM.T)


def _project_in_bwd(residuals, g_RF):
  x_RM, w_MF = residuals
  x_MR = materialized_transpose(x_RM)
  dx_RM = jnp.einsum("RF,MF->RM", g_RF, w_MF)
  return sum_to_varying_axes_of(x_RM, dx_RM), sum_to_varying_axes_of(w_MF, x_MR @ g_RF)


def sum_to_varying_axes_of(primal, cotangent):
  """Inside shard_map, sums a cotangent over the mesh axes its primal does not vary along.

  What autodiff does by itself when it transposes the implicit broadcast of an operand (x is
  replicated over "model" while w is split over it; w is replicated over "data").
  """
  extra = tuple(sorted(_varying_axes(cotangent) - _varying_axes(primal)))
  return jax.lax.psum(cotangent, extra) if extra else cotangent


def _varying_axes(a) -> frozenset:
  """The manual mesh axes along which `a` varies inside shard_map (empty outside)."""
  return frozenset(jax.typeof(a).manual_axis_type.varying)


_project_in.defvjp(_project_in_fwd, _project_in_bwd)


def _hidden(h_RF, gate_RF, keep_RF, *, activation: Activation, dropout_rate: float):
  """An expert's hidden activations from its input projections, with expert dropout."""
  a_RF = activation_lib.apply(activation, h_RF, gate_RF)
  if keep_RF is not None:
    scale = jnp.asarray(1.0 / (1.0 - dropout_rate), a_RF.dtype)
    a_RF = jnp.where(keep_RF, a_RF * scale, jnp.zeros_like(a_RF))
  return a_RF


def _one_expert(x_GCM, wi_MF, wo_FM, wg_MF, keep_GCF, *, activation: Activation,
                dropout_rate: float, transpose_input_for_weight_grad: bool = False):
  """One expert's FFN over its capacity buffer."""
  if transpose_input_for_weight_grad:
    G, C, M = x_GCM.shape
    x_RM = x_GCM.reshape(G * C, M)
    h_GCF = _project_in(x_RM, wi_MF).reshape(G, C, -1)
    gate_GCF = None if wg_MF is None else _project_in(x_RM, wg_MF).reshape(G, C, -1)
  else:
    h_GCF = jnp.einsum("GCM,MF->GCF", x_GCM, wi_MF)
    gate_GCF = None if wg_MF is None else jnp.einsum("GCM,MF->GCF", x_GCM, wg_MF)
  a_GCF = _hidden(h_GCF, gate_GCF, keep_GCF, activation=activation, dropout_rate=dropout_rate)
  return jnp.einsum("GCF,FM->GCM", a_GCF, wo_FM)


def _after(a, *deps):
  """`a`, computed only once `deps` are: a real data dependency that orders independent work.

  XLA's CPU runtime overlaps thunks that share no buffers (an optimization barrier does not
  order them). Subtracting zero times a finite scalar read from each dependency leaves every
  value of `a` bitwise unchanged (x - (+0.0) == x, signed zeros and NaNs included) but makes the
  fusion that produces `a`, usually a slice copy made anyway, read the dependencies' buffers.
  """
  zero = jnp.zeros((), a.dtype)
  for d in deps:
    s = jnp.ravel(d)[0].astype(a.dtype)
    zero = zero + jnp.abs(jnp.where(jnp.isfinite(s), s, 0)) * 0  # +0.0, whatever s is
  return a - zero


def _rows(a_EGCX, e):
  """Expert e's capacity buffer as a matrix (G*C, X)."""
  return None if a_EGCX is None else a_EGCX[e].reshape(-1, a_EGCX.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _experts_in_sequence(x_EGCM, wi_EMF, wo_EFM, wg_EMF, keep_EGCF, activation, dropout_rate):
  """The local experts' FFNs, one 2-D matmul per expert, issued strictly one expert after another.

  On CPU the runtime overlaps independent matmuls; each one already uses every core, so
  overlapping them only makes them compete for cores and caches (in the layer's forward+backward,
  overlapped expert matmuls ran at about 60% of the rate of one at a time). Chaining expert e's
  work after expert e-1's, in the forward and in the hand-written backward, keeps one at a time.
  The backward also forms each input-projection weight gradient as x^T @ g with x's (smaller)
  transpose materialised, as `_project_in` does. The numbers are those of plain autodiff.
  """
  return _experts_in_sequence_fwd(x_EGCM, wi_EMF, wo_EFM, wg_EMF, keep_EGCF, activation,
                                  dropout_rate)[0]


def _experts_in_sequence_fwd(x_EGCM, wi_EMF, wo_EFM, wg_EMF, keep_EGCF, activation,
                             dropout_rate):
  E, G, C, M = x_EGCM.shape
  ys, hs, gates = [], [], []
  for e in range(E):
    x_RM = _rows(x_EGCM, e)
    if ys:
      x_RM = _after(x_RM, ys[-1])
    h_RF = x_RM @ wi_EMF[e]
    gate_RF = None if wg_EMF is None else x_RM @ wg_EMF[e]
    a_RF = _hidden(h_RF, gate_RF, _rows(keep_EGCF, e), activation=activation,
                   dropout_rate=dropout_rate)
    ys.append(a_RF @ wo_EFM[e])
    hs.append(h_RF)
    gates.append(gate_RF)
  y_EGCM = jnp.stack(ys).reshape(E, G, C, M)
  return y_EGCM, (x_EGCM, wi_EMF, wo_EFM, wg_EMF, keep_EGCF, hs, gates)


def _experts_in_sequence_bwd(activation, dropout_rate, residuals, dy_EGCM):
  x_EGCM, wi_EMF, wo_EFM, wg_EMF, keep_EGCF, hs, gates = residuals
  E = x_EGCM.shape[0]
  dxs, dwis, dwos, dwgs = [], [], [], []
  prev = ()
  for e in range(E):
    dy_RM = _after(_rows(dy_EGCM, e), *prev)
    x_RM, keep_RF = _rows(x_EGCM, e), _rows(keep_EGCF, e)
    hidden = functools.partial(_hidden, keep_RF=keep_RF, activation=activation,
                               dropout_rate=dropout_rate)
    a_RF, hidden_vjp = jax.vjp(hidden, hs[e], gates[e])
    dh_RF, dgate_RF = hidden_vjp(jnp.einsum("RM,FM->RF", dy_RM, wo_EFM[e]))
    x_MR = materialized_transpose(x_RM)
    dwi_MF = x_MR @ dh_RF
    dwg_MF = None if wg_EMF is None else x_MR @ dgate_RF
    done = (dwi_MF,) if dwg_MF is None else (dwi_MF, dwg_MF)
    dx_RM = jnp.einsum("RF,MF->RM", dh_RF, wi_EMF[e])
    if wg_EMF is not None:
      dx_RM = dx_RM + jnp.einsum("RF,MF->RM", dgate_RF, wg_EMF[e])
    dwo_FM = jnp.einsum("RF,RM->FM", a_RF, dy_RM)
    dxs.append(dx_RM)
    dwis.append(dwi_MF)
    dwos.append(dwo_FM)
    if dwg_MF is not None:
      dwgs.append(dwg_MF)
    prev = (dx_RM, dwo_FM) + done
  dx_EGCM = jnp.stack(dxs).reshape(x_EGCM.shape)
  grads = (dx_EGCM, jnp.stack(dwis), jnp.stack(dwos), jnp.stack(dwgs) if dwgs else None)
  primals = (x_EGCM, wi_EMF, wo_EFM, wg_EMF)
  grads = tuple(None if g is None else sum_to_varying_axes_of(p, g)
                for p, g in zip(primals, grads))
  return grads + (None,)


_experts_in_sequence.defvjp(_experts_in_sequence_fwd, _experts_in_sequence_bwd)


def expert_ffn(x_EGCM, wi_EMF, wo_EFM, wg_EMF, *, activation: Activation,
               loop: ExpertLoop = ExpertLoop.AUTO, dropout_rate=0.0, dropout_keep_EGCF=None,
               model_axis: str | None = None):
  """Stacked expert FFNs: expert e transforms its rows x[e] with its own weights.

  `loop` maps the one-expert FFN over the local experts: `BATCHED` as one batched matmul per
  weight (best on TPU/GPU); on CPU, where a batched matmul of E small problems runs slower than
  the same FLOPs as one large one, `UNROLL` issues 2-D matmuls one expert after another
  (`_experts_in_sequence`, fastest: benchmarks/moe_layer.py) and `SCAN` loops over the experts
  (compile time independent of E; it computes the input projection's weight gradient with
  `_project_in`). All give the same numbers.
  """
  num_local = x_EGCM.shape[0]
  if loop is ExpertLoop.AUTO:
    if jax.default_backend() != "cpu":
      loop = ExpertLoop.BATCHED
    else:
      loop = ExpertLoop.UNROLL if num_local <= 16 else ExpertLoop.SCAN
  fn = functools.partial(_one_expert, activation=activation, dropout_rate=dropout_rate,
                         transpose_input_for_weight_grad=loop is not ExpertLoop.BATCHED)
  args = (x_EGCM, wi_EMF, wo_EFM, wg_EMF, dropout_keep_EGCF)
  if loop is ExpertLoop.BATCHED:
    y_EGCM = jax.vmap(fn)(*args)
  elif loop is ExpertLoop.SCAN:
    y_EGCM = jax.lax.map(lambda a: fn(*a), args)
  else:
    y_EGCM = _experts_in_sequence(*args, activation, dropout_rate)
  if model_axis is not None:
    # F is split over the model axis: each device holds a partial sum of the output.
    y_EGCM = jax.lax.psum(y_EGCM, model_axis)
  return y_EGCM


