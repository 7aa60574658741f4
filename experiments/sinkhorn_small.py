"""sinkhorn_small: S-BASE (Sinkhorn-balanced top-1) routing over 8 experts, at switch_small's FLOPs.

    python -m moejax.main --config=experiments/sinkhorn_small.py --workdir=runs/sinkhorn_small

NON-CAUSAL in training in this causal language model (flagged): the balanced assignment of a token
depends on every token of its routing group (Clark et al. 2022), so training can peek ahead through
the routing; evaluation routes by plain top-1 and is causal. The run sets
`model.moe.router.allow_noncausal=True`.

As `switch_small` (every second block an MoE layer of 8 experts of width F=512, top-1, capacity
factor 1.25 in training and 2.0 in evaluation, one routing group per sequence, S = L = 128), so the
active FFN FLOPs per token equal `switch_small`'s and `dense_small`'s. In training each token's
expert is the top-1 of its row of the Sinkhorn-balanced router matrix (at most 10 rounds, relative
tolerance 0.001); its weight is the router's softmax probability of that expert
(normalize_weights=False: with k=1 a renormalised weight would be 1 and the router would get no
gradient from the task loss). No load-balancing loss (S-BASE uses none; the setting is not read);
the router z-loss weight stays 0.001.

Hardware: one CPU; on 8 devices, `--config.mesh.expert=8` shards the experts.

Measured result (the routers study, `python -m moejax.study routers`, 3 seeds, 500 steps; docs/studies/routers.md):
validation loss 4.2004 ± 0.0067, level with switch_small (4.1996 ± 0.0113); evaluation routes by
plain top-1, which drops 3.1% of tokens at factor 2.0 (MaxVio 0.89 at evaluation, where no
balancing applies). dense_small 4.2290 ± 0.0031. Run time: 11-18 minutes per run on the 2-core
machine, shared with other work.
"""

from experiments import base


def get_config(arg: str | None = None):
  config = base.get_config()
  base.set_moe(config, kind="sinkhorn", ffn_dim=config.model.ffn_dim)
  config.model.moe.router.update(k=1, normalize_weights=False, allow_noncausal=True)
  config.model.moe.router.sinkhorn.update(iterations=10, tolerance=1e-3)
  return base.apply_variant(config, arg)
