"""The experiment configuration: an `ml_collections.ConfigDict` at the edge, typed inside.

An experiment file (`experiments/<name>.py`) starts from `default_config()`, the ConfigDict of
every typed field at its default, and changes what it studies. It has six groups:

    config.model            ModelConfig fields; config.model.moe MoeConfig fields and
                            config.model.moe.router RouterConfig fields
    config.data             DataConfig fields
    config.mesh             data / expert / model axis sizes (-1: the remaining devices)
    config.sharding_rules   ((logical axis, mesh axis | tuple of mesh axes | None), ...)
    config.optimizer        OptimizerConfig fields
    config.train            TrainConfig fields

`experiment_config_from` turns it into a frozen `ExperimentConfig`, rejecting unknown fields and
values that cannot work on the available devices (an expert axis that does not divide the number of
experts, a batch that does not split over the token shards, ...) with a `ConfigError` (a ValueError)
that names the field by its command-line path, before any dataset is built or array allocated.
Because the ConfigDict is derived from the dataclasses, every typed field is settable as
`--config.<path>=value`, whether or not the experiment file mentions it.
"""

from __future__ import annotations

import ast
import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import ml_collections
from etils import epath

from moejax import sharding, storage, typed_config
from moejax.data.config import DataConfig
from moejax.model import ModelConfig, model_config_from
from moejax.moe import DispatchKind
from moejax.optim import OptimizerConfig
from moejax.routing import ClaimOrder
from moejax.typed_config import ConfigError

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
    profile_steps: trace this many training steps with the JAX profiler into
      WORKDIR/tensorboard (0: none; moejax/profiler.py).
    profile_start_step: the first traced step (0: the run's second step, the first one after
      compilation).
  """

  PATH: ClassVar[str] = "train"

  num_steps: int = 1000
  batch_size: int = 32
  log_every: int = 10
  eval_every: int = 0
  eval_batches: int = 16
  checkpoint_every: int = 0
  max_checkpoints: int = 3
  seed: int = 0
  progress: bool = True
  profile_steps: int = 0
  profile_start_step: int = 0

  def __post_init__(self):
    typed_config.check_fields(self)
    minimum = dict(num_steps=1, batch_size=1, log_every=1, eval_every=0, eval_batches=0,
                   checkpoint_every=0, max_checkpoints=1, seed=0, profile_steps=0,
                   profile_start_step=0)
    for name, low in minimum.items():
      if getattr(self, name) < low:
        raise ConfigError(f"train.{name}", getattr(self, name), f"must be an integer >= {low}.")


Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Everything a run needs, typed and validated (see the module docstring)."""

  PATH: ClassVar[str] = ""

  model: ModelConfig
  data: DataConfig
  mesh: sharding.MeshConfig
  optimizer: OptimizerConfig
  train: TrainConfig
  sharding_rules: Rules = sharding.DEFAULT_RULES


def default_config() -> ml_collections.ConfigDict:
  """The ConfigDict of every typed field at its default: what experiment files start from.

  `model.vocab_size` is a placeholder (None: the tokenizer's vocabulary size), `model.moe` holds
  the MoE defaults (unused while `model.moe_every` is 0).
  """
  return typed_config.config_dict(ExperimentConfig)


def experiment_config_from(config: ml_collections.ConfigDict | Mapping, *,
                           num_devices: int | None = None,
                           num_processes: int | None = None) -> ExperimentConfig:
  """Validates an experiment ConfigDict and converts it to an `ExperimentConfig`.

  Args:
    config: the experiment's ConfigDict (or an equivalent nested mapping).
    num_devices / num_processes: what the mesh will span; default: this JAX runtime's.

  The model's vocabulary size defaults to `config.data.vocab_size`; the trainer replaces it with
  the tokenizer's once the tokenizer exists. Errors are `ConfigError`s naming the field.
  """
  values = typed_config.as_dict(config, "config")
  unknown = sorted(set(values) - set(GROUPS))
  if unknown:
    raise ConfigError(", ".join(unknown), values[unknown[0]],
                      f"is not a field of the config; its groups are {GROUPS}.")
  missing = [g for g in GROUPS if g not in values and g != "sharding_rules"]
  if missing:
    raise ValueError(f"config is missing the group(s) {missing}; every experiment sets {GROUPS}.")
  data = typed_config.build(DataConfig, values["data"])
  model_values = typed_config.as_dict(values["model"], "model")
  vocab = model_values.get("vocab_size") or data.vocab_size
  experiment = ExperimentConfig(
      model=model_config_from(model_values, vocab_size=vocab),
      data=data,
      mesh=typed_config.build(sharding.MeshConfig, values["mesh"]),
      sharding_rules=rules_from(values.get("sharding_rules", sharding.DEFAULT_RULES)),
      optimizer=typed_config.build(OptimizerConfig, values["optimizer"]),
      train=typed_config.build(TrainConfig, values["train"]),
  )
  check_layout(experiment,
               num_devices=jax.device_count() if num_devices is None else num_devices,
               num_processes=jax.process_count() if num_processes is None else num_processes)
  return experiment


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


def parse_value(text: str) -> Any:
  """An override's value: a Python literal (3, 1e-3, True, None, (1, 2)), else the string."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


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
    value = parse_value(text)
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


# ----------------------------------------------------------------------------- resuming a workdir

CONFIG_FILE = "config.json"

# Fields a rerun on an existing workdir may change: the run's length and cadence, the layout
# (checkpoints restore onto any mesh), where the data lives and how it is read (the token stream does
# not depend on it), evaluation-only settings, implementation choices with identical numbers, and
# the permission to run a non-causal router (it changes no number).
# Any other change would silently continue a different experiment from the old state.
RESUMABLE_FIELDS = (
    "train.num_steps", "train.log_every", "train.eval_every", "train.eval_batches",
    "train.checkpoint_every", "train.max_checkpoints", "train.progress", "train.profile_steps",
    "train.profile_start_step",
    "mesh.data", "mesh.expert", "mesh.model", "sharding_rules",
    "data.data_dir", "data.eval_split", "data.read_batch_size", "data.read_threads",
    "data.prefetch_buffer_size",
    "model.moe.dispatch", "model.moe.expert_loop", "model.moe.router.capacity_factor_eval",
    "model.moe.grouped_matmul", "model.moe.grouped_matmul_tile", "model.moe.exchange",
    "model.moe.router.allow_noncausal",
)

def check_evaluation_setting(path: str) -> None:
  """Raises ValueError unless `path` is a setting under which a trained model may be evaluated
  as it is (a field of RESUMABLE_FIELDS)."""
  if path not in RESUMABLE_FIELDS:
    raise ValueError(f"{path} is not a setting evaluation may change (it would not be the trained "
                     f"model); allowed: {', '.join(RESUMABLE_FIELDS)}.")


# Fields that may change on resume only between these values: einsum and index dispatch compute
# the same numbers; dropless does not (it drops nothing where the capacity forms drop tokens).
RESUMABLE_VALUES = {"model.moe.dispatch": {"einsum", "index"}}

def check_resume(workdir, experiment: ExperimentConfig, *, resuming: bool,
                 write: bool = True) -> list[tuple[str, Any, Any]]:
  """Compares `experiment` with the config saved in WORKDIR/config.json, then saves it there.

  When `resuming` (the workdir holds checkpoints) a change of any field outside
  `RESUMABLE_FIELDS` raises ConfigError naming each changed field with its old and new value.
  Returns the allowed changes (path, old, new). `write=False` (processes other than 0) only
  checks. A workdir without a saved config (or a fresh run) just saves it.
  """
  path = epath.Path(workdir) / CONFIG_FILE
  changes = []
  if resuming and path.exists():
    changes = saved_changes(workdir, experiment)
    refused = [c for c in changes if c[0] not in RESUMABLE_FIELDS or not (
        {c[1], c[2]} <= RESUMABLE_VALUES.get(c[0], {c[1], c[2]}))]
    if refused:
      listed = "; ".join(f"{field}: {before!r} -> {after!r}" for field, before, after in refused)
      raise ConfigError(
          refused[0][0], refused[0][2],
          f"differs from the config of the checkpoints in {workdir} ({listed}). A resumed run "
          f"must keep it: rerun with the old value, or use a new --workdir. Fields that may "
          f"change on resume: {', '.join(RESUMABLE_FIELDS)}.")
  if write:
    storage.replace_text(path, json.dumps(typed_config.as_plain(experiment), indent=2,
                                          sort_keys=True) + "\n")
  return changes


def saved_changes(workdir, experiment: ExperimentConfig) -> list[tuple[str, Any, Any]]:
  """(path, saved, now) of every field where `experiment` differs from WORKDIR/config.json.

  A field added to moejax after that config was saved held what moejax did before it existed:
  its default, or the value BEFORE_FIELD gives; it differs only where `experiment` sets another.
  """
  old = json.loads((epath.Path(workdir) / CONFIG_FILE).read_text())
  new = json.loads(json.dumps(typed_config.as_plain(experiment)))
  defaults = json.loads(json.dumps(typed_config.as_plain(default_config().to_dict())))
  changes = [(field, _saved_value(field, before, after, experiment, defaults), after)
             for field, before, after in typed_config.differences(old, new)]
  return [change for change in changes if change[1] != change[2]]


def _claim_order_before_field(experiment: ExperimentConfig) -> str:
  """Capacity was claimed choice-major (every first choice before any second) before
  `claim_order` existed; where the claim order cannot matter (k = 1, dropless experts, a kind
  without a claim) the field's default is what such a run did."""
  moe = experiment.model.moe
  if moe is None or moe.dispatch is DispatchKind.DROPLESS:
    return ClaimOrder.POSITION.value
  if "claim_order" in moe.router.unused_fields():  # not read by the kind, or k = 1
    return ClaimOrder.POSITION.value
  return ClaimOrder.CHOICE.value


# Fields added to moejax whose absence from a saved config means something other than the
# field's default: path -> (the experiment -> the value its runs had before the field existed).
BEFORE_FIELD = {"model.moe.router.claim_order": _claim_order_before_field}


def _saved_value(path: str, saved: Any, now: Any, experiment: ExperimentConfig,
                 defaults: dict) -> Any:
  """`saved`, or for a field the saved config lacks, what the run had: the BEFORE_FIELD value, or
  else the field's default, which is no change when it is `now`'s value."""
  if saved != typed_config.MISSING:
    return saved
  if path in BEFORE_FIELD:
    return BEFORE_FIELD[path](experiment)
  return now if now == _at(defaults, path) else saved


def _at(tree: dict, path: str) -> Any:
  for part in path.split("."):
    if not isinstance(tree, dict) or part not in tree:
      return typed_config.MISSING
    tree = tree[part]
  return tree
