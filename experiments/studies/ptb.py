"""ptb: dense, Switch and GShard on Penn Treebank (word level), test perplexity.

    python -m moejax.study ptb

The three small experiments (experiments/base.py; equal active FFN FLOPs per token) on
Mikolov's PTB splits with the word vocabulary (10k words + end of sentence), evaluated once, at
the end, on the whole test split. The classic published test perplexities are Zaremba et al.
(2014): 82.7 (medium LSTM, 20M parameters, 39 epochs) and 78.4 (large, 66M). These models are far
smaller (about 0.8M parameters outside the 1.3M-parameter embedding) and train for 500 steps of
4,096 tokens, about 2 epochs of the 929k training words, so they are not expected to reach
those figures; the study compares the three at equal compute on a corpus the literature knows.

Run time: 8 minutes per run on the 2-core development machine, two at a time with nothing else
running (4.4-4.6k training tokens/s per core, against 6.9-7.5k for the same models on the default
corpus: the 10k-word output layer is most of a step at M=128); 9 runs: about 40 minutes.
Measured result (2026-11-26): test perplexity dense_small 251.59 +- 1.88, switch_small 251.56 +-
1.25, gshard_small 249.43 +- 1.73 (3 seeds each). Switch matches dense; GShard is lower at every
seed (by 1.8-2.6 against dense, paired by seed) though not separated unpaired (1.5 standard
errors). All three are three times the LSTM figures: far smaller models, two epochs.
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
