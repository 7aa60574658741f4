"""init_scale: weights initialised at 0.1x the usual scale against 1.0x, over five seeds.

    python -m moejax.study init_scale

The Switch Transformer paper (Fedus et al. 2021, Sec. 2.3, Table 3) draws every weight matrix
from a truncated normal of standard deviation sqrt(s / fan_in) and finds that s = 0.1 instead of
1.0 both improves quality and cuts its spread over seeds (at 3.5k steps of a 223M Switch-Base:
-2.72 +- 0.01 against -3.60 +- 0.68 negative log perplexity). Runs: switch_small (top-1,
8 experts) with `model.init_scale` 0.1 and 1.0 (moejax/init_scale.py lists the matrices it
scales: attention, dense FFN, router, experts, shared experts, untied output projection; not the
embedding or the norms), five seeds each. Both runs have the same FLOPs; the claim is in the
standard deviation over seeds that every cell reports beside the mean.

Run time: about 5-6 minutes per run on the 2-core development machine (10 runs), not yet
measured. Measured result: not yet run.
"""

from moejax.study import Run, Study

SWITCH = "experiments/switch_small.py"


def get_study() -> Study:
  return Study(
      description=(
          "Switch Transformer, Table 3: initialising every weight matrix at 0.1x the usual "
          "scale (variance s = 0.1 instead of 1.0) gives better quality and a much smaller "
          "spread over seeds. switch_small with model.init_scale 0.1 and 1.0, five seeds each; "
          "the spread is the standard deviation in each cell."),
      runs=(Run("scale0.1", SWITCH, overrides=("model.init_scale=0.1",)),
            Run("scale1.0", SWITCH, overrides=("model.init_scale=1.0",))),
      seeds=(0, 1, 2, 3, 4),
      metrics=("eval/loss", "eval/perplexity", "train/loss", "train/grad_norm"),
      plots=("eval/loss", "train/grad_norm"),
      curves=("eval/loss",),
      evaluations=4,
  )
