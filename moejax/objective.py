"""What a moejax model is trained to predict: the next token (causal LM) or masked tokens (MLM).

`model.objective` chooses one of two:

    causal_lm   a decoder: attention sees earlier positions only, and every real position predicts
                the next token (the pipeline's `targets`); the loss is the mean cross-entropy over
                the real targets.
    masked_lm   an encoder (BERT, Devlin et al. 2019): attention is bidirectional (padding keys
                still masked), a random subset of the real tokens is corrupted, and the loss is the
                mean cross-entropy of the original tokens at the corrupted positions only.

Masked LM on the pipeline's packed rows. A row of L + 1 tokens x gives `inputs = x[:-1]`,
`targets = x[1:]` and `mask`, which marks the real targets (data/pipeline.py). The masked LM
takes `targets` as its uncorrupted sequence, because `mask` says exactly which of its tokens are
real (the last real input of a padded row has a padding target, so `mask` cannot tell it from
padding). Each real position is chosen independently with probability `mask_rate`, and each
sequence that holds a real token gets at least one chosen position (the real position of the
smallest uniform draw), so that short sequences always contribute. A chosen position becomes the
mask token with probability `mask_token_fraction`, a uniformly random token with probability
`random_token_fraction`, and otherwise keeps its token (BERT's 80/10/10 by default); the loss
reads all chosen positions whatever became of them.

The mask token is a vocabulary row of its own: the model's vocabulary is the tokenizer's plus one,
and the mask id is the last row, V - 1 (train.py sets V). Random replacement tokens are drawn from
ids 1 .. V - 2: every id but padding (0) and the mask (with an explicitly larger
`model.vocab_size` this includes ids the tokenizer never produces).

Randomness: the positions and replacements of training step s are a function of (train.seed, s)
only, so a resumed run masks exactly as an uninterrupted one; those of evaluation batch i are a
function of (train.seed, i) only, the same at every evaluation of a run, so that evaluations are
comparable over the run. Both streams are threefry keys folded from the seed, independent of the
mesh (`jax_threefry_partitionable`).

Reported numbers: for masked_lm, "cross_entropy", "eval/loss" and "eval/perplexity" keep their
keys but mean the masked-token loss and exp of it (a masked-token perplexity, not comparable with
a causal LM's), and "target_tokens" / "eval/tokens" count the masked positions.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import ClassVar

import jax
import jax.numpy as jnp

from moejax import typed_config
from moejax.typed_config import ConfigError

# Tags folded into the seed's key, so that the masking streams are not the parameter-init stream
# (nnx folds small counters into the same seed) nor each other.
_TRAIN_STREAM = 0x6D6C6D74  # "mlmt"
_EVAL_STREAM = 0x6D6C6D65  # "mlme"


class Objective(enum.Enum):
  """The training objective (`model.objective`); see the module docstring."""

  CAUSAL_LM = "causal_lm"  # next-token prediction with causal attention
  MASKED_LM = "masked_lm"  # masked-token prediction with bidirectional attention


@dataclasses.dataclass(frozen=True)
class MaskedLmConfig:
  """Masked-LM corruption settings (`model.masked_lm`); read only when objective="masked_lm".

  Attributes:
    mask_rate: probability that a real position is chosen for prediction (BERT: 0.15).
    mask_token_fraction: share of the chosen positions replaced by the mask token (BERT: 0.8).
    random_token_fraction: share replaced by a uniformly random token (BERT: 0.1); the remaining
      1 - mask_token_fraction - random_token_fraction keep their token.
  """

  PATH: ClassVar[str] = "model.masked_lm"

  mask_rate: float = 0.15
  mask_token_fraction: float = 0.8
  random_token_fraction: float = 0.1

  def __post_init__(self):
    typed_config.check_fields(self)
    if not 0.0 < self.mask_rate <= 1.0:
      self._fail("mask_rate", "must be in (0, 1].")
    for name in ("mask_token_fraction", "random_token_fraction"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        self._fail(name, "must be in [0, 1].")
    total = self.mask_token_fraction + self.random_token_fraction
    if total > 1.0 + 1e-9:
      self._fail("random_token_fraction", f"must be at most 1 - mask_token_fraction "
                 f"({1.0 - self.mask_token_fraction:g}): the two shares of the chosen positions "
                 f"add up to {total:g}.")

  def _fail(self, name: str, must: str):
    raise ConfigError(typed_config.path_of(self, name), getattr(self, name), must)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Example:
  """One batch as the objective presents it to the model and the loss, all (B, L)."""

  inputs: jax.Array  # int: what the model reads
  mask: jax.Array  # bool: real tokens of `inputs` (attention keys, routing)
  targets: jax.Array  # int: what the model predicts
  loss_mask: jax.Array  # bool: the positions the loss counts


@dataclasses.dataclass(frozen=True)
class TrainingObjective:
  """The objective as a training step applies it: static (hashable) settings, no arrays.

  Attributes:
    kind: causal_lm or masked_lm.
    vocab_size: V of the model (masked_lm: the mask id is V - 1).
    seed: the run's seed (`train.seed`), from which the masking streams are folded.
    masked_lm: the corruption settings (None for causal_lm).
  """

  kind: Objective
  vocab_size: int
  seed: int
  masked_lm: MaskedLmConfig | None = None

  @classmethod
  def of(cls, model_config, seed: int) -> TrainingObjective:
    """The objective of a `model.ModelConfig` trained with `seed`."""
    return cls(kind=model_config.objective, vocab_size=model_config.vocab_size, seed=seed,
               masked_lm=model_config.masked_lm)

  @property
  def mask_id(self) -> int:
    return self.vocab_size - 1

  @property
  def loss_name(self) -> str:
    """How summaries name the loss: "loss" or "masked-token loss"."""
    return "masked-token loss" if self.kind is Objective.MASKED_LM else "loss"

  @property
  def counted_tokens(self) -> str:
    """What the loss averages over: "tokens" or "masked tokens"."""
    return "masked tokens" if self.kind is Objective.MASKED_LM else "tokens"

  def train_key(self, step: jax.Array) -> jax.Array | None:
    """The masking key of training step `step` (None: the objective draws nothing)."""
    return self._key(_TRAIN_STREAM, step)

  def eval_key(self, index: jax.Array) -> jax.Array | None:
    """The masking key of evaluation batch `index` (the same at every evaluation)."""
    return self._key(_EVAL_STREAM, index)

  def _key(self, stream: int, counter: jax.Array) -> jax.Array | None:
    if self.kind is not Objective.MASKED_LM:
      return None
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), stream), counter)

  def example(self, batch: dict[str, jax.Array], key: jax.Array | None) -> Example:
    """The pipeline's batch {"inputs", "targets", "mask"} as model inputs and loss targets."""
    if self.kind is Objective.CAUSAL_LM:
      return Example(inputs=batch["inputs"], mask=batch["mask"], targets=batch["targets"],
                     loss_mask=batch["mask"])
    tokens_BL, real_BL = batch["targets"], batch["mask"].astype(jnp.bool_)
    choose_key, corrupt_key = jax.random.split(key)
    chosen_BL = choose_positions(choose_key, real_BL, self.masked_lm.mask_rate)
    inputs_BL = corrupt(corrupt_key, tokens_BL, chosen_BL, self.masked_lm, mask_id=self.mask_id)
    return Example(inputs=inputs_BL, mask=real_BL, targets=tokens_BL, loss_mask=chosen_BL)


def choose_positions(key: jax.Array, real_BL: jax.Array, rate: float) -> jax.Array:
  """Bool (B, L): each real position with probability `rate`, plus at least one per sequence.

  The extra position of a sequence is its real position of the smallest uniform draw (it is
  chosen anyway when that draw is below `rate`); a sequence with no real token gets none.
  """
  L = real_BL.shape[1]
  u_BL = jax.random.uniform(key, real_BL.shape, jnp.float32, out_sharding=_layout_of(real_BL))
  chosen_BL = real_BL & (u_BL < rate)
  first_B = jnp.argmin(jnp.where(real_BL, u_BL, 2.0), axis=1)
  return chosen_BL | (real_BL & jax.nn.one_hot(first_B, L, dtype=jnp.bool_))


def corrupt(key: jax.Array, tokens_BL: jax.Array, chosen_BL: jax.Array, config: MaskedLmConfig,
            *, mask_id: int) -> jax.Array:
  """`tokens_BL` with each chosen position replaced (see the module docstring), int (B, L)."""
  kind_key, token_key = jax.random.split(key)
  layout = _layout_of(tokens_BL)
  r_BL = jax.random.uniform(kind_key, tokens_BL.shape, jnp.float32, out_sharding=layout)
  random_BL = jax.random.randint(token_key, tokens_BL.shape, 1, mask_id, dtype=tokens_BL.dtype,
                                 out_sharding=layout)
  masked_BL = chosen_BL & (r_BL < config.mask_token_fraction)
  randomized_BL = chosen_BL & ~masked_BL & (
      r_BL < config.mask_token_fraction + config.random_token_fraction)
  out_BL = jnp.where(randomized_BL, random_BL, tokens_BL)
  return jnp.where(masked_BL, jnp.asarray(mask_id, tokens_BL.dtype), out_BL)


def _layout_of(x: jax.Array):
  """`out_sharding` for random numbers laid out like x, on meshes with Explicit axes (else None).

  Threefry is partitionable, so each device draws its slice of the same numbers whatever the mesh.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or jax.sharding.AxisType.Explicit not in mesh.axis_types:
    return None
  return jax.typeof(x).sharding.spec
