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

Expected result: not yet measured.
"""

from experiments import base


def get_config(arg: str | None = None):
  config = base.get_config()
  base.set_moe(config, kind="random", ffn_dim=config.model.ffn_dim)
  config.model.moe.router.update(k=1, normalize_weights=True)
  return base.apply_variant(config, arg)
