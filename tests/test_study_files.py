"""The repository's study files (experiments/studies/): each validates with >= 3 seeds per run,
documents its command, and compares its runs at equal active FFN FLOPs per token, at the size
it runs on a CPU and grown for an accelerator (`--scale base`)."""

import importlib
import pathlib

import pytest

from moejax.model import active_ffn_flops_per_token
from moejax.routing import REGISTRY, RouterKind
from moejax.study import scale, spec

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


@pytest.fixture(scope="module", params=STUDY_FILES)
def base_jobs(request, tmp_path_factory):
  name, study = spec.load_study(request.param)
  folder = tmp_path_factory.mktemp(name)
  small = {job.run.name: job.experiment for job in spec.jobs(study, folder, seeds=(0,))}
  return name, small, {job.run.name: job for job in spec.jobs(
      study, folder, seeds=(0,), scale=scale.SCALES["base"])}


def test_every_study_grows_to_switch_base_at_equal_active_ffn_flops(base_jobs):
  """`--scale base`: Switch-Base's shape (12 blocks, M=768, 12 heads of 64, dense F=3072) and
  512-token sequences for every run; each run's FFN widths 6 times its CPU-size ones (a top-2
  run's experts stay half width), so the study's runs stay at equal active FFN FLOPs per token."""
  name, small, scaled = base_jobs
  flops = {run: active_ffn_flops_per_token(job.experiment.model) for run, job in scaled.items()}
  assert len(set(flops.values())) == 1, (name, flops)
  for run, job in scaled.items():
    model, was = job.experiment.model, small[run].model
    assert (model.num_layers, model.model_dim, model.num_heads, model.head_dim,
            model.ffn_dim) == (12, 768, 12, 64, 3072), (name, run)
    assert job.experiment.data.seq_len == 512 and job.experiment.train.num_steps == 5000
    assert job.experiment.train.batch_size == 256 and job.experiment.data.vocab_size == 32000
    assert job.experiment.model.dtype == was.dtype  # what a study varies stays as it set it
    if model.moe is not None:
      assert model.moe.ffn_dim == 6 * was.moe.ffn_dim, (name, run)
      assert model.moe.shared_ffn_dim == 6 * was.moe.shared_ffn_dim
      assert model.moe.group_size == 4 * was.moe.group_size
      assert model.moe.router == was.moe.router or model.moe.router.kind is RouterKind.SOFT
      if model.moe.router.kind is RouterKind.SOFT:  # E * p / S kept: one expert's FLOPs per token
        assert model.moe.router.soft.slots_per_expert == 4 * was.moe.router.soft.slots_per_expert
