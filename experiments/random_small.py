"""random_small: uniformly random top-1 routing over 8 experts, the baseline for learned routers.

    python -m moejax.main --config=experiments/random_small.py --workdir=runs/random_small

As `switch_small` (8 experts of F=512, one expert per token, so the same active FFN FLOPs per
token as `dense_small` and `switch_small`), but each token's expert is drawn uniformly at random:
a fresh draw every training step, and in evaluation a fixed pseudo-random expert per position of
the routing group (moejax/routing/random_routing.py). With k=1 and normalised weights the combine
weight is 1, so the model is a dense transformer whose FFN in blocks 1 and 3 is one of 8 FFNs at
random: what a learned router adds shows as the gap to `switch_small`. No load-balancing loss
(nothing to balance); router z-loss 0.001 is the router's only training signal.

Hardware: one CPU.

Measured result (the routers study, `python -m moejax.study routers`, 3 seeds, 500 steps; docs/studies/routers.md), where
the run is switch_small with kind=random, as this file: validation loss 4.3397 ± 0.0063, the
highest of every router and 0.111 above dense_small (4.2290 ± 0.0031): each of 8 FFNs sees an
eighth of the tokens at random, so each learns less than the one dense FFN. Run time: 9-11
minutes per run on the 2-core machine.
"""

from experiments import base


def get_config(arg: str | None = None):
  config = base.get_config()
  base.set_moe(config, kind="random", ffn_dim=config.model.ffn_dim)
  config.model.moe.router.update(k=1, normalize_weights=True)
  return base.apply_variant(config, arg)
