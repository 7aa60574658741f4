"""A study's numbers: each run's metrics over its seeds, read back from the runs' metrics.jsonl.

For each finished (run, seed), the values are those of the record of the last step (which holds
the final evaluation), plus:

* `train/tokens_per_sec_mean`: the run's mean training throughput. Each `train/tokens_per_sec`
  record covers the same number of tokens (`train.log_every` steps; compilation, evaluation and
  checkpoints excluded), so the mean throughput, total tokens over total time, is the harmonic
  mean of the logged rates. Read from the file, it covers every session of a resumed run.
* the study's metrics with a `*` (the mean over the MoE layers it matches);
* `model/params_*` from the first record (the parameter counts);
* `wall_seconds`: the run's wall time as the runner recorded it (every attempt);
* the study's extra evaluations (`Evaluation`): "eval@<name>/loss", ".../perplexity",
  ".../tokens" and ".../moe/<layer>/<metric>" from WORKDIR/eval_<name>.json.

Over the seeds, every metric becomes {"mean", "std", "n", "values"}: `std` is the sample
standard deviation (numpy's ddof=1), None when n < 2; `values` are the seeds' own values in the
order of `finished_seeds`. A non-finite value makes the mean and std None.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from moejax import metrics as metrics_lib
from moejax.model import active_ffn_flops_per_token
from moejax.study import sharing
from moejax.study.runner import RunRecord, is_finished
from moejax.study.spec import TOKENS_PER_SEC, Evaluation, Job, Study

STD_DEFINITION = "sample standard deviation over seeds (ddof=1); null when n < 2"


def _pattern(metric: str) -> re.Pattern:
  return re.compile("^" + "[^/]+".join(re.escape(part) for part in metric.split("*")) + "$")


def metric_value(record: dict[str, Any], metric: str) -> float | None:
  """`record[metric]`, or for a metric with `*` the mean of the keys it matches; None if none."""
  if "*" not in metric:
    value = record.get(metric)
    return None if value is None else float(value)
  pattern = _pattern(metric)
  values = [float(v) for k, v in record.items() if pattern.match(k)]
  return sum(values) / len(values) if values else None


def mean_throughput(records: Sequence[dict[str, Any]]) -> float | None:
  """The harmonic mean of the records' `train/tokens_per_sec` (see the module docstring)."""
  rates = [float(r["train/tokens_per_sec"]) for r in records if "train/tokens_per_sec" in r]
  return len(rates) / sum(1.0 / r for r in rates) if rates else None


def seed_values(job: Job, study: Study) -> dict[str, float]:
  """Every metric of one finished job (see the module docstring)."""
  records = metrics_lib.read_jsonl(job.workdir / "metrics.jsonl")
  final = next(r for r in records if r["step"] == job.num_steps and "eval/loss" in r)
  for evaluation in study.extra_evaluations:
    final = {**final, **evaluation_values(job, evaluation)}
  values = {k: float(v) for k, v in final.items() if k != "step"}
  for key, value in records[0].items():
    if key.startswith("model/params_"):
      values.setdefault(key, float(value))
  for metric in {*study.metrics, *study.plots}:
    if "*" in metric:
      value = metric_value(final, metric)
      if value is not None:
        values[metric] = value
  throughput = mean_throughput(records)
  if throughput is not None:
    values[TOKENS_PER_SEC] = throughput
  values["wall_seconds"] = RunRecord.read(job.workdir).wall_seconds
  return values


def evaluation_values(job: Job, evaluation: Evaluation) -> dict[str, float]:
  """The metrics of WORKDIR/eval_<name>.json as the trainer names its own, under
  "eval@<name>/" ({} while the file does not exist)."""
  path = job.workdir / evaluation.file_name
  if not path.exists():
    return {}
  record = json.loads(path.read_text())
  return metrics_lib.flatten_metrics(
      {evaluation.prefix: {k: record[k] for k in ("loss", "perplexity", "tokens", "moe")
                           if k in record}})


def curve_values(job: Job, metric: str) -> list[tuple[int, float]]:
  """(step, value) of `metric` over the job's records that hold it."""
  out = []
  for record in metrics_lib.read_jsonl(job.workdir / "metrics.jsonl"):
    value = metric_value(record, metric)
    if value is not None and record["step"] <= job.num_steps:
      out.append((record["step"], value))
  return out


def _finite(value: float) -> float | None:
  return value if math.isfinite(value) else None


def summary(values: Sequence[float]) -> dict[str, Any]:
  """{"mean", "std" (ddof=1), "n", "values"} of one metric over seeds."""
  array = np.asarray(values, dtype=np.float64)
  n = int(array.size)
  finite = bool(np.all(np.isfinite(array)))
  mean = float(np.mean(array)) if n and finite else None
  std = float(np.std(array, ddof=1)) if n >= 2 and finite else None
  return {"mean": mean, "std": std, "n": n, "values": [_finite(float(v)) for v in array]}


def aggregate_run(run_jobs: Sequence[Job], study: Study) -> dict[str, Any]:
  """One run's entry of the study's JSON, from its jobs (one per seed)."""
  first = run_jobs[0]
  run, experiment = first.run, first.experiment
  finished = [job for job in run_jobs if is_finished(job)]
  per_seed = [seed_values(job, study) for job in finished]
  keys = sorted({key for values in per_seed for key in values})
  metrics = {}
  for key in keys:
    present = [values[key] for values in per_seed if key in values]
    metrics[key] = summary(present)
  curves = {}
  for metric in study.curves:
    by_step: dict[int, list[float]] = {}
    for job in finished:
      for step, value in curve_values(job, metric):
        by_step.setdefault(step, []).append(value)
    curves[metric] = [{"step": step, **{k: v for k, v in summary(values).items()
                                         if k != "values"}}
                      for step, values in sorted(by_step.items())]
  failed = {}
  finished_seeds = {job.seed for job in finished}
  for job in run_jobs:
    if job.seed not in finished_seeds:
      reason = RunRecord.read(job.workdir).failed
      if reason is not None:
        failed[str(job.seed)] = reason
  return {
      "name": run.name,
      "experiment": run.experiment,
      "overrides": [*study.overrides, *run.overrides],
      "note": run.note,
      "seeds": [job.seed for job in run_jobs],
      "finished_seeds": [job.seed for job in finished],
      "failed": failed,
      "shared": {str(job.seed): where for job in run_jobs
                 if (where := sharing.shared_with(job)) is not None},
      "num_steps": experiment.train.num_steps,
      "training_tokens": (experiment.train.num_steps * experiment.train.batch_size *
                          experiment.data.seq_len),
      "active_ffn_flops_per_token": float(active_ffn_flops_per_token(experiment.model)),
      "metrics": metrics,
      "curves": curves,
  }


def aggregate(name: str, study: Study, jobs: Sequence[Job], command: str) -> dict[str, Any]:
  """The study's JSON: its settings, and every run's metrics over seeds."""
  runs = []
  for run in study.runs:
    run_jobs = [job for job in jobs if job.run.name == run.name]
    if run_jobs:
      runs.append(aggregate_run(run_jobs, study))
  return {
      "study": name,
      "description": study.description,
      "command": command,
      "std": STD_DEFINITION,
      "extra_evaluations": [{"name": e.name, "metrics": f"{e.prefix}/...",
                             "settings": list(e.settings)} for e in study.extra_evaluations],
      "table_metrics": list(study.table_metrics),
      "plots": list(study.plots),
      "curves": list(study.curves),
      "runs": runs,
  }
