"""num_experts: dense, then 2, 4, 8, 16 and 32 experts, top-1, at equal active FLOPs per token.

    python -m moejax.study num_experts

The Switch Transformer paper (Fedus et al. 2021, Fig. 4) finds that more experts at equal FLOPs
per token keep lowering the loss. Each MoE run is switch_small (top-1, experts of F=512, the
dense FFN's width, so every run spends the same active FFN FLOPs per token) with
`model.moe.router.num_experts` changed; the parameter count grows with E. With one routing group
per 128-token sequence, capacity factor 1.25 gives C = ceil(1.25 * 128 / E) slots per expert
(5 at E=32).

Run time: about 5-6 minutes per run on the 2-core development machine (more for E=32: the
router and the dispatch grow with E), not yet measured. Measured result: not yet run.
"""

from moejax.study import Run, Study

EXPERTS = (2, 4, 8, 16, 32)


def get_study() -> Study:
  runs = [Run("dense", "experiments/dense_small.py")]
  runs += [Run(f"e{experts}", "experiments/switch_small.py",
               overrides=(f"model.moe.router.num_experts={experts}",))
           for experts in EXPERTS]
  return Study(
      description=(
          "Switch Transformer, Fig. 4: at equal FLOPs per token, more experts keep lowering the "
          "loss. Top-1 routing over 2 to 32 experts of the dense FFN's width, against the dense "
          "model."),
      runs=tuple(runs),
      seeds=(0, 1, 2),
      metrics=("eval/loss", "eval/perplexity", "model/params_total",
               "eval/moe/*/dropped_fraction"),
      plots=("eval/loss", "model/params_total"),
      curves=("eval/loss",),
      evaluations=4,
  )
