"""Router settings (`model.moe.router`): the common fields and one typed group per family.

Fields every router reads: `kind`, `num_experts`, `jitter_eps`, `z_loss_weight`, and
`allow_noncausal` for the kinds that are not causal in training or evaluation. The others are
read by some families only (`family.OPTIONAL_FIELDS`); a field the chosen kind does not read must
keep its default, so a setting is never silently ignored.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import ClassVar

from moejax import typed_config
from moejax.routing import family as family_lib
from moejax.typed_config import ConfigError


class RouterKind(enum.Enum):
  """Which routing algorithm a layer uses (README: the router table)."""

  SWITCH = "switch"  # top-1, Fedus et al. 2021
  GSHARD = "gshard"  # top-2 with renormalised gates, Lepikhin et al. 2020
  TOPK = "topk"  # any k; Mixtral-style renormalised or Qwen/OLMoE-style raw softmax weights
  NOISY_TOPK = "noisy_topk"  # Shazeer et al. 2017; V-MoE's fixed-noise variant
  EXPERT_CHOICE = "expert_choice"  # experts pick tokens, Zhou et al. 2022
  SOFT = "soft"  # soft slots, Puigcerver et al. 2023
  SINKHORN = "sinkhorn"  # balanced assignment (S-BASE), Clark et al. 2022
  HASH = "hash"  # expert from the token id, Roller et al. 2021
  RANDOM = "random"  # uniformly random experts (a baseline and a load test)
  DEEPSEEK = "deepseek"  # sigmoid / group-limited routing, DeepSeek-V2/V3


class SecondExpertPolicy(enum.Enum):
  """GShard's treatment of each token's second expert (applied in training only)."""

  ALL = "all"  # always dispatch to the second expert
  RANDOM = "random"  # keep it with probability min(1, g2 / threshold)


class ClaimOrder(enum.Enum):
  """The order in which a token-choice router's assignments claim expert capacity (k >= 2)."""

  # Token by token in position order, each token's choices in preference order (as a sequence is
  # read): a token's slots depend on itself and earlier tokens only, so it is causal.
  POSITION = "position"
  # Every token's first choice, then every second choice, ... (GShard, Lepikhin et al. 2020,
  # Algorithm 1): a later token's first choice outranks an earlier token's second, so once
  # capacity drops assignments a token's routing depends on later tokens (not causal).
  CHOICE = "choice"


class NoiseKind(enum.Enum):
  LEARNED = "learned"  # N(0, 1) * softplus(x W_noise), Shazeer et al. 2017 eq. 4
  FIXED = "fixed"  # N(0, noise_std^2), V-MoE (Riquelme et al. 2021)


class HashTableKind(enum.Enum):
  RANDOM = "random"  # a seeded uniformly random expert per vocabulary entry
  BALANCED = "balanced"  # tokens spread so that experts get equal training-token counts


class DeepseekScore(enum.Enum):
  SIGMOID = "sigmoid"  # DeepSeek-V3
  SOFTMAX = "softmax"  # DeepSeek-V2


def _fail(config, name: str, must: str):
  raise ConfigError(typed_config.path_of(config, name), getattr(config, name), must)


def _check_non_negative(config, *names):
  for name in names:
    if getattr(config, name) < 0:
      _fail(config, name, "must be >= 0.")


@dataclasses.dataclass(frozen=True)
class NoisyTopkConfig:
  """`noisy_topk`: noise on the logits before KeepTopK, and the importance and load losses.

  Attributes:
    noise: "learned" (Shazeer et al. 2017: softplus(x W_noise) scales N(0, 1)) or "fixed"
      (V-MoE: N(0, noise_std^2)).
    noise_std: the fixed noise's standard deviation ("fixed" only).
    importance_loss_weight: weight of CV(Importance)^2 (eq. 6).
    load_loss_weight: weight of CV(Load)^2 with the smooth load estimator (eq. 8-10).
  """

  PATH: ClassVar[str] = "model.moe.router.noisy_topk"
  noise: NoiseKind = NoiseKind.LEARNED
  noise_std: float = 1.0
  importance_loss_weight: float = 1e-2
  load_loss_weight: float = 1e-2

  def __post_init__(self):
    typed_config.check_fields(self)
    if not self.noise_std > 0:
      _fail(self, "noise_std", "must be > 0.")
    _check_non_negative(self, "importance_loss_weight", "load_loss_weight")
    typed_config.check_unused(self)

  def unused_fields(self):
    if self.noise is NoiseKind.LEARNED:
      return {"noise_std": f"{self.PATH}.noise='learned' learns the noise scale"}
    return {}


@dataclasses.dataclass(frozen=True)
class SoftConfig:
  """`soft`: Soft MoE's slots.

  Attributes:
    slots_per_expert: p, the slots of each expert (the capacity C).
  """

  PATH: ClassVar[str] = "model.moe.router.soft"
  slots_per_expert: int = 1

  def __post_init__(self):
    typed_config.check_fields(self)
    if self.slots_per_expert < 1:
      _fail(self, "slots_per_expert", "must be an integer >= 1.")


@dataclasses.dataclass(frozen=True)
class SinkhornConfig:
  """`sinkhorn`: the balancing iterations of S-BASE routing in training.

  Attributes:
    iterations: at most this many Sinkhorn rounds (each rescales the experts' totals to their
      share N / E of a group's N real tokens, then each token's total to 1).
    tolerance: a group stops earlier once every expert's total is within this relative error
      of N / E.
  """

  PATH: ClassVar[str] = "model.moe.router.sinkhorn"
  iterations: int = 10
  tolerance: float = 1e-3

  def __post_init__(self):
    typed_config.check_fields(self)
    if self.iterations < 1:
      _fail(self, "iterations", "must be an integer >= 1.")
    if not self.tolerance > 0:
      _fail(self, "tolerance", "must be > 0.")


@dataclasses.dataclass(frozen=True)
class HashConfig:
  """`hash`: the fixed token-id -> expert table of hash routing.

  Attributes:
    table: "random" (seeded) or "balanced" (from the training split's token counts).
    seed: seeds the random table (and breaks ties of the balanced one).
  """

  PATH: ClassVar[str] = "model.moe.router.hash"
  table: HashTableKind = HashTableKind.RANDOM
  seed: int = 0

  def __post_init__(self):
    typed_config.check_fields(self)
    if self.seed < 0:
      _fail(self, "seed", "must be an integer >= 0.")


@dataclasses.dataclass(frozen=True)
class DeepseekConfig:
  """`deepseek`: DeepSeek-V2/V3 routing (moejax/routing/deepseek.py).

  Attributes:
    score: "sigmoid" (V3) or "softmax" (V2) affinities.
    num_groups / topk_groups: group-limited routing: the experts form num_groups contiguous
      groups (num_groups must divide num_experts), and a token chooses its k experts among the
      topk_groups best groups only (k <= topk_groups * num_experts / num_groups).
    group_score_experts: a group's score is the sum of its group_score_experts largest
      affinities (+ balancing bias): 2 in DeepSeek-V3, 1 (the group's maximum) in DeepSeek-V2.
      Read only when num_groups > 1.
    routed_scaling_factor: multiplies the routed experts' weights.
    sequence_balance_loss_weight: weight of the sequence-wise balance loss (V3 eq. 17-20),
      computed per routing group.
  """

  PATH: ClassVar[str] = "model.moe.router.deepseek"
  score: DeepseekScore = DeepseekScore.SIGMOID
  num_groups: int = 1
  topk_groups: int = 1
  group_score_experts: int = 2
  routed_scaling_factor: float = 1.0
  sequence_balance_loss_weight: float = 0.0

  def __post_init__(self):
    typed_config.check_fields(self)
    if self.num_groups < 1:
      _fail(self, "num_groups", "must be an integer >= 1.")
    if not 1 <= self.topk_groups <= self.num_groups:
      _fail(self, "topk_groups", f"must be an integer in [1, num_groups={self.num_groups}].")
    if self.group_score_experts < 1:
      _fail(self, "group_score_experts", "must be an integer >= 1.")
    if not self.routed_scaling_factor > 0:
      _fail(self, "routed_scaling_factor", "must be > 0.")
    _check_non_negative(self, "sequence_balance_loss_weight")
    typed_config.check_unused(self)

  def unused_fields(self):
    if self.num_groups == 1:
      return {"group_score_experts": f"{self.PATH}.num_groups=1 does not limit groups"}
    return {}


@dataclasses.dataclass(frozen=True)
class BalanceConfig:
  """`balance`: aux-loss-free load balancing (Wang et al. 2024; DeepSeek-V3).

  A per-expert bias, added to the scores for selection only, updated after each training step by
  bias_update_rate * sign(mean load - load). It is not a parameter: no gradient, no optimizer.

  Attributes:
    bias_update_rate: the update speed u; 0 turns the bias off.
  """

  PATH: ClassVar[str] = "model.moe.router.balance"
  bias_update_rate: float = 0.0

  def __post_init__(self):
    typed_config.check_fields(self)
    _check_non_negative(self, "bias_update_rate")


@dataclasses.dataclass(frozen=True)
class RouterConfig:
  """Typed, validated router settings (`model.moe.router`).

  Attributes:
    kind: the routing algorithm (`RouterKind` or its string value).
    num_experts: E.
    k: experts per token for the kinds that take it (topk, noisy_topk, sinkhorn, random,
      deepseek); switch uses 1, gshard 2 and hash 1 (leave k as None or set that value);
      expert_choice and soft take none.
    normalize_weights: renormalise the k weights to sum to 1 (Mixtral, DeepSeek-V3) or keep the
      router's probabilities (Qwen-MoE, OLMoE).
    capacity_factor_train / capacity_factor_eval: C = ceil(k * factor * S / E) (token choice),
      C = ceil(factor * S / E) (expert choice).
    min_capacity: lower bound on C.
    batch_prioritized: token choice claims capacity in order of router confidence instead of
      position (V-MoE). Not causal: a confident later token can take an earlier token's slot.
    claim_order: with k >= 2, "position" (token by token, causal) or "choice" (every first
      choice before any second choice, GShard's Algorithm 1; not causal). Unused with k = 1.
    jitter_eps: multiplicative jitter on the router input in training, uniform in [1-eps, 1+eps].
    second_expert_policy / second_expert_threshold: GShard's second-expert policy.
    load_balancing_loss_weight / z_loss_weight: coefficients of the Switch load-balancing loss
      and the router z-loss.
    allow_noncausal: let a causal language model use a router whose decisions look at later
      tokens of the group (expert choice, soft MoE, Sinkhorn in training, batch-prioritised or
      choice-ordered capacity claims); with a router that is causal in training and evaluation
      it is unused, so setting it is an error.
    dtype: the router matmul's precision: "float32" (moejax's default, Switch Transformer's
      "selective precision") or "bfloat16", the router input, weight and logits in bfloat16, as
      in Switch Transformer's unstable arm (Table 2). The softmax and every later step of routing
      are float32 either way: with logits of magnitude above about 1, the bfloat16 rounding of
      the logits (8-bit mantissa) is the larger part of a bfloat16 softmax's error.
    noisy_topk, soft, sinkhorn, hash, deepseek, balance: the family groups.
  """

  PATH: ClassVar[str] = "model.moe.router"
  DTYPES: ClassVar[tuple[str, ...]] = ("float32", "bfloat16")

  kind: RouterKind = RouterKind.SWITCH
  num_experts: int = 8
  k: int | None = None
  normalize_weights: bool = True
  capacity_factor_train: float = 1.25
  capacity_factor_eval: float = 2.0
  min_capacity: int = 4
  batch_prioritized: bool = False
  claim_order: ClaimOrder = ClaimOrder.POSITION
  jitter_eps: float = 0.0
  second_expert_policy: SecondExpertPolicy = SecondExpertPolicy.ALL
  second_expert_threshold: float = 0.2
  load_balancing_loss_weight: float = 1e-2
  z_loss_weight: float = 1e-3
  allow_noncausal: bool = False
  dtype: str = "float32"
  noisy_topk: NoisyTopkConfig = NoisyTopkConfig()
  soft: SoftConfig = SoftConfig()
  sinkhorn: SinkhornConfig = SinkhornConfig()
  hash: HashConfig = HashConfig()
  deepseek: DeepseekConfig = DeepseekConfig()
  balance: BalanceConfig = BalanceConfig()

  def __post_init__(self):
    typed_config.check_fields(self)
    if self.kind not in family_lib.REGISTRY:
      _fail(self, "kind", "is not available in this build.")
    if self.num_experts < 1:
      _fail(self, "num_experts", "must be an integer >= 1.")
    self._resolve_k()
    for name in ("capacity_factor_train", "capacity_factor_eval"):
      if not getattr(self, name) > 0:
        _fail(self, name, "must be a finite number > 0.")
    if self.min_capacity < 1:
      _fail(self, "min_capacity", "must be an integer >= 1.")
    if not 0.0 <= self.jitter_eps < 1.0:
      _fail(self, "jitter_eps", "must be in [0, 1).")
    if not self.second_expert_threshold > 0:
      _fail(self, "second_expert_threshold", "must be > 0.")
    _check_non_negative(self, "load_balancing_loss_weight", "z_loss_weight")
    if self.dtype not in self.DTYPES:
      _fail(self, "dtype", f"must be one of {', '.join(map(repr, self.DTYPES))}.")
    if self.family.validate is not None:
      self.family.validate(self)
    typed_config.check_unused(self)

  def _resolve_k(self):
    fixed_k = self.family.fixed_k
    if fixed_k == 0:
      return  # k is not a setting of this kind; check_unused refuses a value
    k = self.k if self.k is not None else fixed_k
    if k is None:
      _fail(self, "k", f"is not allowed with {self.PATH}.kind={self.kind.value!r}, which needs "
            f"k, an integer in [1, num_experts={self.num_experts}].")
    if fixed_k is not None and k != fixed_k:
      _fail(self, "k", f"is not allowed for {self.PATH}.kind={self.kind.value!r}, which routes "
            f"each token to exactly {fixed_k} expert(s); use kind='topk' for other k.")
    object.__setattr__(self, "k", k)
    if not 1 <= k <= self.num_experts:
      _fail(self, "k", f"must be an integer in [1, num_experts={self.num_experts}].")

  @property
  def family(self) -> family_lib.Family:
    return family_lib.REGISTRY[self.kind]

  def unused_fields(self) -> dict[str, str]:
    """Fields the chosen kind does not read, with the reason (see `typed_config.check_unused`)."""
    reads = self.family.reads | ({"k"} if self.family.fixed_k != 0 else set())
    kind = f"{self.PATH}.kind={self.kind.value!r}"
    unused = {name: f"{kind} does not read it" for name in family_lib.OPTIONAL_FIELDS
              if name not in reads}
    if "claim_order" in reads and self.k == 1:
      unused["claim_order"] = f"{self.PATH}.k=1: each token makes one claim"
    if self.causal(train=True) and self.causal(train=False):
      unused["allow_noncausal"] = (f"{kind} is causal in training and evaluation with these "
                                   "settings")
    return unused

  def capacity(self, group_size: int, *, train: bool) -> int:
    """C, the slots of each expert per group of `group_size` tokens."""
    return self.family.capacity(self, group_size, train)

  def lookahead(self, *, train: bool) -> tuple[str, str] | None:
    """Why a token's routing may depend on later tokens of its group: (the field that makes it
    so, the reason), or None when it depends only on itself and earlier tokens."""
    family = self.family
    if not (family.causal_train if train else family.causal_eval):
      return "kind", "a token's routing depends on later tokens of its group"
    # A field a kind does not read keeps its default (check_unused), so these need no read check.
    if self.batch_prioritized:
      return ("batch_prioritized", "capacity is claimed in order of router confidence, so a "
              "confident later token can take an earlier token's slot")
    if self.claim_order is ClaimOrder.CHOICE and (self.k or 1) > 1:
      return ("claim_order", "every first choice claims capacity before any second choice, so "
              "a later token's first choice can take an earlier token's slot")
    return None

  def causal(self, *, train: bool) -> bool:
    """Whether a token's routing depends only on itself and earlier tokens."""
    return self.lookahead(train=train) is None

  def loss_weights(self) -> dict[str, float]:
    """Auxiliary loss name -> weight, for the losses this kind returns."""
    weights = {"router_z_loss": self.z_loss_weight}
    for name, path in self.family.losses:
      node = self
      for part in path.split("."):
        node = getattr(node, part)
      weights[name] = node
    return weights
