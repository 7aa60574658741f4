"""Evaluates a training run's newest checkpoint, without the training command.

    python -m moejax.evaluate --workdir=runs/switch_small
    python -m moejax.evaluate --workdir=runs/switch_small --split=test --batches=50
    python -m moejax.evaluate --workdir=runs/switch_small \
        --set=model.moe.router.capacity_factor_eval=1.0 --output=runs/switch_small/eval_cf1.json

By default the whole evaluation split (`data.eval_split` of the run; `--split` names another)
in batches of `train.batch_size` rows of `data.seq_len` tokens on the run's mesh, exactly as the
trainer evaluates (`train.eval_step` and `train.evaluate`): on the same batches the loss is the
trainer's. (The trainer stops after `train.eval_batches` batches; `--batches=N` does the same.)
A progress line on stderr counts the batches; the result goes to stdout:

    step 500: test loss 4.1872, perplexity 65.86 (82,430 target tokens, 41 batches)

and, as JSON (loss, perplexity, tokens, batches, step, split and the per-layer routing metrics),
to `--output` (default WORKDIR/eval_<split>_step<step>.json). Exit statuses: `moejax.command`.

`--set=PATH=VALUE` (repeatable) evaluates under a changed setting that leaves the trained model
as it is: one of the fields a resumed run may change (`moejax.config.RESUMABLE_FIELDS`), such as
the evaluation capacity factor, the dispatch form or the mesh. The value is read as a Python
literal, else taken as a string; the record lists the settings under "settings".
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath
from jax.sharding import NamedSharding

from moejax import command, sharding, train
from moejax.config import check_evaluation_setting, parse_value
from moejax import data as data_lib
from moejax import workdir as workdir_lib


def evaluate_run(run: workdir_lib.TrainedRun, *, max_batches: int | None = None,
                 progress: bool = True) -> dict[str, Any]:
  """The trainer's evaluation (`train.evaluate`) of `run` on its `data.eval_split`.

  Returns loss, perplexity, tokens, moe (per-layer routing metrics) and batches.
  """
  experiment = run.experiment
  batch_spec = sharding.logical_to_spec(("batch", None), experiment.sharding_rules)
  batch_sharding = NamedSharding(run.mesh, batch_spec)
  per_process = experiment.train.batch_size // jax.process_count()
  batches = data_lib.eval_batches(experiment.data, run.tokenizer, batch_size=per_process,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count(), max_batches=max_batches)
  counter = _Progress(f"evaluating step {run.step} on {experiment.data.eval_split!r}",
                      enabled=progress and jax.process_index() == 0)
  with jax.set_mesh(run.mesh):
    _, eval_fn = train.compile_steps(run.state, run.mesh, batch_spec)
    result = train.evaluate(eval_fn, run.state, counter.count(batches), batch_sharding)
  counter.close()
  return {**result, "batches": counter.batches}


class _Progress:
  """`name: batch N, T tokens, S s` on stderr, in place on a terminal, else every 10 batches."""

  def __init__(self, name: str, *, enabled: bool, stream=None):
    self.name, self.enabled = name, enabled
    self.stream = stream or sys.stderr
    self.in_place = hasattr(self.stream, "isatty") and self.stream.isatty()
    self.batches, self.tokens = 0, 0
    self.start = time.perf_counter()

  def count(self, batches: Iterable[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    for batch in batches:
      self.batches += 1
      self.tokens += int(np.sum(batch["mask"]))
      if self.enabled and (self.in_place or self.batches == 1 or self.batches % 10 == 0):
        text = (f"{self.name}: batch {self.batches}, {self.tokens:,} tokens, "
                f"{time.perf_counter() - self.start:.1f} s")
        self.stream.write(("\r" + text + "\x1b[K") if self.in_place else text + "\n")
        self.stream.flush()
      yield batch

  def close(self) -> None:
    if self.enabled and self.in_place:
      self.stream.write("\n")
      self.stream.flush()


def _to_json(value):
  if isinstance(value, dict):
    return {k: _to_json(v) for k, v in value.items()}
  if isinstance(value, int):
    return value
  array = np.asarray(value)
  return float(array) if array.ndim == 0 else array.tolist()


def _main(args) -> None:
  if args.batches is not None and args.batches < 1:
    raise ValueError(f"--batches={args.batches} must be an integer >= 1 (leave it out for the "
                     "whole split).")
  settings = parse_settings(args.set)
  changes = dict(settings)
  if args.split is not None:
    changes["data.eval_split"] = args.split
  try:
    run = workdir_lib.load(args.workdir, changes=changes)
  except ValueError as error:
    field = f"data.eval_split={args.split!r}"
    if args.split is not None and str(error).startswith(field):  # the flag, not the config
      raise ValueError(f"--split={args.split!r}{str(error)[len(field):]}") from error
    for path, value in settings.items():  # a value the config refuses: name the flag
      if str(error).startswith(f"{path}="):
        raise ValueError(f"--set={path}={value!r}: {error}") from error
    raise
  result = evaluate_run(run, max_batches=args.batches, progress=not args.quiet)
  split = run.experiment.data.eval_split
  loss_name = run.state.objective.loss_name
  print(f"step {run.step}: {split} {loss_name} {result['loss']:.4f}, perplexity "
        f"{result['perplexity']:.2f} ({int(result['tokens']):,} "
        f"{run.state.objective.counted_tokens}, {result['batches']} "
        f"batch{'es' if result['batches'] != 1 else ''})")
  output = epath.Path(args.output or run.workdir / f"eval_{split}_step{run.step}.json")
  record = {"workdir": str(run.workdir), "step": run.step, "split": split,
            "settings": settings, **_to_json(result)}
  if jax.process_index() == 0:
    output.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    print(f"written: {output}")


def parse_settings(assignments: Sequence[str]) -> dict[str, Any]:
  """{"path": value} from `--set` assignments, each a field of RESUMABLE_FIELDS."""
  settings = {}
  for assignment in assignments:
    path, sep, text = assignment.partition("=")
    if not sep or not path:
      raise ValueError(f"--set={assignment!r} must look like group.field=value "
                       "(model.moe.router.capacity_factor_eval=1.0).")
    try:
      check_evaluation_setting(path)
    except ValueError as error:
      raise ValueError(f"--set={assignment}: {error}") from None
    settings[path] = parse_value(text)
  return settings


def main(argv: Sequence[str] | None = None) -> int:
  parser = command.Parser(prog="python -m moejax.evaluate",
                          description="Evaluate the newest checkpoint of a training run.")
  parser.add_argument("--workdir", required=True, help="the training run's workdir")
  parser.add_argument("--split", default=None,
                      help="the split to evaluate (default: the run's data.eval_split)")
  parser.add_argument("--batches", type=int, default=None,
                      help="evaluate only the first N batches (default: the whole split)")
  parser.add_argument("--output", default=None,
                      help="the JSON file to write (default: WORKDIR/eval_<split>_step<step>.json)")
  parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                      help="evaluate under a changed setting that leaves the trained model as it "
                           "is (model.moe.router.capacity_factor_eval=1.0); repeatable")
  parser.add_argument("--quiet", action="store_true", help="no progress line")
  return command.run(parser, _main, argv)


if __name__ == "__main__":
  sys.exit(main())
