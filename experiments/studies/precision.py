"""precision: float32 against bfloat16 compute, at the experiments' and at a higher learning rate.

    python -m moejax.study precision

The Switch Transformer paper (Fedus et al. 2021, Table 2) finds that a bfloat16 router
destabilises training and that computing the router in float32 ("selective precision") fixes it
at bfloat16 speed. In moejax the router is always float32 (router logits, softmax and the
auxiliary losses; see docs/design.md), so the bfloat16-router arm of that table cannot be set up;
the study compares float32 compute with bfloat16 compute (`model.dtype=bfloat16`, parameters
kept in float32) with a float32 router. A higher learning rate (1e-2 against the experiments'
3e-3) is added to expose instability, where there is any; a run that diverges stops with an
error (moejax's non-finite check) and is listed as failed in the report.

On a CPU, bfloat16 matmuls are not faster than float32 (there is no bfloat16 hardware on the
development machine), so the tokens/s column measures XLA's CPU bfloat16 path, not the speed-up
an accelerator gives.

Run time: not yet measured (bfloat16 may be slower on this CPU). Measured result: not yet run.
"""

from moejax.study import Run, Study

SWITCH = "experiments/switch_small.py"
BF16 = "model.dtype=bfloat16"
HIGH_LR = "optimizer.learning_rate=0.01"


def get_study() -> Study:
  return Study(
      description=(
          "Switch Transformer, Table 2: a bfloat16 router destabilises training; a float32 "
          "router fixes it at bfloat16 speed. moejax's router is always float32, so the "
          "comparison is float32 against bfloat16 compute (float32 router), at the "
          "experiments' learning rate 3e-3 and at 1e-2."),
      runs=(Run("float32", SWITCH),
            Run("bfloat16", SWITCH, overrides=(BF16,), note="float32 router"),
            Run("float32_lr1e-2", SWITCH, overrides=(HIGH_LR,)),
            Run("bfloat16_lr1e-2", SWITCH, overrides=(BF16, HIGH_LR), note="float32 router")),
      seeds=(0, 1, 2),
      metrics=("eval/loss", "eval/perplexity", "train/grad_norm", "eval/moe/*/router_z_loss"),
      plots=("eval/loss", "train/tokens_per_sec_mean"),
      curves=("eval/loss", "train/loss"),
      evaluations=4,
  )
