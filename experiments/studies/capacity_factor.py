"""capacity_factor: training capacity factors 0.5 to 2.0 for top-1 and top-2 routing.

    python -m moejax.study capacity_factor

The Switch Transformer paper (Fedus et al. 2021, Table 1) finds capacity factors 1.0-1.25 the best
trade of speed against quality for top-1 routing: a small factor drops tokens, a large one pays
for padding. Runs: switch_small (top-1, F=512) and gshard_small (top-2, F=256) at
`model.moe.router.capacity_factor_train` 0.5, 0.75, 1.0, 1.25 and 2.0; every run has the same
active FFN FLOPs per token (the padding's FLOPs are the cost the study measures, in tokens/s).

Evaluation uses the experiments' evaluation factor, 2.0; each finished run is also evaluated at
factor 1.0 on the same validation batches (`eval@cf1.0/...`: what a model trained at one factor
loses when served at a tight one).

Run time: about 5-6 minutes per run on the 2-core development machine (30 runs), not yet
measured. Measured result: not yet run.
"""

from moejax.study import Evaluation, Run, Study

FACTORS = (0.5, 0.75, 1.0, 1.25, 2.0)
EXPERIMENTS = (("top1", "experiments/switch_small.py"), ("top2", "experiments/gshard_small.py"))


def get_study() -> Study:
  runs = tuple(
      Run(f"{name}_cf{factor}", experiment,
          overrides=(f"model.moe.router.capacity_factor_train={factor}",))
      for name, experiment in EXPERIMENTS for factor in FACTORS)
  return Study(
      description=(
          "Switch Transformer, Table 1: for top-1 routing a training capacity factor of "
          "1.0-1.25 is the best trade of quality against speed. Training factors 0.5 to 2.0 for "
          "top-1 and top-2 routing at equal active FFN FLOPs per token; evaluation at factor "
          "2.0, and again at 1.0."),
      runs=runs,
      seeds=(0, 1, 2),
      metrics=("eval/loss", "moe/*/dropped_fraction", "eval/moe/*/dropped_fraction",
               "eval@cf1.0/loss", "eval@cf1.0/moe/*/dropped_fraction"),
      plots=("eval/loss", "moe/*/dropped_fraction", "train/tokens_per_sec_mean"),
      curves=("eval/loss",),
      evaluations=4,
      extra_evaluations=(Evaluation("cf1.0", ("model.moe.router.capacity_factor_eval=1.0",)),),
  )
