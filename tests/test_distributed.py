"""moejax.distributed: when a run joins jax.distributed, and its settings' validation."""

import pytest

from moejax import distributed


@pytest.fixture
def clean_env(monkeypatch):
  for name in ("SLURM_JOB_ID", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MOEJAX_COORDINATOR",
               "MOEJAX_NUM_PROCESSES", "MOEJAX_PROCESS_ID", "MOEJAX_HEARTBEAT_TIMEOUT_SECONDS"):
    monkeypatch.delenv(name, raising=False)
  return monkeypatch


def test_no_cluster_on_a_plain_machine(clean_env):
  assert not distributed.cluster_detected()
  assert distributed.initialize(distributed.DistributedConfig()) is False


def test_slurm_with_several_tasks_is_a_cluster(clean_env):
  clean_env.setenv("SLURM_JOB_ID", "42")
  clean_env.setenv("SLURM_NTASKS", "1")
  assert not distributed.cluster_detected()
  clean_env.setenv("SLURM_NTASKS", "16")
  assert distributed.cluster_detected()


def test_tpu_worker_hostnames_mark_a_multi_host_slice(clean_env):
  clean_env.setenv("TPU_WORKER_HOSTNAMES", "w0")
  assert not distributed.cluster_detected()
  clean_env.setenv("TPU_WORKER_HOSTNAMES", "w0,w1,w2,w3")
  assert distributed.cluster_detected()


def test_settings_from_the_environment(clean_env):
  clean_env.setenv("MOEJAX_COORDINATOR", "127.0.0.1:1234")
  clean_env.setenv("MOEJAX_NUM_PROCESSES", "2")
  clean_env.setenv("MOEJAX_PROCESS_ID", "1")
  clean_env.setenv("MOEJAX_HEARTBEAT_TIMEOUT_SECONDS", "15")
  config = distributed.DistributedConfig.from_env()
  assert (config.coordinator_address, config.num_processes, config.process_id,
          config.heartbeat_timeout_seconds) == ("127.0.0.1:1234", 2, 1, 15)
  # One process needs no runtime.
  assert distributed.initialize(distributed.DistributedConfig("127.0.0.1:1", 1, 0)) is False


@pytest.mark.parametrize("kwargs, message", [
    (dict(coordinator_address="h:1"), "go together"),
    (dict(coordinator_address="h:1", num_processes=0, process_id=0), "num_processes=0"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), "process_id=2"),
    (dict(heartbeat_timeout_seconds=0), "heartbeat_timeout_seconds=0"),
])
def test_bad_settings_name_the_field(kwargs, message):
  with pytest.raises(ValueError, match=message):
    distributed.DistributedConfig(**kwargs)


def test_bad_environment_value_names_the_variable(clean_env):
  clean_env.setenv("MOEJAX_NUM_PROCESSES", "two")
  with pytest.raises(ValueError, match="MOEJAX_NUM_PROCESSES='two'"):
    distributed.DistributedConfig.from_env()
