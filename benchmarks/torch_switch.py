"""transformers' PyTorch Switch block (SwitchTransformersSparseMLP) as a benchmark side.

`benchmarks/moe_layer.py` times it beside moejax's layers at the same shape: float32 on the CPU,
forward+backward of the loss sum(y * dy) (gradients w.r.t. every parameter and the input), with
`torch.set_num_threads` set to the host's core count. Its router is given capacity S per
sequence (expert_capacity = S), so, like moejax's dropless experts, it drops nothing and computes
no padding: one (rows, M) x (M, F) and one (rows, F) x (F, M) matmul per expert over exactly the
tokens routed there. Its aux and z losses are computed outside the block in transformers, so the
block's step has none (moejax's steps include theirs, a small cost).

Optional: it needs the `bench` extra (`pip install -e .[bench]`: transformers and CPU torch).
`make_step` returns None, with the reason, where they are not installed.
"""

from __future__ import annotations

import os


def make_step(args):
  """(step, None): `step()` runs one forward+backward; or (None, why it is skipped)."""
  if args.k != 1:
    return None, f"skipped: the Switch block routes top-1 only (--k {args.k})"
  try:
    import torch
    from transformers.models.switch_transformers import modeling_switch_transformers as switch
    from transformers.models.switch_transformers.configuration_switch_transformers import (
        SwitchTransformersConfig)
  except ImportError:
    return None, "skipped: install .[bench] (transformers and torch)"
  if args.dtype != "float32":
    return None, f"skipped: the PyTorch side runs float32 only (--dtype {args.dtype})"
  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)
  config = SwitchTransformersConfig(d_model=args.model_dim, d_ff=args.ffn_dim,
                                    num_experts=args.experts, expert_capacity=args.group_size,
                                    router_jitter_noise=0.0, dropout_rate=0.0,
                                    dense_act_fn="relu")
  block = switch.SwitchTransformersSparseMLP(config).train()
  shape = (args.tokens // args.group_size, args.group_size, args.model_dim)
  x = torch.randn(shape, requires_grad=True)
  dy = torch.randn(shape)
  params = list(block.parameters())

  def step():
    for p in params + [x]:
      p.grad = None
    y = block(x)
    loss = torch.sum(y * dy)
    loss.backward()
    return None

  return step, None


def version() -> str:
  import torch
  import transformers
  return f"torch {torch.__version__}, transformers {transformers.__version__}"
