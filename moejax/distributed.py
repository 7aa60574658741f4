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
data this process reads.

A run that ends on one process must end on all of them, each saying why. `Peers.join` (what
`moejax.main` uses) joins like `initialize`, then watches the other processes from a thread:

* a process that dies or loses the network stops sending heartbeats to the coordination service
  (hosted by process 0); after `heartbeat_timeout_seconds` the service declares it dead and every
  survivor prints one line naming it, how to resume, and exits with `EXIT_PEER_LOST`, also when
  its main thread is stuck in a collective that waits for the dead process;
* a process that fails (an error) or stops (SIGTERM before training) records why in the
  service's key-value store before it leaves; the others print that reason and leave too;
* at the end of a run every process waits for the others, and process 0 leaves last (a
  coordination service that goes away takes its clients down with it).

JAX's own reaction to a dead peer is to abort every survivor from a C++ thread (status 134, a
stack dump); the watch needs JAX's "recoverable" mode (`jax_enable_recoverability`), in which the
service only reports the death, so that moejax can say what happened. Process 0 dying is still
fatal in that mode (the coordination service dies with it): the survivors are then aborted by
JAX with "Failed to send RPC to coordination service ... the leader task ... died". The service
logs one warning at start-up ("Using experimental recoverable task feature"). Set
MOEJAX_WATCH_PEERS=0 to keep JAX's default behaviour instead.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import threading
import time
from collections.abc import Callable

import jax


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  coordinator_address: str | None = None  # "host:port" of process 0
  num_processes: int | None = None
  process_id: int | None = None
  heartbeat_timeout_seconds: int = 60
  initialization_timeout_seconds: int = 300
  watch_peers: bool = True  # `Peers.join` watches the other processes (MOEJAX_WATCH_PEERS=0: no)

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
    watch = env.get("MOEJAX_WATCH_PEERS")
    if watch not in (None, ""):
      if watch not in ("0", "1"):
        raise ValueError(f"MOEJAX_WATCH_PEERS={watch!r} must be 0 or 1.")
      values["watch_peers"] = watch == "1"
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


# ----------------------------------------------------------------------------- the other processes

EXIT_PEER_LOST = 75  # sysexits' EX_TEMPFAIL: the run itself is fine; rerun it to resume
_EXIT_RECORDS = "moejax/exit/"  # key-value store: "moejax/exit/<process>" = "<kind> <text>"
_FINISHED_BARRIER = "moejax/finished"
_FINISH_TIMEOUT_MS = 30 * 60 * 1000  # the last checkpoint of a large model may take a while
# Process 0 leaves this long after the others disconnected: a client whose disconnection is
# still being answered when the coordination service goes away aborts.
_DISCONNECT_GRACE_SECONDS = 1.0
# How a collective or barrier fails when the process at its other end is gone (gloo on CPU,
# gRPC, NCCL): such an error waits for the watch's verdict before it is reported as this
# process's own.
PEER_ERROR = re.compile(r"connection (reset|closed) by peer|socket closed|broken pipe|heartbeat|"
                        r"not connected|unavailable|remote process", re.IGNORECASE)


class Peers:
  """The other processes of a multi-process run, watched from a thread (see the module doc).

  `join` creates it. The main thread ends the run with `finish` (training done, on every
  process) or `leave` (this process stops early); `before_reporting` gives the watch time to
  explain an error that a dead peer may have caused.

  Records in the coordination service's key-value store say why a process left: "finished",
  "failed <reason>", "stopped <reason>" (SIGTERM before training), or "follows" (it stopped
  because of another process). The watch polls liveness every `poll_seconds`;
  `client.get_live_nodes` is a barrier of the live processes, so all survivors learn of a death
  in the same round, `heartbeat_timeout_seconds` after the last heartbeat of the dead process.
  """

  def __init__(self, client, process_index: int, process_count: int, *,
               heartbeat_timeout_seconds: int, resume_advice: Callable[[], str],
               poll_seconds: float = 1.0):
    self._client = client
    self.process_index = process_index
    self.process_count = process_count
    self.heartbeat_timeout_seconds = heartbeat_timeout_seconds
    self._resume_advice = resume_advice
    self._poll_seconds = poll_seconds
    self._leaving = threading.Event()  # this process is on its way out; the watch stays quiet
    self._alone = threading.Event()  # process 0, leaving, sees no other process any more
    self._verdict = threading.Event()  # the watch is ending this process
    self._wake = threading.Event()
    self._thread = threading.Thread(target=self._watch, name="moejax-peers", daemon=True)

  @classmethod
  def join(cls, config: DistributedConfig | None = None, *,
           resume_advice: Callable[[], str] = lambda: "rerun the same command on all processes"
           ) -> Peers | None:
    """Joins the other processes (see `initialize`) and starts watching them.

    Returns None with one process, or with `watch_peers` off or unsupported by this JAX (then
    JAX's own reaction to a dead peer, aborting the survivors, stays). `resume_advice()` ends
    the line printed when the run stops because of another process.
    """
    config = config or DistributedConfig.from_env()
    if not (config.watch_peers and _recoverable_mode()):
      initialize(config)
      return None
    if not initialize(config):
      jax.config.update("jax_enable_recoverability", False)
      return None
    from jax._src import distributed as jax_distributed  # pylint: disable=import-outside-toplevel
    state = jax_distributed.global_state
    peers = cls(state.client, state.process_id, state.num_processes,
                heartbeat_timeout_seconds=config.heartbeat_timeout_seconds,
                resume_advice=resume_advice)
    peers._thread.start()
    return peers

  # ---- called by the main thread

  def finish(self) -> None:
    """Waits until every process has finished the run; process 0 then waits for the others to
    disconnect, so that its coordination service outlives them."""
    self._record("finished", "")
    self._client.wait_at_barrier(_FINISHED_BARRIER, _FINISH_TIMEOUT_MS)
    self._depart()

  def leave(self, kind: str, reason: str) -> None:
    """Records why this process stops early ("failed" or "stopped") for the others to report,
    and disconnects (process 0: once the others have gone, or after the heartbeat timeout)."""
    if self._verdict.is_set():  # the watch is already ending this process
      threading.Event().wait()
    self._record(kind, reason)
    self._depart()

  def before_reporting(self, error: BaseException) -> None:
    """Call before reporting `error` as this process's own.

    If another process caused it, the watch says so instead: when the watch is already ending
    this process, or `error` is one of a collective that lost its other side (`PEER_ERROR`) and
    the watch finds a dead or failed process within the heartbeat timeout, this never returns.
    Otherwise the watch falls silent (this process reports its own error, then `leave`s), so that
    processes failing together each report their own error.
    """
    seconds = self.heartbeat_timeout_seconds + 5 if PEER_ERROR.search(str(error)) else 0
    if self._verdict.wait(seconds):
      threading.Event().wait()
    self._leaving.set()

  # ---- the watch thread

  def _record(self, kind: str, text: str) -> None:
    self._client.key_value_set(f"{_EXIT_RECORDS}{self.process_index}", f"{kind} {text}".strip(),
                               allow_overwrite=True)

  def _records(self) -> dict[int, tuple[str, str]]:
    """The other processes' exit records: {process: (kind, text)}."""
    records = {}
    for key, value in self._client.key_value_dir_get(_EXIT_RECORDS):
      index = int(key.rstrip("/").rsplit("/", 1)[-1])
      if index != self.process_index:
        kind, _, text = value.partition(" ")
        records[index] = (kind, text)
    return records

  def _depart(self) -> None:
    """Process 0: waits until the others have disconnected; others: disconnect. Either way the
    watch thread has left its native call when this returns (a thread inside one when the
    interpreter exits aborts the process)."""
    self._leaving.set()
    self._wake.set()
    if self.process_index == 0:
      if self._alone.wait(self.heartbeat_timeout_seconds + 4 * self._poll_seconds):
        time.sleep(_DISCONNECT_GRACE_SECONDS)
    else:
      jax.distributed.shutdown()  # ends the watch's pending call
    self._thread.join(5.0)

  def _watch(self) -> None:
    everyone = list(range(self.process_count))
    while True:
      try:
        live = set(self._client.get_live_nodes(everyone))
      except Exception as error:  # pylint: disable=broad-except
        if self._leaving.is_set():  # this process disconnected
          return
        # Process 0 is gone; JAX's own error poller usually aborts this process first.
        self._end_run(EXIT_PEER_LOST, "lost contact with process 0, which hosts the "
                      f"coordination service ({first_line(error)}); {self._resume_advice()}.")
        return
      if self._leaving.is_set():
        if self.process_index != 0 or live <= {0}:
          self._alone.set()
          return
        continue  # process 0 stays until the others have gone: a round lasts until they call
      trouble = self._trouble(live, self._records())
      if trouble is not None:
        self._end_run(*trouble)
        return
      self._wake.wait(self._poll_seconds)

  def _trouble(self, live: set[int], records: dict[int, tuple[str, str]]
               ) -> tuple[int, str] | None:
    """(exit status, line) when another process failed, stopped or died; else None."""
    me = self.process_index
    causes = {i: r for i, r in records.items() if r[0] in ("failed", "stopped")}
    if causes:
      index, (kind, text) = min(causes.items())
      if kind == "stopped":
        return 0, f"process {index} {text}; process {me} stops too."
      return 1, (f"process {index} failed ({text}); process {me} stops too. Fix what process "
                 f"{index} reports, then {self._resume_advice()}.")
    lost = [i for i in range(self.process_count) if i not in live and i not in records]
    if not lost:
      return None
    who = (f"process {lost[0]}" if len(lost) == 1 else
           "processes " + ", ".join(map(str, lost)))
    return EXIT_PEER_LOST, (
        f"{who} of {self.process_count} stopped responding (no heartbeat for "
        f"{self.heartbeat_timeout_seconds} s: killed, crashed or cut off); process {me} stops too. "
        f"{self._resume_advice()[:1].upper()}{self._resume_advice()[1:]}.")

  def _end_run(self, status: int, line: str) -> None:
    """Prints `line`, leaves like `leave` (waiting for the others on process 0) and exits."""
    self._verdict.set()
    print(f"moejax: {line}", file=sys.stderr, flush=True)
    try:
      self._record("follows", "")
      self._leaving.set()
      if self.process_index == 0:
        waiter = threading.Thread(target=self._wait_alone, daemon=True)
        waiter.start()
        waiter.join(self.heartbeat_timeout_seconds + 4 * self._poll_seconds)
      else:
        jax.distributed.shutdown()
    finally:
      sys.stdout.flush()
      os._exit(status)  # pylint: disable=protected-access

  def _wait_alone(self) -> None:
    everyone = list(range(self.process_count))
    while not set(self._client.get_live_nodes(everyone)) <= {0}:
      pass
    time.sleep(_DISCONNECT_GRACE_SECONDS)


def _recoverable_mode() -> bool:
  """Turns on JAX's recoverable mode (read when process 0 starts the coordination service, so
  before joining) if this JAX has it and the liveness query the watch needs; else False."""
  try:
    from jax._src.lib import _jax  # pylint: disable=import-outside-toplevel
    if not hasattr(_jax.DistributedRuntimeClient, "get_live_nodes"):
      return False
    jax.config.update("jax_enable_recoverability", True)
  except (ImportError, AttributeError):  # another JAX: keep its own handling of a dead peer
    return False
  return True


def first_line(error: BaseException) -> str:
  """`Type: first line of the message`, at most 300 characters."""
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0] if text else ''}"[:300]
