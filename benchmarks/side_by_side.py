"""Timing of several programs side by side, shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time

import jax


def time_side_by_side(fns: dict, repeats: int, rounds: bool = False) -> dict:
  """Median seconds per call, in rounds that visit every candidate, so drift hits all alike.

  In each round a candidate runs twice back to back and only the second call is timed, so every
  timed call follows a call of the same program, as a step does in a training loop. `rounds`:
  return each candidate's list of times, one per round (to pair candidates round by round).
  """
  for fn in fns.values():  # compile and warm up
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      jax.block_until_ready(fn())
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  if rounds:
    return times
  return {name: statistics.median(t) for name, t in times.items()}
