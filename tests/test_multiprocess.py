"""Multi-process training on one machine: 2 processes x 4 CPU devices against 1 process x 8.

Every run is the tiny switch_small (M=32, L=16, 2 layers, 8 experts, global batch 8) on the PTB
fixture, with the expert axis over all 8 devices (`mesh.data=1, mesh.expert=8`), so each MoE
layer's all-to-alls cross between the two processes. Checked:

  (a, b) a `launch/local.sh 2` run and a single process with 8 simulated devices log the same
         per-step losses (see `LOSS_RTOL` for why not bit for bit) on the same global batches;
  (c)    the 2-process run checkpoints, and rerun with more steps resumes at the next step, with
         the single process's losses (slow: about a minute more);
  (d)    the compiled train step's all-to-alls have replica groups holding devices of both
         processes (a 2-process worker, this file run as a script, reads the compiled HLO);
  (e)    how a run ends when one process leaves (`distributed.Peers`): a process that is
         killed, fails or is stopped by SIGTERM early ends the other one with one last line that
         says which process and why (workers joined by `Peers.join` alone, and a `moejax.main`
         run where one process gets bad input); a process that finishes first waits for the
         others instead of taking them down; with MOEJAX_WATCH_PEERS=0 JAX's own abort of the
         survivor, which the watch replaces, comes back;
  (f)    SIGKILL of process 1 mid-run makes process 0 exit with status 75 and the line naming
         process 1 and the checkpoint to resume from, within the heartbeat timeout (5 s here)
         and a little, and a rerun resumes from the last checkpoint (slow: 2-3 minutes).

Runs are subprocesses under timeouts (the process group is killed when one expires). The
learning-rate schedule is pinned (`optimizer.decay_steps`) so that runs of different lengths
share it. A persistent compilation cache in the test's tmp directory spares repeated compiles.
"""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
DECAY_STEPS = 20
# Losses of the 2-process run against the single process: relative 1e-6 (about 12 float32 ulps
# at a loss of 6). Not bitwise: the all-reduces of the loss and the gradients add the same
# per-device partial sums in another order when they cross processes (gloo combines the two
# processes' partial sums; one process reduces its 8 devices in its own order). Measured: 0 or 1
# ulp per step (4.8e-7 absolute at a loss near 6), not growing over 6 steps.
LOSS_RTOL = 1e-6
RUN_TIMEOUT_S = 300


def _tiny_flags(data_dir: str, workdir: pathlib.Path, num_steps: int, *extra: str) -> list[str]:
  return ["--config=experiments/switch_small.py:tiny", f"--workdir={workdir}",
          "--config.data.name=ptb", f"--config.data.data_dir={data_dir}",
          "--config.mesh.data=1", "--config.mesh.expert=8",
          f"--config.train.num_steps={num_steps}", "--config.train.eval_batches=1",
          f"--config.optimizer.decay_steps={DECAY_STEPS}", *extra]


def _env(tmp: pathlib.Path, **extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("MOEJAX_", "JAX_", "XLA_"))}  # conftest's 8 devices are not theirs
  env.update(JAX_PLATFORMS="cpu", PYTHON=sys.executable, PYTHONUNBUFFERED="1",
             JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  env.update(extra)
  # As the conftest does for the tests' own programs: compile time dominates these tiny runs.
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
  return env


def _start(cmd: list[str], env: dict[str, str], log: pathlib.Path) -> subprocess.Popen:
  """Starts `cmd` in its own process group, stdout and stderr to `log`."""
  with log.open("w") as out:
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float) -> int:
  """Waits for `proc`; past `timeout` kills its whole process group and fails the test."""
  try:
    return proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    pytest.fail(f"{proc.args[:2]} ran past {timeout} s and was killed")


def _launch_two(tmp: pathlib.Path, name: str, flags: list[str]) -> subprocess.Popen:
  """`launch/local.sh 2 FLAGS` (process 0's output in tmp/NAME.log, process 1's in
  tmp/NAME_logs/process_1.log)."""
  env = _env(tmp, MOEJAX_LOG_DIR=str(tmp / f"{name}_logs"))
  return _start(["bash", "launch/local.sh", "2", *flags], env, tmp / f"{name}.log")


def _run_two(tmp: pathlib.Path, name: str, flags: list[str]) -> str:
  proc = _launch_two(tmp, name, flags)
  status = _finish(proc, RUN_TIMEOUT_S)
  output = (tmp / f"{name}.log").read_text()
  assert status == 0, f"2-process run {name} exited {status}:\n{output[-3000:]}"
  return output


def _run_one(tmp: pathlib.Path, name: str, flags: list[str]) -> str:
  env = _env(tmp, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = _start([sys.executable, "-m", "moejax.main", *flags], env, tmp / f"{name}.log")
  status = _finish(proc, RUN_TIMEOUT_S)
  output = (tmp / f"{name}.log").read_text()
  assert status == 0, f"1-process run {name} exited {status}:\n{output[-3000:]}"
  return output


def _records(workdir: pathlib.Path, filename: str = "metrics.jsonl") -> dict[int, dict]:
  lines = (workdir / filename).read_text().splitlines()
  records = [json.loads(line) for line in lines if line.strip()]
  return {r["step"]: r for r in records}


def _assert_losses_match(records: dict[int, dict], reference: dict[int, dict]) -> None:
  steps = sorted(records)
  print("|loss - 1-process loss| by step:",
        {s: abs(records[s]["train/loss"] - reference[s]["train/loss"]) for s in steps})
  assert set(steps) <= set(reference)
  # Same global batches: the same number of real target tokens, exactly.
  assert [records[s]["train/target_tokens"] for s in steps] == [
      reference[s]["train/target_tokens"] for s in steps]
  for key in ("train/loss", "train/cross_entropy"):
    np.testing.assert_allclose([records[s][key] for s in steps],
                               [reference[s][key] for s in steps], rtol=LOSS_RTOL, err_msg=key)


def _checkpoint_steps(workdir: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> pathlib.Path:
  return tmp_path_factory.mktemp("multiprocess")


@pytest.fixture(scope="module")
def ptb_dir(tmp) -> str:
  from moejax.data import corpora  # pylint: disable=g-import-not-at-top
  data_dir = tmp / "ptb"
  corpora.build("ptb", data_dir, source_dir=FIXTURES / "ptb")
  return str(data_dir)


@pytest.fixture(scope="module")
def reference(tmp, ptb_dir) -> dict[int, dict]:
  """One process, 8 simulated devices, 10 uninterrupted steps."""
  workdir = tmp / "one_process"
  _run_one(tmp, "one_process", _tiny_flags(ptb_dir, workdir, 10))
  return _records(workdir)


@pytest.fixture(scope="module")
def two_processes(tmp, ptb_dir):
  """A 2-process run of 3 steps; it checkpoints at its last step."""
  workdir = tmp / "two_processes"
  _run_two(tmp, "first", _tiny_flags(ptb_dir, workdir, 3))
  return dict(workdir=workdir, records=_records(workdir))


def test_two_processes_match_one_process(two_processes, reference):
  records = two_processes["records"]
  assert sorted(records) == [1, 2, 3]
  _assert_losses_match(records, reference)


@pytest.mark.slow
def test_two_process_run_resumes_from_its_checkpoint(tmp, ptb_dir, two_processes, reference):
  """The same command with 6 steps restores step 3 and trains steps 4-6 only.

  The first run's metrics.jsonl is moved aside first, so the rerun's file holds exactly the
  steps the rerun trained.
  """
  workdir = two_processes["workdir"]
  assert _checkpoint_steps(workdir) == [3]
  (workdir / "metrics.jsonl").rename(workdir / "first.jsonl")
  _run_two(tmp, "rerun", _tiny_flags(ptb_dir, workdir, 6))
  assert _checkpoint_steps(workdir) == [3, 6]
  rerun = _records(workdir)
  assert sorted(rerun) == [4, 5, 6]  # it restored step 3 and trained on from step 4
  _assert_losses_match(rerun, reference)  # the same steps as an uninterrupted run


# ----------------------------------------------------------------------------- compiled HLO


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def replica_groups(text: str) -> list[list[list[int]]]:
  """The replica groups of every all-to-all in compiled HLO text.

  Reads the explicit form `replica_groups={{0,1},{2,3}}` and the iota form
  `replica_groups=[2,2]<=[4]` / `[2,2]<=[2,2]T(1,0)`.
  """
  out = []
  for line in text.splitlines():
    if not re.search(r"\ball-to-all(-start)?\(", line):
      continue
    explicit = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", line)
    iota = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if explicit:
      out.append([[int(i) for i in g.split(",") if i]
                  for g in re.findall(r"\{([\d,]*)\}", explicit.group(1))])
    elif iota:
      shape = [int(i) for i in iota.group(1).split(",")]
      dims = [int(i) for i in iota.group(2).split(",")]
      ids = np.arange(int(np.prod(dims))).reshape(dims)
      if iota.group(3):
        ids = ids.transpose([int(i) for i in iota.group(3).split(",")])
      out.append(ids.reshape(shape).tolist())
    else:
      raise AssertionError(f"an all-to-all without readable replica_groups: {line[:300]}")
  return out


def test_replica_group_forms():
  hlo = ("%a = (f32[1,2]) all-to-all(f32[1,2] %x), channel_id=1, replica_groups={{0,1},{2,3}}, "
         "dimensions={0}\n"
         "%b = f32[4] all-to-all(f32[4] %y), channel_id=2, replica_groups=[2,2]<=[2,2]T(1,0)\n"
         "%c = f32[4] all-reduce(f32[4] %z), replica_groups={{0,1,2,3}}\n"
         "%d = f32[8] all-to-all(f32[8] %w), replica_groups=[1,8]<=[8], dimensions={0}\n")
  assert replica_groups(hlo) == [[[0, 1], [2, 3]], [[0, 2], [1, 3]], [list(range(8))]]


def _hlo_worker(out_path: str) -> None:
  """Run as a script, once per process: join, and on process 0 compile the trainer's train step
  on the (data=1, expert=8) mesh and write its all-to-all replica groups and the device layout."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

  from experiments import switch_small  # pylint: disable=g-import-not-at-top
  from moejax import config as config_lib  # pylint: disable=g-import-not-at-top
  from moejax import distributed, sharding, train  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_threefry_partitionable", True)
  distributed.initialize()  # from MOEJAX_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID
  if jax.process_index() != 0:
    return  # process 1 lends its devices; jax.distributed's shutdown waits for process 0
  config = switch_small.get_config("tiny")
  config.mesh.update(data=1, expert=8)
  experiment = config_lib.experiment_config_from(config)
  mesh = sharding.make_mesh(experiment.mesh)
  batch_spec = sharding.logical_to_spec(("batch", None), experiment.sharding_rules)
  with jax.set_mesh(mesh):
    # The trainer's state, abstractly (no initialisation to compile); scalars without a
    # sharding in their type (the optimizer's step count) are replicated, as in the trainer.
    abstract = jax.eval_shape(lambda: train.create_train_state(experiment.model, experiment, mesh))
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
        mesh, x.sharding.spec if x.sharding is not None else P())), abstract)
    train_fn, _ = train.compile_steps(state, mesh, batch_spec)
    rows = (experiment.train.batch_size, experiment.data.seq_len)
    batch_sharding = NamedSharding(mesh, batch_spec)
    batch = {"inputs": jax.ShapeDtypeStruct(rows, "int32", sharding=batch_sharding),
             "targets": jax.ShapeDtypeStruct(rows, "int32", sharding=batch_sharding),
             "mask": jax.ShapeDtypeStruct(rows, "bool", sharding=batch_sharding)}
    compiled = train_fn.lower(state, batch).compile()
  text = compiled.as_text()
  pathlib.Path(out_path).with_suffix(".hlo.txt").write_text(text)
  pathlib.Path(out_path).write_text(json.dumps({
      # jit's device assignment is the mesh's devices in row-major order: the HLO's partition i
      # (the numbers in replica_groups) runs on mesh.devices.flat[i].
      "mesh_devices": [[d.id, d.process_index] for d in mesh.devices.flat],
      "executable_local_devices": [d.id for d in compiled.runtime_executable().local_devices()],
      "process_count": jax.process_count(),
      "all_to_all_groups": replica_groups(text),
  }))


def test_all_to_alls_of_the_train_step_span_both_processes(tmp):
  out = tmp / "hlo_worker.json"
  port = _free_port()
  procs = []
  for i in range(2):
    env = _env(tmp, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               MOEJAX_COORDINATOR=f"127.0.0.1:{port}", MOEJAX_NUM_PROCESSES="2",
               MOEJAX_PROCESS_ID=str(i), PYTHONPATH=str(REPO))
    procs.append(_start([sys.executable, __file__, "hlo-worker", str(out)], env,
                        tmp / f"hlo_worker_{i}.log"))
  statuses = [_finish(p, 240) for p in procs]
  logs = [(tmp / f"hlo_worker_{i}.log").read_text()[-2000:] for i in range(2)]
  assert statuses == [0, 0], logs
  result = json.loads(out.read_text())
  assert result["process_count"] == 2
  process_of = [process for _, process in result["mesh_devices"]]
  assert sorted(process_of) == [0, 0, 0, 0, 1, 1, 1, 1]
  assert result["executable_local_devices"] == [
      device for device, process in result["mesh_devices"] if process == 0]
  groups = result["all_to_all_groups"]
  # Forward and backward of the one MoE layer: 2 + 2 all-to-alls at least, each over all 8
  # partitions, i.e. the 4 devices of process 0 and the 4 of process 1.
  assert len(groups) >= 4, groups
  for group_list in groups:
    assert group_list == [list(range(8))] or [sorted(g) for g in group_list] == [list(range(8))]
    assert {process_of[i] for i in group_list[0]} == {0, 1}


# ----------------------------------------------------------------------------- how a run ends

# Every process's heartbeat timeout in these tests: a dead process is noticed this long after.
HEARTBEAT_S = 5
# Process 0's last line when process 1 died; {} is what it advises.
PEER_LOST_LINE = (rf"^moejax: process 1 of 2 stopped responding \(no heartbeat for {HEARTBEAT_S} "
                  r"s: killed, crashed or cut off\); process 0 stops too\. {}\.$")


def _peers_worker(scenario: str) -> None:
  """Run as a script, once per process: joins with `distributed.Peers` and plays `scenario`;
  the main thread otherwise waits for a key-value entry that never comes, as a process waits in
  a collective for a peer (it fails when this process's client disconnects)."""
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  from moejax import distributed  # pylint: disable=g-import-not-at-top
  peers = distributed.Peers.join(resume_advice=lambda: "rerun the same command on all processes")
  if peers is None:  # MOEJAX_WATCH_PEERS=0: JAX alone
    me = jax_distributed.global_state.process_id
    print(f"joined {me} unwatched", flush=True)
    if me == 1:
      os.kill(os.getpid(), signal.SIGKILL)
    jax_distributed.global_state.client.blocking_key_value_get("never", 120_000)
    return
  me = peers.process_index
  print(f"joined {me}", flush=True)
  try:
    if scenario == "kill" and me == 1:
      os.kill(os.getpid(), signal.SIGKILL)
    elif scenario in ("fail1", "fail0") and me == int(scenario[-1]):
      time.sleep(1)  # the other process is waiting by now
      print("moejax: ValueError: boom", file=sys.stderr, flush=True)
      peers.leave("failed", "ValueError: boom")
      os._exit(2)
    elif scenario == "stop1" and me == 1:
      peers.leave("stopped", "was stopped by SIGTERM before training started; nothing to save")
      os._exit(0)
    elif scenario == "finish":
      time.sleep(3 * me)  # process 0 finishes first: it must not take process 1 down
      peers.finish()
      print(f"finished {me}", flush=True)
      return
    peers._client.blocking_key_value_get("never", 120_000)  # pylint: disable=protected-access
  except Exception as error:  # pylint: disable=broad-except
    peers.before_reporting(error)
    raise


def _run_peers(tmp: pathlib.Path, scenario: str, **env_extra: str
               ) -> tuple[list[int], list[str], float]:
  """Two `_peers_worker` processes; returns (exit statuses, outputs, seconds)."""
  port = _free_port()
  procs = []
  started = time.monotonic()
  for i in range(2):
    env = _env(tmp, MOEJAX_COORDINATOR=f"127.0.0.1:{port}", MOEJAX_NUM_PROCESSES="2",
               MOEJAX_PROCESS_ID=str(i), MOEJAX_HEARTBEAT_TIMEOUT_SECONDS=str(HEARTBEAT_S),
               PYTHONPATH=str(REPO), **env_extra)
    procs.append(_start([sys.executable, __file__, "peers-worker", scenario], env,
                        tmp / f"peers_{scenario}_{i}.log"))
  statuses = [_finish(p, 120) for p in procs]
  outputs = [(tmp / f"peers_{scenario}_{i}.log").read_text() for i in range(2)]
  return statuses, outputs, time.monotonic() - started


def _last_line(output: str) -> str:
  return output.strip().splitlines()[-1]


# (scenario, exit statuses, each process's last line): the process that leaves first records why
# in the coordination service; the other one reports it, and a dead one is named.
PEER_SCENARIOS = [
    ("kill", [75, -signal.SIGKILL],
     [PEER_LOST_LINE.format("Rerun the same command on all processes"), None]),
    ("fail1", [1, 2],
     [r"^moejax: process 1 failed \(ValueError: boom\); process 0 stops too\. Fix what "
      r"process 1 reports, then rerun the same command on all processes\.$",
      r"^moejax: ValueError: boom$"]),
    ("fail0", [2, 1],
     [r"^moejax: ValueError: boom$",
      r"^moejax: process 0 failed \(ValueError: boom\); process 1 stops too\."]),
    ("stop1", [0, 0],
     [r"^moejax: process 1 was stopped by SIGTERM before training started; nothing to save; "
      r"process 0 stops too\.$", r"^joined 1$"]),
    ("finish", [0, 0], [r"^finished 0$", r"^finished 1$"]),
]


@pytest.mark.parametrize("scenario, statuses, last_lines", PEER_SCENARIOS,
                         ids=[s[0] for s in PEER_SCENARIOS])
def test_a_process_that_leaves_ends_the_run_with_one_line(tmp, scenario, statuses, last_lines):
  got, outputs, seconds = _run_peers(tmp, scenario)
  print(f"{scenario}: statuses {got} after {seconds:.1f} s")
  assert got == statuses, outputs
  for output, pattern in zip(outputs, last_lines):
    if pattern is not None:
      assert re.search(pattern, _last_line(output)), output
    # JAX's own ending (an abort from its error poller) never shows.
    assert "Terminating process" not in output and "Check failure" not in output, output


def test_without_the_watch_jax_aborts_the_survivor(tmp):
  """MOEJAX_WATCH_PEERS=0 keeps JAX's own reaction to a dead process, which the watch replaces:
  the survivor is aborted from JAX's error-polling thread (SIGABRT, a C++ stack dump)."""
  statuses, outputs, seconds = _run_peers(tmp, "unwatched", MOEJAX_WATCH_PEERS="0")
  print(f"unwatched: statuses {statuses} after {seconds:.1f} s")
  assert statuses == [-signal.SIGABRT, -signal.SIGKILL], outputs
  assert "Terminating process because the JAX distributed service detected fatal errors" in (
      outputs[0])
  assert "moejax:" not in outputs[0]


def _children(pid: int) -> list[int]:
  out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True,
                       text=True, check=True).stdout
  return [int(line.split()[0]) for line in out.splitlines() if "moejax.main" in line]


def _own_lines(output: str) -> list[str]:
  """Process 0's lines of a `launch/local.sh` log (without the launcher's)."""
  return [line for line in output.strip().splitlines()
          if not line.startswith("launch/local.sh:")]


def test_a_process_with_bad_input_stops_the_other_one(tmp, ptb_dir):
  """Process 1 alone gets an unusable data.data_dir: it says so in one line (status 2) and
  process 0, which has joined and gone on towards training, stops naming process 1's reason."""
  port = _free_port()
  (tmp / "not_a_dir").write_text("")
  procs = []
  for i, data_dir in enumerate([ptb_dir, str(tmp / "not_a_dir")]):
    env = _env(tmp, MOEJAX_COORDINATOR=f"127.0.0.1:{port}", MOEJAX_NUM_PROCESSES="2",
               MOEJAX_PROCESS_ID=str(i), MOEJAX_HEARTBEAT_TIMEOUT_SECONDS=str(HEARTBEAT_S),
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    procs.append(_start([sys.executable, "-m", "moejax.main",
                         *_tiny_flags(data_dir, tmp / "bad_input", 3)], env,
                        tmp / f"bad_input_{i}.log"))
  statuses = [_finish(p, RUN_TIMEOUT_S) for p in procs]
  outputs = [(tmp / f"bad_input_{i}.log").read_text() for i in range(2)]
  reason = (f"data.data_dir={str(tmp / 'not_a_dir')!r}: {tmp / 'not_a_dir'} is a file, not a "
            "directory")
  assert statuses == [1, 2], outputs
  assert _last_line(outputs[1]) == f"moejax: {reason}"
  assert _last_line(outputs[0]) == (
      f"moejax: process 1 failed ({reason}); process 0 stops too. Fix what process 1 reports, "
      "then rerun the same command on all processes to resume from the start (no checkpoint in "
      f"{tmp / 'bad_input'} yet).")
  assert "Traceback" not in outputs[0] + outputs[1]


@pytest.mark.slow
def test_killed_process_stops_the_run_and_a_rerun_resumes(tmp, ptb_dir, reference):
  workdir = tmp / "killed"
  flags = _tiny_flags(ptb_dir, workdir, 1000, "--config.train.checkpoint_every=2")
  env = _env(tmp, MOEJAX_LOG_DIR=str(tmp / "killed_logs"),
             MOEJAX_HEARTBEAT_TIMEOUT_SECONDS=str(HEARTBEAT_S))
  launcher = _start(["bash", "launch/local.sh", "2", *flags], env, tmp / "killed.log")
  log = tmp / "killed.log"
  try:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (workdir / "checkpoints" / "2").is_dir():
      assert launcher.poll() is None, log.read_text()[-3000:]
      assert time.monotonic() < deadline, "no checkpoint 2 in time"
      time.sleep(0.2)
    pids = _children(launcher.pid)
    assert len(pids) == 2, pids
    killed_at = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)  # launch/local.sh starts process 0 first, then process 1
    _finish(launcher, 120)
    exit_s = time.monotonic() - killed_at
  finally:
    if launcher.poll() is None:
      os.killpg(launcher.pid, signal.SIGKILL)
      launcher.wait()
  output = log.read_text()
  print(f"after SIGKILL of process 1: launcher exited after {exit_s:.1f} s with status "
        f"{launcher.returncode}")
  assert re.search(r"process 0 exited with status 75\b", output), output[-3000:]
  assert exit_s < HEARTBEAT_S + 30
  # Process 0's last line names the dead process and says how to go on; no abort by JAX.
  latest = _checkpoint_steps(workdir)[-1]
  assert latest >= 2
  advice = f"Rerun the same command on all processes to resume from checkpoint step {latest} in "
  assert re.search(PEER_LOST_LINE.format(re.escape(f"{advice}{workdir}")),
                   _own_lines(output)[-1]), output[-3000:]
  assert "Terminating process" not in output and "Traceback" not in output, output[-3000:]

  (workdir / "metrics.jsonl").rename(workdir / "killed.jsonl")
  _run_two(tmp, "after_kill", _tiny_flags(ptb_dir, workdir, latest + 2,
                                          "--config.train.checkpoint_every=2"))
  rerun = _records(workdir)
  assert sorted(rerun) == [latest + 1, latest + 2]
  _assert_losses_match({s: r for s, r in rerun.items() if s in reference}, reference)


if __name__ == "__main__":
  if sys.argv[1:2] == ["hlo-worker"]:
    _hlo_worker(sys.argv[2])
  elif sys.argv[1:2] == ["peers-worker"]:
    _peers_worker(sys.argv[2])
  else:
    sys.exit(f"usage: {sys.argv[0]} hlo-worker OUT.json | peers-worker SCENARIO")
