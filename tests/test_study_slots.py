"""Where `python -m moejax.study --jobs N` runs its jobs (moejax/study/slots.py): GPUs shared out
through CUDA_VISIBLE_DEVICES, else CPU cores by affinity, one-core slots with XLA on one thread."""

import pytest

from moejax.study import slots


@pytest.fixture
def no_gpus(monkeypatch):
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
  monkeypatch.delenv("XLA_FLAGS", raising=False)


def test_one_job_gets_the_whole_machine(monkeypatch):
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
  assert slots.slots(1) == [slots.Slot()]


def test_cpu_cores_are_dealt_round_robin(no_gpus, monkeypatch):
  monkeypatch.setattr(slots.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 5})
  two = slots.slots(2)
  assert [(s.name, s.cpus, s.env) for s in two] == [
      ("cores 0,2,5", frozenset({0, 2, 5}), {}), ("cores 1,3", frozenset({1, 3}), {})]
  five = slots.slots(5)
  assert [s.cpus for s in five] == [frozenset({c}) for c in (0, 1, 2, 3, 5)]
  assert five[4].name == "core 5"
  assert all(s.env == {"XLA_FLAGS": slots.SINGLE_THREAD_XLA_FLAGS} for s in five)
  with pytest.raises(ValueError, match=r"--jobs=6: this process may use 5 CPU core\(s\)"):
    slots.slots(6)


def test_a_one_core_slot_keeps_the_studys_xla_flags(no_gpus, monkeypatch):
  monkeypatch.setattr(slots.os, "sched_getaffinity", lambda pid: {0, 1})
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
  assert slots.slots(2)[1].env == {
      "XLA_FLAGS": "--xla_backend_optimization_level=0 " + slots.SINGLE_THREAD_XLA_FLAGS}


def test_gpus_are_dealt_through_cuda_visible_devices(monkeypatch):
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
  assert [(s.name, s.cpus, s.env) for s in slots.slots(2)] == [
      ("GPU 0,2", None, {"CUDA_VISIBLE_DEVICES": "0,2"}),
      ("GPU 1,3", None, {"CUDA_VISIBLE_DEVICES": "1,3"})]
  assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots.slots(4)] == ["0", "1", "2", "3"]
  with pytest.raises(ValueError, match=r"--jobs=5: this machine shows 4 GPU\(s\) \(0,1,2,3\)"):
    slots.slots(5)


def test_jobs_below_one_are_refused():
  with pytest.raises(ValueError, match=r"--jobs=0 must be an integer >= 1"):
    slots.slots(0)
