"""deepseek_small: DeepSeek-V3-style routing with shared and fine-grained experts.

    python -m moejax.main --config=experiments/deepseek_small.py --workdir=runs/deepseek_small

As `switch_small` (every second block of 4 is an MoE layer, one routing group per sequence), but
routed as in DeepSeek-V3 (arXiv 2412.19437, Sec. 2.1.2): 16 fine-grained experts of a quarter
of switch_small's width (F=128), k=2 of them per token, plus a shared expert of width 256 that
every token uses (DeepSeekMoE's shared expert isolation; moejax/shared_experts.py). Sigmoid
affinities; group-limited routing over 4 groups of 4 experts, 2 groups kept per token; weights
normalised over the chosen 2, routed scaling factor 1; aux-loss-free balancing with
bias_update_rate 1e-3 (V3's gamma) and the sequence-wise balance loss at weight 1e-4 (V3's
alpha); no Switch load-balancing loss. Capacity C = ceil(2 * 1.25 * 128 / 16) = 20 slots per
expert and group in training (32 in evaluation).

Active FFN FLOPs per token equal `switch_small`'s and `dense_small`'s: an MoE block runs
2 x 128 routed + 256 shared = 512 hidden units, like one switch_small expert of width 512 (relu,
as in the other small experiments; SwiGLU would need widths that are not whole numbers to keep
the FLOPs equal).

Hardware: one CPU; on 8 devices, `--config.mesh.expert=8` (or 4, 2) shards the 16 experts.

Measured result (the routers study, `python -m moejax.study routers`, 3 seeds, 500 steps; docs/studies/routers.md):
validation loss 4.1901 ± 0.0055, 0.02% of tokens dropped at evaluation, MaxVio 0.54; level with
gshard_small (4.1877 ± 0.0090), ahead of switch_small (4.1996 ± 0.0113) and dense_small (4.2290 ±
0.0031). Run time: 9-12 minutes per run on the 2-core machine.
"""

from experiments import base


def get_config(arg: str | None = None):
  config = base.get_config()
  base.set_moe(config, kind="deepseek", ffn_dim=config.model.ffn_dim // 4, num_experts=16)
  config.model.moe.shared_ffn_dim = config.model.ffn_dim // 2
  config.model.moe.router.update(k=2, normalize_weights=True)
  config.model.moe.router.deepseek.update(
      score="sigmoid", num_groups=4, topk_groups=2, group_score_experts=2,
      routed_scaling_factor=1.0, sequence_balance_loss_weight=1e-4)
  config.model.moe.router.balance.bias_update_rate = 1e-3
  return base.apply_variant(config, arg)
