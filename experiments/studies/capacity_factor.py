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

Run time: 6-23 minutes per run on the 2-core development machine (most two at a time with
`--jobs 2`), 4.9 hours of run time for the 25 trainings (the factor-1.25 runs are the routers
study's switch and gshard). Measured result (3 seeds, validation loss at factor 2.0; served at
factor 1.0 in brackets): top-1 4.2763 / 4.2412 / 4.2164 / 4.1991 / 4.1871 (4.2820 / 4.2529 /
4.2374 / 4.2321 / 4.2509) at training factors 0.5 / 0.75 / 1.0 / 1.25 / 2.0, dropping 50.7% /
28.9% / 13.2% / 5.0% / 0.3% of tokens in training; top-2 4.2648 / 4.2285 / 4.2021 / 4.1877 /
4.1758 (4.2678 / 4.2349 / 4.2168 / 4.2130 / 4.2307). Quality rises with the factor up to 2.0
(1.25 to 2.0 within the seed noise); served at 1.0 the models trained at 1.0-1.25 are best.
docs/studies/README.md has the reading.
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
