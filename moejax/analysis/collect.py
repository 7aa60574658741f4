"""Routes a split through a trained run's newest checkpoint and keeps every real token's routing.

    run = load_run(workdir, split="validation")    # config, tokenizer, restored state
    routes = collect(run, max_batches=16)          # Routes: tokens, positions, per-layer experts

`load_run` reads WORKDIR/config.json (the run's resolved config), loads the tokenizer the data
pipeline keeps beside the dataset (`data.prepare`), and restores the newest checkpoint of
WORKDIR/checkpoints that restores (an older one when the newest fails; nothing is moved or
written). `collect` runs the model in evaluation mode (evaluation capacity factor, no dropout or
jitter; a masked LM's inputs corrupted as its evaluation does) over the split's batches, with
every `MoeLayer`'s `record_routing` set, and keeps the tokens whose mask is true.

The analysis runs on one device, whatever mesh the run trained on: MoE routing groups never
straddle devices, so the decisions are those of the run's own mesh, batch for batch.
Only token-choice routers (each token picks k experts) are analysed; expert choice (a token
reaches 0..E experts) and soft MoE (every slot mixes every token) are refused.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding

from moejax import checkpoint as checkpoint_lib
from moejax import config as config_lib
from moejax import data as data_lib
from moejax import sharding, train
from moejax.config import ExperimentConfig
from moejax.data.tokenizer import Tokenizer
from moejax.model import ModelConfig
from moejax.moe import MoeLayer


class AnalysisError(ValueError):
  """A workdir or setting the analysis cannot use; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class Run:
  """A trained run, restored for analysis."""

  workdir: epath.Path
  experiment: ExperimentConfig
  model: ModelConfig  # with the vocabulary size of the checkpoint
  tokenizer: Tokenizer
  state: train.TrainState
  step: int
  mesh: jax.sharding.Mesh


@dataclasses.dataclass(frozen=True)
class Routes:
  """The routing of the N real tokens analysed, in reading order.

  Attributes:
    tokens_N: the token id each position held (the model's input; the masked LM's corrupted one).
    positions_N: its position in its sequence, [0, seq_len).
    layers: per MoE layer ("layer_1", ...; in block order) (expert_NK int32, keep_NK bool).
    batches: how many batches were read.
  """

  tokens_N: np.ndarray
  positions_N: np.ndarray
  layers: dict[str, tuple[np.ndarray, np.ndarray]]
  batches: int


def load_run(workdir: str | epath.PathLike, *, split: str | None = None) -> Run:
  """Restores WORKDIR's newest checkpoint that restores (see the module docstring)."""
  workdir = epath.Path(workdir)
  where = f"--workdir={str(workdir)!r}"
  config_path = workdir / config_lib.CONFIG_FILE
  if not config_path.exists():
    raise AnalysisError(f"{where}: no {config_lib.CONFIG_FILE} there; point it at the workdir "
                        "of a moejax training run.")
  steps = _checkpoint_steps(workdir)
  if not steps:
    raise AnalysisError(f"{where}: no checkpoint in {workdir / 'checkpoints'}; train the run "
                        "first (python -m moejax.main --config=... --workdir=...).")
  saved = json.loads(config_path.read_text())
  saved["mesh"] = {"data": 1, "expert": 1, "model": 1}
  if split is not None:
    saved["data"]["eval_split"] = split
  experiment = config_lib.experiment_config_from(saved, num_devices=1, num_processes=1)
  _check_router(experiment.model)
  tokenizer = data_lib.prepare(experiment.data)
  mesh = sharding.make_mesh(experiment.mesh, devices=jax.devices()[:1])
  checkpointer = checkpoint_lib.Checkpointer(workdir / "checkpoints")
  try:
    model = dataclasses.replace(experiment.model,
                                vocab_size=_saved_vocab_size(checkpointer, steps[0]))
    with jax.set_mesh(mesh):
      state = train.create_train_state(model, experiment, mesh)
      step, items = _restore_newest(checkpointer, steps, state)
  finally:
    checkpointer.close()
  return Run(workdir=workdir, experiment=experiment, model=model, tokenizer=tokenizer,
             state=state.replace(**items), step=step, mesh=mesh)


def _checkpoint_steps(workdir: epath.Path) -> list[int]:
  """The checkpoint steps in WORKDIR/checkpoints, newest first."""
  directory = workdir / "checkpoints"
  if not directory.is_dir():
    return []
  return sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit()), reverse=True)


def _check_router(model: ModelConfig) -> None:
  if model.moe is None:
    raise AnalysisError("model.moe_every=0: the run's model is dense; it has no MoE layer to "
                        "analyse.")
  router = model.moe.router
  if router.k is None:
    raise AnalysisError(
        f"model.moe.router.kind={router.kind.value!r} is not analysed: the analysis counts the "
        "k experts each token chooses, and with this router a token does not choose (expert "
        "choice: experts pick their tokens, a token reaches 0..E of them; soft MoE: every slot "
        "mixes every token). Analyse a token-choice router (switch, gshard, topk, ...).")


def _saved_vocab_size(checkpointer: checkpoint_lib.Checkpointer, step: int) -> int:
  """V of the saved embedding (the tokenizer's, plus the masked LM's mask token, or larger)."""
  handler = checkpoint_lib.ocp.StandardCheckpointHandler()
  try:
    metadata = handler.metadata(checkpointer.directory / str(step) / checkpoint_lib.STATE)
  finally:
    handler.close()
  tree = getattr(metadata, "item_metadata", metadata)
  return int(tree["params"]["embed"].shape[0])


def _restore_newest(checkpointer, steps: list[int], state: train.TrainState
                    ) -> tuple[int, dict[str, Any]]:
  """(step, items) of the newest checkpoint that restores; damaged ones are reported, kept."""
  abstract = checkpoint_lib.abstract_like(state.checkpoint_items())
  failures = []
  for step in steps:
    try:
      return step, checkpointer.restore(step, abstract)
    except checkpoint_lib.CheckpointError as error:
      failures.append(f"step {step}: {error}")
      print(f"moejax.analyze: checkpoint {step} does not restore ({error}); trying an older one.",
            file=sys.stderr)
  raise checkpoint_lib.CheckpointError(
      f"no checkpoint in {checkpointer.directory} restores ({'; '.join(failures)}).")


def _route_batch(state: train.TrainState, batch, index):
  """(inputs (B, L), real (B, L), {layer: {"expert_index_GSK", "keep_GSK"}}) of one batch."""
  example = state.objective.example(batch, state.objective.eval_key(index))
  model = state.model()
  for _, node in nnx.iter_graph(model):
    if isinstance(node, MoeLayer):
      node.record_routing = True
  _, aux = model(example.inputs, mask_BL=example.mask, train=False)
  return example.inputs, example.mask, {name: a.routing for name, a in aux.moe.items()}


def collect(run: Run, *, max_batches: int | None = None) -> Routes:
  """Routes the split's batches (at most `max_batches`; None: all) and keeps the real tokens."""
  experiment = run.experiment
  batch_spec = sharding.logical_to_spec(("batch", None), experiment.sharding_rules)
  batch_sharding = NamedSharding(run.mesh, batch_spec)
  batches = data_lib.eval_batches(experiment.data, run.tokenizer,
                                  batch_size=experiment.train.batch_size, max_batches=max_batches)
  tokens, positions, layers = [], [], {}
  count = 0
  with jax.set_mesh(run.mesh):
    route = jax.jit(_route_batch)
    for index, batch in enumerate(batches):
      inputs, real, routing = jax.device_get(
          route(run.state, train.device_batch(batch, batch_sharding), np.int32(index)))
      real_T = np.asarray(real, bool).reshape(-1)
      B, L = inputs.shape
      tokens.append(np.asarray(inputs).reshape(-1)[real_T])
      positions.append(np.tile(np.arange(L), B)[real_T])
      for name, record in routing.items():
        expert = np.asarray(record["expert_index_GSK"])
        keep = np.asarray(record["keep_GSK"])
        K = expert.shape[-1]
        layers.setdefault(name, []).append((expert.reshape(B * L, K)[real_T],
                                            keep.reshape(B * L, K)[real_T]))
      count = index + 1
  order = sorted(layers, key=lambda name: int(name.rsplit("_", 1)[1]))
  return Routes(
      tokens_N=np.concatenate(tokens) if tokens else np.zeros((0,), np.int32),
      positions_N=np.concatenate(positions) if positions else np.zeros((0,), np.int64),
      layers={name: (np.concatenate([e for e, _ in layers[name]]),
                     np.concatenate([k for _, k in layers[name]])) for name in order},
      batches=count)
