"""What a study is: runs (experiment + overrides) x seeds, and the metrics to report.

A study file, `experiments/studies/<name>.py`, defines `get_study() -> Study`:

    Study(
        description="Switch Transformer, Fig. 4: more experts at equal FLOPs ...",
        runs=(Run("dense", "experiments/dense_small.py"),
              Run("switch_e8", "experiments/switch_small.py",
                  overrides=("model.moe.router.num_experts=8",))),
        seeds=(0, 1, 2),
        metrics=("eval/loss", "eval/moe/*/dropped_fraction"),
    )

`load_study` reads such a file, `jobs` turns it into one `Job` per (run, seed): its resolved and
validated config, its workdir and the `python -m moejax.main` command that trains it.

Overrides are "path=value" strings, exactly as `--config.<path>=value` on the command line (the
value a Python literal, else a string); every typed field is settable (`moejax.config`). The
seed sets `train.seed` (parameter initialisation and every random stream of training; the data
order is `data.shuffle_seed`, which the seed leaves alone). A metric is a key of the runs'
`metrics.jsonl` records ("eval/loss", "moe/layer_1/dropped_fraction"); a `*` in it stands for
one path component and the metric is the mean over what it matches ("eval/moe/*/dropped_fraction":
the mean over MoE layers).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import pathlib
import re
from collections.abc import Sequence

import ml_collections

from moejax import config as config_lib
from moejax.config import ExperimentConfig
from moejax.study.scale import Scale

STUDIES_DIR = pathlib.Path("experiments") / "studies"
# The mean training throughput of a run, which every table shows beside the quality metrics.
TOKENS_PER_SEC = "train/tokens_per_sec_mean"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class StudyError(ValueError):
  """A study file that cannot be used; the message names the study, the run and the field."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One setting of a study, trained once per seed.

  Attributes:
    name: the row's name in the tables and the run's folder (letters, digits, `_ . -`).
    experiment: an experiment file, relative to the repository root, optionally with the
      `get_config` argument after a colon ("experiments/switch_small.py:tiny").
    overrides: "path=value" settings applied after the study's own `overrides`.
    seeds: the seeds of this run; None: the study's.
    note: shown beside the run in the tables (e.g. "non-causal router").
  """

  name: str
  experiment: str
  overrides: tuple[str, ...] = ()
  seeds: tuple[int, ...] | None = None
  note: str = ""


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """A further evaluation of every finished run, under settings that leave the trained model as it
  is (fields of `moejax.config.RESUMABLE_FIELDS`, such as the evaluation capacity factor).

  The runner evaluates each finished run's last checkpoint with `python -m moejax.evaluate
  --set=...` on the batches the trainer evaluates (`train.eval_batches` of the validation split)
  into WORKDIR/eval_<name>.json; the report reads its metrics as the trainer's "eval/..." keys
  with "eval@<name>" in place of "eval": "eval@cf1.0/loss", "eval@cf1.0/moe/*/dropped_fraction".

  Attributes:
    name: names the metrics and the file (letters, digits, `_ . -`).
    settings: "path=value" settings, as `--set` takes them.
  """

  name: str
  settings: tuple[str, ...]

  @property
  def prefix(self) -> str:
    return f"eval@{self.name}"

  @property
  def file_name(self) -> str:
    return f"eval_{self.name}.json"


@dataclasses.dataclass(frozen=True)
class Study:
  """A set of runs and what to report about them.

  Attributes:
    description: what the study tests (the paper's claim) and how; the report's first paragraph.
    runs: the settings compared, in table order.
    seeds: seeds of every run that does not list its own.
    metrics: the table's columns (the run's mean training tokens/s is always added last).
    plots: metrics that get a bar chart (mean and standard deviation over seeds per run).
    curves: metrics logged along the run that get a curve against steps ("eval/loss").
    overrides: "path=value" settings of every run (before the run's own).
    evaluations: evaluations per run (`train.eval_every` = steps // evaluations, the last at the
      end); None keeps the experiment's `train.eval_every`.
    extra_evaluations: `Evaluation`s of every finished run under other settings (their metrics
      are "eval@<name>/...").
  """

  description: str
  runs: tuple[Run, ...]
  seeds: tuple[int, ...] = (0, 1, 2)
  metrics: tuple[str, ...] = ("eval/loss", "eval/perplexity")
  plots: tuple[str, ...] = ("eval/loss",)
  curves: tuple[str, ...] = ("eval/loss",)
  overrides: tuple[str, ...] = ()
  evaluations: int | None = 4
  extra_evaluations: tuple[Evaluation, ...] = ()

  def __post_init__(self):
    if not self.runs:
      raise StudyError("Study.runs is empty: a study needs at least one Run.")
    names = [run.name for run in self.runs]
    for run in self.runs:
      if not isinstance(run, Run):
        raise StudyError(f"Study.runs holds {run!r}, not a Run.")
      if not _NAME.match(run.name):
        raise StudyError(f"Run.name={run.name!r} must be letters, digits, '_', '.' or '-' (it "
                         "names the run's folder).")
      if names.count(run.name) > 1:
        raise StudyError(f"Run.name={run.name!r} is used by {names.count(run.name)} runs; each "
                         "run needs its own name.")
      _check_seeds(run.seeds if run.seeds is not None else self.seeds, f"run {run.name}: seeds")
      for text in (*self.overrides, *run.overrides):
        _check_override(text, f"run {run.name}")
    _check_extra_evaluations(self.extra_evaluations)
    if self.evaluations is not None and self.evaluations < 1:
      raise StudyError(f"Study.evaluations={self.evaluations} must be >= 1 (or None).")
    for field in ("metrics", "plots", "curves"):
      for metric in getattr(self, field):
        if not isinstance(metric, str) or not metric or metric.startswith("/"):
          raise StudyError(f"Study.{field} holds {metric!r}; a metric is a key of metrics.jsonl "
                           "such as 'eval/loss'.")

  @property
  def table_metrics(self) -> tuple[str, ...]:
    """The table's columns: `metrics`, then the mean training tokens/s."""
    return tuple(m for m in self.metrics if m != TOKENS_PER_SEC) + (TOKENS_PER_SEC,)

  def seeds_of(self, run: Run) -> tuple[int, ...]:
    return run.seeds if run.seeds is not None else self.seeds


def _check_seeds(seeds, where: str) -> None:
  if (not isinstance(seeds, (tuple, list)) or not seeds or
      any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds)):
    raise StudyError(f"{where}={seeds!r} must be a non-empty tuple of integers >= 0.")
  if len(set(seeds)) != len(seeds):
    raise StudyError(f"{where}={seeds!r} repeats a seed.")


def _check_extra_evaluations(evaluations) -> None:
  names = [getattr(e, "name", None) for e in evaluations]
  for i, evaluation in enumerate(evaluations):
    where = f"Study.extra_evaluations[{i}]"
    if not isinstance(evaluation, Evaluation):
      raise StudyError(f"{where} is {evaluation!r}, not an Evaluation.")
    if not isinstance(evaluation.name, str) or not _NAME.match(evaluation.name):
      raise StudyError(f"{where}: name={evaluation.name!r} must be letters, digits, '_', '.' or "
                       "'-' (it names the metrics and the file).")
    if names.count(evaluation.name) > 1:
      raise StudyError(f"{where}: name={evaluation.name!r} is used twice.")
    if isinstance(evaluation.settings, str) or not evaluation.settings:
      raise StudyError(f"{where} ({evaluation.name}): settings={evaluation.settings!r} must be a "
                       "non-empty tuple of 'path=value' strings.")
    for text in evaluation.settings:
      _check_override(text, f"{where} ({evaluation.name})")
      try:
        config_lib.check_evaluation_setting(text.partition("=")[0])
      except ValueError as error:
        raise StudyError(f"{where} ({evaluation.name}): {error}") from None


def _check_override(text: str, where: str) -> None:
  path, sep, _ = text.partition("=") if isinstance(text, str) else ("", "", "")
  if not sep or not path or " " in path:
    raise StudyError(f"{where}: override {text!r} must look like 'group.field=value'.")
  if path == "train.seed":
    raise StudyError(f"{where}: override {text!r}: the study sets train.seed from its seeds; "
                     "list them in Run.seeds or Study.seeds instead.")


# ----------------------------------------------------------------------------- loading


def study_path(name_or_path: str) -> pathlib.Path:
  """The study file: `experiments/studies/<name>.py`, or a path to a .py file."""
  if name_or_path.endswith(".py") or os.sep in name_or_path:
    path = pathlib.Path(name_or_path)
  else:
    path = STUDIES_DIR / f"{name_or_path}.py"
  if not path.is_file():
    known = sorted(p.stem for p in STUDIES_DIR.glob("*.py") if not p.stem.startswith("_"))
    raise StudyError(f"study {name_or_path!r}: no file {path}" +
                     (f"; the studies in {STUDIES_DIR}: {', '.join(known)}." if known else "."))
  return path


def load_study(name_or_path: str) -> tuple[str, Study]:
  """(the study's name: its file's stem, the Study its `get_study()` returns)."""
  path = study_path(name_or_path)
  spec = importlib.util.spec_from_file_location(f"moejax_study_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_study"):
    raise StudyError(f"{path} defines no get_study(); a study file returns its Study from it.")
  study = module.get_study()
  if not isinstance(study, Study):
    raise StudyError(f"{path}: get_study() returned {type(study).__name__}, not a Study.")
  return path.stem, study


# ----------------------------------------------------------------------------- jobs


@dataclasses.dataclass(frozen=True)
class Job:
  """One (run, seed) of a study, resolved.

  Attributes:
    run, seed: what it trains.
    workdir: STUDY_DIR/<run name>/seed_<seed>.
    overrides: every "path=value" setting applied to the experiment, in order.
    experiment: the validated typed config (steps, batch, model) of the job.
    argv: the command that trains it (`python -m moejax.main ...`, without the interpreter).
    extra_evaluations: the study's `Evaluation`s of the finished run.
  """

  run: Run
  seed: int
  workdir: pathlib.Path
  overrides: tuple[str, ...]
  experiment: ExperimentConfig
  argv: tuple[str, ...]
  extra_evaluations: tuple[Evaluation, ...] = ()

  def evaluation_argv(self, evaluation: Evaluation) -> tuple[str, ...]:
    """`python -m moejax.evaluate ...` (without the interpreter) on the trainer's eval batches."""
    batches = self.experiment.train.eval_batches
    return ("-m", "moejax.evaluate", f"--workdir={self.workdir}",
            *(f"--set={text}" for text in evaluation.settings),
            *((f"--batches={batches}",) if batches else ()),
            f"--output={self.workdir / evaluation.file_name}", "--quiet")

  @property
  def num_steps(self) -> int:
    return self.experiment.train.num_steps

  @property
  def label(self) -> str:
    return f"{self.run.name} seed {self.seed}"


def load_experiment(reference: str, where: str) -> ml_collections.ConfigDict:
  """`get_config(arg)` of an experiment file named "FILE[:ARG]"."""
  file, _, arg = reference.partition(":")
  path = pathlib.Path(file)
  if not path.is_file():
    raise StudyError(f"{where}: experiment file {file!r} does not exist (paths are relative to "
                     f"the repository root; the current directory is {os.getcwd()}).")
  spec = importlib.util.spec_from_file_location(f"moejax_experiment_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def job_overrides(study: Study, run: Run, seed: int, config: ml_collections.ConfigDict,
                  steps: int | None, scale: Scale | None = None,
                  settings: Sequence[str] = ()) -> tuple[str, ...]:
  """The study's and the run's overrides, then the seed, the scale's, the steps, `settings`
  (`--set`) and the evaluation cadence."""
  overrides = [*study.overrides, *run.overrides, f"train.seed={seed}"]
  if scale is not None:
    probe = config_lib.apply_overrides(ml_collections.ConfigDict(config.to_dict()), overrides)
    overrides += scale.overrides(probe)
  if steps is not None:
    overrides.append(f"train.num_steps={steps}")
  overrides += settings
  if study.evaluations is not None:
    probe = config_lib.apply_overrides(ml_collections.ConfigDict(config.to_dict()),
                                       overrides)
    num_steps = probe.train.num_steps
    overrides.append(f"train.eval_every={max(1, num_steps // study.evaluations)}")
  return tuple(overrides)


def jobs(study: Study, study_dir: pathlib.Path, *, steps: int | None = None,
         seeds: Sequence[int] | None = None, scale: Scale | None = None,
         settings: Sequence[str] = ()) -> list[Job]:
  """One Job per (run, seed), in table order; every config validated before anything trains.

  `steps` replaces every run's `train.num_steps`, `seeds` every run's seeds; `scale` (scale.py)
  grows every run, `settings` ("path=value", `--set`) are applied to every run last. The layout
  (mesh, batch and experts) is checked here against the fewest devices the mesh allows, and
  against the real devices by each run (this process starts no JAX backend, which on an
  accelerator would take memory from the runs).
  """
  if seeds is not None:
    _check_seeds(tuple(seeds), "--seeds")
  if steps is not None and steps < 1:
    raise StudyError(f"--steps={steps} must be >= 1.")
  for text in settings:
    _check_override(text, "--set")
  out = []
  for run in study.runs:
    where = f"run {run.name}"
    try:
      base = load_experiment(run.experiment, where)
    except StudyError:
      raise
    except ValueError as error:
      raise StudyError(f"{where}: experiment {run.experiment!r}: {error}") from error
    for seed in (tuple(seeds) if seeds is not None else study.seeds_of(run)):
      config = ml_collections.ConfigDict(base.to_dict())
      try:
        overrides = job_overrides(study, run, seed, config, steps, scale, settings)
        config_lib.apply_overrides(config, overrides)
        experiment = config_lib.experiment_config_from(
            config, num_devices=_fewest_devices(config), num_processes=1)
      except ValueError as error:
        raise StudyError(f"{where}: {error}") from error
      for i, evaluation in enumerate(study.extra_evaluations):
        try:  # the values too, not only the fields
          evaluated = config_lib.apply_overrides(ml_collections.ConfigDict(config.to_dict()),
                                                 evaluation.settings)
          config_lib.experiment_config_from(evaluated, num_devices=_fewest_devices(evaluated),
                                            num_processes=1)
        except ValueError as error:
          raise StudyError(f"{where}: Study.extra_evaluations[{i}] ({evaluation.name}): "
                           f"{error}") from error
      workdir = study_dir / run.name / f"seed_{seed}"
      file, sep, arg = run.experiment.partition(":")
      argv = ("-m", "moejax.main", f"--config={os.path.abspath(file)}{sep}{arg}",
              f"--workdir={workdir}", *(f"--config.{o}" for o in overrides))
      out.append(Job(run=run, seed=seed, workdir=workdir, overrides=overrides,
                     experiment=experiment, argv=argv,
                     extra_evaluations=study.extra_evaluations))
  return out


def _fewest_devices(config: ml_collections.ConfigDict) -> int:
  """The product of the mesh's fixed axis sizes (an axis of -1 takes one device)."""
  return math.prod(size for size in config.mesh.values() if size > 0)
