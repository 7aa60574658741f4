"""gshard_small: GShard-style top-2 routing over 8 experts, at switch_small's active FLOPs.

    python -m moejax.main --config=experiments/gshard_small.py --workdir=runs/gshard_small

As `switch_small`, but each token goes to its two best experts with renormalised gates (Lepikhin
et al. 2020), and each expert's F is halved (256) so that the active FFN FLOPs per token equal
`dense_small`'s and `switch_small`'s. Capacity C = ceil(2 * 1.25 * S / E) = 40 slots per expert
per group of S=128 in training (64 in evaluation), claimed token by token (causal). GShard's own
order, every first choice before any second (Algorithm 1), is
`--config.model.moe.router.claim_order=choice`; it lets a later token take an earlier token's slot,
so the causal LM also needs `--config.model.moe.router.allow_noncausal=True` for it.

Hardware: one CPU. Run time on the 2-core development machine: about 5-6 minutes (about 7k training
tokens/s). Expected result (seed 0, the routers study): validation loss 4.187, perplexity 65.8
after 500 steps; with GShard's choice order, 4.171-4.176 (docs/compare.md and the earlier routers
run). Over three seeds (the `compare` and `routers` studies, docs/studies/): 4.1877 ± 0.0090,
against switch_small's 4.1996 ± 0.0113 (within seed noise) and dense_small's 4.2290 ± 0.0031
(7.5 standard errors); 11-17 minutes per run on one core, two runs at a time.
"""

from experiments import base


def get_config(arg: str | None = None):
  config = base.get_config()
  base.set_moe(config, kind="gshard", ffn_dim=config.model.ffn_dim // 2)
  return base.apply_variant(config, arg)
