"""Where a study's jobs run when it runs several at once (`python -m moejax.study NAME --jobs N`).

Each of the N slots runs one job at a time, on its own share of the machine:

* GPUs (CUDA_VISIBLE_DEVICES when set, else the /dev/nvidiaN devices): slot i sees the GPUs
  i, i + N, i + 2N, ... through CUDA_VISIBLE_DEVICES; N may not exceed the number of GPUs.
* CPUs otherwise: slot i is pinned (sched_setaffinity, where the OS has it: Linux) to the cores
  i, i + N, ... of the cores this process may use; N may not exceed their number. A slot of one
  core also holds XLA's CPU backend to one thread (SINGLE_THREAD_XLA_FLAGS): the small models'
  matmuls do not keep two threads busy, and two single-core jobs train about 1.2 times the
  tokens/s of one job on both cores of the 2-core development machine (docs/studies/README.md).

With N = 1 (the default) the job gets the whole machine, as `python -m moejax.main` would. The
study process itself starts no JAX backend, so it finds the devices from the environment alone.
TPU hosts run one job at a time (a TPU VM's chips belong to one process).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re

SINGLE_THREAD_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


@dataclasses.dataclass(frozen=True)
class Slot:
  """One place a job runs.

  Attributes:
    name: how the progress lines name it ("" for the whole machine).
    cpus: the cores a job is pinned to (None: not pinned).
    env: environment variables a job gets on top of the study's.
  """

  name: str = ""
  cpus: frozenset[int] | None = None
  env: dict[str, str] = dataclasses.field(default_factory=dict)


def visible_gpus() -> list[str]:
  """The CUDA devices a job could use: CUDA_VISIBLE_DEVICES, else /dev/nvidiaN."""
  listed = os.environ.get("CUDA_VISIBLE_DEVICES")
  if listed is not None:
    return [d.strip() for d in listed.split(",") if d.strip() and d.strip() != "-1"]
  found = [p.name for p in pathlib.Path("/dev").glob("nvidia*")
           if re.fullmatch(r"nvidia\d+", p.name)]
  return sorted((name[len("nvidia"):] for name in found), key=int)


def _usable_cores() -> list[int]:
  """The cores this process may run on (all of them where the OS has no affinity call)."""
  if hasattr(os, "sched_getaffinity"):
    return sorted(os.sched_getaffinity(0))
  return list(range(os.cpu_count() or 1))


def slots(count: int) -> list[Slot]:
  """`count` slots over this machine's GPUs, else its CPU cores; ValueError naming --jobs when
  there are fewer of them than slots."""
  if count < 1:
    raise ValueError(f"--jobs={count} must be an integer >= 1.")
  if count == 1:
    return [Slot()]
  gpus = visible_gpus()
  if gpus:
    if count > len(gpus):
      raise ValueError(f"--jobs={count}: this machine shows {len(gpus)} GPU(s) "
                       f"({','.join(gpus)}); run at most that many jobs at once.")
    return [Slot(name=f"GPU {','.join(gpus[i::count])}",
                 env={"CUDA_VISIBLE_DEVICES": ",".join(gpus[i::count])}) for i in range(count)]
  cores = _usable_cores()
  if count > len(cores):
    raise ValueError(f"--jobs={count}: this process may use {len(cores)} CPU core(s); run at "
                     "most that many jobs at once.")
  out = []
  for i in range(count):
    mine = cores[i::count]
    env = {}
    if len(mine) == 1:
      flags = os.environ.get("XLA_FLAGS", "")
      env["XLA_FLAGS"] = f"{flags} {SINGLE_THREAD_XLA_FLAGS}".strip()
    out.append(Slot(name=f"core{'s' if len(mine) > 1 else ''} {','.join(map(str, mine))}",
                    cpus=frozenset(mine), env=env))
  return out
