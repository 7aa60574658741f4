"""A transformer language model whose FFN is an MoE layer every `moe_every` blocks.

`model.objective` makes it a decoder (causal_lm: causal attention, next-token prediction) or an
encoder (masked_lm: bidirectional attention, masked-token prediction; moejax/objective.py).

Dimensions (docs/design.md): B batch, L sequence (query positions), M model width, F FFN width,
H heads, D head width, V vocabulary. Attention also needs the key positions, written T (the same
length as L; T is not a token count here), and RoPE the R = D/2 rotated pairs of a head.

    inputs (B, L) int -> embedding (B, L, M)
      -> num_layers x block:  x + attention(rms_norm(x))   causal or bidirectional, RoPE
                              x + ffn(rms_norm(x))         dense FFN or MoeLayer
      -> rms_norm -> logits (B, L, V) float32               tied to the embedding or separate

Block i holds an `MoeLayer` when `moe_every >= 1` and `(i + 1) % moe_every == 0` (blocks
n-1, 2n-1, ...; Switch Transformer used every other block, n = 2).

Precision: parameters are stored in `param_dtype` and cast to the compute `dtype`; RMSNorm
statistics, attention scores and softmax, and the output logits are float32 whatever `dtype` is,
and the router always runs in float32 inside `MoeLayer`.

Sharding: every parameter names its logical axes (`sharding.param`); under `jax.set_mesh(mesh)` the
dense parts are plain jnp code partitioned by the compiler (batch over ("data", "expert"), heads
and F over "model"), and each MoeLayer runs its own `shard_map`.

Causality: token-choice routing with a capacity limit lets tokens compete for expert slots within a
routing group. Claimed in position order (`model.moe.router.claim_order="position"`, the default),
a token's slots depend only on the tokens before it in its group: earlier positions of its own
sequence and, where a group spans several sequences, earlier sequences of the batch, never a later
position of its own. Batch-prioritised claims, GShard's choice order with k >= 2, and the routers
that decide from the whole group (expert choice, soft MoE, Sinkhorn in training) let a later token
change an earlier token's routing: in the causal LM `check_causality` refuses them unless
`model.moe.router.allow_noncausal=True`; the masked LM (`model.objective="masked_lm"`) takes any.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from fractions import Fraction
from typing import ClassVar

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from moejax import init_scale as init_scale_lib
from moejax import sharding, typed_config
from moejax.attention import Attention, AttentionImpl, KvCache, padding_mask
from moejax.moe import Activation, MoeAux, MoeConfig, MoeLayer, parse_dtype
from moejax.objective import MaskedLmConfig, Objective
from moejax.remat import Remat
from moejax import remat as remat_lib
from moejax.typed_config import ConfigError, parse_enum

RMS_NORM_EPS = 1e-6


# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Typed settings of the transformer (`model`). See the module docstring for the architecture.

  Attributes:
    vocab_size: V (None in an experiment file: the tokenizer's vocabulary size).
    num_layers: number of transformer blocks.
    model_dim: M, the residual-stream width.
    num_heads / head_dim: H and D of multi-head attention (D even, for RoPE).
    ffn_dim: F of the dense FFN blocks (MoE blocks use `moe.ffn_dim`).
    activation: "relu", "gelu" or "swiglu" for the dense FFN (MoE blocks use `moe.activation`).
    moe_every: 0 for a dense model; n >= 1 puts an MoeLayer in blocks n-1, 2n-1, ...
    moe: the MoE layer settings; required when moe_every > 0, unused (None) when it is 0.
    dtype: compute dtype, "float32" or "bfloat16".
    param_dtype: storage dtype of the parameters.
    dropout_rate: residual dropout (after attention and after the FFN), in training only.
    rope_base: base of the rotary position embedding frequencies.
    tie_embeddings: reuse the embedding (V, M) as the output projection.
    remat: what each block keeps for the backward pass: "none", "full" or "save_matmuls"
      (moejax/remat.py).
    objective: "causal_lm" (causal attention, next-token loss) or "masked_lm" (bidirectional
      attention, masked-token loss; V includes the mask token). See moejax/objective.py.
    masked_lm: the masked-LM corruption settings; unused (None) under causal_lm.
    attention_impl: the implementation of `jax.nn.dot_product_attention`: "auto" (cuDNN on
      NVIDIA GPUs in bfloat16, else XLA), "xla", or "cudnn" (fused flash attention on NVIDIA
      GPUs; needs dtype="bfloat16"). See moejax/attention.py.
    init_scale: s, multiplying the variance of every weight matrix initialised by variance
      scaling (Switch Transformer Sec. 2.3: 0.1 cuts the spread over seeds); 1.0 is the usual
      initialisation. Which parameters it scales: moejax/init_scale.py.
  """

  PATH: ClassVar[str] = "model"

  vocab_size: int
  num_layers: int = 4
  model_dim: int = 256
  num_heads: int = 4
  head_dim: int = 64
  ffn_dim: int = 1024
  activation: Activation = Activation.RELU
  moe_every: int = 0
  moe: MoeConfig | None = None
  dtype: str = "float32"
  param_dtype: str = "float32"
  dropout_rate: float = 0.0
  rope_base: float = 10000.0
  tie_embeddings: bool = True
  remat: Remat = Remat.NONE
  objective: Objective = Objective.CAUSAL_LM
  masked_lm: MaskedLmConfig | None = None
  attention_impl: AttentionImpl = AttentionImpl.AUTO
  init_scale: float = 1.0

  def __post_init__(self):
    typed_config.check_fields(self)
    fail = lambda name, must: _fail(self, name, must)
    for name in ("vocab_size", "num_layers", "model_dim", "num_heads", "head_dim", "ffn_dim"):
      if getattr(self, name) < 1:
        fail(name, "must be an integer >= 1.")
    if self.head_dim % 2:
      fail("head_dim", "must be even: RoPE rotates pairs of dimensions.")
    if not 0 <= self.moe_every <= self.num_layers:
      fail("moe_every", f"must be an integer in [0, num_layers={self.num_layers}] (0: dense "
           "model; n: an MoE FFN in every n-th block).")
    if self.moe_every > 0 and self.moe is None:
      fail("moe", f"is not allowed with model.moe_every={self.moe_every}: the MoE blocks need "
           "MoE settings (or set moe_every=0 for a dense model).")
    parse_dtype("model.dtype", self.dtype)
    parse_dtype("model.param_dtype", self.param_dtype)
    if not 0.0 <= self.dropout_rate < 1.0:
      fail("dropout_rate", "must be in [0, 1).")
    if not self.rope_base > 1.0:
      fail("rope_base", "must be a number > 1.")
    if not self.init_scale > 0.0:
      fail("init_scale", "must be a finite number > 0 (1.0: the usual initialisation).")
    if self.attention_impl is AttentionImpl.CUDNN and self.dtype != "bfloat16":
      fail("attention_impl", f"needs model.dtype='bfloat16' (cuDNN's fused attention takes "
           f"16-bit inputs; model.dtype={self.dtype!r}); choose 'auto' or 'xla' for "
           f"{self.dtype}.")
    if self.objective is Objective.MASKED_LM and self.vocab_size < 3:
      fail("vocab_size", "must be >= 3 with model.objective='masked_lm': padding, at least one "
           "token and the mask token.")
    typed_config.check_unused(self)
    if self.objective is Objective.CAUSAL_LM:
      object.__setattr__(self, "masked_lm", None)
    elif self.masked_lm is None:
      object.__setattr__(self, "masked_lm", MaskedLmConfig())
    if self.moe_every == 0:
      object.__setattr__(self, "moe", None)
    elif self.moe.dtype is None:  # the experts compute in the model's dtype unless set
      object.__setattr__(self, "moe", dataclasses.replace(self.moe, dtype=self.dtype))
    check_causality(self)

  def unused_fields(self) -> dict[str, str]:
    unused = {}
    if self.moe_every == 0:
      unused["moe"] = "model.moe_every=0 builds a dense model, which has no MoE layer"
    if self.objective is Objective.CAUSAL_LM:
      unused["masked_lm"] = "model.objective='causal_lm' masks no tokens"
    return unused

  @property
  def causal(self) -> bool:
    """Whether a position may depend only on itself and earlier positions (causal_lm).

    A masked LM sees the whole sequence, so routers that look at later tokens of their group
    are legitimate there.
    """
    return self.objective is Objective.CAUSAL_LM

  def is_moe_block(self, index: int) -> bool:
    """Whether block `index` (0-based) holds an MoeLayer instead of a dense FFN."""
    return self.moe_every > 0 and (index + 1) % self.moe_every == 0


def _fail(config, name: str, must: str):
  raise ConfigError(typed_config.path_of(config, name), getattr(config, name), must)


def noncausal_routing(config: ModelConfig) -> bool:
  """Whether this causal LM routes with a router that looks at later tokens (allowed explicitly):
  its results are then marked non-causal in the run's output and metrics."""
  return bool(config.moe is not None and config.causal and not (
      config.moe.router.causal(train=True) and config.moe.router.causal(train=False)))


def check_causality(config: ModelConfig) -> None:
  """Refuses a router that looks at later tokens in this causal language model, unless allowed.

  Expert choice, soft MoE and Sinkhorn in training decide a token's routing from every token of
  its group; batch-prioritised and choice-ordered capacity claims let a later token take an
  earlier token's slot. A token's output can then depend on later tokens: next-token prediction
  sees the future. Such a router needs `model.moe.router.allow_noncausal=True`, and its results
  are non-causal. A bidirectional (masked-LM) model, where every router is legitimate, skips this
  check. Raises ConfigError naming the field that makes the router non-causal and the flag.
  """
  if config.moe is None or not config.causal:
    return
  router = config.moe.router
  reasons = {mode: router.lookahead(train=train)
             for mode, train in (("training", True), ("evaluation", False))}
  noncausal = [mode for mode, reason in reasons.items() if reason is not None]
  if noncausal and not router.allow_noncausal:
    field, why = reasons[noncausal[0]]
    raise ConfigError(
        typed_config.path_of(router, field), getattr(router, field),
        f"is not causal in {' and '.join(noncausal)}: {why}, which the causal language model "
        f"does not allow. Set {typed_config.path_of(router, 'allow_noncausal')}=True to use it "
        "anyway (the results are then non-causal), or choose a causal router.")


def model_config_from(cfg: ml_collections.ConfigDict | Mapping, *,
                      vocab_size: int | None = None) -> ModelConfig:
  """Turns the experiment's `config.model` into a validated ModelConfig.

  `cfg.moe` holds MoeConfig fields and `cfg.moe.router` RouterConfig fields; a dense model
  (`moe_every=0`) leaves them at their defaults. `vocab_size`, when given, overrides
  `cfg.vocab_size` (the data pipeline knows it). Unknown fields raise ConfigError.
  """
  fields = typed_config.as_dict(cfg, "model")
  if vocab_size is not None:
    fields["vocab_size"] = vocab_size
  if fields.get("vocab_size") is None:
    raise ConfigError("model.vocab_size", None, "is missing: set it in the config or pass "
                      "vocab_size=.")
  return typed_config.build(ModelConfig, fields)


# ----------------------------------------------------------------------------- pure functions


def rms_norm(x_BLM: jax.Array, scale_M: jax.Array, eps: float = RMS_NORM_EPS) -> jax.Array:
  """x / sqrt(mean(x^2) + eps) * scale, computed in float32 and returned in x's dtype."""
  x32_BLM = x_BLM.astype(jnp.float32)
  inv_rms_BL1 = jax.lax.rsqrt(jnp.mean(jnp.square(x32_BLM), axis=-1, keepdims=True) + eps)
  return (x32_BLM * inv_rms_BL1 * scale_M.astype(jnp.float32)).astype(x_BLM.dtype)


# ----------------------------------------------------------------------------- modules


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, *, param_dtype):
    self.scale = sharding.param(jnp.ones((dim,), param_dtype), ("embed",))

  def __call__(self, x_BLM: jax.Array) -> jax.Array:
    return rms_norm(x_BLM, self.scale[...])


class DenseFfn(nnx.Module):
  """x -> act(x W_in) W_out, or (silu(x W_gate) * x W_in) W_out for swiglu."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    M, F = config.model_dim, config.ffn_dim
    pdt = parse_dtype("model.param_dtype", config.param_dtype)
    self.dtype = parse_dtype("model.dtype", config.dtype)
    self.activation = parse_enum(Activation, "model.activation", config.activation)
    init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    self.wi = sharding.param(init(rngs.params(), (M, F), pdt), ("embed", "mlp"))
    self.wo = sharding.param(init(rngs.params(), (F, M), pdt), ("mlp", "embed"))
    # The attribute is data (a Param) or None; NNX needs to know which before the first assignment.
    self.wg = nnx.data(None)
    if self.activation is Activation.SWIGLU:
      self.wg = sharding.param(init(rngs.params(), (M, F), pdt), ("embed", "mlp"))

  def __call__(self, x_BLM: jax.Array) -> jax.Array:
    dt = self.dtype
    h_BLF = jnp.einsum("BLM,MF->BLF", x_BLM, self.wi[...].astype(dt))
    if self.activation is Activation.RELU:
      h_BLF = jax.nn.relu(h_BLF)
    elif self.activation is Activation.GELU:
      h_BLF = jax.nn.gelu(h_BLF)
    else:
      gate_BLF = jnp.einsum("BLM,MF->BLF", x_BLM, self.wg[...].astype(dt))
      h_BLF = jax.nn.silu(gate_BLF) * h_BLF
    return jnp.einsum("BLF,FM->BLM", h_BLF, self.wo[...].astype(dt),
                      out_sharding=sharding.batch_sharded_like(x_BLM, 3))


class Block(nnx.Module):
  """Pre-norm block: x + attention(norm(x)), then x + ffn(norm(x)) with a dense or MoE FFN."""

  def __init__(self, config: ModelConfig, index: int, *, rngs: nnx.Rngs):
    pdt = parse_dtype("model.param_dtype", config.param_dtype)
    self.attention_norm = RMSNorm(config.model_dim, param_dtype=pdt)
    self.attention = Attention(config, rngs=rngs)
    self.ffn_norm = RMSNorm(config.model_dim, param_dtype=pdt)
    self.is_moe = config.is_moe_block(index)
    if self.is_moe:
      self.ffn = MoeLayer(config.model_dim, config.moe, rngs=rngs, param_dtype=pdt,
                          vocab_size=config.vocab_size)
    else:
      self.ffn = DenseFfn(config, rngs=rngs)
    rate = config.dropout_rate
    self.dropout = nnx.Dropout(rate, rngs=rngs if rate > 0 else None)

  def __call__(self, x_BLM: jax.Array, padding_B1LT: jax.Array | None, mask_BL: jax.Array | None,
               train: bool, inputs_BL: jax.Array | None = None,
               routing_group_size: int | None = None) -> tuple[jax.Array, MoeAux | None]:
    with jax.named_scope("attention"):
      y_BLM = self.attention(self.attention_norm(x_BLM), padding_B1LT)
      x_BLM = x_BLM + self.dropout(y_BLM, deterministic=not train)
    y_BLM, aux = self._ffn(self.ffn_norm(x_BLM), mask_BL, train, inputs_BL, routing_group_size)
    x_BLM = x_BLM + self.dropout(y_BLM.astype(x_BLM.dtype), deterministic=not train)
    return x_BLM, aux

  def decode(self, x_BLM: jax.Array, cache: KvCache, inputs_BL: jax.Array
             ) -> tuple[jax.Array, KvCache, MoeAux | None]:
    """The block on the next L tokens after `cache` (evaluation mode, MoE groups of one token)."""
    with jax.named_scope("attention"):
      y_BLM, cache = self.attention.decode(self.attention_norm(x_BLM), cache)
      x_BLM = x_BLM + y_BLM
    y_BLM, aux = self._ffn(self.ffn_norm(x_BLM), None, False, inputs_BL, 1)
    return x_BLM + y_BLM.astype(x_BLM.dtype), cache, aux

  def _ffn(self, h_BLM, mask_BL, train, inputs_BL, routing_group_size):
    if not self.is_moe:
      with jax.named_scope("ffn"):
        return self.ffn(h_BLM), None
    with jax.named_scope("moe"):
      return self.ffn(h_BLM, padding_mask_BL=mask_BL, train=train, group_size=routing_group_size,
                      token_ids_BL=inputs_BL if self.ffn.hash_table is not None else None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelAux:
  """What the model returns beside its logits."""

  aux_loss: jax.Array  # sum over MoE layers of MoeAux.aux_loss (0.0 for a dense model)
  moe: dict[str, MoeAux]  # per MoE layer, key f"layer_{i}" (empty for a dense model)


class Transformer(nnx.Module):
  """The LM (a decoder or, for masked_lm, an encoder): (B, L) token ids -> (logits (B, L, V)
  float32, ModelAux)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    V, M = config.vocab_size, config.model_dim
    pdt = parse_dtype("model.param_dtype", config.param_dtype)
    self.dtype = parse_dtype("model.dtype", config.dtype)
    embed_init = jax.nn.initializers.normal(stddev=1.0)
    self.embed = sharding.param(embed_init(rngs.params(), (V, M), pdt), ("vocab", "embed"))
    self.blocks = nnx.List([Block(config, i, rngs=rngs) for i in range(config.num_layers)])
    self.final_norm = RMSNorm(M, param_dtype=pdt)
    self.unembed = nnx.data(None)
    if not config.tie_embeddings:
      init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
      self.unembed = sharding.param(init(rngs.params(), (M, V), pdt), ("embed", "vocab"))
    init_scale_lib.rescale(self, config.init_scale)

  def __call__(self, inputs_BL: jax.Array, *, mask_BL: jax.Array | None = None,
               train: bool = False, routing_group_size: int | None = None
               ) -> tuple[jax.Array, ModelAux]:
    """Logits (B, L, V) float32 and ModelAux.

    Args:
      inputs_BL: int token ids.
      mask_BL: True for real tokens, False for padding (None: all real). Padding is excluded from
        the MoE layers' routing (no capacity, no loss or metric) and from the attention keys.
      train: enables dropout, router jitter and the training capacity factor.
      routing_group_size: route the MoE layers' tokens in groups of this many instead of
        `model.moe.group_size`; 1 routes each token alone, as `decode` does.
    """
    L = inputs_BL.shape[1]
    x_BLM = self._embed(inputs_BL)
    padding_B1LT = padding_mask(L, mask_BL)
    aux_by_layer = {}
    run_block = remat_lib.wrap(
        lambda block, x, padding, mask, inputs: block(x, padding, mask, train, inputs,
                                                      routing_group_size),
        self.config.remat)
    for i, block in enumerate(self.blocks):
      x_BLM, aux = run_block(block, x_BLM, padding_B1LT, mask_BL, inputs_BL)
      if aux is not None:
        aux_by_layer[f"layer_{i}"] = aux
    aux_loss = sum((a.aux_loss for a in aux_by_layer.values()), jnp.zeros((), jnp.float32))
    return self._logits(x_BLM), ModelAux(aux_loss=aux_loss, moe=aux_by_layer)

  def init_cache(self, batch: int, max_length: int) -> list[KvCache]:
    """Empty key/value caches, one per block, for decoding up to `max_length` positions."""
    config = self.config
    return [KvCache.empty(batch, max_length, config.num_heads, config.head_dim, self.dtype)
            for _ in self.blocks]

  def decode(self, inputs_BL: jax.Array, caches: list[KvCache]
             ) -> tuple[jax.Array, list[KvCache], ModelAux]:
    """Logits (B, L, V) of the next L tokens of every row, continuing the sequences in `caches`.

    A causal LM only. The first call (empty caches) is the prompt's prefill, later calls feed
    one token at a time; every position is a real token. Evaluation mode, and the MoE layers
    route each token alone (groups of one token, `MoeLayer`), so a token's logits and experts
    never depend on other tokens' routing; `__call__(..., routing_group_size=1)` on the whole
    sequence gives the same logits. Returns the updated caches and ModelAux, whose
    `moe[layer].kept_GE` reshaped to (B, L, E) says which experts each token took.
    """
    if not self.config.causal:
      raise ValueError(f"model.objective={self.config.objective.value!r}: decoding needs a "
                       "causal language model ('causal_lm').")
    x_BLM = self._embed(inputs_BL)
    aux_by_layer, new_caches = {}, []
    for i, (block, cache) in enumerate(zip(self.blocks, caches)):
      x_BLM, cache, aux = block.decode(x_BLM, cache, inputs_BL)
      new_caches.append(cache)
      if aux is not None:
        aux_by_layer[f"layer_{i}"] = aux
    aux_loss = sum((a.aux_loss for a in aux_by_layer.values()), jnp.zeros((), jnp.float32))
    return self._logits(x_BLM), new_caches, ModelAux(aux_loss=aux_loss, moe=aux_by_layer)

  def _embed(self, inputs_BL: jax.Array) -> jax.Array:
    return self.embed[...].at[inputs_BL].get(
        out_sharding=sharding.batch_sharded_like(inputs_BL, 3)).astype(self.dtype)

  def _logits(self, x_BLM: jax.Array) -> jax.Array:
    """Final norm and output projection: float32 logits (B, L, V)."""
    x_BLM = self.final_norm(x_BLM)
    if self.unembed is None:
      # The embedding rows have unit scale; M^-1/2 keeps the initial logits at unit scale too.
      logits_BLV = jnp.einsum("BLM,VM->BLV", x_BLM, self.embed[...].astype(self.dtype),
                              preferred_element_type=jnp.float32)
      logits_BLV = logits_BLV * (self.config.model_dim ** -0.5)
    else:
      logits_BLV = jnp.einsum("BLM,MV->BLV", x_BLM, self.unembed[...].astype(self.dtype),
                              preferred_element_type=jnp.float32)
    return logits_BLV.astype(jnp.float32)


# ----------------------------------------------------------------------------- accounting


def active_ffn_flops_per_token(config: ModelConfig) -> int:
  """Forward FLOPs per token of all FFN / MoE blocks, counting only the experts a token uses.

  A matmul of widths (M, F) costs 2*M*F FLOPs per token (multiply and add). A dense block has two
  such matmuls (three with swiglu); an MoE block runs `expert_rows_per_token` experts of width
  moe.ffn_dim and its shared experts of width moe.shared_ffn_dim. The router (2*M*E),
  activations and dispatch are left out, so that a dense FFN of width F, a top-1 MoE of expert
  width F and a top-2 MoE of expert width F/2 count the same. An int, or a float where expert
  choice or soft MoE give a fractional row count.
  """
  M = config.model_dim
  total = Fraction(0)
  for i in range(config.num_layers):
    if config.is_moe_block(i):
      moe = config.moe
      matmuls = 3 if moe.activation is Activation.SWIGLU else 2
      total += (expert_rows_per_token(moe) * moe.ffn_dim + moe.shared_ffn_dim) * matmuls * 2 * M
    else:
      activation = parse_enum(Activation, "model.activation", config.activation)
      matmuls = 3 if activation is Activation.SWIGLU else 2
      total += matmuls * 2 * M * config.ffn_dim
  return int(total) if total.denominator == 1 else float(total)


def expert_rows_per_token(moe: MoeConfig) -> Fraction:
  """Expert input rows computed per token: k for token choice; E * C / S when k is not a setting.

  Expert choice fills C = ceil(capacity_factor * S / E) slots of each expert per group of S
  tokens (training capacity), soft MoE p slots of each expert: E * C rows for S tokens.
  """
  router = moe.router
  if router.k is not None:
    return Fraction(router.k)
  slots = router.num_experts * router.capacity(moe.group_size, train=True)
  return Fraction(slots, moe.group_size)


def num_params(model: nnx.Module) -> int:
  """Number of parameters (every expert counted)."""
  return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
