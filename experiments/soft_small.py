"""soft_small: Soft MoE over 8 experts, at switch_small's active FLOPs.

    python -m moejax.main --config=experiments/soft_small.py --workdir=runs/soft_small

NON-CAUSAL in this causal language model (flagged): every slot is a softmax-weighted mix of all
tokens of the routing group (Puigcerver et al. 2023), so each token's output depends on the later
tokens of its sequence. The run sets `model.moe.router.allow_noncausal=True`; its losses are not
comparable with causal routers' as language-model results, only as a measure of the router itself.

As `switch_small` (every second block an MoE layer of 8 experts of width F=512, one routing group
per sequence, S = L = 128), but with soft slots: p = S / E = 16 slots per expert, so the E * p =
128 slots of a group are as many expert rows as the group has tokens. The experts then compute one
row of width 512 per token, the active FFN FLOPs of `switch_small` and `dense_small` (checked in
tests/test_experiments.py); the dispatch and combine einsums add 2 * S * E * p * M FLOPs each
per group, about an eighth of the experts' FLOPs here. The `tiny` variant keeps p = S / E. The
dispatch is the einsum form (soft MoE's dispatch weights are dense; the index form is refused).
No auxiliary loss, as in the paper: the router z-loss weight is 0 (the normalised logits are bounded
by the learned scale, which a z-loss would only pull towards 0).

Hardware: one CPU; on 8 devices, `--config.mesh.expert=8` shards the experts.

Measured result (the routers study, `python -m moejax.study routers`, 3 seeds, 500 steps; docs/studies/routers.md):
validation loss 4.2234 ± 0.0015, not comparable with the causal routers (see above), 0.006 below
dense_small (4.2290 ± 0.0031) and 0.024 behind switch_small (4.1996 ± 0.0113); nothing is dropped
by construction. With z-loss 0.001 through switch_small's router settings, an earlier run reached
4.274. Run time: 12-16 minutes per run on the 2-core machine (its dispatch and combine are dense
matmuls: see docs/benchmarks.md).
"""

from experiments import base


def get_config(arg: str | None = None):
  config = base.get_config()
  base.set_moe(config, kind="soft", ffn_dim=config.model.ffn_dim)
  config.model.moe.dispatch = "einsum"
  config.model.moe.router.update(allow_noncausal=True, z_loss_weight=0.0)
  config = base.apply_variant(config, arg)
  # As many slots per group as tokens (after the variant, which may change the group size).
  moe = config.model.moe
  moe.router.soft.slots_per_expert = moe.group_size // moe.router.num_experts
  return config
