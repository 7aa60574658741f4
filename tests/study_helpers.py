"""What the study tests share: tiny study files on the PTB fixture, run as a user runs them.

A study process gets one CPU device, the PTB fixture (tests/fixtures/ptb, through
$MOEJAX_DATA_DIR), the suite's compilation cache and XLA's unoptimised CPU backend (compilation
dominates these runs); `env_as_committed` keeps XLA's optimisations, as the committed fixture
report was made. The fixtures are imported by the test modules that use them.
"""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from moejax.data import corpora

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


@pytest.fixture(scope="module")
def in_repository():
  """Study and experiment files name their paths relative to the repository root."""
  with pytest.MonkeyPatch.context() as patch:
    patch.chdir(REPO)
    yield


@pytest.fixture(scope="module")
def ptb_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("ptb")
  corpora.build("ptb", data_dir, source_dir=FIXTURES / "ptb")
  return str(data_dir)


def study_env(ptb_dir, cache_dir, xla_flags: str) -> dict[str, str]:
  out = {k: v for k, v in os.environ.items() if not k.startswith("MOEJAX_")}
  out.update(JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags, PYTHONUNBUFFERED="1",
             MOEJAX_DATA_DIR=ptb_dir, JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return out


@pytest.fixture(scope="module")
def env(ptb_dir, compile_once):
  """A study process's environment: one CPU device, the PTB fixture, the shared compilation
  cache, and XLA's CPU backend without optimisations, which halves the compilation that
  dominates these runs (the tests check what the runner does, not the numbers it gets)."""
  return study_env(ptb_dir, compile_once, "--xla_backend_optimization_level=0")


@pytest.fixture(scope="module")
def env_as_committed(ptb_dir, tmp_path_factory):
  """As `env`, with XLA's default optimisations, as the committed fixture report was made."""
  return study_env(ptb_dir, tmp_path_factory.mktemp("cache_optimized"), "")


def write_study(path: pathlib.Path, *, seeds=(0, 1), steps=3, evaluations=3, overrides=(),
                extra_evaluations=(), extra_metrics=()):
  """A study file of one run, the tiny switch_small, on the PTB fixture.

  `extra_evaluations`: (name, settings) pairs."""
  settings = ("data.name=ptb", f"train.num_steps={steps}", "train.eval_batches=1", *overrides)
  extra = ", ".join(f"Evaluation({name!r}, {tuple(s)!r})" for name, s in extra_evaluations)
  path.write_text(textwrap.dedent(f"""\
      from moejax.study import Evaluation, Run, Study

      def get_study():
        return Study(description="tiny", runs=(Run("switch", "experiments/switch_small.py:tiny"),),
                     seeds={tuple(seeds)!r}, overrides={settings!r}, evaluations={evaluations},
                     metrics=("eval/loss", "eval/perplexity", "eval/moe/*/dropped_fraction",
                              *{tuple(extra_metrics)!r}),
                     plots=("eval/loss",), curves=("eval/loss",),
                     extra_evaluations=({extra}{"," if extra else ""}))
      """))
  return path


def run_study(study_file, runs_root, env, *args, timeout=600) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "moejax.study", str(study_file),
                         "--runs-root", str(runs_root), *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)


def snapshot(folder: pathlib.Path, *, skip=()) -> dict[str, tuple[int, bytes]]:
  """(mtime in ns, content) of every file under `folder`, except those under `skip`."""
  out = {}
  for path in sorted(folder.rglob("*")):
    if path.is_file() and not any(path.is_relative_to(s) for s in skip):
      out[str(path.relative_to(folder))] = (path.stat().st_mtime_ns, path.read_bytes())
  return out
