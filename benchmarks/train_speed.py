"""Benchmark: training tokens/s of switch_small relative to dense_small, measured in one run.

Usage:
  .venv/bin/python benchmarks/train_speed.py                  # the experiments as configured
  .venv/bin/python benchmarks/train_speed.py --steps 5 --repeats 2
  .venv/bin/python benchmarks/train_speed.py --experiments dense_small switch_small gshard_small
  .venv/bin/python benchmarks/train_speed.py --set train.batch_size=32 data.vocab_size=4096
  .venv/bin/python benchmarks/train_speed.py --study capacity_factor   # a study's runs

Each experiment's full `train_step` (forward, backward, AdamW update) is compiled once on the
mesh its config names (one device by default), then the experiments are timed in many short
interleaved rounds of `--steps` steps on synthetic token batches of the configured shape, so that
load from other processes hits all of them alike; each reports its best round (the least
disturbed). On a busy machine, raise `--repeats`. `--study NAME` times each run of a study
(experiments/studies/NAME.py: its experiment with the study's and the run's overrides) instead:
the quiet, side-by-side speed figure for a study whose training runs shared the machine.
Prints tokens/s per experiment, each one's ratio to the first (the goal for switch_small over
dense_small on a 2-core CPU: >= 0.8), the achieved model TFLOP/s per device and, on devices with
a known peak, the MFU (moejax/flops.py). No dataset is needed: the vocabulary is `data.vocab_size`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import pathlib
import sys
import time

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from moejax import config as config_lib  # noqa: E402
from moejax import device_peak, flops, sharding, train  # noqa: E402
from moejax.study import spec as study_spec  # noqa: E402


def _parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--experiments", nargs="+", default=["dense_small", "switch_small"])
  p.add_argument("--study", help="time each run of this study instead (experiment + overrides)")
  p.add_argument("--steps", type=int, default=4, help="steps per timed round")
  p.add_argument("--repeats", type=int, default=8, help="timed rounds per experiment")
  p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                 help="config overrides for every experiment, e.g. train.batch_size=32")
  return p.parse_args(argv)


def _candidates(args) -> dict[str, tuple[ml_collections.ConfigDict, list[str]]]:
  """name -> (experiment config, overrides): the named experiments, or a study's runs."""
  if args.study is None:
    return {name: (importlib.import_module(f"experiments.{name}").get_config(), args.set)
            for name in args.experiments}
  _, study = study_spec.load_study(args.study)
  return {run.name: (study_spec.load_experiment(run.experiment, run.name),
                     [*study.overrides, *run.overrides, *args.set]) for run in study.runs}


def _setup(config: ml_collections.ConfigDict, overrides: list[str]):
  """(step function, state, batch, tokens per step, mesh) of one experiment."""
  config_lib.apply_overrides(config, overrides)
  experiment = config_lib.experiment_config_from(config)
  model_config = dataclasses.replace(experiment.model, vocab_size=experiment.data.vocab_size)
  mesh = sharding.make_mesh(experiment.mesh)
  spec = sharding.logical_to_spec(("batch", None), experiment.sharding_rules)
  B, L = experiment.train.batch_size, experiment.data.seq_len
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, experiment.data.vocab_size, (B, L + 1), dtype=np.int32)
  batch_np = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": np.ones((B, L), bool)}
  with jax.set_mesh(mesh):
    state = train.create_train_state(model_config, experiment, mesh)
    step_fn, _ = train.compile_steps(state, mesh, spec)
    batch = train.device_batch(batch_np, NamedSharding(mesh, spec))
    state, metrics = step_fn(state, batch)  # compiles
    jax.block_until_ready(metrics)
  return dict(step_fn=step_fn, state=state, batch=batch, tokens=B * L, mesh=mesh,
              flops_per_token=flops.train_flops_per_token(model_config, L))


def _time_round(run, steps: int) -> float:
  with jax.set_mesh(run["mesh"]):
    start = time.perf_counter()
    state = run["state"]
    for _ in range(steps):
      state, metrics = run["step_fn"](state, run["batch"])
    jax.block_until_ready(metrics)
    run["state"] = state
  return run["tokens"] * steps / (time.perf_counter() - start)


def main(argv=None):
  args = _parse_args(argv)
  runs = {}
  for name, (config, overrides) in _candidates(args).items():
    t0 = time.perf_counter()
    runs[name] = _setup(config, overrides)
    print(f"{name}: compiled in {time.perf_counter() - t0:.1f} s "
          f"({runs[name]['tokens']} tokens per step)", flush=True)
  rates = {name: [] for name in runs}
  order = list(runs)
  for _ in range(args.repeats):
    for name in order:
      rates[name].append(_time_round(runs[name], args.steps))
    order.reverse()  # neither experiment always runs first after the other
  best = {name: max(r) for name, r in rates.items()}
  base = next(iter(runs))
  kind, peak = device_peak.local_peak_flops()
  print(f"\ntraining tokens/s (best of {args.repeats} rounds of {args.steps} steps; "
        f"{jax.device_count()} x {kind}; MFU against "
        f"{f'{peak / 1e12:.0f} TFLOP/s' if peak else 'no known peak'}):")
  width = max(len(name) for name in runs)
  for name in runs:
    rounds = " ".join(f"{r / 1e3:.1f}k" for r in rates[name])
    perf = flops.performance_metrics(runs[name]["flops_per_token"], best[name],
                                     jax.device_count(), peak)
    mfu = f"   MFU {100 * perf['perf/mfu']:.1f}%" if "perf/mfu" in perf else ""
    print(f"  {name:<{width}} {best[name] / 1e3:8.1f}k tok/s   ratio to {base}: "
          f"{best[name] / best[base]:.3f}   TFLOP/s/device {perf['perf/tflops_per_device']:.3g}"
          f"{mfu}   (rounds: {rounds})")


if __name__ == "__main__":
  main()
