"""Trains dense_small, switch_small and gshard_small for the same steps and compares them.

    .venv/bin/python experiments/compare.py --steps 300 --workdir_root runs/compare
    .venv/bin/python experiments/compare.py --steps 300 --set train.batch_size=32

Each experiment runs in WORKDIR_ROOT/<name> (a rerun resumes or just re-evaluates), evaluating
`--evals` times along the way. Writes to `--docs_dir` (default docs/):

    compare.md              a table: validation loss and perplexity, training tokens/s, the share
                            of tokens dropped by capacity (training, last logged step; validation)
    compare_val_loss.png    validation loss against steps, one line per experiment

All three spend the same active FFN FLOPs per token, so the table compares routing at equal
compute per token. Expect a few minutes per experiment per 300 steps on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import pathlib
import sys

import jax
import matplotlib

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from moejax import config as config_lib  # noqa: E402
from moejax import metrics, train  # noqa: E402
from moejax.model import active_ffn_flops_per_token  # noqa: E402

EXPERIMENTS = ("dense_small", "switch_small", "gshard_small")


def _parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, required=True, help="training steps of every experiment")
  p.add_argument("--workdir_root", required=True, help="one workdir per experiment below this")
  p.add_argument("--docs_dir", default="docs", help="where compare.md and the plot go")
  p.add_argument("--evals", type=int, default=5, help="evaluations per run (the last at the end)")
  p.add_argument("--variant", default=None, help="get_config(arg) variant, e.g. tiny")
  p.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS))
  p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                 help="config overrides for every experiment, e.g. train.batch_size=32")
  return p.parse_args(argv)


@dataclasses.dataclass
class Outcome:
  name: str
  result: dict[str, float]
  eval_curve: list[tuple[int, float]]  # (step, validation loss)
  train_dropped: float | None
  tokens_per_sec: float  # over the whole run, read back from its metrics
  active_flops: int


def _mean_over_layers(scalars: dict[str, float], prefix: str, metric: str) -> float | None:
  values = [v for k, v in scalars.items() if k.startswith(prefix) and k.endswith("/" + metric)]
  return sum(values) / len(values) if values else None


def run_experiment(name: str, args) -> Outcome:
  config = importlib.import_module(f"experiments.{name}").get_config(args.variant)
  config_lib.apply_overrides(config, args.set)
  config.train.num_steps = args.steps
  config.train.eval_every = max(1, args.steps // max(args.evals, 1))
  config.optimizer.decay_steps = args.steps
  workdir = pathlib.Path(args.workdir_root) / name
  result = train.train_and_evaluate(config, workdir)
  if result["preempted"]:
    return None
  records = metrics.read_jsonl(workdir / "metrics.jsonl")
  curve = [(r["step"], r["eval/loss"]) for r in records if "eval/loss" in r]
  last_train = next((r for r in reversed(records) if "train/loss" in r), {})
  # Each logged rate covers the same number of tokens (log_every steps), so the run's mean
  # throughput is their harmonic mean. Read from the file, it survives resumed runs.
  rates = [r["train/tokens_per_sec"] for r in records if "train/tokens_per_sec" in r]
  model = config_lib.experiment_config_from(config).model
  return Outcome(name=name, result=result, eval_curve=curve,
                 train_dropped=_mean_over_layers(last_train, "moe/", "dropped_fraction"),
                 tokens_per_sec=len(rates) / sum(1.0 / r for r in rates) if rates else 0.0,
                 active_flops=active_ffn_flops_per_token(model))


def _percent(value: float | None) -> str:
  return "—" if value is None else f"{100 * value:.2f}%"


def markdown_table(outcomes: list[Outcome], args) -> str:
  flags = [f"--steps {args.steps}", f"--evals {args.evals}"]
  if args.variant:
    flags.append(f"--variant {args.variant}")
  if args.set:
    flags.append("--set " + " ".join(args.set))
  command = " ".join(["experiments/compare.py", *flags])
  lines = [
      f"# {' vs '.join(o.name for o in outcomes)} ({args.steps} steps)",
      "",
      f"Written by `{command}` on {jax.device_count()} x {jax.devices()[0].platform}. Equal "
      "active FFN FLOPs per token in every row. Training tokens/s: mean over the run as it "
      "trained, compilation and evaluation excluded. Dropped: tokens none of whose experts had "
      "room (mean over MoE layers), in training at the last logged step (capacity factor 1.25) "
      "and on the validation batches (2.0).",
      "",
      "| experiment | active FFN MFLOPs/token | val loss | val perplexity | train tokens/s "
      "| dropped (train) | dropped (val) |",
      "|---|---:|---:|---:|---:|---:|---:|",
  ]
  for o in outcomes:
    r = o.result
    val_dropped = _mean_over_layers(r, "eval/moe/", "dropped_fraction")
    lines.append(
        f"| {o.name} | {o.active_flops / 1e6:.2f} | {r['eval/loss']:.4f} | "
        f"{r['eval/perplexity']:.2f} | {o.tokens_per_sec:,.0f} | "
        f"{_percent(o.train_dropped)} | {_percent(val_dropped)} |")
  return "\n".join(lines) + "\n"


def plot(outcomes: list[Outcome], path: pathlib.Path) -> None:
  fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
  for o in outcomes:
    steps, losses = zip(*o.eval_curve) if o.eval_curve else ((), ())
    ax.plot(steps, losses, marker="o", label=o.name)
  ax.set_xlabel("training step")
  ax.set_ylabel("validation loss (nats per token)")
  ax.set_title("Validation loss at equal active FLOPs per token")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main(argv=None) -> list[Outcome]:
  args = _parse_args(argv)
  if args.steps < 1:
    raise ValueError(f"--steps={args.steps} must be >= 1.")
  outcomes = []
  for name in args.experiments:
    outcome = run_experiment(name, args)
    if outcome is None:  # SIGTERM: the run saved; stop here and write nothing
      print(f"{name} was stopped; rerun the same command to resume the comparison.")
      return outcomes
    outcomes.append(outcome)
  docs = pathlib.Path(args.docs_dir)
  docs.mkdir(parents=True, exist_ok=True)
  table = markdown_table(outcomes, args)
  (docs / "compare.md").write_text(table)
  plot(outcomes, docs / "compare_val_loss.png")
  print(table)
  print(f"wrote {docs / 'compare.md'} and {docs / 'compare_val_loss.png'}")
  return outcomes


if __name__ == "__main__":
  main()
