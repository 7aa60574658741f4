"""`python -m moejax.study NAME`: trains what a study still needs, then writes its report.

    python -m moejax.study NAME [--scale base] [--steps N] [--seeds S ...] [--set PATH=VALUE ...]
                                [--runs-root runs/studies] [--write-docs [--docs-dir docs/studies]]
                                [--jobs N] [--list] [--report-only] [--retry-failed] [--no-share]

NAME is a study file's stem (`experiments/studies/NAME.py`) or a path to a study file. Runs go to
RUNS_ROOT/NAME/<run>/seed_<seed> (RUNS_ROOT/NAME-<N>steps/... with --steps, NAME-base/... with
--scale base, NAME-set<hash>/... with --set, so that a study of another size never continues the
runs of this one). `--scale` grows every run for an accelerator, keeping what the study compares
(moejax/study/scale.py); `--set` applies settings to every run last (a dataset, a mesh). The
report (NAME.md, NAME.json and the PNG figures) goes to RUNS_ROOT/NAME/report, and with
--write-docs to DOCS_DIR instead (the committed copy).
The report is written once every run has finished or failed; a stopped study writes nothing.
`--report-only` writes it at once from the runs finished so far (each run's cells say how many
seeds they hold) and trains nothing: a look at a study another process is still running.
A run whose settings equal a run another study under RUNS_ROOT has finished is shared with it,
not trained again (moejax/study/sharing.py; --no-share turns that off).

The runs share JAX's persistent compilation cache, RUNS_ROOT/.jax_cache (unless
$JAX_COMPILATION_CACHE_DIR names another): every seed of a run, and a resumed run, loads the
programs its first seed compiled.

`--jobs N` trains N runs at once, each on its own share of the machine: its GPU(s), else its CPU
core(s), pinned (moejax/study/slots.py); N = 1 gives each run the whole machine.

Exit status: 0 done, or stopped by SIGTERM / Ctrl-C (rerun the same command to resume); 1 some
runs failed (the report lists them); 2 bad input (the study file, a setting, a workdir made with
other settings), one line "moejax.study: ..." on stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import sys

from moejax import lock as lock_lib
from moejax.study import aggregate, figures, report, runner, sharing, spec
from moejax.study import scale as scale_lib
from moejax.study import slots as slots_lib

EXIT_FAILED, EXIT_USAGE = 1, 2
CACHE_VARIABLE, CACHE_DIR = "JAX_COMPILATION_CACHE_DIR", ".jax_cache"


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m moejax.study",
                              description=__doc__.splitlines()[0])
  p.add_argument("study", help="a study's name (experiments/studies/NAME.py) or a study file")
  p.add_argument("--steps", type=int, default=None,
                 help="training steps of every run (default: each experiment's)")
  p.add_argument("--seeds", type=int, nargs="+", default=None,
                 help="seeds of every run (default: the study's)")
  p.add_argument("--scale", choices=sorted(scale_lib.SCALES), default=None,
                 help="grow every run to this size, for accelerators (moejax/study/scale.py)")
  p.add_argument("--set", nargs="+", default=[], metavar="PATH=VALUE", dest="settings",
                 help="settings applied to every run last (e.g. data.name=... with --scale)")
  p.add_argument("--runs-root", default="runs/studies", help="runs go to RUNS_ROOT/NAME")
  p.add_argument("--write-docs", action="store_true",
                 help="write the report to --docs-dir (the committed copy) instead of the runs")
  p.add_argument("--docs-dir", default="docs/studies", help="where --write-docs writes")
  p.add_argument("--list", action="store_true",
                 help="print every run, seed and its state (and the finished run of another "
                      "study it would share); train nothing")
  p.add_argument("--report-only", action="store_true",
                 help="write the report from the runs finished so far; train and evaluate "
                      "nothing (works while the study runs)")
  p.add_argument("--retry-failed", action="store_true",
                 help="train again the runs whose last attempt failed")
  p.add_argument("--jobs", type=int, default=1,
                 help="train this many runs at once, each on its own GPU(s) or CPU core(s) "
                      "(moejax/study/slots.py)")
  p.add_argument("--no-share", action="store_true",
                 help="train every run here, even one another study under RUNS_ROOT has "
                      "finished with the same settings (moejax/study/sharing.py)")
  return p.parse_args(argv)


def command_line(args, name: str) -> str:
  """The command that makes this report (what the report says it was made by)."""
  default = spec.STUDIES_DIR / f"{name}.py"
  given = pathlib.Path(args.study)
  target = name if (args.study == name or given == default) else args.study
  parts = ["python -m moejax.study", target]
  if args.scale is not None:
    parts.append(f"--scale {args.scale}")
  if args.steps is not None:
    parts.append(f"--steps {args.steps}")
  if args.seeds is not None:
    parts.append("--seeds " + " ".join(str(s) for s in args.seeds))
  if args.settings:
    parts.append("--set " + " ".join(args.settings))
  return " ".join(parts)


def study_dir(args, name: str) -> pathlib.Path:
  """RUNS_ROOT/NAME, with -SCALE, -<N>steps and -set<hash of --set> where given: runs of other
  sizes or settings never continue each other."""
  folder = name
  if args.scale is not None:
    folder += f"-{args.scale}"
  if args.steps is not None:
    folder += f"-{args.steps}steps"
  if args.settings:
    folder += "-set" + hashlib.sha256("\n".join(args.settings).encode()).hexdigest()[:8]
  return pathlib.Path(args.runs_root) / folder


def list_jobs(jobs, share_root: pathlib.Path | None) -> None:
  """One line per job: its state and workdir; where it is linked to another study's run, or
  (`share_root` given) would be at its start, that run, relative to the runs root."""
  width = max((len(job.run.name) for job in jobs), default=0)
  for job in jobs:
    where = sharing.shared_with(job)
    note = f" (shared: {where})" if where else ""
    if not where and share_root is not None:
      twin = sharing.twin_of_unstarted(job, share_root)
      note = f" (will share: {twin.relative_to(share_root)})" if twin else ""
    print(f"{job.run.name:<{width}}  seed {job.seed:<4} {job.num_steps:>7} steps   "
          f"{runner.status(job):<9} {job.workdir}{note}")


def write_report(name: str, study: spec.Study, jobs, args) -> list[pathlib.Path]:
  out_dir = pathlib.Path(args.docs_dir) if args.write_docs else study_dir(args, name) / "report"
  result = aggregate.aggregate(name, study, jobs, command_line(args, name))
  written = figures.write_figures(result, out_dir)
  paths = report.write(result, out_dir, written)
  return paths + [out_dir / file_name for _, file_name in written]


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    name, study = spec.load_study(args.study)
    directory = study_dir(args, name)
    try:
      job_slots = slots_lib.slots(args.jobs)
    except ValueError as error:
      raise spec.StudyError(str(error)) from None
    jobs = spec.jobs(study, directory, steps=args.steps, seeds=args.seeds,
                     scale=scale_lib.SCALES.get(args.scale), settings=args.settings)
    # The runs share compiled programs: every seed of a run compiles the same ones.
    os.environ.setdefault(CACHE_VARIABLE, str(pathlib.Path(args.runs_root).resolve() / CACHE_DIR))
    if args.list:
      list_jobs(jobs, None if args.no_share else pathlib.Path(args.runs_root))
      return 0
    if args.report_only:  # reads finished runs only: no lock, whatever another process runs
      print("study: wrote " + ", ".join(str(p) for p in write_report(name, study, jobs, args)),
            flush=True)
      return 0
    directory.mkdir(parents=True, exist_ok=True)
    with lock_lib.WorkdirLock(directory):
      runner_ = runner.Runner(jobs, retry_failed=args.retry_failed,
                              share_root=None if args.no_share else pathlib.Path(args.runs_root),
                              slots=job_slots)
      outcome = runner_.run()
      paths = write_report(name, study, jobs, args)
  except runner.Stop:
    print("study: stopped; the running job saved a checkpoint. Rerun the same command to "
          "resume.", flush=True)
    return 0
  except (spec.StudyError, lock_lib.WorkdirLockedError) as error:
    print(f"moejax.study: {error}", file=sys.stderr, flush=True)
    return EXIT_USAGE
  print("study: wrote " + ", ".join(str(p) for p in paths), flush=True)
  if runner_.failed_evaluations:
    print(f"study: {len(runner_.failed_evaluations)} evaluation(s) failed: " +
          ", ".join(f"{job.label} {e.name}" for job, e in runner_.failed_evaluations),
          flush=True)
  if outcome["failed"]:
    print(f"study: {len(outcome['failed'])} run(s) failed: " +
          ", ".join(job.label for job in outcome["failed"]), flush=True)
  return EXIT_FAILED if outcome["failed"] or runner_.failed_evaluations else 0


if __name__ == "__main__":
  sys.exit(main())
