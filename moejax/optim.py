"""Optimizers and learning-rate schedules for moejax training.

Two optimizers, chosen by `OptimizerConfig.name`:

* "adamw": Adam with decoupled weight decay (Loshchilov & Hutter 2019), the default.
* "adafactor": factored second moments, no momentum (Shazeer & Stern 2018), as Switch Transformer
  was trained. Its natural learning rate is larger (about 1e-2) than Adam's.

Both are preceded by clipping of the gradients' global norm (`clip_norm`, 0 turns it off), and both
follow the same schedule: a linear warm-up to `learning_rate` over `warmup_steps`, then

* "cosine":   lr * (f + (1 - f) * (1 + cos(pi * t)) / 2),  t from 0 to 1 over the decay phase,
              f = `final_learning_rate_fraction`;
* "rsqrt":    lr * sqrt(warmup_steps / (step + 1))  (T5 / Switch; constant 1 during warm-up);
* "constant": lr.

Weight decay applies to matrices (parameters of rank >= 2) only, not to biases or norm scales.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import optax

from moejax import typed_config
from moejax.typed_config import ConfigError

OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("cosine", "rsqrt", "constant")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Typed optimizer settings (`config.optimizer` of an experiment).

  Attributes:
    name: "adamw" or "adafactor".
    learning_rate: the peak learning rate, reached at the end of warm-up.
    schedule: "cosine", "rsqrt" or "constant" after warm-up.
    warmup_steps: linear warm-up length; the rate at step s < warmup_steps is
      learning_rate * (s + 1) / warmup_steps.
    decay_steps: the step at which the cosine reaches its floor; 0 means the run's length.
    final_learning_rate_fraction: the cosine's floor as a fraction of `learning_rate`.
    weight_decay: decoupled weight decay on matrices (AdamW's `weight_decay`, Adafactor's
      `weight_decay_rate`); 0 turns it off.
    b1, b2, eps: Adam's moment decay rates and epsilon (AdamW only).
    clip_norm: clip the gradients' global norm to this value; 0 turns clipping off.
  """

  PATH: ClassVar[str] = "optimizer"

  name: str = "adamw"
  learning_rate: float = 1e-3
  schedule: str = "cosine"
  warmup_steps: int = 100
  decay_steps: int = 0
  final_learning_rate_fraction: float = 0.1
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.98
  eps: float = 1e-8
  clip_norm: float = 1.0

  def __post_init__(self):
    typed_config.check_fields(self)
    if self.name not in OPTIMIZERS:
      raise ConfigError("optimizer.name", self.name, f"is not allowed; choose one of {OPTIMIZERS}.")
    if self.schedule not in SCHEDULES:
      raise ConfigError("optimizer.schedule", self.schedule,
                        f"is not allowed; choose one of {SCHEDULES}.")
    _check_number("learning_rate", self.learning_rate, lower=0.0, strict=True)
    for name in ("warmup_steps", "decay_steps"):
      if getattr(self, name) < 0:
        raise ConfigError(f"optimizer.{name}", getattr(self, name), "must be an integer >= 0.")
    _check_number("final_learning_rate_fraction", self.final_learning_rate_fraction, lower=0.0,
                  upper=1.0)
    _check_number("weight_decay", self.weight_decay, lower=0.0)
    _check_number("b1", self.b1, lower=0.0, upper=1.0)
    _check_number("b2", self.b2, lower=0.0, upper=1.0)
    _check_number("eps", self.eps, lower=0.0)
    _check_number("clip_norm", self.clip_norm, lower=0.0)


def _check_number(field, value, *, lower=None, upper=None, strict=False):
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  if ok and lower is not None:
    ok = value > lower if strict else value >= lower
  if ok and upper is not None:
    ok = value <= upper
  if not ok:
    low = "" if lower is None else f"{'>' if strict else '>='} {lower}"
    high = "" if upper is None else f"<= {upper}"
    allowed = " and ".join(s for s in (low, high) if s) or "finite"
    raise ConfigError(f"optimizer.{field}", value, f"must be a number {allowed}.")


def learning_rate_schedule(config: OptimizerConfig, num_steps: int) -> optax.Schedule:
  """The learning rate as a function of the (0-based) step; see the module docstring."""
  peak = config.learning_rate
  warmup = config.warmup_steps
  decay_end = config.decay_steps or num_steps
  floor = config.final_learning_rate_fraction

  def schedule(step):
    s = jnp.asarray(step, jnp.float32)
    warm = jnp.minimum(1.0, (s + 1.0) / warmup) if warmup > 0 else jnp.float32(1.0)
    if config.schedule == "cosine":
      span = max(decay_end - warmup, 1)
      t = jnp.clip((s - warmup) / span, 0.0, 1.0)
      after = floor + (1.0 - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
    elif config.schedule == "rsqrt":
      after = jnp.sqrt(max(warmup, 1) / jnp.maximum(s + 1.0, max(warmup, 1)))
    else:
      after = jnp.float32(1.0)
    return peak * warm * after

  return schedule


def _decay_mask(params):
  """True for matrices (rank >= 2), which take weight decay; False for vectors and scalars."""
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(config: OptimizerConfig, num_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer (with clipping in front) and its learning-rate schedule."""
  schedule = learning_rate_schedule(config, num_steps)
  if config.name == "adamw":
    inner = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                        weight_decay=config.weight_decay, mask=_decay_mask)
  else:
    inner = optax.adafactor(schedule, multiply_by_parameter_scale=True, momentum=None,
                            weight_decay_rate=config.weight_decay or None,
                            weight_decay_mask=_decay_mask)
  if config.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), inner), schedule
  return inner, schedule
