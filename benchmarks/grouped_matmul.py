"""Benchmark: dropless experts (grouped matmul) against the index dispatch layer and a dense FFN.

Usage:
  .venv/bin/python benchmarks/grouped_matmul.py                      # the reference shape
  .venv/bin/python benchmarks/grouped_matmul.py --dtype bfloat16 --tiles 128,256,512
  .venv/bin/python benchmarks/grouped_matmul.py --tokens 2048 --repeats 3   # smaller, faster

Reference shape: T=8192 tokens, M=512, F=2048, E=8, top-1 (Switch), S=1024, float32. Every side is
`value_and_grad` of a loss that uses its output (sum(y * dy), plus the aux loss for the MoE
layers), with gradients w.r.t. the parameters and the input, so no side's forward is dead code:

* dense: relu(x W_in) W_out with the same active FLOPs per token (width k*F);
* index: the MoE layer with index dispatch at capacity factor `--capacity-factor` (its experts
  compute E*C rows per group of S tokens, the capacity padding included);
* dropless portable (tile t): the MoE layer with dispatch=dropless and the portable grouped
  matmul at row tile t (each expert's rows padded to a multiple of t);
* dropless ragged_dot: the same with `jax.lax.ragged_dot`.

Timings are taken side by side in one run (interleaved rounds, median), so the printed ratios are
meaningful on a noisy shared machine even where absolute times are not. The first line names the
device, the jax version and the load average; the last says what `grouped_matmul=auto` runs here.
The `first call` column is each side's first call, compilation included (XLA's compile time
dominates it at small shapes: the number to watch as the number of experts grows).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

# This checkout's moejax, whatever the environment has installed.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from side_by_side import time_side_by_side  # noqa: E402
from moejax.grouped_matmul import GroupedMatmulImpl, resolve_impl  # noqa: E402
from moejax.moe import MoeConfig, MoeLayer  # noqa: E402
from moejax.routing import RouterConfig  # noqa: E402


def _parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tokens", type=int, default=8192)
  p.add_argument("--model-dim", type=int, default=512)
  p.add_argument("--ffn-dim", type=int, default=2048)
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--k", type=int, default=1)
  p.add_argument("--group-size", type=int, default=1024)
  p.add_argument("--capacity-factor", type=float, default=1.25)
  p.add_argument("--tiles", default="64,128", help="portable row tiles, comma-separated")
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--skip-ragged-dot", action="store_true",
                 help="leave out ragged_dot (a dense masked matmul, E times the FLOPs, on CPU)")
  return p.parse_args(argv)


def _router(args, **capacity) -> RouterConfig:
  kind = dict(kind="topk", k=args.k) if args.k > 1 else dict(kind="switch")
  return RouterConfig(num_experts=args.experts, **kind, **capacity)


def _layer_step(args, config: MoeConfig):
  """A jitted fwd+bwd of the MoE layer: loss, grads w.r.t. all parameters and the input."""
  layer = MoeLayer(args.model_dim, config, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)

  def loss(layer, x, dy):
    y, aux = layer(x, train=True)
    return jnp.sum((y * dy).astype(jnp.float32)) + aux.aux_loss

  grad_fn = nnx.value_and_grad(loss, argnums=(0, 1))

  @jax.jit
  def step(state, x, dy):
    return grad_fn(nnx.merge(graphdef, state), x, dy)

  return lambda x, dy: step(state, x, dy)


def _dense_step(args):
  """relu(x W_in) W_out of width k*F, float32 parameters computed in the benchmark's dtype."""
  k1, k2 = jax.random.split(jax.random.key(1))
  F = args.ffn_dim * args.k
  params = (jax.random.normal(k1, (args.model_dim, F)) * args.model_dim ** -0.5,
            jax.random.normal(k2, (F, args.model_dim)) * F ** -0.5)
  dtype = jnp.dtype(args.dtype)

  def loss(params, x, dy):
    wi_MF, wo_FM = (p.astype(dtype) for p in params)
    y = jnp.einsum("BLF,FM->BLM", jax.nn.relu(jnp.einsum("BLM,MF->BLF", x, wi_MF)), wo_FM)
    return jnp.sum((y * dy).astype(jnp.float32))

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  return lambda x, dy: step(params, x, dy)


def candidates(args) -> dict:
  """name -> step(x, dy), in the printed order."""
  common = dict(ffn_dim=args.ffn_dim, group_size=args.group_size, dtype=args.dtype)
  steps = {
      "dense": _dense_step(args),
      f"index (capacity {args.capacity_factor})": _layer_step(args, MoeConfig(
          router=_router(args, capacity_factor_train=args.capacity_factor, min_capacity=1),
          dispatch="index", **common)),
  }
  for tile in (int(t) for t in args.tiles.split(",") if t):
    steps[f"dropless portable t={tile}"] = _layer_step(args, MoeConfig(
        router=_router(args), dispatch="dropless", grouped_matmul="portable",
        grouped_matmul_tile=tile, **common))
  if not args.skip_ragged_dot:
    steps["dropless ragged_dot"] = _layer_step(args, MoeConfig(
        router=_router(args), dispatch="dropless", grouped_matmul="ragged_dot", **common))
  return steps


def main(argv=None):
  args = _parse_args(argv)
  B = args.tokens // args.group_size
  device = jax.devices()[0]
  key_x, key_dy = jax.random.split(jax.random.key(0))
  x = jax.random.normal(key_x, (B, args.group_size, args.model_dim)).astype(args.dtype)
  dy = jax.random.normal(key_dy, x.shape).astype(args.dtype)
  x, dy = jax.device_put(x, device), jax.device_put(dy, device)
  steps = candidates(args)
  first = {}
  for name, step in steps.items():
    start = time.perf_counter()
    jax.block_until_ready(step(x, dy))
    first[name] = time.perf_counter() - start
  t = time_side_by_side({name: (lambda s=s: s(x, dy)) for name, s in steps.items()},
                        args.repeats)
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  print(f"device: {device.platform} {device.device_kind} ({jax.device_count()} devices, "
        f"{os.cpu_count()} host cores); jax {jax.__version__}; load average {load:.2f}")
  print(f"T={args.tokens} M={args.model_dim} F={args.ffn_dim} E={args.experts} k={args.k} "
        f"S={args.group_size} {args.dtype}, forward+backward (value_and_grad), "
        f"median of {args.repeats}")
  index_name = f"index (capacity {args.capacity_factor})"
  print(f"{'layer':<30}{'seconds':>10}{'x dense':>10}{'x index':>10}{'first call':>12}")
  for name, seconds in t.items():
    print(f"{name:<30}{seconds:>10.4f}{seconds / t['dense']:>10.2f}"
          f"{seconds / t[index_name]:>10.2f}{first[name]:>11.1f}s")
  auto = resolve_impl(GroupedMatmulImpl.AUTO, device.platform)
  print(f"model.moe.grouped_matmul=auto runs {auto.value!r} on {device.platform} "
        "(moejax/grouped_matmul.py AUTO_IMPL)")


if __name__ == "__main__":
  sys.exit(main())
