"""The repository's study files (experiments/studies/): each validates with >= 3 seeds per run,
documents its command, and compares its runs at equal active FFN FLOPs per token."""

import importlib
import pathlib

import pytest

from moejax.model import active_ffn_flops_per_token
from moejax.routing import REGISTRY, RouterKind
from moejax.study import spec

REPO = pathlib.Path(__file__).resolve().parents[1]
STUDY_FILES = sorted(p.stem for p in (REPO / "experiments" / "studies").glob("*.py")
                     if not p.stem.startswith("_"))


@pytest.fixture(scope="module", autouse=True)
def in_repository():
  """Study and experiment files name their paths relative to the repository root."""
  with pytest.MonkeyPatch.context() as patch:
    patch.chdir(REPO)
    yield


@pytest.fixture(scope="module", params=STUDY_FILES)
def study_jobs(request, tmp_path_factory):
  name, study = spec.load_study(request.param)
  return name, study, spec.jobs(study, tmp_path_factory.mktemp(name))


def test_every_study_validates_with_three_seeds_and_documents_its_command(study_jobs):
  name, study, jobs = study_jobs
  assert name in ("compare", "routers", "num_experts", "capacity_factor", "precision",
                  "init_scale", "balancing", "ptb")
  for run in study.runs:
    assert len(study.seeds_of(run)) >= 3, (name, run.name)
  doc = importlib.import_module(f"experiments.studies.{name}").__doc__
  assert f"python -m moejax.study {name}" in doc


def test_every_study_compares_at_equal_active_ffn_flops(study_jobs):
  name, _, jobs = study_jobs
  flops = {job.run.name: active_ffn_flops_per_token(job.experiment.model) for job in jobs}
  assert len(set(flops.values())) == 1, (name, flops)


def test_routers_study_runs_every_registered_router():
  routers = importlib.import_module("experiments.studies.routers")
  assert set(routers.SETTINGS) == set(RouterKind)  # a new kind needs its equal-FLOPs settings
  _, study = spec.load_study("routers")
  assert [run.name for run in study.runs] == ["dense"] + [k.value for k in RouterKind
                                                          if k in REGISTRY]
  for run in study.runs[1:]:
    family = REGISTRY[RouterKind(run.name)]
    assert ("non-causal" in run.note) == (not (family.causal_train and family.causal_eval))
  missing = [k.value for k in RouterKind if k not in REGISTRY]
  assert all(kind in study.description for kind in missing)
