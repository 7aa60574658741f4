"""The experiment configuration: an `ml_collections.ConfigDict` at the edge, typed inside.

An experiment file (`experiments/<name>.py`) returns a ConfigDict with six groups:

    config.model            ModelConfig fields; config.model.moe MoeConfig fields and
                            config.model.moe.router RouterConfig fields
    config.data             DataConfig fields
    config.mesh             data / expert / model axis sizes (-1: the remaining devices)
    config.sharding_rules   ((logical axis, mesh axis | tuple of mesh axes | None), ...)
    config.optimizer        OptimizerConfig fields
    config.train            TrainConfig fields

`experiment_config_from` turns it into a frozen `ExperimentConfig`, rejecting unknown fields and
values that cannot work on the available devices (an expert axis that does not divide the number of
experts, a batch that does not split over the token shards, ...) with a ValueError that names the
field, before any dataset is built or any array allocated.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections

from moejax import sharding
from moejax.data.config import DataConfig, data_config_from
from moejax.model import ModelConfig, model_config_from
from moejax.optim import OptimizerConfig

GROUPS = ("model", "data", "mesh", "sharding_rules", "optimizer", "train")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Typed loop settings (`config.train`).

  Attributes:
    num_steps: optimizer updates in the whole run (a resumed run continues up to it).
    batch_size: global batch (sequences per step, over all processes).
    log_every: write metrics and refresh the progress line every this many steps.
    eval_every: evaluate every this many steps (0: only at the end; the end always evaluates).
    eval_batches: validation batches per evaluation (0: the whole validation split).
    checkpoint_every: save every this many steps (0: only at the end and on SIGTERM).
    max_checkpoints: how many of the newest checkpoints to keep.
    seed: seeds parameter initialisation and every random stream of training.
    progress: show the progress line on stderr.
  """

  num_steps: int = 1000
  batch_size: int = 32
  log_every: int = 10
  eval_every: int = 0
  eval_batches: int = 16
  checkpoint_every: int = 0
  max_checkpoints: int = 3
  seed: int = 0
  progress: bool = True

  def __post_init__(self):
    minimum = dict(num_steps=1, batch_size=1, log_every=1, eval_every=0, eval_batches=0,
                   checkpoint_every=0, max_checkpoints=1, seed=0)
    for name, low in minimum.items():
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"train.{name}={value!r} must be an integer >= {low}.")
    if not isinstance(self.progress, bool):
      raise ValueError(f"train.progress={self.progress!r} must be True or False.")


Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Everything a run needs, typed and validated (see the module docstring)."""

  model: ModelConfig
  data: DataConfig
  mesh: sharding.MeshConfig
  sharding_rules: Rules
  optimizer: OptimizerConfig
  train: TrainConfig


def experiment_config_from(config: ml_collections.ConfigDict | Mapping, *,
                           num_devices: int | None = None,
                           num_processes: int | None = None) -> ExperimentConfig:
  """Validates an experiment ConfigDict and converts it to an `ExperimentConfig`.

  Args:
    config: the experiment's ConfigDict (or an equivalent nested mapping).
    num_devices / num_processes: what the mesh will span; default: this JAX runtime's.

  The model's vocabulary size defaults to `config.data.vocab_size`; the trainer replaces it with
  the tokenizer's once the tokenizer exists.
  """
  values = _as_dict(config, "config")
  unknown = sorted(set(values) - set(GROUPS))
  if unknown:
    raise ValueError(f"unknown config field(s) {unknown}; allowed top-level groups: {GROUPS}.")
  missing = [g for g in GROUPS if g not in values and g != "sharding_rules"]
  if missing:
    raise ValueError(f"config is missing the group(s) {missing}; every experiment sets {GROUPS}.")
  data = data_config_from(_as_dict(values["data"], "data"))
  model_values = _as_dict(values["model"], "model")
  vocab = model_values.get("vocab_size") or data.vocab_size
  experiment = ExperimentConfig(
      model=model_config_from(model_values, vocab_size=vocab),
      data=data,
      mesh=_dataclass_from(sharding.MeshConfig, values["mesh"], "mesh"),
      sharding_rules=rules_from(values.get("sharding_rules", sharding.DEFAULT_RULES)),
      optimizer=_dataclass_from(OptimizerConfig, values["optimizer"], "optimizer"),
      train=_dataclass_from(TrainConfig, values["train"], "train"),
  )
  check_layout(experiment,
               num_devices=jax.device_count() if num_devices is None else num_devices,
               num_processes=jax.process_count() if num_processes is None else num_processes)
  return experiment


def _as_dict(value: Any, field: str) -> dict:
  if isinstance(value, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
    return dict(value.to_dict())
  if isinstance(value, Mapping):
    return dict(value)
  raise ValueError(f"{field}={value!r} must be a ConfigDict or a mapping of fields.")


def _dataclass_from(cls, value: Any, field: str):
  values = _as_dict(value, field)
  allowed = [f.name for f in dataclasses.fields(cls)]
  unknown = sorted(set(values) - set(allowed))
  if unknown:
    listed = ", ".join(f"{field}.{name}" for name in unknown)
    raise ValueError(f"unknown config field(s) {listed}; allowed fields of {field}: {allowed}.")
  return cls(**values)


def rules_from(value: Sequence) -> Rules:
  """Validates `config.sharding_rules`: pairs (logical axis, mesh axis | tuple | None)."""
  rules = []
  for entry in value:
    if not isinstance(entry, Sequence) or isinstance(entry, str) or len(entry) != 2:
      raise ValueError(f"sharding_rules entry {entry!r} must be a pair (logical axis, mesh axes).")
    logical, target = entry
    targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    for axis in targets:
      if axis not in sharding.MESH_AXES:
        raise ValueError(
            f"sharding_rules[{logical!r}]={target!r} names mesh axis {axis!r}; the mesh axes "
            f"are {sharding.MESH_AXES}.")
    rules.append((logical, None if target is None else
                  target if isinstance(target, str) else tuple(target)))
  return tuple(rules)


def check_layout(experiment: ExperimentConfig, *, num_devices: int, num_processes: int) -> None:
  """Raises ValueError when the model, batch and mesh do not fit together."""
  data_size, expert_size, model_size = experiment.mesh.resolve(num_devices)
  model, train = experiment.model, experiment.train
  if model.moe_every > 0:
    experts = model.moe.router.num_experts
    if experts % expert_size:
      raise ValueError(
          f"mesh.expert={expert_size} must divide model.moe.router.num_experts={experts}: each "
          "device of the expert axis holds an equal share of the experts.")
  token_shards = data_size * expert_size
  if train.batch_size % token_shards or train.batch_size % num_processes:
    raise ValueError(
        f"train.batch_size={train.batch_size} must be divisible by the token shards of the mesh "
        f"(data x expert = {token_shards}) and by the number of processes ({num_processes}).")
  if model.moe_every > 0:
    local_tokens = train.batch_size * experiment.data.seq_len // token_shards
    if local_tokens % model.moe.group_size:
      raise ValueError(
          f"model.moe.group_size={model.moe.group_size} must divide the tokens on each device "
          f"(train.batch_size x data.seq_len / {token_shards} shards = {local_tokens}).")
  for field, size in (("num_heads", model.num_heads), ("ffn_dim", model.ffn_dim)):
    if size % model_size:
      raise ValueError(f"model.{field}={size} must be divisible by mesh.model={model_size}.")
  if model.moe_every > 0 and model.moe.ffn_dim % model_size:
    raise ValueError(
        f"model.moe.ffn_dim={model.moe.ffn_dim} must be divisible by mesh.model={model_size}.")


def apply_overrides(config: ml_collections.ConfigDict, assignments: Sequence[str]
                    ) -> ml_collections.ConfigDict:
  """Applies "group.field=value" assignments (for scripts; `moejax.main` has --config.* flags).

  The value is read as a Python literal (3, 1e-3, True, None, (1, 2)), else taken as a string.
  A field the config does not have raises ValueError naming it.
  """
  for assignment in assignments:
    path, sep, text = assignment.partition("=")
    if not sep or not path:
      raise ValueError(f"override {assignment!r} must look like group.field=value.")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *parents, name = path.split(".")
    node = config
    for i, part in enumerate(parents):
      if part not in node:
        missing = ".".join(parents[:i + 1])
        raise ValueError(f"override {assignment!r}: config has no field {missing}.")
      node = node[part]
    if name not in node:
      raise ValueError(f"override {assignment!r}: config has no field {path}.")
    node[name] = value
  return config
