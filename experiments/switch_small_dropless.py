"""switch_small_dropless: switch_small's model with dropless experts (no capacity, nothing dropped).

    python -m moejax.main --config=experiments/switch_small_dropless.py --workdir=runs/dropless

As `switch_small` (8 experts of F=512, top-1 Switch routing, load-balancing loss weight 0.01,
router z-loss weight 0.001, S=128), but `model.moe.dispatch=dropless`: every token reaches its
expert in training and evaluation, whatever the load (moejax/dropless.py: token copies sorted by
expert, one grouped matmul per expert weight over contiguous segments, `grouped_matmul=auto`).
Active FFN FLOPs per token equal switch_small's and dense_small's; the experts compute each
routed token once, plus at most one partial row tile per expert, instead of switch_small's
1.25x capacity buffers. The routing metrics keep their meaning: dropped fractions are exactly 0,
and `exchange_overflow` (the buffer exchange's unsent copies on an expert-parallel mesh) is 0 at
the default, worst-case buffer size.

Hardware: one CPU is enough; on 8 devices, `--config.mesh.expert=8` shards the experts.

Expected result: not yet measured.
"""

from experiments import base


def get_config(arg: str | None = None):
  config = base.get_config()
  base.set_moe(config, kind="switch", ffn_dim=config.model.ffn_dim)
  config.model.moe.dispatch = "dropless"
  return base.apply_variant(config, arg)
