"""switch_small: a Switch Transformer (top-1 routing, 8 experts) small enough for a laptop CPU.

    python -m moejax.main --config=experiments/switch_small.py --workdir=runs/switch_small

Every second block's FFN (blocks 1 and 3 of 4) is an MoE layer of 8 experts of width F=1024 with
top-1 routing (Fedus et al. 2021): capacity factor 1.25 in training, 2.0 in evaluation, load-
balancing loss weight 0.01, router z-loss weight 0.001, one routing group per sequence. The
active FFN FLOPs per token equal `dense_small`'s. Otherwise identical to `dense_small`.

Hardware: one CPU; on more devices, `--config.mesh.expert=8` shards the experts.
Run time (2-core x86_64 development machine, first run including the one-time dataset and
tokenizer build): see the measurement below. Expected result: validation perplexity printed at the
end, experts all in use (loads near 1/8), a checkpoint in WORKDIR/checkpoints and TensorBoard
logs in WORKDIR/tensorboard.
"""

from experiments import base


def get_config(arg: str | None = None):
  config = base.get_config()
  config.model.moe_every = 2
  config.model.moe = base.moe_settings(kind="switch", ffn_dim=config.model.ffn_dim)
  return base.apply_variant(config, arg)
