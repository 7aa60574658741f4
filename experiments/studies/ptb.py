"""ptb: dense, Switch and GShard on Penn Treebank (word level), test perplexity.

    python -m moejax.study ptb

The three small experiments (experiments/base.py; equal active FFN FLOPs per token) on
Mikolov's PTB splits with the word vocabulary (10k words + end of sentence), evaluated once, at
the end, on the whole test split. The classic published test perplexities are Zaremba et al.
(2014): 82.7 (medium LSTM, 20M parameters, 39 epochs) and 78.4 (large, 66M). These models are far
smaller (about 0.8M parameters outside the 1.3M-parameter embedding) and train for 500 steps of
4,096 tokens, about 2 epochs of the 929k training words, so they are not expected to reach
those figures; the study compares the three at equal compute on a corpus the literature knows.

Run time: 21 minutes per run on the 2-core development machine, two at a time (about 10.5
minutes of machine time per run, 9 runs: 1.6 hours): 1.7-1.9k training tokens/s per core against
about 3k for the same models on the default corpus, the 10k-word output layer being most of a
step at M=128. Measured result: not yet complete (dense and switch finished, gshard not).
"""

from moejax.study import Run, Study


def get_study() -> Study:
  return Study(
      description=(
          "Dense, Switch (top-1) and GShard (top-2) at equal active FFN FLOPs per token on "
          "Penn Treebank (word level), test perplexity, beside the classic LSTM figures of "
          "Zaremba et al. 2014 (82.7 medium, 78.4 large)."),
      runs=(Run("dense_small", "experiments/dense_small.py"),
            Run("switch_small", "experiments/switch_small.py"),
            Run("gshard_small", "experiments/gshard_small.py")),
      seeds=(0, 1, 2),
      overrides=("data.name=ptb", "data.eval_split=test", "train.eval_batches=0"),
      metrics=("eval/loss", "eval/perplexity", "eval/moe/*/dropped_fraction"),
      plots=("eval/perplexity",),
      curves=(),
      evaluations=1,
  )
