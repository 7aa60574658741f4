"""Training and evaluation of a moejax language model: `train_and_evaluate(config, workdir)`.

The run holds the workdir's lock (`lock.py`: a second run on the same workdir fails at once,
naming this one). The rest is linear, in the order of its banner comments:

    mesh    (data, expert, model) device mesh from `config.mesh`
    input   dataset + tokenizer (built on first use), this process's training iterator
    model   the abstract model -> graph definition and parameter shardings (from the rules)
    shard   parameters and optimizer state created directly in their shardings
    restore the newest checkpoint in WORKDIR/checkpoints that restores (damaged ones set aside)
    update  `train_step` / `eval_step`, jitted with explicit shardings
    loop    steps, metrics, evaluation, checkpoints, SIGTERM, divergence (`divergence.py`);
            what the run prints of itself: `run_report.py`

`train_step(state, batch) -> (state, metrics)` is a pure function of arrays: the model is rebuilt
inside it from its graph definition and the parameters (`nnx.merge`). Its random streams (dropout,
router jitter, ...) are the model's initial streams with the step number folded in, so the random
numbers of step s depend only on the seed and s, and a resumed run repeats them exactly.

The loss is the mean token cross-entropy plus the model's auxiliary loss (the weighted MoE
load-balancing and router z-losses). The objective (`objective.py`) says over what: the next token
at every real position (causal_lm), or the original token at the masked positions (masked_lm,
whose masks are drawn from the seed and the step, or the evaluation batch's index).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax import checkpoint as checkpoint_lib
from moejax import config as config_lib
from moejax import data as data_lib
from moejax import device_peak, divergence, flops
from moejax import lock as lock_lib
from moejax import metrics as metrics_lib
from moejax import objective as objective_lib
from moejax import routing, run_report, sharding
from moejax.config import ExperimentConfig, experiment_config_from
from moejax.model import ModelAux, ModelConfig, Transformer
from moejax.moe import RouterState
from moejax.routing import hash_routing
from moejax.optim import make_optimizer
from moejax.profiler import StepProfiler
from moejax.throughput import Throughput

Batch = dict[str, jax.Array]
_STATIC = dict(static=True)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  """Everything a training step reads.

  `step`, `params` and `opt_state` change every step and are checkpointed. `router_state` holds
  the routers' state that is not a parameter (`moe.RouterState`: the aux-loss-free balancing bias,
  hash tables); the layers update it in the forward pass, and it is checkpointed too. `rngs` holds
  the model's random streams as initialised from the seed; it never changes (see `step_rngs`).
  `graphdef`, `tx` and `schedule` are static: the model's structure, the optimizer and the
  learning-rate schedule. `objective` (static) turns batches into model inputs and loss targets;
  its masking streams are a function of the seed, so they are not checkpointed.
  """

  step: jax.Array  # int32 scalar: the number of updates applied so far
  params: Any  # nested dict of parameter arrays (nnx.Param values)
  opt_state: optax.OptState
  rngs: Any  # nested dict: the model's RNG keys and counters at initialisation
  router_state: Any  # nested dict of RouterState values (empty without such state)
  graphdef: nnx.GraphDef = dataclasses.field(metadata=_STATIC)
  tx: optax.GradientTransformation = dataclasses.field(metadata=_STATIC)
  schedule: optax.Schedule = dataclasses.field(metadata=_STATIC)
  objective: objective_lib.TrainingObjective = dataclasses.field(metadata=_STATIC)

  def checkpoint_items(self) -> dict[str, Any]:
    """What a checkpoint holds."""
    items = {"step": self.step, "params": self.params, "opt_state": self.opt_state}
    if jax.tree.leaves(self.router_state):
      items["router_state"] = self.router_state
    return items

  def model(self, rngs: Any = None) -> Transformer:
    """The model with this state's parameters, router state and `rngs` (default: the initial)."""
    return nnx.merge(self.graphdef, self.params, self.rngs if rngs is None else rngs,
                     self.router_state)

  def replace(self, **changes) -> TrainState:
    return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------- pure functions


def step_rngs(rngs: Any, step: jax.Array) -> Any:
  """The random streams of one step: each stream's initial key with `step` folded in."""

  def for_step(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.fold_in(x, step)
    return jnp.zeros_like(x)  # the stream's call counter starts again from 0

  return jax.tree.map(for_step, rngs)


def token_loss(logits_BLV: jax.Array, targets_BL: jax.Array, mask_BL: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
  """(sum over real targets of -log p(target), number of real targets), float32 scalars."""
  nll_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV.astype(jnp.float32),
                                                           targets_BL)
  weight_BL = mask_BL.astype(jnp.float32)
  return jnp.sum(nll_BL * weight_BL), jnp.sum(weight_BL)


def moe_metrics(aux: ModelAux) -> dict[str, dict[str, jax.Array]]:
  """Per MoE layer: its weighted aux loss, raw losses and routing metrics."""
  return {name: {"aux_loss": a.aux_loss, **a.losses, **a.metrics} for name, a in aux.moe.items()}


def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Any]]:
  """One optimizer update on `batch` ({"inputs", "targets", "mask"}: (B, L))."""
  rngs = step_rngs(state.rngs, state.step)
  example = state.objective.example(batch, state.objective.train_key(state.step))

  def loss_fn(params):
    model = nnx.merge(state.graphdef, params, rngs, state.router_state)
    logits_BLV, aux = model(example.inputs, mask_BL=example.mask, train=True)
    loss_sum, tokens = token_loss(logits_BLV, example.targets, example.loss_mask)
    cross_entropy = loss_sum / jnp.maximum(tokens, 1.0)
    # The routers' non-parameter state as the forward pass left it (e.g. the updated bias).
    router_state = jax.lax.stop_gradient(nnx.to_pure_dict(nnx.state(model, RouterState)))
    return cross_entropy + aux.aux_loss, (cross_entropy, tokens, aux, router_state)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, (cross_entropy, tokens, aux, router_state)), grads = grad_fn(state.params)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
      "train": {
          "loss": loss,
          "cross_entropy": cross_entropy,
          "aux_loss": aux.aux_loss,
          "grad_norm": optax.tree.norm(grads),
          "learning_rate": state.schedule(state.step),
          "target_tokens": tokens,
      },
      "moe": moe_metrics(aux),
  }
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            router_state=router_state)
  return new_state, metrics


def eval_step(state: TrainState, batch: Batch, index: jax.Array) -> dict[str, Any]:
  """Summed token loss, token count and routing metrics of evaluation batch number `index`."""
  example = state.objective.example(batch, state.objective.eval_key(index))
  logits_BLV, aux = state.model()(example.inputs, mask_BL=example.mask, train=False)
  loss_sum, tokens = token_loss(logits_BLV, example.targets, example.loss_mask)
  return {"loss_sum": loss_sum, "tokens": tokens, "moe": moe_metrics(aux)}


# ----------------------------------------------------------------------------- state


def create_train_state(model_config: ModelConfig, experiment: ExperimentConfig,
                       mesh: jax.sharding.Mesh) -> TrainState:
  """A fresh state, every array created in its final sharding on `mesh` (call under set_mesh)."""
  seed = experiment.train.seed

  def create():
    return Transformer(model_config, rngs=nnx.Rngs(seed))

  abstract = nnx.eval_shape(create)
  graphdef, abstract_params, abstract_rngs, abstract_router, rest = nnx.split(
      abstract, nnx.Param, nnx.RngState, RouterState, ...)
  if jax.tree.leaves(rest):
    raise ValueError(f"the model holds state that is neither a parameter, a random stream nor "
                     f"router state ({list(rest.flat_state())[:3]}...); the trainer would not "
                     "update it.")
  param_shardings = nnx.to_pure_dict(
      sharding.shardings(abstract_params, mesh, experiment.sharding_rules))
  replicated = NamedSharding(mesh, P())
  rng_shardings = jax.tree.map(lambda _: replicated, nnx.to_pure_dict(abstract_rngs))
  router_shardings = jax.tree.map(lambda _: replicated, nnx.to_pure_dict(abstract_router))

  @functools.partial(jax.jit, out_shardings=(param_shardings, rng_shardings, router_shardings))
  def init():
    _, params, rngs, router_state = nnx.split(create(), nnx.Param, nnx.RngState, RouterState)
    return tuple(nnx.to_pure_dict(x) for x in (params, rngs, router_state))

  params, rngs, router_state = init()
  tx, schedule = make_optimizer(experiment.optimizer, experiment.train.num_steps)
  opt_state = jax.jit(tx.init)(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
  return TrainState(step=step, params=params, opt_state=opt_state, rngs=rngs,
                    router_state=router_state, graphdef=graphdef, tx=tx, schedule=schedule,
                    objective=objective_lib.TrainingObjective.of(model_config, seed))


def shardings_of(tree: Any) -> Any:
  return jax.tree.map(lambda x: x.sharding, tree)


def compile_steps(state: TrainState, mesh: jax.sharding.Mesh, batch_spec: P):
  """`train_step` and `eval_step` jitted with the state's shardings and the batch sharding."""
  state_shardings = shardings_of(state)
  batch_sharding = NamedSharding(mesh, batch_spec)
  replicated = NamedSharding(mesh, P())
  train = jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                  out_shardings=(state_shardings, replicated), donate_argnums=0)
  evaluate = jax.jit(eval_step, in_shardings=(state_shardings, batch_sharding, replicated),
                     out_shardings=replicated)
  return train, evaluate


# ----------------------------------------------------------------------------- host side


def device_batch(batch: dict[str, np.ndarray], batch_sharding: NamedSharding) -> Batch:
  """This process's rows of a batch -> global arrays sharded over the token axes."""
  return {key: jax.make_array_from_process_local_data(batch_sharding, np.asarray(batch[key]))
          for key in ("inputs", "targets", "mask")}


def evaluate(eval_fn, state: TrainState, batches, batch_sharding: NamedSharding
             ) -> dict[str, Any]:
  """Validation loss and perplexity (exp of the mean token loss) over `batches`.

  Routing metrics are averaged over the batches, weighted by their real tokens.
  """
  loss_sum, tokens, moe_sums = 0.0, 0.0, None
  for index, batch in enumerate(batches):
    out = jax.device_get(eval_fn(state, device_batch(batch, batch_sharding), np.int32(index)))
    weight = float(out["tokens"])
    loss_sum += float(out["loss_sum"])
    tokens += weight
    weighted = jax.tree.map(lambda v, w=weight: np.asarray(v, np.float64) * w, out["moe"])
    moe_sums = weighted if moe_sums is None else jax.tree.map(np.add, moe_sums, weighted)
  if tokens == 0:
    raise ValueError("the validation split gave no tokens to evaluate on; check data.eval_split "
                     "and train.eval_batches.")
  loss = loss_sum / tokens
  moe = jax.tree.map(lambda v: v / tokens, moe_sums)
  return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens, "moe": moe}


# ----------------------------------------------------------------------------- the run


def train_and_evaluate(config, workdir: str | epath.PathLike) -> dict[str, float]:
  """Trains and evaluates the experiment `config` (a ConfigDict) in `workdir`.

  Resumes from the newest checkpoint in WORKDIR/checkpoints that restores (a damaged one is moved
  to WORKDIR/checkpoints_damaged with a warning). Returns the final metrics, flat:
  "step", "train/..." (last logged step), "eval/loss", "eval/perplexity", "eval/moe/...",
  "eval/step" (the step of that evaluation) and "train/tokens_per_sec_mean". The record of the
  first logged step, min(log_every, num_steps), also holds the parameter counts
  "model/params_*" (see `param_count`), returned too when this run logged that step. After a
  SIGTERM it saves, stops early and returns with "preempted" = 1.0.

  Raises:
    lock.WorkdirLockedError: another run holds the workdir (WORKDIR/run.lock names it).
    divergence.NonFiniteError: a loss, gradient norm or state to be saved was not finite; the
      run stopped without saving it, and its checkpoints are the finite ones saved before.
  """
  jax.config.update("jax_threefry_partitionable", True)
  experiment = experiment_config_from(config)
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  with lock_lib.hold_for_run(workdir):
    return _train_and_evaluate(config, experiment, workdir)


def _train_and_evaluate(config, experiment: ExperimentConfig, workdir: epath.Path
                        ) -> dict[str, float]:
  """`train_and_evaluate` once it holds the workdir."""
  train_cfg = experiment.train
  for field, before, after in config_lib.check_resume(
      workdir, experiment, resuming=_has_checkpoints(workdir), write=jax.process_index() == 0):
    if jax.process_index() == 0:
      print(f"resuming with {field} changed from {before!r} to {after!r}", file=sys.stderr)

  # ---- mesh
  mesh = sharding.make_mesh(experiment.mesh)
  batch_spec = sharding.logical_to_spec(("batch", None), experiment.sharding_rules)
  batch_sharding = NamedSharding(mesh, batch_spec)

  # ---- input
  tokenizer = _prepare_data(experiment)
  model_config = _with_vocab(experiment.model, tokenizer.vocab_size, config)
  per_process = train_cfg.batch_size // jax.process_count()
  data_args = dict(batch_size=per_process, process_index=jax.process_index(),
                   process_count=jax.process_count())
  train_iter = data_lib.train_iterator(experiment.data, tokenizer, **data_args)
  eval_source = functools.partial(data_lib.eval_batches, experiment.data, tokenizer,
                                  max_batches=train_cfg.eval_batches or None, **data_args)

  with jax.set_mesh(mesh):
    # ---- model + shard
    state = create_train_state(model_config, experiment, mesh)

    # ---- restore
    checkpointer = checkpoint_lib.Checkpointer(workdir / "checkpoints",
                                               max_to_keep=train_cfg.max_checkpoints)
    # The newest checkpoint that restores; damaged newer ones are reported and set aside.
    latest = None  # the step restored, which the run continues from
    restored = checkpointer.restore_latest(
        checkpoint_lib.abstract_like(state.checkpoint_items()), train_iter)
    if restored is not None:
      latest, items = restored
      state = state.replace(**items)
    else:  # a fresh start: tables built from the data (a resumed run has them in its checkpoint)
      state = _with_balanced_hash_tables(state, model_config, experiment, tokenizer)

    # ---- update
    train_fn, eval_fn = compile_steps(state, mesh, batch_spec)

    # ---- loop
    writer = metrics_lib.create_writers(workdir, process_index=jax.process_index(),
                                        resume_step=int(jax.device_get(state.step)))
    try:
      result = _loop(state, experiment, train_fn, eval_fn, train_iter, eval_source,
                     batch_sharding, checkpointer, writer,
                     flops_per_token=flops.train_flops_per_token(model_config,
                                                                 experiment.data.seq_len),
                     profile_dir=workdir / "tensorboard")
    finally:
      writer.close()
      checkpointer.close()
  if jax.process_index() == 0:
    run_report.print_summary(result, workdir, state.objective)
  return result


def _with_balanced_hash_tables(state: TrainState, model_config: ModelConfig,
                               experiment: ExperimentConfig, tokenizer) -> TrainState:
  """Hash routers with `hash.table="balanced"` get the table built from the training split's
  token counts (Roller et al. 2021); the layers start with the seeded random table otherwise."""
  moe = model_config.moe
  if moe is None or not moe.router.family.token_ids or (
      moe.router.hash.table is not routing.HashTableKind.BALANCED):
    return state
  counts = data_lib.count_tokens(experiment.data, tokenizer)
  counts = np.pad(counts, (0, model_config.vocab_size - counts.shape[0]))
  table = hash_routing.balanced_table(counts, moe.router.num_experts, moe.router.hash.seed)

  def install(path, value):
    if path and getattr(path[-1], "key", None) == "hash_table":
      return jax.device_put(jnp.asarray(table, value.dtype), value.sharding)
    return value

  return state.replace(router_state=jax.tree_util.tree_map_with_path(install, state.router_state))


def _has_checkpoints(workdir: epath.Path) -> bool:
  """Whether WORKDIR/checkpoints holds a step folder (a run to resume)."""
  directory = workdir / "checkpoints"
  return directory.exists() and any(p.name.isdigit() for p in directory.iterdir())


def _prepare_data(experiment: ExperimentConfig):
  """Builds the dataset and tokenizer once (process 0 first when there are several)."""
  if jax.process_count() == 1:
    return data_lib.prepare(experiment.data)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    data_lib.prepare(experiment.data)
  multihost_utils.sync_global_devices("moejax data prepared")
  return data_lib.prepare(experiment.data)


def _with_vocab(model: ModelConfig, vocab_size: int, config) -> ModelConfig:
  """The model config with the tokenizer's vocabulary (or a larger, explicitly set one); a masked
  LM's has one more row, its mask token."""
  needed = vocab_size + (0 if model.causal else 1)
  explicit = config.model.get("vocab_size") if hasattr(config.model, "get") else None
  if explicit is None:
    return dataclasses.replace(model, vocab_size=needed)
  if explicit < needed:
    extra = "" if model.causal else " plus the mask token"
    raise ValueError(f"model.vocab_size={explicit} is smaller than the tokenizer's vocabulary "
                     f"({vocab_size}){extra}; leave it unset to use the tokenizer's.")
  return model


def _loop(state, experiment, train_fn, eval_fn, train_iter, eval_source, batch_sharding,
          checkpointer, writer, *, flops_per_token: float, profile_dir: epath.Path
          ) -> dict[str, float]:
  """Runs steps state.step + 1 .. num_steps; see `train_and_evaluate`.

  Divergence: every step's loss and gradient norm go to a `NonFiniteWatch` on the device, read
  whenever the loop logs, evaluates or saves anyway; a state is checked before it is saved.
  Either raises NonFiniteError, after writing the metrics of the step that found it.
  """
  cfg = experiment.train
  tokens_per_step = cfg.batch_size * experiment.data.seq_len
  first = int(jax.device_get(state.step)) + 1
  if first > cfg.num_steps:  # a finished run: report its final evaluation, write nothing
    final = evaluate(eval_fn, state, eval_source(), batch_sharding)
    return {**metrics_lib.flatten_metrics({"eval": final}), "eval/step": float(first - 1),
            "step": float(first - 1), "preempted": 0.0, "train/tokens_per_sec_mean": 0.0}
  model_scalars = run_report.report_params(state.model(), experiment)
  device_kind, peak = device_peak.local_peak_flops()
  perf = functools.partial(flops.performance_metrics, flops_per_token,
                           num_devices=jax.device_count(), peak_per_device=peak)
  model_scalars["model/train_flops_per_token"] = flops_per_token
  if jax.process_index() == 0:
    peak_text = f"peak {peak / 1e12:.0f} TFLOP/s bf16" if peak else "no peak known: no MFU"
    print(f"model FLOPs per token (training): {flops_per_token:.4g}; {jax.device_count()} x "
          f"{device_kind} ({peak_text})", flush=True)
  profiler = StepProfiler(profile_dir, first_step=first, start_step=cfg.profile_start_step,
                          steps=cfg.profile_steps if jax.process_index() == 0 else 0)
  bar = metrics_lib.ProgressBar(cfg.num_steps, enabled=cfg.progress and jax.process_index() == 0)
  timer = Throughput()
  watch = divergence.NonFiniteWatch(first, NamedSharding(batch_sharding.mesh, P()))
  result, preempted, step = {}, False, first - 1
  with checkpoint_lib.PreemptionFlag() as flag:
    for step in range(first, cfg.num_steps + 1):
      profiler.before(step)
      state, metrics = train_fn(state, device_batch(next(train_iter), batch_sharding))
      profiler.after(step, metrics)
      watch.observe(metrics["train"])
      if step == first:  # compilation: keep it out of the throughput
        jax.block_until_ready(metrics)
        timer.resume()
      else:
        timer.add(tokens_per_step)
      scalars = {}
      logs = step % cfg.log_every == 0 or step == cfg.num_steps
      if logs:
        if step == min(cfg.log_every, cfg.num_steps):  # the run's first record: the model's size
          scalars.update(model_scalars)
        scalars.update(metrics_lib.flatten_metrics(jax.device_get(metrics)))
        rate = timer.pause()
        if rate is not None:
          scalars["train/tokens_per_sec"] = rate
          scalars.update(perf(rate))
        bar.update(step, scalars["train/loss"], rate or 0.0, mfu=scalars.get("perf/mfu"),
                   tflops=scalars.get("perf/tflops_per_device"))
      preempted = flag.should_stop()
      evaluates = (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.num_steps
      saves = preempted or step == cfg.num_steps or (cfg.checkpoint_every and
                                                    step % cfg.checkpoint_every == 0)
      if logs or evaluates or saves:
        _check_finite(watch, step, checkpointer, writer, scalars)
      if evaluates:
        timer.pause(wait_for=state)
        evaluation = evaluate(eval_fn, state, eval_source(), batch_sharding)
        scalars.update(metrics_lib.flatten_metrics({"eval": evaluation}))
        result["eval/step"] = float(step)
        if not (preempted or step == cfg.num_steps):  # the summary reports the last one
          bar.note(f"step {step}: validation {state.objective.loss_name} "
                   f"{evaluation['loss']:.4f}, "
                   f"perplexity {evaluation['perplexity']:.2f}")
      if scalars:
        writer.write_scalars(step, scalars)
        result.update(scalars)
      if saves:
        divergence.check_finite_state(state.checkpoint_items(), step=step,
                                      checkpointer=checkpointer)
        timer.pause(wait_for=state)
        writer.flush()  # metrics up to this checkpoint are stored before it is (object stores)
        checkpointer.save(step, state.checkpoint_items(), train_iter)
      timer.resume()
      if preempted:
        break
  profiler.close(state)
  bar.close()
  writer.flush()
  result.update({"step": float(step), "preempted": float(preempted),
                 "train/tokens_per_sec_mean": timer.mean})
  if timer.mean:
    result.update({f"{name}_mean": value for name, value in perf(timer.mean).items()})
  return result


def _check_finite(watch: divergence.NonFiniteWatch, step: int, checkpointer, writer,
                  scalars: dict[str, float]) -> None:
  """Raises NonFiniteError if a step so far was not finite, after logging `scalars` (which
  may show it)."""
  try:
    watch.check(checked_at=step, checkpointer=checkpointer)
  except divergence.NonFiniteError:
    if scalars:
      writer.write_scalars(step, scalars)
    writer.flush()
    raise
