"""The MoE layer: router projection, routing, dispatch, expert-parallel all-to-all, experts, combine.

Dimension letters (docs/design.md): B batch, L sequence, M model width, F FFN width, E experts,
K experts per token, G groups, S group size, C expert capacity, X expert-parallel size.

Per device, inside `jax.shard_map` over the mesh (tokens split over ("data", "expert")):

    x (T_local, M) -> groups (G, S, M) -> logits (G, S, E) float32 -> RoutingDecision
      -> dispatch                                   (E, G, C, M)
      -> all_to_all over "expert": split E, concat G (E/X, X*G, C, M)
      -> experts, weights (E/X, M, F), (E/X, F, M)   (E/X, X*G, C, M)
      -> all_to_all back: split G, concat E          (E, G, C, M)
      -> combine                                    (G, S, M) -> (T_local, M)

Shared experts (`shared_ffn_dim` > 0, moejax/shared_experts.py) run beside this, outside
`shard_map`, and their output is added to the routed one.

Groups never straddle devices, so the sharded layer forms exactly the groups of the single-device
layer and gives the same outputs, losses and gradients. Random numbers (router jitter, GShard's
random policy, the expert-dropout mask) are drawn in the global view, outside `shard_map`, for the
same reason: training steps match too.

Non-finite inputs stay with their token. A token whose input or router logits hold NaN or inf is
not routed (it claims no capacity, reaches no expert and counts in no aux loss or metric), so the
other tokens' outputs, the losses, the metrics and every gradient the other tokens contribute are
exactly those of the same batch with that token marked as padding, in both dispatch forms. A real
such token's output is NaN, so that the fault shows in the loss rather than passing for a dropped
token; a padded one's output is zero, and padding may hold anything.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from moejax import dropless, routing, sharding, typed_config
from moejax.activation import Activation
from moejax.dispatch import DispatchKind, make_dispatcher
from moejax.dropless import ExchangeKind
from moejax.experts import ExpertLoop, expert_ffn
from moejax.grouped_matmul import GroupedMatmulImpl
from moejax.routing import RouterConfig, RouterInputs, route
from moejax.shared_experts import SharedExperts
from moejax.typed_config import ConfigError


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
    dispatch: `DispatchKind.INDEX` (gathers) or `DispatchKind.EINSUM` (one-hot tensors), both
      with capacity buffers; a router with dense dispatch weights (soft MoE) needs EINSUM.
      `DispatchKind.DROPLESS`: no capacity, nothing dropped (token-choice routers only;
      moejax/dropless.py).
    activation: relu, gelu or swiglu.
    expert_loop: how the experts' matmuls are issued: auto, batched, scan or unroll (same
      results; see `expert_ffn`).
    expert_dropout: dropout rate on the experts' hidden activations in training.
    dtype: compute dtype of the experts ("float32" or "bfloat16"); None: the model's `dtype`.
      The router runs in `router.dtype` (float32 by default).
    shared_ffn_dim: width of the shared experts, an always-on FFN (activation `activation`)
      whose output is added to the routed experts' for every real token (DeepSeekMoE; N_s
      shared experts of width F' are one FFN of width N_s * F'); 0: none. Expert dropout does
      not apply to it.
    grouped_matmul: dropless experts' grouped matmul: auto (per platform), portable or
      ragged_dot (moejax/grouped_matmul.py).
    grouped_matmul_tile: rows per tile of the portable grouped matmul.
    exchange: how dropless token copies cross the expert axis: auto, ragged
      (ragged_all_to_all, GPU/TPU) or buffer (fixed-size all_to_all).
    exchange_buffer_factor: the buffer exchange's rows per device pair, as a multiple of the
      balanced share N/X of a device's N token copies; None: the worst case (N), so nothing can
      overflow. Copies past it are counted in the `exchange_overflow` metric.
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
  shared_ffn_dim: int = 0
  grouped_matmul: GroupedMatmulImpl = GroupedMatmulImpl.AUTO
  grouped_matmul_tile: int = 64
  exchange: ExchangeKind = ExchangeKind.AUTO
  exchange_buffer_factor: float | None = None

  def __post_init__(self):
    typed_config.check_fields(self)
    _FORMS[self.dispatch].validate(self)
    if self.dtype is not None:
      parse_dtype(typed_config.path_of(self, "dtype"), self.dtype)
    for name in ("ffn_dim", "group_size"):
      if getattr(self, name) < 1:
        raise ConfigError(typed_config.path_of(self, name), getattr(self, name),
                          "must be an integer >= 1.")
    if self.shared_ffn_dim < 0:
      raise ConfigError(typed_config.path_of(self, "shared_ffn_dim"), self.shared_ffn_dim,
                        "must be an integer >= 0 (0: no shared experts).")
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

  @property
  def routing_config(self) -> RouterConfig:
    """The router settings routing runs with: capacity S (every assignment kept) when the
    dispatch form has no capacity."""
    if _FORMS[self.dispatch].uncapped:
      return dataclasses.replace(self.router, min_capacity=self.group_size)
    return self.router


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MoeAux:
  """What an MoE layer returns beside its output: weighted aux loss, raw losses, metrics."""

  aux_loss: jax.Array  # the weighted sum of the router's auxiliary losses (routing.aux_loss)
  losses: dict[str, jax.Array]
  metrics: dict[str, jax.Array]
  # (G, E) per routing group: the assignments each expert kept. With groups of one token
  # (`group_size=1`, as in decoding) row t counts the experts token t took (0 or 1 each).
  kept_GE: jax.Array | None = None
  # Only when the layer's `record_routing` is set: the decision's "expert_index_GSK" (int32) and
  # "keep_GSK" (bool), groups in token order (G * S = B * L); moejax/analysis reads them.
  routing: dict[str, jax.Array] | None = None


# ----------------------------------------------------------------------------- per-device body


# Token-major RouterInputs fields (leading axis T, reshaped to (G, S, ...) per device); the others
# (hash table, bias) are replicated.
_TOKEN_INPUTS = ("uniform_GS", "normal_GSE", "uniform_GSE", "token_ids_GS")


def _moe_tokens(x_TM, mask_T, jitter_TM, keep_EGCF, inputs: RouterInputs, router_MX, wi_EMF,
                wo_EFM, wg_EMF, *, config: MoeConfig, train: bool, expert_axis: str | None = None,
                model_axis: str | None = None, record_routing: bool = False):
  """The MoE layer on one device's tokens. Returns y_TM and (per-group RoutingStats, the
  decision's expert indices and keep flags when `record_routing`, else None).

  Non-finite tokens (see `_router_logits`) are not routed; a real one's output is NaN, a padded
  one's is zero like any padding's.
  """
  T, M = x_TM.shape
  S = config.group_size
  G = T // S
  x_GSM = x_TM.reshape(G, S, M)
  with jax.named_scope("route"):
    grouped = {name: getattr(inputs, name).reshape(G, S, *getattr(inputs, name).shape[1:])
               for name in _TOKEN_INPUTS if getattr(inputs, name) is not None}
    inputs = dataclasses.replace(inputs, **grouped)
    logits_GSX, finite_GS = _router_logits(x_GSM, jitter_TM, router_MX, inputs, config.router)
    routable_GS = finite_GS if mask_T is None else finite_GS & mask_T.reshape(G, S)
    decision = route(logits_GSX, config.routing_config, train=train,
                     padding_mask_GS=routable_GS, inputs=inputs)
  y_GSM, stats = _FORMS[config.dispatch].execute(
      decision, x_GSM, keep_EGCF, wi_EMF, wo_EFM, wg_EMF, config=config, expert_axis=expert_axis,
      model_axis=model_axis)
  with jax.named_scope("combine"):
    # A real token that was not routed for holding NaN/inf shows it in its output (its downstream
    # loss turns NaN), rather than passing for a dropped token; the select also stops whatever
    # cotangent its output gets.
    poisoned_GS = ~finite_GS if mask_T is None else ~finite_GS & mask_T.reshape(G, S)
    y_GSM = jnp.where(poisoned_GS[..., None], jnp.asarray(jnp.nan, y_GSM.dtype), y_GSM)
  routing_GS = ({"expert_index_GSK": decision.expert_index_GSK, "keep_GSK": decision.keep_GSK}
                if record_routing else None)
  return y_GSM.reshape(T, M).astype(x_TM.dtype), (stats, routing_GS)


def _capacity_experts(decision, x_GSM, keep_EGCF, wi_EMF, wo_EFM, wg_EMF, *, config: MoeConfig,
                      expert_axis: str | None, model_axis: str | None):
  """The routed experts over capacity buffers (index or einsum form): y (G, S, M) and stats."""
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
    return dispatcher.combine(y_EGCM), decision.stats


def _dropless_experts(decision, x_GSM, keep_EGCF, wi_EMF, wo_EFM, wg_EMF, **kw):
  with jax.named_scope("dropless_experts"):
    return dropless.dropless_experts(decision, x_GSM, keep_EGCF, wi_EMF, wo_EFM, wg_EMF, **kw)


@dataclasses.dataclass(frozen=True)
class _DispatchForm:
  """How a dispatch kind executes a decision, and the settings it reads.

  execute: (decision, x_GSM, keep_EGCF, wi, wo, wg, *, config, expert_axis, model_axis) ->
    (y_GSM, RoutingStats), inside shard_map. validate: (MoeConfig) -> None, raising ConfigError.
  uncapped: routing runs with capacity S, so every assignment is kept.
  """

  execute: Callable[..., Any]
  validate: Callable[[Any], None]
  uncapped: bool = False


_FORMS = {
    DispatchKind.EINSUM: _DispatchForm(_capacity_experts, dropless.check_capacity_form),
    DispatchKind.INDEX: _DispatchForm(_capacity_experts, dropless.check_capacity_form),
    DispatchKind.DROPLESS: _DispatchForm(_dropless_experts, dropless.check_dropless_form,
                                         uncapped=True),
}


def _router_logits(x_GSM, jitter_TM, router_MX, inputs: RouterInputs, router: RouterConfig):
  """Float32 router logits (G, S, X), and which tokens have finite input and logits (G, S).

  The matmul runs in `router.dtype` (float32 by default; bfloat16 rounds input, weight and
  logits to bfloat16 before the float32 routing).

  X = E * logits_per_expert of the router family, whose `logits` function (soft MoE's
  normalised logits) replaces x @ w where it has one. A token holding NaN or inf, in its input or
  (by overflow) in its logits, is routed as padding (`route` does the same for non-finite
  logits). Its input row is set to zero before the matmul: the weight gradient x^T g would
  otherwise multiply that row's zero cotangent by NaN/inf and make the whole router gradient NaN.
  Finite rows pass unchanged.
  """
  G, S, M = x_GSM.shape
  finite_GS = jnp.all(jnp.isfinite(x_GSM), axis=-1)
  router_in_GSM = jnp.where(finite_GS[..., None], x_GSM, jnp.zeros_like(x_GSM))
  dtype = _ROUTER_DTYPES[router.dtype]
  router_in_GSM = router_in_GSM.astype(dtype)
  if jitter_TM is not None:
    router_in_GSM = router_in_GSM * jitter_TM.reshape(G, S, M).astype(dtype)
  logits_fn = router.family.logits
  if logits_fn is None:
    logits_GSX = jnp.einsum("GSM,MX->GSX", router_in_GSM, router_MX.astype(dtype))
  else:
    logits_GSX = logits_fn(router_in_GSM, router_MX.astype(dtype), inputs)
  logits_GSX = logits_GSX.astype(jnp.float32)
  return logits_GSX, finite_GS & jnp.all(jnp.isfinite(logits_GSX), axis=-1)


# `RouterConfig.dtype`: the router matmul's precision (the rest of routing is float32).
_ROUTER_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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
    self.shared = nnx.data(None)
    if config.shared_ffn_dim > 0:
      self.shared = SharedExperts(M, config.shared_ffn_dim, config.activation, rngs=rngs,
                                  param_dtype=param_dtype)
    needs_rng = (config.router.jitter_eps > 0 or config.expert_dropout > 0 or
                 bool(config.router.family.random_inputs(config.router)))
    self.rngs = rngs.fork() if needs_rng else None
    # Set to True to get the routing decision in MoeAux.routing (off: nothing changes).
    self.record_routing = False

  def __call__(self, x_BLM: jax.Array, *, padding_mask_BL: jax.Array | None = None,
               token_ids_BL: jax.Array | None = None, train: bool = False,
               group_size: int | None = None) -> tuple[jax.Array, MoeAux]:
    """y (B, L, M) and MoeAux; `token_ids_BL` for routers that route by token id (hash).

    y is the routed experts' output plus, when `shared_ffn_dim` > 0, the shared experts'.

    `group_size` replaces `config.group_size` for this call (capacity follows it). Decoding
    routes each token alone with `group_size=1`: a token-choice router's capacity is then
    max(min_capacity, ceil(k * capacity_factor / E)) capped at 1, i.e. exactly 1 slot per
    expert, so the token's k distinct choices are all kept and no token is ever dropped; nor can
    another token change its routing.

    In training, the aux-loss-free balancing bias (when on) moves after routing by
    `bias_update_rate * sign(mean load - load)` over the whole batch (Wang et al. 2024).
    """
    B, L, M = x_BLM.shape
    cfg = self.config
    if group_size is not None and group_size != cfg.group_size:
      cfg = dataclasses.replace(cfg, group_size=group_size)
    dtype = cfg.compute_dtype
    x_TM = x_BLM.reshape(B * L, M).astype(dtype)
    mask_T = None if padding_mask_BL is None else padding_mask_BL.reshape(B * L).astype(bool)
    mesh = jax.sharding.get_abstract_mesh()
    X = sharding.mesh_axis_size(mesh, sharding.EXPERT)
    token_shards = X * sharding.mesh_axis_size(mesh, sharding.DATA)
    _check_shapes(cfg, B * L, token_shards, X)
    jitter, keep, inputs = self._random_inputs(cfg, B * L, train, mesh)
    inputs = self._state_inputs(inputs, token_ids_BL)
    weights = (self.router[...], self.wi[...].astype(dtype), self.wo[...].astype(dtype),
               None if self.wg is None else self.wg[...].astype(dtype))
    args = (x_TM, mask_T, jitter, keep, inputs, *weights)
    if mesh.empty:
      y_TM, (stats, routing_GS) = _moe_tokens(*args, config=cfg, train=train,
                                              record_routing=self.record_routing)
    else:
      y_TM, (stats, routing_GS) = _sharded(cfg, train, mesh, self.record_routing)(*args)
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
    if self.shared is not None:
      with jax.named_scope("shared_experts"):
        y_BLM = y_BLM + self.shared(x_BLM, dtype=dtype, padding_mask_BL=padding_mask_BL)
    return y_BLM, MoeAux(aux_loss=aux_loss, losses=losses, metrics=metrics,
                         kept_GE=stats.kept_GE, routing=routing_GS)

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

  def _random_inputs(self, cfg: MoeConfig, num_tokens: int, train: bool, mesh):
    """Router jitter, the expert-dropout mask and the router family's random inputs for one call.

    Drawn in the global view with the layouts the per-device body uses (threefry is
    partitionable), so every device gets its slice of the same numbers under any mesh and the
    sharded layer stays equal to the single-device layer in training too.
    """
    router = cfg.router
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


def _sharded(cfg: MoeConfig, train: bool, mesh, record_routing: bool = False):
  """The per-device body wrapped in shard_map over the context mesh."""
  names = set(mesh.axis_names)
  expert_axis = sharding.EXPERT if sharding.EXPERT in names else None
  model_axis = sharding.MODEL if sharding.MODEL in names else None
  specs = _specs(mesh)
  tokens = specs["tokens"]
  body = functools.partial(_moe_tokens, config=cfg, train=train, expert_axis=expert_axis,
                           model_axis=model_axis, record_routing=record_routing)

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
    # Every leaf of the stats (and of the recorded routing) has a leading group axis, split like
    # the tokens.
    fn = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=(tokens, tokens))
    return fn(*args)

  return run
