"""Benchmark: the index dispatch form from the tokens' side against the buffer's side.

Usage:
  .venv/bin/python benchmarks/index_sides.py                 # T=8192, M=512, E=8
  .venv/bin/python benchmarks/index_sides.py --tokens 2048 --repeats 3

`IndexDispatcher` moves rows either from the tokens' side (K gathers per token: dispatch's
backward and combine sum a token's K rows as they gather them) or from the buffer's side (one
gather or scatter-add per buffer row; see moejax/dispatch.py). For each router below, on its own
routing decision of random logits, the script times dispatch + combine, forward and backward
(value_and_grad of sum(combine(dispatch(x) * 2) * dy) w.r.t. x and the logits), both ways, and
prints the time of each and the ratio of the token table's assignments to the buffer's rows
(T*K / R), on which `dispatch.BUFFER_SIDE_RATIO` picks the side:

  switch           K = 1, capacity factor 1.25      T*K / R = 0.8
  topk (k=2)       K = 2, capacity factor 1.25      T*K / R = 0.8
  expert_choice    K = E = 8, capacity factor 1     T*K / R = 8
  expert_choice    K = E = 8, capacity factor 2     T*K / R = 4

Timings are taken side by side in one run (interleaved rounds, median); the first line names the
device, the jax version and the load average.
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from moejax import dispatch  # noqa: E402
from moejax.routing import RouterConfig, route  # noqa: E402
from side_by_side import time_side_by_side  # noqa: E402

CASES = {
    "switch": dict(kind="switch", capacity_factor_train=1.25),
    "topk (k=2)": dict(kind="topk", k=2, capacity_factor_train=1.25),
    "expert_choice cf1": dict(kind="expert_choice", capacity_factor_train=1.0,
                              allow_noncausal=True),
    "expert_choice cf2": dict(kind="expert_choice", capacity_factor_train=2.0,
                              allow_noncausal=True),
}


def _step(config: RouterConfig, buffer_side: bool, logits, x, dy):
  @jax.jit
  def step(logits, x):
    def loss(logits, x):
      decision = route(logits, config, train=True)
      dispatcher = dispatch.IndexDispatcher(decision, buffer_side=buffer_side)
      return jnp.sum(dispatcher.combine(dispatcher.dispatch(x) * 2.0) * dy)
    return jax.value_and_grad(loss, argnums=(0, 1))(logits, x)
  return functools.partial(step, logits, x)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tokens", type=int, default=8192)
  p.add_argument("--model-dim", type=int, default=512)
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--group-size", type=int, default=1024)
  p.add_argument("--repeats", type=int, default=7)
  args = p.parse_args(argv)
  G, S, E, M = args.tokens // args.group_size, args.group_size, args.experts, args.model_dim
  keys = jax.random.split(jax.random.key(0), 3)
  logits = jax.random.normal(keys[0], (G, S, E))
  x = jax.random.normal(keys[1], (G, S, M))
  dy = jax.random.normal(keys[2], (G, S, M))
  fns, ratios = {}, {}
  for name, kw in CASES.items():
    config = RouterConfig(num_experts=E, min_capacity=1, **kw)
    decision = route(logits, config, train=True)
    K = decision.expert_index_GSK.shape[-1]
    ratios[name] = G * S * K / (E * G * decision.capacity)
    for side in ("tokens", "buffer"):
      fns[f"{name} {side}"] = _step(config, side == "buffer", logits, x, dy)
  t = time_side_by_side(fns, args.repeats)
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({os.cpu_count()} cores); "
        f"load average {os.getloadavg()[0]:.2f}; T={args.tokens} M={M} E={E} S={S}; dispatch + "
        f"combine, forward+backward, median of {args.repeats}; BUFFER_SIDE_RATIO = "
        f"{dispatch.BUFFER_SIDE_RATIO}")
  print(f"{'router':<20}{'T*K/R':>7}{'tokens ms':>11}{'buffer ms':>11}{'buffer/tokens':>15}")
  for name in CASES:
    tokens, buffer = t[f"{name} tokens"], t[f"{name} buffer"]
    print(f"{name:<20}{ratios[name]:>7.1f}{tokens * 1e3:>11.1f}{buffer * 1e3:>11.1f}"
          f"{buffer / tokens:>15.2f}")


if __name__ == "__main__":
  main()
