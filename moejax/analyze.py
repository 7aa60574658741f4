"""`python -m moejax.analyze --workdir=DIR`: what the experts of a trained run specialise in.

    python -m moejax.analyze --workdir=runs/switch_small [--split=validation] [--batches=N]
                             [--out=DIR/analysis] [--buckets=16] [--min-count=5] [--top=20]

Restores the newest checkpoint of DIR (its config from DIR/config.json, the tokenizer the data
pipeline keeps), routes the split in evaluation mode and writes, per MoE layer, the load heatmap
(expert x position bucket), each expert's most over-represented tokens (lift over their frequency
in the split), the share of each token class per expert, and how often a token keeps its expert
from one MoE layer to the next: OUT/report.md with PNG figures, and every number in
OUT/analysis.json (moejax/analysis/ says how each is defined). Nothing in DIR but OUT is written.

--split: the split to route (default: the run's data.eval_split). --batches: at most this many
batches of the run's train.batch_size sequences (default: the run's train.eval_batches, what its
evaluations read; 0: the whole split).

Exit status: 0 done; 1 an error (a checkpoint that does not restore: one line; anything else:
its traceback); 2 bad input (no config or checkpoint in DIR, a dense model, a router whose tokens
do not choose experts, a bad flag): one line "moejax.analyze: <message>" on stderr, with
`--traceback` printing the traceback first.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import traceback

EXIT_ERROR, EXIT_USAGE = 1, 2
PROG = "moejax.analyze"


def parse_args(argv):
  p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="the training run's workdir")
  p.add_argument("--split", default=None, help="split to route (default: data.eval_split)")
  p.add_argument("--batches", type=int, default=None,
                 help="batches to route (default: train.eval_batches; 0: the whole split)")
  p.add_argument("--out", default=None, help="output folder (default: WORKDIR/analysis)")
  p.add_argument("--buckets", type=int, default=16, help="position buckets of the heatmaps")
  p.add_argument("--min-count", type=int, default=5,
                 help="a top token needs at least this many assignments to the expert")
  p.add_argument("--top", type=int, default=20, help="top tokens per expert in the JSON")
  p.add_argument("--traceback", action="store_true",
                 help="print the traceback of a bad-input error before its one line")
  args = p.parse_args(argv)
  for name, low in (("batches", 0), ("buckets", 1), ("min_count", 1), ("top", 1)):
    value = getattr(args, name)
    if value is not None and value < low:
      p.error(f"--{name.replace('_', '-')}={value} must be an integer >= {low}")
  return args


def command_line(args) -> str:
  parts = [f"python -m {PROG}", f"--workdir={args.workdir}"]
  for flag in ("split", "batches", "out"):
    if getattr(args, flag) is not None:
      parts.append(f"--{flag}={getattr(args, flag)}")
  for flag, default in (("buckets", 16), ("min_count", 5), ("top", 20)):
    if getattr(args, flag) != default:
      parts.append(f"--{flag.replace('_', '-')}={getattr(args, flag)}")
  return " ".join(parts)


def analyse(args) -> list[pathlib.Path]:
  """Runs the analysis `args` describe; returns the files written."""
  import jax  # pylint: disable=g-import-not-at-top
  from moejax.analysis import collect, report, statistics, token_classes  # pylint: disable=g-import-not-at-top
  try:
    import matplotlib  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise collect.AnalysisError("the figures need matplotlib: pip install -e '.[plot]'") from None
  jax.config.update("jax_threefry_partitionable", True)  # as in training: the same masks
  run = collect.load_run(args.workdir, split=args.split)
  batches = run.experiment.train.eval_batches if args.batches is None else args.batches
  routes = collect.collect(run, max_batches=batches or None)
  if routes.tokens_N.size == 0:
    raise collect.AnalysisError(f"--split={run.experiment.data.eval_split!r} gave no real token "
                                "to analyse.")
  texts, classes_VC = token_classes.vocabulary(run.tokenizer, run.model.vocab_size,
                                               mask_id=run.state.objective.mask_id if not
                                               run.model.causal else None)
  router = run.model.moe.router
  result = statistics.summarise(
      routes.tokens_N, routes.positions_N, routes.layers, num_experts=router.num_experts,
      seq_len=run.experiment.data.seq_len, classes_VC=classes_VC, texts=texts,
      num_buckets=args.buckets, min_count=args.min_count, top=args.top)
  result.update({
      "workdir": str(args.workdir), "step": run.step, "split": run.experiment.data.eval_split,
      "batches": routes.batches, "num_experts": router.num_experts, "router": router.kind.value,
      "assignments_per_token": int(next(iter(routes.layers.values()))[0].shape[1]),
      "seq_len": run.experiment.data.seq_len, "tokenizer": run.experiment.data.tokenizer_kind,
      "classes": list(token_classes.CLASSES), "command": command_line(args),
  })
  out = pathlib.Path(args.out) if args.out else pathlib.Path(args.workdir) / "analysis"
  return report.write(result, out)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
  from moejax import checkpoint  # pylint: disable=g-import-not-at-top
  try:
    paths = analyse(args)
  except (ValueError, checkpoint.CheckpointError) as error:
    if args.traceback:
      traceback.print_exception(error)
    print(f"{PROG}: {error}", file=sys.stderr, flush=True)
    return EXIT_ERROR if isinstance(error, checkpoint.CheckpointError) else EXIT_USAGE
  report_path = next(p for p in paths if p.name == "report.md")
  print(f"wrote {report_path} ({len(paths) - 1} more files beside it)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
