"""Training throughput: tokens per second over the intervals in which the host only fed steps."""

from __future__ import annotations

import time
from typing import Any

import jax


class Throughput:
  """Training tokens per second over intervals during which the host only fed training steps.

  `resume()` when steps start being dispatched, `add(tokens)` per step, and `pause()` once the
  last step has finished (it returns the interval's rate, None if it had no steps). Steps run
  asynchronously: pass `wait_for` (the newest state) unless the caller already waited on them.
  """

  def __init__(self):
    self.tokens, self.seconds = 0, 0.0
    self._pending, self._since = 0, None

  def resume(self) -> None:
    if self._since is None:
      self._since = time.perf_counter()

  def add(self, tokens: int) -> None:
    self._pending += tokens

  def pause(self, wait_for: Any = None) -> float | None:
    if self._since is None:
      return None
    if wait_for is not None:
      jax.block_until_ready(wait_for)
    elapsed = time.perf_counter() - self._since
    rate = self._pending / elapsed if self._pending and elapsed > 0 else None
    self.tokens += self._pending
    self.seconds += elapsed
    self._pending, self._since = 0, None
    return rate

  @property
  def mean(self) -> float:
    return self.tokens / self.seconds if self.seconds > 0 else 0.0
