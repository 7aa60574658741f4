"""What a training run prints about itself: its parameter counts and non-causal routing at the
start, and a summary (validation perplexity, expert load, where its outputs are) at the end."""

from __future__ import annotations

import os
import sys

import jax
from etils import epath
from flax import nnx

from moejax import metrics as metrics_lib
from moejax import objective as objective_lib
from moejax import typed_config
from moejax.config import ExperimentConfig
from moejax.model import expert_rows_per_token, noncausal_routing
from moejax.param_count import count_params


def report_params(model: nnx.Module, experiment: ExperimentConfig) -> dict[str, float]:
  """Prints the model's parameter counts (process 0) and returns them as metric scalars."""
  moe = experiment.model.moe
  counts = count_params(nnx.state(model, nnx.Param), experts_per_token=(
      float(expert_rows_per_token(moe)) if moe else 1))
  noncausal = noncausal_routing(experiment.model)
  if jax.process_index() == 0:
    print(counts.describe(), flush=True)
    if noncausal:
      router = experiment.model.moe.router
      field, why = next(reason for reason in (router.lookahead(train=True),
                                              router.lookahead(train=False)) if reason)
      value = typed_config.as_plain(getattr(router, field))
      print(f"NON-CAUSAL: {typed_config.path_of(router, field)}={value!r}: {why} in this causal "
            "LM (allow_noncausal=True); its losses are not comparable with causal runs.",
            flush=True)
  return {**counts.as_metrics(), "model/noncausal_routing": float(noncausal)}


def print_summary(result: dict[str, float], workdir: epath.Path,
                   objective: objective_lib.TrainingObjective) -> None:
  """Validation perplexity (of the objective's loss) and per-layer expert load, on stdout."""
  step = int(result["step"])
  if result.get("model/noncausal_routing"):
    print("NON-CAUSAL routing (allow_noncausal=True): not comparable with causal runs.")
  if "eval/loss" in result:
    print(f"step {int(result.get('eval/step', step))}: validation {objective.loss_name} "
          f"{result['eval/loss']:.4f}, perplexity {result['eval/perplexity']:.2f} "
          f"({int(result['eval/tokens'])} {objective.counted_tokens})")
  print(f"training throughput: {metrics_lib.format_count(result['train/tokens_per_sec_mean'])} "
        "tokens/s (mean, compilation, evaluation and checkpoints excluded)")
  layers = sorted({k.split("/")[2] for k in result if k.startswith("eval/moe/")},
                  key=lambda name: int(name.split("_")[-1]))
  if layers:
    print("expert load on the validation batches (share of routed assignments per expert):")
  for layer in layers:
    prefix = f"eval/moe/{layer}/"
    loads = [result[k] for k in sorted((k for k in result if k.startswith(prefix +
                                                                          "expert_load/")),
                                       key=lambda k: int(k.rsplit("/", 1)[1]))]
    dropped = result.get(prefix + "dropped_fraction", float("nan"))
    print(f"  {layer:<9} " + " ".join(f"{v:.3f}" for v in loads) +
          f"   (uniform {1 / len(loads):.3f}; dropped tokens {100 * dropped:.2f}%)")
  if result.get("preempted"):
    print(f"stopped by SIGTERM at step {step}; rerun the same command to resume.")
  # TensorBoard is installed beside this interpreter (in .venv/bin), not necessarily on PATH.
  tensorboard = os.path.join(os.path.dirname(sys.executable), "tensorboard")
  print(f"checkpoints: {workdir / 'checkpoints'}   "
        f"TensorBoard: {tensorboard} --logdir {workdir / 'tensorboard'}")
