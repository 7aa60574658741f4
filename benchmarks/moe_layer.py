"""Benchmark: forward+backward time of the MoE layer per dispatch form, relative to a dense FFN.

Usage:
  .venv/bin/python benchmarks/moe_layer.py                   # the reference shape (below)
  .venv/bin/python benchmarks/moe_layer.py --tokens 2048     # smaller, faster
  .venv/bin/python benchmarks/moe_layer.py --routers         # every router family, see below
  make bench

Reference shape: T=8192 tokens, M=512, F=2048, E=8, top-1 (Switch), capacity factor 1.25,
S=1024, float32. The dense FFN has the same active FLOPs per token (one expert of width F), so the
ratio's floor is the capacity factor: the experts process E*C = 1.25*S slots per group.

Every step is `jax.value_and_grad` of a loss that uses the output (sum(y * dy) plus the aux loss),
so no side's forward is dead code: with `jax.grad` alone XLA deletes a dense FFN's output matmul
(the gradient of sum(y * dy) w.r.t. y is the constant dy), a 15-18% unfair discount.

`--routers` times the layer once per router family at the same active FLOPs per token (top-1
families with experts of width F; top-2 families with F/2; expert choice at the capacity factor;
soft MoE with S/E slots per expert, one expert row per token), and each family's routing step,
two ways:
  routing        the layer's time minus that of its experts alone: the same expert FFN code
                 (moejax.experts.expert_ffn, same expert loop) on a random buffer of the shape the
                 layer gives it, forward+backward. What remains is routing, dispatch, combine, the
                 router's gradient and the aux losses. The two run back to back in each round;
                 the column is the median over rounds of their difference.
  at F=8         the same layer with experts of width 8. This keeps the experts' passes over the
                 M-wide buffers (a width-8 matmul still reads and writes them), so it overstates
                 routing, by more the larger the buffers (k=2: twice top-1's rows).

The main run also times the layer with dropless experts (dispatch=dropless, grouped_matmul=auto:
no capacity, nothing dropped, no padding beyond the grouped matmul's row tiles) and, when the
`bench` extra is installed, transformers' PyTorch Switch block at the same shape
(benchmarks/torch_switch.py); without it that side prints 'skipped: install .[bench]'.

Timings are taken side by side in one run (interleaved repetitions, median), so the printed ratios
are meaningful on a noisy shared machine even where absolute times are not. The script also
compiles the layer on a simulated 8-device mesh (data=1, expert=8) and reads the all-to-all bytes
per step from the compiled HLO (forward and backward).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import statistics
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

# This checkout's moejax, whatever the environment has installed.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from moejax import moe as moe_module  # noqa: E402
from moejax import sharding  # noqa: E402
from moejax.experts import expert_ffn  # noqa: E402
from moejax.grouped_matmul import GroupedMatmulImpl, resolve_impl  # noqa: E402
from moejax.moe import MoeConfig, MoeLayer  # noqa: E402
from moejax.routing import (REGISTRY, DeepseekConfig, RouterConfig, RouterKind,  # noqa: E402
                            SoftConfig)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import torch_switch  # noqa: E402
from side_by_side import time_side_by_side  # noqa: E402


def _parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tokens", type=int, default=8192)
  p.add_argument("--model-dim", type=int, default=512)
  p.add_argument("--ffn-dim", type=int, default=2048)
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--k", type=int, default=1)
  p.add_argument("--capacity-factor", type=float, default=1.25)
  p.add_argument("--group-size", type=int, default=1024)
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--routers", action="store_true", help="time every router family instead")
  return p.parse_args(argv)


def _moe_config(args, dispatch, expert_loop="auto"):
  # Dropless experts have no capacity: their router keeps the capacity settings' defaults.
  capacity = ({} if dispatch == "dropless" else
              dict(capacity_factor_train=args.capacity_factor, min_capacity=1))
  router = RouterConfig(kind="topk" if args.k > 1 else "switch", num_experts=args.experts,
                        k=args.k, **capacity)
  return MoeConfig(router=router, ffn_dim=args.ffn_dim, group_size=args.group_size,
                   dispatch=dispatch, dtype=args.dtype, expert_loop=expert_loop)


def _moe_step(args, dispatch, expert_loop="auto", config=None, vocab_size=None):
  """A jitted fwd+bwd of the MoE layer: the loss, grads w.r.t. all parameters and the input."""
  config = config or _moe_config(args, dispatch, expert_loop)
  layer = MoeLayer(args.model_dim, config, rngs=nnx.Rngs(0), vocab_size=vocab_size)
  graphdef, state = nnx.split(layer)
  token_ids = None
  if vocab_size is not None:
    token_ids = jax.random.randint(jax.random.key(2), (args.tokens // args.group_size,
                                                       args.group_size), 0, vocab_size)

  def loss(layer, x, dy):
    y, aux = layer(x, train=True, token_ids_BL=token_ids)
    return jnp.sum(y * dy) + aux.aux_loss

  # Gradients w.r.t. the parameters and the input; random streams and router state get none.
  grad_fn = nnx.value_and_grad(loss, argnums=(0, 1))

  @jax.jit
  def step(state, x, dy):
    return grad_fn(nnx.merge(graphdef, state), x, dy)

  return step, state


def _dense_step(args):
  """A dense FFN with the same active FLOPs per token: relu(x W_in) W_out."""
  k1, k2 = jax.random.split(jax.random.key(1))
  F = args.ffn_dim * args.k
  params = (jax.random.normal(k1, (args.model_dim, F)) * args.model_dim ** -0.5,
            jax.random.normal(k2, (F, args.model_dim)) * F ** -0.5)

  @jax.jit
  def step(params, x, dy):
    def loss(params, x):
      wi_MF, wo_FM = params
      y = jnp.einsum("BLF,FM->BLM", jax.nn.relu(jnp.einsum("BLM,MF->BLF", x, wi_MF)), wo_FM)
      return jnp.sum(y * dy)
    return jax.value_and_grad(loss, argnums=(0, 1))(params, x)

  return step, params


TORCH_SIDE = "transformers (PyTorch)"


def _load() -> float:
  return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def all_to_all_bytes(args, dispatch, mesh_shape=(1, 8, 1)) -> tuple[int, list[int]]:
  """All-to-all ops in the compiled fwd+bwd on a simulated mesh, and bytes each moves per device."""
  mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape))
  step, params = _moe_step(args, dispatch)
  with jax.set_mesh(mesh):
    params = jax.device_put(params, sharding.shardings(params, mesh))
    tokens = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.TOKEN_AXES))
    x = jax.ShapeDtypeStruct((args.tokens // args.group_size, args.group_size, args.model_dim),
                             jnp.dtype(args.dtype), sharding=tokens)
    hlo = step.lower(params, x, x).compile().as_text()
  sizes = []
  for line in hlo.splitlines():
    if " all-to-all(" not in line:
      continue
    result_type = line.split("=", 1)[1].split("all-to-all(", 1)[0]
    elements = 0
    for dtype, dims in re.findall(r"(f32|bf16|f16|s32)\[([\d,]*)\]", result_type):
      n = 1
      for d in filter(None, dims.split(",")):
        n *= int(d)
      elements += n * (4 if dtype in ("f32", "s32") else 2)
    sizes.append(elements)
  return len(sizes), sizes


# Router families at the reference shape's active FLOPs per token: (RouterConfig settings, MoeConfig
# settings, expert width relative to F). Families that are not registered are skipped.
def _router_cases(args):
  S, E = args.group_size, args.experts
  factor = dict(capacity_factor_train=args.capacity_factor, min_capacity=1)
  return {
      "switch": (dict(kind="switch", **factor), {}, 1.0),
      "gshard": (dict(kind="gshard", **factor), {}, 0.5),
      "topk (k=2)": (dict(kind="topk", k=2, **factor), {}, 0.5),
      "noisy_topk": (dict(kind="noisy_topk", k=1, **factor), {}, 1.0),
      "expert_choice": (dict(kind="expert_choice", allow_noncausal=True, **factor), {}, 1.0),
      "soft": (dict(kind="soft", allow_noncausal=True, z_loss_weight=0.0,
                    soft=SoftConfig(slots_per_expert=S // E)), dict(dispatch="einsum"), 1.0),
      "sinkhorn": (dict(kind="sinkhorn", k=1, allow_noncausal=True, **factor), {}, 1.0),
      "hash": (dict(kind="hash", **factor), {}, 1.0),
      "random": (dict(kind="random", k=1, **factor), {}, 1.0),
      "deepseek": (dict(kind="deepseek", k=2, deepseek=DeepseekConfig(num_groups=4, topk_groups=2),
                        **factor), {}, 0.5),
  }


def _buffer(step, params, x, dy):
  """The (E, G, C, M) buffer shape and dtype the layer's experts receive (traced, not run)."""
  seen = []

  def recording(x_EGCM, *args, **kwargs):
    seen.append(jax.ShapeDtypeStruct(x_EGCM.shape, x_EGCM.dtype))
    return expert_ffn(x_EGCM, *args, **kwargs)

  moe_module.expert_ffn = recording
  try:
    jax.eval_shape(step, params, x, dy)
  finally:
    moe_module.expert_ffn = expert_ffn
  return seen[0]


def _experts_step(config: MoeConfig, buffer):
  """Forward+backward of the layer's experts alone on a random buffer: loss sum(y * dy), grads
  w.r.t. the buffer and both weights."""
  E, M, F = buffer.shape[0], buffer.shape[-1], config.ffn_dim
  k_x, k_dy, k_in, k_out = jax.random.split(jax.random.key(3), 4)
  x = jax.random.normal(k_x, buffer.shape, buffer.dtype)
  dy = jax.random.normal(k_dy, buffer.shape, buffer.dtype)
  weights = (jax.random.normal(k_in, (E, M, F), buffer.dtype) * M ** -0.5,
             jax.random.normal(k_out, (E, F, M), buffer.dtype) * F ** -0.5)

  @jax.jit
  def step(x, weights):
    def loss(x, weights):
      y = expert_ffn(x, *weights, None, activation=config.activation, loop=config.expert_loop)
      return jnp.sum(y * dy)
    return jax.value_and_grad(loss, argnums=(0, 1))(x, weights)

  return lambda: step(x, weights)


def _router_steps(args, x, dy):
  """name -> closures: the full layer, its experts alone (" experts") and the layer with experts
  of width 8 (" F=8"), for the registered families."""
  steps = {}
  for name, (router_kw, moe_kw, width) in _router_cases(args).items():
    if RouterKind(router_kw["kind"]) not in REGISTRY:
      continue
    vocab = 1024 if REGISTRY[RouterKind(router_kw["kind"])].token_ids else None
    for suffix, ffn_dim in (("", int(args.ffn_dim * width)), (" F=8", 8)):
      config = MoeConfig(router=RouterConfig(num_experts=args.experts, **router_kw),
                         ffn_dim=ffn_dim, group_size=args.group_size, dtype=args.dtype,
                         **{"dispatch": "index", **moe_kw})
      step, params = _moe_step(args, None, config=config, vocab_size=vocab)
      steps[name + suffix] = (lambda step=step, params=params: step(params, x, dy))
      if not suffix:
        steps[name + " experts"] = _experts_step(config, _buffer(step, params, x, dy))
  return steps


def routers_main(args, x, dy):
  dense, dense_params = _dense_step(args)
  fns = {"dense": lambda: dense(dense_params, x, dy), **_router_steps(args, x, dy)}
  rounds = time_side_by_side(fns, args.repeats, rounds=True)
  t = {name: statistics.median(times) for name, times in rounds.items()}
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({os.cpu_count()} cores); "
        f"load average {_load():.2f}; T={args.tokens} M={args.model_dim} "
        f"F={args.ffn_dim} E={args.experts} capacity_factor={args.capacity_factor} "
        f"S={args.group_size} {args.dtype}, forward+backward, median of {args.repeats}")
  print("times x dense (medians); routing = layer - experts alone, the median over rounds of "
        "each round's difference (the two run back to back); 'at F=8': the layer with experts "
        "of width 8")
  print(f"{'router':<16}{'layer':>8}{'experts':>9}{'routing':>9}{'at F=8':>8}")
  for name in (n for n in t if n + " experts" in t):
    layer, experts = t[name] / t["dense"], t[name + " experts"] / t["dense"]
    routing = statistics.median(
        (a - b) / d for a, b, d in zip(rounds[name], rounds[name + " experts"], rounds["dense"]))
    print(f"{name:<16}{layer:>8.2f}{experts:>9.2f}{routing:>9.2f}"
          f"{t[name + ' F=8'] / t['dense']:>8.2f}")


def main(argv=None):
  args = _parse_args(argv)
  B = args.tokens // args.group_size
  key_x, key_dy = jax.random.split(jax.random.key(0))
  device = jax.devices()[0]
  x = jax.device_put(jax.random.normal(key_x, (B, args.group_size, args.model_dim)), device)
  dy = jax.device_put(jax.random.normal(key_dy, x.shape), device)
  x, dy = x.astype(args.dtype), dy.astype(args.dtype)
  if args.routers:
    return routers_main(args, x, dy)

  dense, dense_params = _dense_step(args)
  index, index_params = _moe_step(args, "index")
  einsum, einsum_params = _moe_step(args, "einsum")
  batched, batched_params = _moe_step(args, "index", "batched")
  dropless, dropless_params = _moe_step(args, "dropless")
  fns = {
      "dense": lambda: dense(dense_params, x, dy),
      "index": lambda: index(index_params, x, dy),
      "einsum": lambda: einsum(einsum_params, x, dy),
      "index, batched": lambda: batched(batched_params, x, dy),
      "dropless": lambda: dropless(dropless_params, x, dy),
  }
  torch_step, skipped = torch_switch.make_step(args)
  if torch_step is not None:
    fns[TORCH_SIDE] = torch_step
  load_start = _load()
  t = time_side_by_side(fns, args.repeats)

  capacity = _moe_config(args, "index").router.capacity(args.group_size, train=True)
  print(f"jax {jax.__version__} on {device.device_kind} ({os.cpu_count()} cores); "
        f"load average {load_start:.2f} at the start, {_load():.2f} at the end; "
        f"T={args.tokens} M={args.model_dim} F={args.ffn_dim} E={args.experts} k={args.k} "
        f"capacity_factor={args.capacity_factor} S={args.group_size} C={capacity} {args.dtype}, "
        f"forward+backward, median of {args.repeats}")
  print(f"{'layer':<24}{'seconds':>10}{'x dense':>10}{'x index':>10}{'x dropless':>12}")
  loop = "unroll" if jax.default_backend() == "cpu" else "batched"
  gmm = resolve_impl(GroupedMatmulImpl.AUTO, device.platform).value
  print(f"(index and einsum use expert_loop=auto, here {loop}; 'index, batched' forces one "
        f"batched matmul over experts; dropless runs grouped_matmul=auto, here {gmm})")
  for name in t:
    print(f"{name:<24}{t[name]:>10.4f}{t[name] / t['dense']:>10.2f}"
          f"{t[name] / t['index']:>10.2f}{t[name] / t['dropless']:>12.2f}")
  if torch_step is None:
    print(f"{TORCH_SIDE:<24}{skipped}")
  else:
    print(f"({TORCH_SIDE}: {torch_switch.version()}, {os.cpu_count()} threads, float32, "
          "expert_capacity=S: nothing dropped)")
  padding = args.experts * capacity / args.group_size / args.k
  print(f"capacity padding floor: {padding:.2f}x")

  count, sizes = all_to_all_bytes(args, "index")
  G_local = B // 8
  expected = args.experts * G_local * capacity * args.model_dim * jnp.dtype(args.dtype).itemsize
  print(f"mesh (data=1, expert=8): {count} all-to-alls in fwd+bwd, bytes per device each: "
        f"{sorted(set(sizes))} (E*G*C*M*itemsize = {expected}); total {sum(sizes)} bytes/step")


if __name__ == "__main__":
  sys.exit(main())
