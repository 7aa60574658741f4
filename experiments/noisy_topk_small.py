"""noisy_topk_small: noisy top-2 gating (Shazeer et al. 2017) over 8 experts, at switch_small's
active FLOPs.

    python -m moejax.main --config=experiments/noisy_topk_small.py --workdir=runs/noisy_topk_small

As `gshard_small` (k=2, each expert's F halved to 256 so that the active FFN FLOPs per token equal
`dense_small`'s and `switch_small`'s), but with the router of Shazeer et al. 2017: in training,
H(x) = x W_g + N(0, 1) * softplus(x W_noise) with a learned noise scale (the router projection is
(M, 2E)), the top 2 of H(x) with weights softmax over the two kept values, and the importance and
load losses (CV^2 of the batch's gate sums and of its smooth load estimate), each with weight
0.01, instead of the Switch load-balancing loss; router z-loss 0.001. In evaluation the top 2 of
the clean logits. Capacity C = ceil(2 * 1.25 * S / E) = 40 slots per expert per group of S=128 in
training (64 in evaluation). V-MoE's fixed-noise variant (std 1/E, weights not renormalised):

    --config.model.moe.router.noisy_topk.noise=fixed
    --config.model.moe.router.noisy_topk.noise_std=0.125
    --config.model.moe.router.normalize_weights=False

Hardware: one CPU.

Measured result (the routers study, `python -m moejax.study routers`, 3 seeds, 500 steps; docs/studies/routers.md), where
the run is switch_small with kind=noisy_topk, k=2, F=256, as this file: validation loss 4.2072 ±
0.0103, nothing dropped at evaluation, 0.020 behind plain top-2 (4.1877 ± 0.0090; 2.5 standard
errors). dense_small 4.2290 ± 0.0031, switch_small 4.1996 ± 0.0113. Run time: 11-13 minutes per
run on the 2-core machine.
"""

from experiments import base


def get_config(arg: str | None = None):
  config = base.get_config()
  base.set_moe(config, kind="noisy_topk", ffn_dim=config.model.ffn_dim // 2)
  config.model.moe.router.k = 2
  config.model.moe.router.noisy_topk.update(noise="learned", importance_loss_weight=1e-2,
                                            load_loss_weight=1e-2)
  return base.apply_variant(config, arg)
