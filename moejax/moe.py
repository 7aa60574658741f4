"""The MoE layer: router projection, routing, dispatch, expert-parallel all-to-all, experts, combine.

Dimension letters (DESIGN.md): B batch, L sequence, M model width, F FFN width, E experts,
K experts per token, G groups, S group size, C expert capacity, X expert-parallel size.

Per device, inside `jax.shard_map` over the mesh (tokens split over ("data", "expert")):

    x (T_local, M) -> groups (G, S, M) -> logits (G, S, E) float32 -> RoutingDecision
      -> dispatch                                   (E, G, C, M)
      -> all_to_all over "expert": split E, concat G (E/X, X*G, C, M)
      -> experts, weights (E/X, M, F), (E/X, F, M)   (E/X, X*G, C, M)
      -> all_to_all back: split G, concat E          (E, G, C, M)
      -> combine                                    (G, S, M) -> (T_local, M)

Groups never straddle devices, so the sharded layer forms exactly the groups of the single-device
layer and gives the same outputs, losses and gradients. Random numbers (router jitter, GShard's
random policy, the expert-dropout mask) are drawn in the global view, outside `shard_map`, for the
same reason: training steps match too.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from moejax import sharding, typed_config
from moejax.dispatch import DispatchKind, make_dispatcher
from moejax import routing
from moejax.routing import RouterConfig, RouterInputs, route
from moejax.typed_config import ConfigError


class ExpertLoop(enum.Enum):
  """How the stacked experts' matmuls are issued (see `expert_ffn`)."""

  AUTO = "auto"  # CPU: UNROLL up to 16 local experts, else SCAN; other platforms: BATCHED
  BATCHED = "batched"  # one batched matmul per weight
  SCAN = "scan"  # a loop (lax.map) of 2-D matmuls
  UNROLL = "unroll"  # one 2-D matmul per expert, unrolled at trace time


class Activation(enum.Enum):
  RELU = "relu"
  GELU = "gelu"
  SWIGLU = "swiglu"  # silu(x W_gate) * (x W_in); adds an (E, M, F) gate


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def parse_dtype(field: str, value) -> jnp.dtype:
  if isinstance(value, str) and value in _DTYPES:
    return jnp.dtype(_DTYPES[value])
  if value in (jnp.float32, jnp.bfloat16):
    return jnp.dtype(value)
  raise ConfigError(field, value, f"is not allowed; choose one of {sorted(_DTYPES)}.")


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """Typed settings of one MoE layer (`model.moe`).

  Attributes:
    router: the router settings (number of experts, k, capacity, losses).
    ffn_dim: F, the hidden width of each expert.
    group_size: S, tokens per routing group; must divide the tokens on each device.
    dispatch: `DispatchKind.INDEX` (gathers) or `DispatchKind.EINSUM` (one-hot tensors); a
      router with dense dispatch weights (soft MoE) needs EINSUM.
    activation: relu, gelu or swiglu.
    expert_loop: how the experts' matmuls are issued: auto, batched, scan or unroll (same
      results; see `expert_ffn`).
    expert_dropout: dropout rate on the experts' hidden activations in training.
    dtype: compute dtype of the experts ("float32" or "bfloat16"); None: the model's `dtype`.
      The router is always float32.
  """

  PATH: ClassVar[str] = "model.moe"

  router: RouterConfig = RouterConfig()
  ffn_dim: int = 2048
  group_size: int = 1024
  dispatch: DispatchKind = DispatchKind.INDEX
  activation: Activation = Activation.RELU
  expert_loop: ExpertLoop = ExpertLoop.AUTO
  expert_dropout: float = 0.0
  dtype: str | None = None

  def __post_init__(self):
    typed_config.check_fields(self)
    if self.dtype is not None:
      parse_dtype(typed_config.path_of(self, "dtype"), self.dtype)
    for name in ("ffn_dim", "group_size"):
      if getattr(self, name) < 1:
        raise ConfigError(typed_config.path_of(self, name), getattr(self, name),
                          "must be an integer >= 1.")
    if not 0.0 <= self.expert_dropout < 1.0:
      raise ConfigError(typed_config.path_of(self, "expert_dropout"), self.expert_dropout,
                        "must be in [0, 1).")
    if self.router.family.dense and self.dispatch is not DispatchKind.EINSUM:
      raise ConfigError(typed_config.path_of(self, "dispatch"), self.dispatch,
                        f"cannot execute {self.router.PATH}.kind={self.router.kind.value!r}, "
                        "whose dispatch weights are dense (every slot mixes every token of its "
                        "group); use 'einsum'.")

  @property
  def compute_dtype(self) -> jnp.dtype:
    """The experts' compute dtype (float32 when `dtype` is None and no model resolved it)."""
    return parse_dtype(typed_config.path_of(self, "dtype"), self.dtype or "float32")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MoeAux:
  """What an MoE layer returns beside its output: weighted aux loss, raw losses, metrics."""

  aux_loss: jax.Array  # the weighted sum of the router's auxiliary losses (routing.aux_loss)
  losses: dict[str, jax.Array]
  metrics: dict[str, jax.Array]


# ----------------------------------------------------------------------------- experts


def _activation(kind: Activation, h_GCF, gate_GCF):
  if kind is Activation.RELU:
    return jax.nn.relu(h_GCF)
  if kind is Activation.GELU:
    return jax.nn.gelu(h_GCF)
  return jax.nn.silu(gate_GCF) * h_GCF


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


def _materialized_transpose(x_RM):
  """x^T as a real (small) copy, so that dW = x^T @ g is a row-major matmul on CPU.

  The barrier keeps XLA from folding the transpose into the dot, which would bring back the dot
  that transposes g instead.
  """
  return jax.lax.optimization_barrier(x_RM.T)


def _project_in_bwd(residuals, g_RF):
  x_RM, w_MF = residuals
  x_MR = _materialized_transpose(x_RM)
  dx_RM = jnp.einsum("RF,MF->RM", g_RF, w_MF)
  return _sum_to_varying_axes_of(x_RM, dx_RM), _sum_to_varying_axes_of(w_MF, x_MR @ g_RF)


def _sum_to_varying_axes_of(primal, cotangent):
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
  a_RF = _activation(activation, h_RF, gate_RF)
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
    x_MR = _materialized_transpose(x_RM)
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
  grads = tuple(None if g is None else _sum_to_varying_axes_of(p, g)
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


# ----------------------------------------------------------------------------- per-device body


# Token-major RouterInputs fields (leading axis T, reshaped to (G, S, ...) per device); the others
# (hash table, bias) are replicated.
_TOKEN_INPUTS = ("uniform_GS", "normal_GSE", "uniform_GSE", "token_ids_GS")


def _moe_tokens(x_TM, mask_T, jitter_TM, keep_EGCF, inputs: RouterInputs, router_MX, wi_EMF,
                wo_EFM, wg_EMF, *, config: MoeConfig, train: bool, expert_axis: str | None = None,
                model_axis: str | None = None):
  """The MoE layer on one device's tokens. Returns y_TM and per-group RoutingStats."""
  T, M = x_TM.shape
  S = config.group_size
  G = T // S
  x_GSM = x_TM.reshape(G, S, M)
  with jax.named_scope("route"):
    router_in_GSM = x_GSM.astype(jnp.float32)
    if jitter_TM is not None:
      router_in_GSM = router_in_GSM * jitter_TM.reshape(G, S, M)
    logits_fn = config.router.family.logits
    if logits_fn is None:
      logits_GSX = jnp.einsum("GSM,MX->GSX", router_in_GSM, router_MX.astype(jnp.float32))
    else:
      logits_GSX = logits_fn(router_in_GSM, router_MX.astype(jnp.float32), inputs)
    grouped = {name: getattr(inputs, name).reshape(G, S, *getattr(inputs, name).shape[1:])
               for name in _TOKEN_INPUTS if getattr(inputs, name) is not None}
    inputs = dataclasses.replace(inputs, **grouped)
    decision = route(logits_GSX, config.router, train=train,
                     padding_mask_GS=None if mask_T is None else mask_T.reshape(G, S),
                     inputs=inputs)
  with jax.named_scope("dispatch"):
    dispatcher = make_dispatcher(config.dispatch, decision)
    x_EGCM = dispatcher.dispatch(x_GSM)
    if expert_axis is not None:
      # (E, G, C, M) -> (E/X, X*G, C, M): expert block j goes to device j along the expert axis,
      # and each device receives every peer's groups for its own experts.
      x_EGCM = jax.lax.all_to_all(x_EGCM, expert_axis, split_axis=0, concat_axis=1, tiled=True)
  with jax.named_scope("experts"):
    y_EGCM = expert_ffn(x_EGCM, wi_EMF, wo_EFM, wg_EMF, activation=config.activation,
                        loop=config.expert_loop, dropout_rate=config.expert_dropout,
                        dropout_keep_EGCF=keep_EGCF,
                        model_axis=model_axis)
  with jax.named_scope("combine"):
    if expert_axis is not None:
      # (E/X, X*G, C, M) -> (E, G, C, M): results return to the devices that own the tokens.
      y_EGCM = jax.lax.all_to_all(y_EGCM, expert_axis, split_axis=1, concat_axis=0, tiled=True)
    y_GSM = dispatcher.combine(y_EGCM)
  return y_GSM.reshape(T, M).astype(x_TM.dtype), decision.stats


# ----------------------------------------------------------------------------- the module


class RouterState(nnx.Variable):
  """Router state that is not a parameter: the balancing bias, a hash table."""


class MoeLayer(nnx.Module):
  """A Mixture-of-Experts FFN: x (B, L, M) -> (y (B, L, M), MoeAux).

  With no mesh set, everything runs on one device. Under `jax.set_mesh(mesh)` with a mesh of axes
  (data, expert, model), the layer runs in `jax.shard_map`: tokens split over (data, expert),
  experts over expert, F over model, and two all-to-alls move the dispatched tokens.
  """

  def __init__(self, model_dim: int, config: MoeConfig, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32, vocab_size: int | None = None):
    self.config = config
    self.model_dim = M = model_dim
    E, F = config.router.num_experts, config.ffn_dim
    family = config.router.family
    # The router starts small so that early routing is near uniform (Switch Sec. 2.4).
    router_init = jax.nn.initializers.variance_scaling(0.1, "fan_in", "truncated_normal")
    width = E * family.logits_per_expert(config.router)
    self.router = sharding.param(router_init(rngs.params(), (M, width), param_dtype),
                                 ("embed", None))
    # Soft MoE's learned scale of its normalised logits (Puigcerver et al. 2023, Sec. 2.3).
    self.router_scale = nnx.data(None)
    if family.normalized_logits:
      self.router_scale = sharding.param(jnp.ones((), param_dtype), ())
    # State that is not a parameter (no gradient, no optimizer), kept in checkpoints.
    self.balance_bias = nnx.data(None)
    if family.biased and config.router.balance.bias_update_rate > 0:
      self.balance_bias = RouterState(jnp.zeros((E,), jnp.float32))
    self.hash_table = nnx.data(None)
    if family.token_ids:
      if vocab_size is None:
        raise ValueError(f"{config.router.PATH}.kind={config.router.kind.value!r} routes by token "
                         "id: MoeLayer needs vocab_size.")
      self.hash_table = RouterState(family.initial_table(config.router, vocab_size))
    batched = dict(in_axis=1, out_axis=2, batch_axis=0)
    expert_init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                       **batched)
    self.wi = sharding.param(expert_init(rngs.params(), (E, M, F), param_dtype),
                             ("expert", "embed", "mlp"))
    self.wo = sharding.param(expert_init(rngs.params(), (E, F, M), param_dtype),
                             ("expert", "mlp", "embed"))
    self.wg = (sharding.param(expert_init(rngs.params(), (E, M, F), param_dtype),
                              ("expert", "embed", "mlp"))
               if config.activation is Activation.SWIGLU else None)
    needs_rng = (config.router.jitter_eps > 0 or config.expert_dropout > 0 or
                 bool(config.router.family.random_inputs(config.router)))
    self.rngs = rngs.fork() if needs_rng else None

  def __call__(self, x_BLM: jax.Array, *, padding_mask_BL: jax.Array | None = None,
               token_ids_BL: jax.Array | None = None, train: bool = False
               ) -> tuple[jax.Array, MoeAux]:
    """y (B, L, M) and MoeAux; `token_ids_BL` for routers that route by token id (hash).

    In training, the aux-loss-free balancing bias (when on) moves after routing by
    `bias_update_rate * sign(mean load - load)` over the whole batch (Wang et al. 2024).
    """
    B, L, M = x_BLM.shape
    cfg = self.config
    dtype = cfg.compute_dtype
    x_TM = x_BLM.reshape(B * L, M).astype(dtype)
    mask_T = None if padding_mask_BL is None else padding_mask_BL.reshape(B * L).astype(bool)
    mesh = jax.sharding.get_abstract_mesh()
    X = sharding.mesh_axis_size(mesh, sharding.EXPERT)
    token_shards = X * sharding.mesh_axis_size(mesh, sharding.DATA)
    _check_shapes(cfg, B * L, token_shards, X)
    jitter, keep, inputs = self._random_inputs(B * L, train, mesh)
    inputs = self._state_inputs(inputs, token_ids_BL)
    weights = (self.router[...], self.wi[...].astype(dtype), self.wo[...].astype(dtype),
               None if self.wg is None else self.wg[...].astype(dtype))
    args = (x_TM, mask_T, jitter, keep, inputs, *weights)
    if mesh.empty:
      y_TM, stats = _moe_tokens(*args, config=cfg, train=train)
    else:
      y_TM, stats = _sharded(cfg, train, mesh)(*args)
    losses, metrics = stats.summarize()
    aux_loss = routing.aux_loss(cfg.router, losses)
    if self.balance_bias is not None:
      metrics["balance_bias"] = self.balance_bias[...]
      if train:
        load_E = jnp.sum(stats.assigned_GE, axis=0)
        step = cfg.router.balance.bias_update_rate * jnp.sign(jnp.mean(load_E) - load_E)
        self.balance_bias[...] = self.balance_bias[...] + step
    # Give y the input's layout: splitting T back into (B, L) is otherwise ambiguous on an
    # Explicit mesh (with expert=1 it could put L over the expert axis).
    out_sharding = None if mesh.empty else jax.typeof(x_BLM).sharding
    y_BLM = jnp.reshape(y_TM, (B, L, M), out_sharding=out_sharding)
    return y_BLM, MoeAux(aux_loss=aux_loss, losses=losses, metrics=metrics)

  def _state_inputs(self, inputs: RouterInputs, token_ids_BL) -> RouterInputs:
    """Adds the balancing bias, the hash table and the token ids the family reads."""
    changes = {}
    if self.balance_bias is not None:
      changes["bias_E"] = self.balance_bias[...]
    if self.hash_table is not None:
      if token_ids_BL is None:
        raise ValueError(f"{self.config.router.PATH}.kind={self.config.router.kind.value!r} "
                         "routes by token id: call the layer with token_ids_BL.")
      changes["hash_table_V"] = self.hash_table[...]
      changes["token_ids_GS"] = token_ids_BL.reshape(-1).astype(jnp.int32)
    if self.router_scale is not None:
      changes["scale"] = self.router_scale[...].astype(jnp.float32)
    return dataclasses.replace(inputs, **changes)

  def _random_inputs(self, num_tokens: int, train: bool, mesh):
    """Router jitter, the expert-dropout mask and the router family's random inputs for one call.

    Drawn in the global view with the layouts the per-device body uses (threefry is
    partitionable), so every device gets its slice of the same numbers under any mesh and the
    sharded layer stays equal to the single-device layer in training too.
    """
    cfg, router = self.config, self.config.router
    if not train or self.rngs is None:
      return None, None, RouterInputs()
    specs = _specs(mesh)
    out = lambda name: None if mesh.empty else specs[name]
    jitter = keep = None
    if router.jitter_eps > 0:
      eps = router.jitter_eps
      jitter = jax.random.uniform(self.rngs.jitter(), (num_tokens, self.model_dim), jnp.float32,
                                  1.0 - eps, 1.0 + eps, out_sharding=out("tokens"))
    E = router.num_experts
    draws = {
        "uniform_GS": lambda key: jax.random.uniform(key, (num_tokens,), jnp.float32,
                                                     out_sharding=out("tokens")),
        "uniform_GSE": lambda key: jax.random.uniform(key, (num_tokens, E), jnp.float32,
                                                      out_sharding=out("tokens")),
        "normal_GSE": lambda key: jax.random.normal(key, (num_tokens, E), jnp.float32,
                                                    out_sharding=out("tokens")),
    }
    inputs = {name: draws[name](self.rngs.router()) for name in router.family.random_inputs(router)}
    if cfg.expert_dropout > 0:
      shape = (router.num_experts, num_tokens // cfg.group_size,
               router.capacity(cfg.group_size, train=True), cfg.ffn_dim)
      keep = jax.random.bernoulli(self.rngs.dropout(), 1.0 - cfg.expert_dropout, shape,
                                  out_sharding=out("hidden"))
    return jitter, keep, RouterInputs(**inputs)


def _check_shapes(cfg: MoeConfig, num_tokens: int, token_shards: int, expert_shards: int):
  E = cfg.router.num_experts
  if E % expert_shards:
    raise ValueError(
        f"model.moe.router.num_experts={E} must be divisible by the mesh's expert axis size "
        f"({expert_shards}).")
  if num_tokens % token_shards:
    raise ValueError(
        f"the {num_tokens} tokens of the batch (B*L) do not split evenly over the "
        f"{token_shards} token shards (data x expert) of the mesh.")
  local = num_tokens // token_shards
  if local % cfg.group_size:
    raise ValueError(
        f"model.moe.group_size={cfg.group_size} must divide the tokens per device ({local} = B*L / "
        f"{token_shards} shards); choose a divisor of {local}.")


def _specs(mesh) -> dict[str, P]:
  """Per-device layouts on `mesh`, by role."""
  names = set(mesh.axis_names)
  axis = lambda a: a if a in names else None
  token_axes = tuple(a for a in sharding.TOKEN_AXES if a in names)
  expert, data, model = axis(sharding.EXPERT), axis(sharding.DATA), axis(sharding.MODEL)
  return {
      "tokens": P(token_axes),
      "wi": P(expert, None, model),
      "wo": P(expert, model, None),
      # The experts' hidden (E/X, X*G, C, F/model): after the all-to-all, device (d, x) holds
      # expert block x of the groups of every peer in its data row, i.e. data block d of G.
      "hidden": P(expert, data, None, model),
  }


def _reshard(a, spec):
  if isinstance(a, RouterInputs):
    return RouterInputs(**{name: None if value is None else jax.reshard(value, getattr(spec, name))
                           for name, value in vars(a).items()})
  return jax.reshard(a, spec)


def _sharded(cfg: MoeConfig, train: bool, mesh):
  """The per-device body wrapped in shard_map over the context mesh."""
  names = set(mesh.axis_names)
  expert_axis = sharding.EXPERT if sharding.EXPERT in names else None
  model_axis = sharding.MODEL if sharding.MODEL in names else None
  specs = _specs(mesh)
  tokens = specs["tokens"]
  body = functools.partial(_moe_tokens, config=cfg, train=train, expert_axis=expert_axis,
                           model_axis=model_axis)

  def run(x, mask, jitter, keep, inputs, router_w, wi, wo, wg):
    args = (x, mask, jitter, keep, inputs, router_w, wi, wo, wg)
    input_specs = RouterInputs(**{
        name: None if value is None else tokens if name in _TOKEN_INPUTS else P()
        for name, value in vars(inputs).items()})
    roles = (tokens, tokens, tokens, specs["hidden"], input_specs, P(), specs["wi"], specs["wo"],
             specs["wi"])
    in_specs = tuple(None if a is None else r for a, r in zip(args, roles))
    # A no-op when the inputs already have these layouts (the model's sharding rules give them).
    args = tuple(a if a is None else _reshard(a, s) for a, s in zip(args, in_specs))
    # Every leaf of the stats has a leading group axis, split like the tokens.
    fn = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=(tokens, tokens))
    return fn(*args)

  return run
