"""hash_small: hash routing (Roller et al. 2021) over 8 experts, at switch_small's active FLOPs.

    python -m moejax.main --config=experiments/hash_small.py --workdir=runs/hash_small

As `switch_small` (8 experts of F=512, one expert per token), but each token's expert is a fixed
function of its input token id: a seeded uniformly random table over the 2048 SentencePiece
pieces (`model.moe.router.hash.table=random`, seed 0), combine weight 1 (the chosen expert's FFN
applies directly). The router is not used for the choice; its z-loss (0.001) is reported and is
its only training signal. No load-balancing loss (the choice cannot be trained).
`--config.model.moe.router.hash.table=balanced` asks for Roller et al.'s frequency-balanced table
built from the training split's token counts.

Hardware: one CPU.

Measured result (the routers study, `python -m moejax.study routers --seeds 0`, seed 0, 500
steps, validation every 125 steps): validation loss 4.061, the lowest of every router in the
study, 0.14 below switch_small's 4.204 (dense_small 4.231, gshard_small 4.187); 0.4% of tokens
dropped at evaluation, MaxVio 0.54. The choice reads only the token's own id (the model's input,
never its target), so nothing leaks from later tokens; Roller et al. 2021 also find hash layers
ahead of Switch. One seed: seeds 1 and 2 of the study are still to run. Run time: 15 minutes on
the 2-core machine shared with other work; switch_small's 500 steps take about 7 minutes on a
quiet machine.
"""

from experiments import base


def get_config(arg: str | None = None):
  config = base.get_config()
  base.set_moe(config, kind="hash", ffn_dim=config.model.ffn_dim)
  config.model.moe.router.hash.update(table="random", seed=0)
  return base.apply_variant(config, arg)
