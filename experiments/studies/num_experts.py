"""num_experts: dense, then 2, 4, 8, 16 and 32 experts, top-1, at equal active FLOPs per token.

    python -m moejax.study num_experts

The Switch Transformer paper (Fedus et al. 2021, Fig. 4) finds that more experts at equal FLOPs
per token keep lowering the loss. Each MoE run is switch_small (top-1, experts of F=512, the
dense FFN's width, so every run spends the same active FFN FLOPs per token) with
`model.moe.router.num_experts` changed; the parameter count grows with E. With one routing group
per 128-token sequence, capacity factor 1.25 gives C = ceil(1.25 * 128 / E) slots per expert
(5 at E=32). A dropless arm (`model.moe.dispatch=dropless`) repeats E=8, 16 and 32 with nothing
dropped.

Run time: 5-6 minutes per run on the 2-core development machine, two at a time with nothing else
running (the first 18 runs: 47 minutes; the dropless 9: 23 minutes).

Measured result (2026-11-26, 3 seeds): validation loss dense 4.2279, then 4.2173, 4.2031, 4.1984,
4.2104, 4.2300 for 2, 4, 8, 16, 32 experts. Switch's trend holds to 8 experts (6.3 standard errors
below dense) and reverses beyond: with 128-token routing groups an expert has 5 slots at E=32 and
18% of the tokens overflow in training, and each expert sees a 32nd of the 2M tokens. Dropless
(2026-11-26, 3 seeds): 4.1787, 4.1822, 4.1876 at 8, 16, 32 experts, all 5-11 standard errors below
dense: dropped tokens made the reversal; without them the curve flattens past 8 experts
(docs/studies/README.md).
"""

from moejax.study import Run, Study

EXPERTS = (2, 4, 8, 16, 32)
# The dropless arm: where capacity drops a large share of the tokens (5% in training at E=8,
# 11% at 16, 18% at 32), the same models with every token reaching its expert.
DROPLESS_EXPERTS = (8, 16, 32)


def get_study() -> Study:
  runs = [Run("dense", "experiments/dense_small.py")]
  runs += [Run(f"e{experts}", "experiments/switch_small.py",
               overrides=(f"model.moe.router.num_experts={experts}",))
           for experts in EXPERTS]
  runs += [Run(f"e{experts}_dropless", "experiments/switch_small.py",
               overrides=(f"model.moe.router.num_experts={experts}", "model.moe.dispatch=dropless"),
               note="dropless")
           for experts in DROPLESS_EXPERTS]
  return Study(
      description=(
          "Switch Transformer, Fig. 4: at equal FLOPs per token, more experts keep lowering the "
          "loss. Top-1 routing over 2 to 32 experts of the dense FFN's width, against the dense "
          "model, and dropless at 8, 16 and 32 experts (nothing dropped)."),
      runs=tuple(runs),
      seeds=(0, 1, 2),
      metrics=("eval/loss", "eval/perplexity", "model/params_total",
               "eval/moe/*/dropped_fraction"),
      plots=("eval/loss", "model/params_total"),
      curves=("eval/loss",),
      evaluations=4,
  )
