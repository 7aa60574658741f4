"""A training run's workdir read back: its config, tokenizer and newest checkpoint.

The commands that use a trained model without training it (`moejax.evaluate`, `moejax.sample`)
start here. `load(workdir)` rebuilds what the trainer had:

    WORKDIR/config.json      the resolved experiment config the trainer saved (`config.check_resume`)
    tokenizer                where the data pipeline keeps it, beside the dataset (`data.prepare`)
    WORKDIR/checkpoints/N    the newest checkpoint that restores; nothing is moved or written

The vocabulary size is read from the checkpoint (the embedding's rows), since the trainer set it
from the tokenizer after saving config.json. Reading never changes the workdir: a damaged
checkpoint is reported and the next older one used, but it stays where it is (the trainer sets
damaged checkpoints aside when it resumes).

Errors a user can fix (no such workdir, no config.json, no checkpoint, a config value) are
ValueErrors naming `--workdir` or the field; a checkpoint that does not restore is a
`checkpoint.CheckpointError`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from moejax import checkpoint as checkpoint_lib
from moejax import data as data_lib
from moejax import sharding, train
from moejax.config import CONFIG_FILE, ExperimentConfig, experiment_config_from
from moejax.data import Tokenizer
from moejax.model import ModelConfig


@dataclasses.dataclass(frozen=True)
class TrainedRun:
  """A restored training run (see `load`)."""

  workdir: epath.Path
  experiment: ExperimentConfig  # as trained, with the changes `load` was given
  model_config: ModelConfig  # with the checkpoint's vocabulary size
  tokenizer: Tokenizer
  mesh: jax.sharding.Mesh
  state: train.TrainState  # parameters, optimizer and router state of checkpoint `step`
  step: int

  def model(self):
    """The model with the checkpoint's parameters and router state."""
    return self.state.model()


def checkpoint_steps(workdir: epath.Path) -> list[int]:
  """The steps of WORKDIR/checkpoints, oldest first (empty when there is none)."""
  directory = workdir / "checkpoints"
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def read_config(workdir: epath.Path, changes: Mapping[str, Any] | None = None) -> dict:
  """WORKDIR/config.json as nested dicts, with `changes` ({"data.eval_split": "test"}) applied."""
  path = workdir / CONFIG_FILE
  if not workdir.is_dir():
    raise ValueError(f"--workdir={str(workdir)!r}: no such directory.")
  if not path.exists():
    raise ValueError(f"--workdir={str(workdir)!r}: {path} is missing; the workdir of a training "
                     "run (python -m moejax.main --config=... --workdir=DIR) holds it.")
  try:
    plain = json.loads(path.read_text())
  except ValueError as error:
    raise ValueError(f"--workdir={str(workdir)!r}: {path} is not valid JSON ({error}).") from None
  for dotted, value in (changes or {}).items():
    node = plain
    *parents, name = dotted.split(".")
    for part in parents:
      node = node[part]
    node[name] = value
  return plain


def load(workdir: str | epath.PathLike, *, changes: Mapping[str, Any] | None = None,
         single_device: bool = False) -> TrainedRun:
  """The run in `workdir` at its newest checkpoint that restores.

  Args:
    workdir: a training run's workdir.
    changes: config fields to change, by dotted path (`{"data.eval_split": "test"}`).
    single_device: restore onto one device (a mesh of size 1 on `jax.devices()[0]`) instead of
      the mesh the config names.
  """
  jax.config.update("jax_threefry_partitionable", True)  # as in training
  workdir = epath.Path(workdir)
  plain = read_config(workdir, changes)
  steps = checkpoint_steps(workdir)
  if not steps:
    raise ValueError(f"--workdir={str(workdir)!r}: no checkpoint in {workdir / 'checkpoints'}; "
                     "a training run writes one at train.checkpoint_every and at its end.")
  devices = jax.devices()[:1] if single_device else None
  if single_device:
    plain["mesh"] = {"data": 1, "expert": 1, "model": 1}
  experiment = experiment_config_from(plain, num_devices=1 if single_device else None)
  tokenizer = data_lib.prepare(experiment.data)
  model_config = dataclasses.replace(experiment.model,
                                     vocab_size=_checkpoint_vocab(workdir, steps[-1]))
  needed = tokenizer.vocab_size + (0 if model_config.causal else 1)
  if model_config.vocab_size < needed:
    raise ValueError(f"--workdir={str(workdir)!r}: the checkpoint's vocabulary "
                     f"({model_config.vocab_size}) is smaller than the tokenizer's ({needed}): "
                     "the tokenizer beside the dataset changed since training.")
  mesh = sharding.make_mesh(experiment.mesh, devices)
  with jax.set_mesh(mesh):
    state = train.create_train_state(model_config, experiment, mesh)
    step, items = _restore_newest(workdir, steps, state)
  return TrainedRun(workdir=workdir, experiment=experiment, model_config=model_config,
                    tokenizer=tokenizer, mesh=mesh, state=state.replace(**items), step=step)


def _checkpoint_vocab(workdir: epath.Path, step: int) -> int:
  """V, the rows of the embedding saved in checkpoint `step` (from its metadata)."""
  state_dir = workdir / "checkpoints" / str(step) / checkpoint_lib.STATE
  handler = ocp.StandardCheckpointHandler()
  try:
    return int(handler.metadata(state_dir)["params"]["embed"].shape[0])
  except Exception as error:  # pylint: disable=broad-except
    raise checkpoint_lib.CheckpointError(
        f"checkpoint {step} at {state_dir.parent}: cannot read its metadata: "
        f"{checkpoint_lib.describe_error(error)}") from error
  finally:
    handler.close()


def _restore_newest(workdir: epath.Path, steps: list[int], state: train.TrainState
                    ) -> tuple[int, dict]:
  """(step, checkpoint items) of the newest checkpoint that restores onto `state`'s layout."""
  checkpointer = checkpoint_lib.Checkpointer(workdir / "checkpoints")
  abstract = checkpoint_lib.abstract_like(state.checkpoint_items())
  failures = []
  try:
    for step in reversed(steps):
      try:
        return step, checkpointer.restore(step, abstract)
      except checkpoint_lib.CheckpointError as error:
        failures.append(f"checkpoint {step}: {error}")
        print(f"moejax: checkpoint {step} in {workdir / 'checkpoints'} does not restore "
              f"({error}); trying the next older one.", file=sys.stderr, flush=True)
  finally:
    checkpointer.close()
  raise checkpoint_lib.CheckpointError(f"no checkpoint in {workdir / 'checkpoints'} restores: "
                                       + "; ".join(failures))
