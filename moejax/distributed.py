"""Multi-host runtime: when and how to start `jax.distributed`.

One moejax process runs per host (TPU VM worker, SLURM task, or one of several local processes
on a development machine). `initialize` decides from explicit settings or the environment:

* explicit: `coordinator_address`, `num_processes` and `process_id` (from flags, or the
  `MOEJAX_COORDINATOR`, `MOEJAX_NUM_PROCESSES`, `MOEJAX_PROCESS_ID` variables that
  `launch/local.sh` sets);
* SLURM with more than one task, or a multi-host TPU slice: JAX detects the cluster itself;
* otherwise one process, and nothing to start.

After it returns, `jax.devices()` lists the devices of every process, so `sharding.make_mesh`
builds one global mesh; `jax.process_index()` and `jax.process_count()` say which share of the
data this process reads. A peer that dies is noticed by the coordinator's heartbeat: the survivors
fail with an error after `heartbeat_timeout_seconds` instead of hanging in a collective.
"""

from __future__ import annotations

import dataclasses
import os

import jax


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  coordinator_address: str | None = None  # "host:port" of process 0
  num_processes: int | None = None
  process_id: int | None = None
  heartbeat_timeout_seconds: int = 60
  initialization_timeout_seconds: int = 300

  def __post_init__(self):
    explicit = (self.coordinator_address, self.num_processes, self.process_id)
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
      raise ValueError(
          "distributed: coordinator_address, num_processes and process_id go together; got "
          f"coordinator_address={self.coordinator_address!r}, "
          f"num_processes={self.num_processes!r}, process_id={self.process_id!r}.")
    if self.num_processes is not None and self.num_processes < 1:
      raise ValueError(f"distributed.num_processes={self.num_processes!r} must be >= 1.")
    if self.process_id is not None and not 0 <= self.process_id < self.num_processes:
      raise ValueError(
          f"distributed.process_id={self.process_id!r} must be in [0, {self.num_processes}).")
    if self.heartbeat_timeout_seconds < 1:
      raise ValueError(
          f"distributed.heartbeat_timeout_seconds={self.heartbeat_timeout_seconds!r} must be "
          ">= 1.")

  @classmethod
  def from_env(cls, **overrides) -> DistributedConfig:
    env = os.environ
    values = dict(
        coordinator_address=env.get("MOEJAX_COORDINATOR"),
        num_processes=_int_or_none(env.get("MOEJAX_NUM_PROCESSES"), "MOEJAX_NUM_PROCESSES"),
        process_id=_int_or_none(env.get("MOEJAX_PROCESS_ID"), "MOEJAX_PROCESS_ID"),
    )
    heartbeat = _int_or_none(env.get("MOEJAX_HEARTBEAT_TIMEOUT_SECONDS"),
                             "MOEJAX_HEARTBEAT_TIMEOUT_SECONDS")
    if heartbeat is not None:
      values["heartbeat_timeout_seconds"] = heartbeat
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)


def _int_or_none(value: str | None, name: str) -> int | None:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name}={value!r} must be an integer.") from None


def cluster_detected() -> bool:
  """True on a multi-process SLURM job or a Cloud TPU slice (GCE TPU VMs or GKE)."""
  env = os.environ
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
    return True
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  if len([h for h in hosts.split(",") if h]) > 1:
    return True
  return _jax_detects_tpu_cluster()


def _jax_detects_tpu_cluster() -> bool:
  """Asks JAX's own cluster detection (TPU VMs publish their workers through the metadata
  server, not the environment). A single-host slice also answers True; initialising there is
  harmless (one process)."""
  try:
    from jax._src.clusters import ClusterEnv  # pylint: disable=import-outside-toplevel
  except ImportError:  # the detection moved: rely on the explicit MOEJAX_* settings
    return False
  tpu_envs = [e for e in ClusterEnv._cluster_types  # pylint: disable=protected-access
              if "Tpu" in e.__name__ and not getattr(e, "opt_in_only_method", False)]
  return any(e.is_env_present() for e in tpu_envs)


def initialize(config: DistributedConfig | None = None) -> bool:
  """Starts jax.distributed when more than one process runs; returns whether it did."""
  config = config or DistributedConfig.from_env()
  timeouts = dict(heartbeat_timeout_seconds=config.heartbeat_timeout_seconds,
                  initialization_timeout=config.initialization_timeout_seconds)
  if config.num_processes is not None:
    if config.num_processes == 1:
      return False
    jax.distributed.initialize(config.coordinator_address, config.num_processes,
                               config.process_id, **timeouts)
    return True
  if cluster_detected():
    jax.distributed.initialize(**timeouts)
    return True
  return False
