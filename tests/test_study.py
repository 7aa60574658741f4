"""The study runner, `python -m moejax.study`, on tiny studies.

Studies run as a user runs them: `python -m moejax.study` in a subprocess, each training job in
its own `moejax.main` process on one CPU device, with the tiny variants (M=32, L=16, 2 layers) on
the PTB fixture (tests/study_helpers.py). The module's tiny study (one run x two seeds of 3
steps) is run once and then checked: its report, the aggregation against numpy, a rerun that
trains nothing, a changed setting that stops the study, another study sharing its runs, two
jobs at once. Killing a study midway and the committed fixture report are in
test_study_slow.py, the study files in test_study_files.py.
"""

import json
import os
import pathlib
import shutil
import time
import types

import numpy as np
import pytest

import study_cells
from moejax import lock as lock_lib
from moejax import metrics
from moejax.study import (Evaluation, Run, Study, StudyError, __main__ as study_main, report,
                          sharing, spec)
from study_helpers import (FIXTURES, REPO, env, in_repository, ptb_dir,  # noqa: F401 (fixtures)
                           run_study, snapshot, write_study)

pytestmark = pytest.mark.usefixtures("compile_once", "in_repository")


@pytest.fixture(scope="module")
def pair(tmp_path_factory, env):
  """The module's tiny study, one run x seeds 0 and 1, run to the end once."""
  root = tmp_path_factory.mktemp("pair")
  study_file = write_study(root / "pair.py")
  start = time.monotonic()
  result = run_study(study_file, root / "runs", env)
  assert result.returncode == 0, result.stdout + result.stderr
  study_dir = root / "runs" / "pair"
  return types.SimpleNamespace(
      file=study_file, root=root, dir=study_dir, report=study_dir / "report", result=result,
      seconds=time.monotonic() - start,
      workdirs=[study_dir / "switch" / f"seed_{s}" for s in (0, 1)])


# ----------------------------------------------------------------------------- end to end


def test_a_study_trains_every_seed_and_writes_its_report(pair):
  out = pair.result.stdout
  assert "study: 2 runs: 0 finished, 2 to do" in out
  assert "run 1/2 to do: switch seed 0 (new); time left: known once a run has finished" in out
  assert "run 2/2 to do: switch seed 1 (new); about" in out  # estimated from run 1's wall time
  for workdir in pair.workdirs:
    records = metrics.read_jsonl(workdir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3] and "eval/loss" in records[-1]
    assert (workdir / "checkpoints" / "3").is_dir()
  assert sorted(p.name for p in pair.report.iterdir()) == [
      "pair.json", "pair.md", "pair_eval_loss.png", "pair_eval_loss_curve.png"]
  for png in pair.report.glob("*.png"):
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  result = json.loads((pair.report / "pair.json").read_text())
  assert [run["finished_seeds"] for run in result["runs"]] == [[0, 1]]
  assert result["table_metrics"][-1] == "train/tokens_per_sec_mean"  # tokens/s in every table


def test_rerun_of_a_finished_study_trains_nothing_and_writes_the_same_report(pair, env):
  runs_before = snapshot(pair.dir, skip=(pair.report, pair.dir / "run.lock"))
  report_before = {name: (pair.report / name).read_bytes() for name in ("pair.md", "pair.json")}
  result = run_study(pair.file, pair.root / "runs", env)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "study: 2 runs: 2 finished, 0 to do" in result.stdout
  assert "to do: switch" not in result.stdout  # no job started
  # Not a file of the runs changed: checkpoints, metrics, logs, the runner's records.
  assert snapshot(pair.dir, skip=(pair.report, pair.dir / "run.lock")) == runs_before
  assert any("checkpoints/3/" in name for name in runs_before)
  for name, content in report_before.items():
    assert (pair.report / name).read_bytes() == content, name


def test_report_only_reports_the_finished_seeds_and_trains_nothing(pair, env, tmp_path,
                                                                   monkeypatch, capsys):
  """--report-only while the study is running (its lock held): a report of the seeds finished
  so far, the same numbers as the full report, and not a file of the runs touched."""
  three_seeds = write_study(tmp_path / "pair.py", seeds=(0, 1, 2))  # same name: same runs
  monkeypatch.setenv(study_main.CACHE_VARIABLE, env[study_main.CACHE_VARIABLE])
  runs_before = snapshot(pair.dir, skip=(pair.report, pair.dir / "run.lock"))
  docs = tmp_path / "docs"
  with lock_lib.WorkdirLock(pair.dir):  # as the running study holds it
    assert study_main.main([str(three_seeds), "--runs-root", str(pair.root / "runs"),
                            "--report-only", "--write-docs", "--docs-dir", str(docs)]) == 0
  assert f"study: wrote {docs / 'pair.md'}" in capsys.readouterr().out
  assert snapshot(pair.dir, skip=(pair.report, pair.dir / "run.lock")) == runs_before
  assert not (pair.dir / "switch" / "seed_2").exists()
  partial = json.loads((docs / "pair.json").read_text())["runs"][0]
  full = json.loads((pair.report / "pair.json").read_text())["runs"][0]
  assert partial["seeds"] == [0, 1, 2] and partial["finished_seeds"] == [0, 1]
  assert partial["metrics"] == full["metrics"]
  assert "| 0, 1 of 3 |" in (docs / "pair.md").read_text()


def test_aggregation_equals_a_numpy_recomputation(pair):
  """Mean, sample std (ddof=1) and n over the seeds, recomputed from the metrics.jsonl files."""
  result = json.loads((pair.report / "pair.json").read_text())
  got = result["runs"][0]["metrics"]
  finals, throughputs, dropped = [], [], []
  for workdir in pair.workdirs:
    records = metrics.read_jsonl(workdir / "metrics.jsonl")
    finals.append(records[-1])
    rates = np.array([r["train/tokens_per_sec"] for r in records if "train/tokens_per_sec" in r])
    throughputs.append(rates.size / np.sum(1.0 / rates))  # total tokens / total time
    dropped.append(np.mean([v for k, v in records[-1].items() if k.startswith("eval/moe/layer_")
                            and k.endswith("/dropped_fraction")]))
  columns = {key: [f[key] for f in finals] for key in ("eval/loss", "eval/perplexity",
                                                       "train/cross_entropy")}
  columns["train/tokens_per_sec_mean"] = throughputs
  columns["eval/moe/*/dropped_fraction"] = dropped
  for key, values in columns.items():
    values = np.asarray(values, np.float64)
    assert got[key]["n"] == 2, key
    assert got[key]["values"] == pytest.approx(values.tolist(), rel=1e-12), key
    assert got[key]["mean"] == pytest.approx(np.mean(values), rel=1e-12), key
    assert got[key]["std"] == pytest.approx(np.std(values, ddof=1), rel=1e-12), key
  assert result["std"].startswith("sample standard deviation over seeds (ddof=1)")
  assert "the sample one (ddof=1)" in (pair.report / "pair.md").read_text()


def _check_report(md_text: str, result: dict) -> None:
  columns, rows = study_cells.table_rows(md_text)
  assert columns == result["table_metrics"]
  assert list(rows) == [run["name"] for run in result["runs"]]
  for run in result["runs"]:
    for metric, text in zip(columns, rows[run["name"]]):
      study_cells.assert_cell_matches(text, run["metrics"].get(metric), f"{run['name']} {metric}")


def test_the_report_table_agrees_with_the_json(pair):
  _check_report((pair.report / "pair.md").read_text(),
                json.loads((pair.report / "pair.json").read_text()))


COMMITTED = sorted([*(REPO / "docs" / "studies").glob("*.json"),
                    *(FIXTURES / "studies").glob("*.json")])


@pytest.mark.parametrize("path", COMMITTED, ids=[p.relative_to(REPO).as_posix() for p in COMMITTED])
def test_committed_tables_agree_with_their_json(path):
  _check_report(path.with_suffix(".md").read_text(), json.loads(path.read_text()))


def test_a_changed_setting_of_a_finished_run_stops_the_study(pair, env, tmp_path):
  changed = write_study(tmp_path / "pair.py", overrides=("model.moe.router.z_loss_weight=0.0",))
  before = snapshot(pair.dir, skip=(pair.dir / "run.lock",))
  result = run_study(changed, pair.root / "runs", env)
  assert result.returncode == 2, result.stdout + result.stderr
  said = [line for line in result.stderr.splitlines() if line.startswith("moejax.study:")]
  assert len(said) == 1 and "Traceback" not in result.stderr, result.stderr
  assert "model.moe.router.z_loss_weight" in said[0] and str(pair.workdirs[0]) in said[0]
  assert snapshot(pair.dir, skip=(pair.dir / "run.lock",)) == before


def test_a_run_another_study_finished_is_shared_not_retrained(pair, env, capsys, monkeypatch):
  """A second study holding the pair's run (every setting equal) under the same runs root links
  its jobs to the pair's workdirs: nothing trains, its numbers are the pair's, its report says
  where they come from; a rerun keeps the links. `--list` says so beforehand."""
  other = write_study(pair.root / "other.py")
  before = snapshot(pair.dir, skip=(pair.report, pair.dir / "run.lock"))
  monkeypatch.setenv(study_main.CACHE_VARIABLE, env[study_main.CACHE_VARIABLE])
  for flags, note in (((), " (will share: pair/switch/seed_{})"), (("--no-share",), "")):
    assert study_main.main([str(other), "--runs-root", str(pair.root / "runs"), "--list",
                            *flags]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2, lines
    for seed, line in enumerate(lines):
      workdir = pair.root / "runs" / "other" / "switch" / f"seed_{seed}"
      assert line.endswith(f" new       {workdir}{note.format(seed)}"), line
      assert line.startswith(f"switch  seed {seed}"), line  # the name column fits the names
  assert not (pair.root / "runs" / "other").exists()  # listing creates and links nothing
  for attempt in range(2):
    result = run_study(other, pair.root / "runs", env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "study: 2 runs: 2 finished, 0 to do" in result.stdout
    assert "to do: switch" not in result.stdout
    assert ("shared, not retrained" in result.stdout) == (attempt == 0)
  assert snapshot(pair.dir, skip=(pair.report, pair.dir / "run.lock")) == before
  for seed, workdir in enumerate(pair.workdirs):
    link = pair.root / "runs" / "other" / "switch" / f"seed_{seed}"
    assert link.is_symlink() and not os.path.isabs(os.readlink(link))
    assert link.resolve() == workdir.resolve()
  mine = json.loads((pair.root / "runs" / "other" / "report" / "other.json").read_text())
  theirs = json.loads((pair.report / "pair.json").read_text())
  assert mine["runs"][0]["metrics"] == theirs["runs"][0]["metrics"]
  assert mine["runs"][0]["shared"] == {"0": "pair/switch/seed_0", "1": "pair/switch/seed_1"}
  assert theirs["runs"][0]["shared"] == {}
  assert "* switch, seed 1: `pair/switch/seed_1`" in (
      pair.root / "runs" / "other" / "report" / "other.md").read_text()


def test_only_a_finished_run_with_every_setting_equal_is_a_twin(pair, tmp_path):
  runs = pair.root / "runs"

  def twins(**study_args):
    _, study = spec.load_study(str(write_study(tmp_path / "probe.py", **study_args)))
    return [sharing.find_twin(job, runs) for job in spec.jobs(study, runs / "probe")]

  assert twins() == pair.workdirs
  assert twins(seeds=(1, 2)) == [pair.workdirs[1], None]
  assert twins(overrides=("model.moe.router.z_loss_weight=0.0",)) == [None, None]
  assert twins(steps=4) == [None, None]
  assert twins(evaluations=1) == [None, None]  # train.eval_every differs
  _, study = spec.load_study(str(pair.file))  # a study's own runs are not its twins
  assert [sharing.find_twin(job, runs) for job in spec.jobs(study, pair.dir)] == [None, None]
  # A run not yet finished is no twin.
  copy = tmp_path / "runs" / "x" / "switch" / "seed_0"
  shutil.copytree(pair.workdirs[0], copy)
  _, study = spec.load_study(str(write_study(tmp_path / "probe.py", seeds=(0,))))
  job = spec.jobs(study, tmp_path / "runs" / "probe")[0]
  assert sharing.find_twin(job, tmp_path / "runs") == copy
  # Of two twins, the first trained (the older metrics.jsonl), whatever the names.
  older = tmp_path / "runs" / "y" / "switch" / "seed_0"
  shutil.copytree(pair.workdirs[0], older)
  assert sharing.find_twin(job, tmp_path / "runs") == copy  # same age: by name
  age = (copy / "metrics.jsonl").stat().st_mtime_ns - 10**9
  os.utime(older / "metrics.jsonl", ns=(age, age))
  assert sharing.find_twin(job, tmp_path / "runs") == older
  shutil.rmtree(older)
  records = (copy / "metrics.jsonl").read_text().splitlines(keepends=True)
  (copy / "metrics.jsonl").write_text("".join(records[:-1]))
  assert sharing.find_twin(job, tmp_path / "runs") is None


def test_no_share_trains_the_run_again_with_the_runs_compilation_cache(pair, env):
  """Without $JAX_COMPILATION_CACHE_DIR, the study's runs compile into RUNS_ROOT/.jax_cache."""
  own_env = {k: v for k, v in env.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  result = run_study(write_study(pair.root / "own.py", seeds=(0,)), pair.root / "runs", own_env,
                     "--no-share")
  assert result.returncode == 0, result.stdout + result.stderr
  assert "study: 1 runs: 0 finished, 1 to do" in result.stdout
  workdir = pair.root / "runs" / "own" / "switch" / "seed_0"
  assert not workdir.is_symlink() and (workdir / "checkpoints" / "3").is_dir()
  assert any((pair.root / "runs" / ".jax_cache").iterdir())


def test_two_jobs_at_once_each_on_its_own_core_give_the_sequential_numbers(pair, env):
  """`--jobs 2` on the 2-core machine: the second run starts before the first ends, each pinned
  to one core with XLA held to one thread; every logged loss is the sequential runs' to float32
  rounding (one thread sums the matmuls in another order)."""
  if len(os.sched_getaffinity(0)) < 2:
    pytest.fail("--jobs 2 needs 2 cores; the development machine and CI have 2")
  result = run_study(write_study(pair.root / "two.py"), pair.root / "runs", env, "--jobs", "2",
                     "--no-share")
  assert result.returncode == 0, result.stdout + result.stderr
  lines = result.stdout.splitlines()
  started = [i for i, line in enumerate(lines)
             if "to do: switch seed" in line and " on core" in line]
  ended = [i for i, line in enumerate(lines) if "finished in" in line]
  assert len(started) == 2 and len(ended) == 2 and started[1] < ended[0], result.stdout
  assert {lines[i].split(" on ")[1].split(";")[0] for i in started} == {"core 0", "core 1"}
  for seed, workdir in enumerate(pair.workdirs):
    two = metrics.read_jsonl(pair.root / "runs" / "two" / "switch" / f"seed_{seed}" /
                             "metrics.jsonl")
    one = metrics.read_jsonl(workdir / "metrics.jsonl")
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(two, one):
      for key in ("train/loss", "eval/loss"):
        if key in b:
          np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)


def test_extra_evaluations_of_finished_runs_become_metrics(pair, env, tmp_path):
  """Added to a finished study, they evaluate each run once (no training) on the trainer's
  validation batches: under the run's own capacity factor, the loss the trainer logged; under a
  factor of 8, nothing is dropped."""
  shutil.copytree(pair.dir, tmp_path / "runs" / "pair", ignore=shutil.ignore_patterns("report"))
  workdir = tmp_path / "runs" / "pair" / "switch" / "seed_0"
  study_file = write_study(
      tmp_path / "pair.py",
      extra_evaluations=[("same", ["model.moe.router.capacity_factor_eval=2.0"]),
                         ("cf8", ["model.moe.router.capacity_factor_eval=8.0"])],
      extra_metrics=["eval@same/loss", "eval@cf8/moe/*/dropped_fraction"])
  before = snapshot(workdir, skip=(workdir / "train.log",))
  result = run_study(study_file, tmp_path / "runs", env, "--seeds", "0")
  assert result.returncode == 0, result.stdout + result.stderr
  assert "study: 1 runs: 1 finished, 0 to do" in result.stdout
  assert "evaluation 1/2: switch seed 0 under model.moe.router.capacity_factor_eval=2.0" in (
      result.stdout)
  after = snapshot(workdir, skip=(workdir / "train.log",))
  assert sorted(set(after) - set(before)) == ["eval_cf8.json", "eval_same.json"]
  assert {k: after[k] for k in before} == before  # the run itself is untouched
  final = metrics.read_jsonl(workdir / "metrics.jsonl")[-1]
  same = json.loads((workdir / "eval_same.json").read_text())
  cf8 = json.loads((workdir / "eval_cf8.json").read_text())
  assert same["settings"] == {"model.moe.router.capacity_factor_eval": 2.0}
  assert (same["batches"], same["tokens"]) == (1, final["eval/tokens"])
  np.testing.assert_allclose(same["loss"], final["eval/loss"], rtol=1e-6)
  assert final["eval/moe/layer_1/dropped_fraction"] > 0
  assert cf8["moe"]["layer_1"]["dropped_fraction"] == 0.0
  report_json = json.loads((tmp_path / "runs" / "pair" / "report" / "pair.json").read_text())
  got = report_json["runs"][0]["metrics"]
  assert got["eval@same/loss"]["values"] == [same["loss"]]
  assert got["eval@cf8/moe/*/dropped_fraction"]["values"] == [0.0]
  assert report_json["extra_evaluations"][1] == {
      "name": "cf8", "metrics": "eval@cf8/...",
      "settings": ["model.moe.router.capacity_factor_eval=8.0"]}
  table = (tmp_path / "runs" / "pair" / "report" / "pair.md").read_text()
  assert "`eval@cf8/...` under `model.moe.router.capacity_factor_eval=8.0`" in table
  assert "| eval@same/loss | eval@cf8/moe/*/dropped_fraction |" in table
  rerun = run_study(study_file, tmp_path / "runs", env, "--seeds", "0")
  assert rerun.returncode == 0 and "evaluation 1/" not in rerun.stdout, rerun.stdout
  assert snapshot(workdir, skip=(workdir / "train.log",)) == after


@pytest.mark.parametrize("settings, message", [
    (("model.moe.router.k=2",), r"Study.extra_evaluations\[0\] \(x\): model.moe.router.k is "
     r"not a setting evaluation may change .*allowed: .*capacity_factor_eval"),
    (("model.moe.router.capacity_factor_eval",), "must look like 'group.field=value'"),
    ((), "must be a non-empty tuple"),
])
def test_bad_extra_evaluations_are_refused(settings, message):
  with pytest.raises(StudyError, match=message):
    Study("d", runs=(Run("a", "x.py"),), extra_evaluations=(Evaluation("x", settings),))


def test_an_extra_evaluations_value_is_checked_with_the_runs_config(tmp_path):
  study = Study("d", runs=(Run("a", "experiments/switch_small.py:tiny"),), extra_evaluations=(
      Evaluation("neg", ("model.moe.router.capacity_factor_eval=-1.0",)),))
  with pytest.raises(StudyError, match=r"run a: Study.extra_evaluations\[0\] \(neg\): "
                     r"model.moe.router.capacity_factor_eval=-1.0"):
    spec.jobs(study, tmp_path)


def test_bad_study_input_is_one_line(tmp_path, env):
  bad = write_study(tmp_path / "bad.py", overrides=("model.moe.router.k=0",))
  result = run_study(bad, tmp_path / "runs", env)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "moejax.study: run switch: model.moe.router.k=0 is not allowed for "
      "model.moe.router.kind='switch', which routes each token to exactly 1 expert(s); use "
      "kind='topk' for other k."]
  assert not (tmp_path / "runs" / "bad" / "switch").exists()


# ----------------------------------------------------------------------------- definitions


@pytest.mark.parametrize("make_study, message", [
    (lambda: Study("d", runs=()), "Study.runs is empty"),
    (lambda: Study("d", runs=(Run("a", "x.py"), Run("a", "y.py"))), "Run.name='a' is used by 2"),
    (lambda: Study("d", runs=(Run("a b", "x.py"),)), "Run.name='a b' must be letters"),
    (lambda: Study("d", runs=(Run("a", "x.py", overrides=("train.seed=3",)),)),
     "the study sets train.seed from its seeds"),
    (lambda: Study("d", runs=(Run("a", "x.py", overrides=("num_steps",)),)),
     "must look like 'group.field=value'"),
    (lambda: Study("d", runs=(Run("a", "x.py", seeds=(1, 1)),)), "repeats a seed"),
    (lambda: Study("d", runs=(Run("a", "x.py"),), seeds=()), "non-empty tuple"),
])
def test_bad_study_definitions_are_refused(make_study, message):
  with pytest.raises(StudyError, match=message.replace("(", r"\(").replace(")", r"\)")):
    make_study()


def test_unknown_study_and_unknown_field_name_what_exists(tmp_path):
  with pytest.raises(StudyError, match=r"no file experiments/studies/nope\.py; the studies in "
                     r"experiments/studies: .*compare"):
    spec.study_path("nope")
  study = Study("d", runs=(Run("a", "experiments/switch_small.py:tiny",
                               overrides=("model.moe.nope=1",)),))
  with pytest.raises(StudyError, match="run a: override 'model.moe.nope=1': config has no field "
                     "model.moe.nope"):
    spec.jobs(study, tmp_path)
  study = Study("d", runs=(Run("a", "experiments/missing.py"),))
  with pytest.raises(StudyError, match="experiment file 'experiments/missing.py' does not exist"):
    spec.jobs(study, tmp_path)


def test_jobs_set_seed_steps_and_evaluations(tmp_path):
  study = Study("d", runs=(Run("a", "experiments/switch_small.py:tiny", seeds=(4,)),
                           Run("b", "experiments/dense_small.py:tiny")),
                seeds=(0, 1), evaluations=2)
  jobs = spec.jobs(study, tmp_path)
  assert [(j.run.name, j.seed) for j in jobs] == [("a", 4), ("b", 0), ("b", 1)]
  assert jobs[0].workdir == tmp_path / "a" / "seed_4"
  assert (jobs[0].experiment.train.seed, jobs[0].experiment.train.eval_every) == (4, 2)
  assert "--config.train.seed=4" in jobs[0].argv and "--config.train.eval_every=2" in jobs[0].argv
  assert jobs[0].argv[2] == f"--config={REPO / 'experiments' / 'switch_small.py'}:tiny"
  jobs = spec.jobs(study, tmp_path, steps=9, seeds=(7,))
  assert [(j.run.name, j.seed, j.num_steps) for j in jobs] == [("a", 7, 9), ("b", 7, 9)]
  assert jobs[0].experiment.train.eval_every == 4
  args = study_main.parse_args(["d", "--steps", "9", "--seeds", "7"])
  assert study_main.study_dir(args, "d") == pathlib.Path("runs/studies/d-9steps")
  assert study_main.command_line(args, "d") == "python -m moejax.study d --steps 9 --seeds 7"
  args = study_main.parse_args(
      ["d", "--scale", "base", "--set", "data.name=ptb", "train.eval_batches=2"])
  assert study_main.command_line(args, "d") == (
      "python -m moejax.study d --scale base --set data.name=ptb train.eval_batches=2")
  folder = study_main.study_dir(args, "d").name
  assert folder.startswith("d-base-set") and len(folder) == len("d-base-set") + 8
  jobs = spec.jobs(study, tmp_path, settings=("train.eval_batches=2",))
  assert jobs[0].overrides[-2:] == ("train.eval_batches=2", "train.eval_every=2")
  with pytest.raises(StudyError, match=r"--set: override 'eval_batches' must look like"):
    spec.jobs(study, tmp_path, settings=("eval_batches",))
  with pytest.raises(StudyError, match="run a: .*train.no_such_field"):
    spec.jobs(study, tmp_path, settings=("train.no_such_field=1",))


def test_cells_and_readings():
  one = {"mean": 4.2, "std": None, "n": 1, "values": [4.2]}
  assert report.cell("eval/loss", one) == "4.2000 ± — (1)"
  assert report.cell("eval/loss", None) == "—"
  assert report.cell("moe/*/dropped_fraction", {"mean": 0.0454, "std": 0.001, "n": 3}) == (
      "4.54% ± 0.10% (3)")
  assert report.cell("train/tokens_per_sec_mean", {"mean": 7089.4, "std": 12.0, "n": 3}) == (
      "7,089 ± 12 (3)")
  result = {"runs": [
      {"name": "a", "metrics": {"eval/loss": {"mean": 2.0, "std": 0.1, "n": 4}}},
      {"name": "b", "metrics": {"eval/loss": {"mean": 1.0, "std": 0.1, "n": 4}}},
      {"name": "c", "metrics": {}}]}
  text = report.reading(result, "eval/loss")
  # |2 - 1| / sqrt(0.1^2 / 4 + 0.1^2 / 4) = 14.1 standard errors.
  assert text.startswith("eval/loss: lowest for b, 1.0000 ± 0.1000 (4); next a")
  assert "14.1 standard errors of the difference: larger than the seed-to-seed noise" in text
  result["runs"][0]["metrics"]["eval/loss"]["mean"] = 1.1  # 0.1 / 0.0707 = 1.4 standard errors
  assert "1.4 standard errors of the difference: within" in report.reading(result, "eval/loss")
