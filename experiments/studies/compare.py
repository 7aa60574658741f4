"""compare: dense_small, switch_small and gshard_small at equal active FFN FLOPs per token.

    python -m moejax.study compare                   # make compare
    python -m moejax.study compare --steps 100 --seeds 0

Trains the three small experiments (experiments/base.py: M=128, 500 steps of 32 x 128 tokens on
the default corpus) with three seeds each and reports validation loss and perplexity, training
tokens/s and the share of tokens dropped by capacity (in training at the last step, factor 1.25,
and on the validation batches, factor 2.0). It replaces the script experiments/compare.py, whose
single-seed table (500 steps, seed 0) stays in docs/compare.md.

Run time: every run is shared with the routers study (trained once, 10-17 minutes per run on one
core of the 2-core machine, two at a time). Measured result (docs/studies/compare.md): validation
loss dense_small 4.2290 ± 0.0031, switch_small 4.1996 ± 0.0113, gshard_small 4.1877 ± 0.0090
(3 seeds): both MoE models ahead of dense at equal FLOPs (4.3 and 7.5 standard errors).
"""

from moejax.study import Run, Study


def get_study() -> Study:
  return Study(
      description=(
          "dense_small, switch_small (top-1, 8 experts) and gshard_small (top-2, 8 experts of "
          "half width) at equal active FFN FLOPs per token. An MoE layer adds parameters at "
          "constant FLOPs, which the Switch Transformer paper (Fedus et al. 2021) finds lowers "
          "the loss at equal compute."),
      runs=(Run("dense_small", "experiments/dense_small.py"),
            Run("switch_small", "experiments/switch_small.py"),
            Run("gshard_small", "experiments/gshard_small.py")),
      seeds=(0, 1, 2),
      metrics=("eval/loss", "eval/perplexity", "moe/*/dropped_fraction",
               "eval/moe/*/dropped_fraction"),
      plots=("eval/loss",),
      curves=("eval/loss",),
      evaluations=4,
  )
