"""expert_choice_small: expert-choice routing over 8 experts, at switch_small's active FLOPs.

    python -m moejax.main --config=experiments/expert_choice_small.py \
        --workdir=runs/expert_choice_small

NON-CAUSAL in this causal language model (flagged): each expert picks its top-C tokens of the
routing group (Zhou et al. 2022), so whether an early token reaches an expert depends on the later
tokens of its sequence. The run sets `model.moe.router.allow_noncausal=True`; its losses are not
comparable with causal routers' as language-model results (the model can peek ahead through the
routing), only as a measure of the router itself.

As `switch_small` (every second block an MoE layer of 8 experts, one routing group per sequence,
S = L = 128), but each expert takes C = ceil(2 * 128 / 8) = 32 tokens per group (the paper's
capacity factor 2, in training and evaluation), so a token reaches 0..8 experts and 2 on average.
Each expert's F is halved (256) so that the active FFN FLOPs per token, 2 expert rows of width
256 per token, equal `switch_small`'s and `dense_small`'s (checked in tests/test_experiments.py).
No load-balancing loss (the load is balanced by construction; the setting is not read); the router
z-loss weight stays 0.001.

Hardware: one CPU; on 8 devices, `--config.mesh.expert=8` shards the experts.

Measured result (the routers study, `python -m moejax.study routers`, 3 seeds, 500 steps; docs/studies/routers.md):
validation loss 4.1946 ± 0.0108, not comparable with the causal routers (see above); MaxVio 0 by
construction, 0.27% of tokens reaching no expert at evaluation. In the same study: dense_small
4.2290 ± 0.0031, switch_small 4.1996 ± 0.0113, gshard_small 4.1877 ± 0.0090. Run time: 11-12
minutes per run on one core of the 2-core machine (two runs at a time).
"""

from experiments import base


def get_config(arg: str | None = None):
  config = base.get_config()
  base.set_moe(config, kind="expert_choice", ffn_dim=config.model.ffn_dim // 2)
  config.model.moe.router.update(capacity_factor_train=2.0, capacity_factor_eval=2.0,
                                 allow_noncausal=True)
  return base.apply_variant(config, arg)
