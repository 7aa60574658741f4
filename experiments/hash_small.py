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

Measured result (the routers study, `python -m moejax.study routers`, 3 seeds, 500 steps; docs/studies/routers.md), where
the run is switch_small with kind=hash, as this file: validation loss 4.0689 ± 0.0214, the lowest
of every router, 0.119 below gshard_small (4.1877 ± 0.0090; 8.9 standard errors) and 0.131 below
switch_small (4.1996 ± 0.0113); 0.4% of tokens dropped at evaluation, MaxVio 0.54 (the table,
seed 0, is the same in every run). The choice reads only the token's own id (the model's input,
never its target: tests/test_model.py checks the causal LM), so nothing leaks from later tokens;
Roller et al. 2021 also find hash layers ahead of Switch. Run time: 11-15 minutes per run on the
2-core machine.
"""

from experiments import base


def get_config(arg: str | None = None):
  config = base.get_config()
  base.set_moe(config, kind="hash", ffn_dim=config.model.ffn_dim)
  config.model.moe.router.hash.update(table="random", seed=0)
  return base.apply_variant(config, arg)
