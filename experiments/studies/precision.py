"""precision: float32, bfloat16 compute with a float32 router, and bfloat16 including the router.

    python -m moejax.study precision

The Switch Transformer paper (Fedus et al. 2021, Table 2) finds that a bfloat16 router
destabilises training and that computing the router in float32 ("selective precision") fixes it
at bfloat16 speed. The study runs switch_small three ways: float32; bfloat16 compute
(`model.dtype=bfloat16`, parameters kept in float32) with the float32 router moejax uses by
default; and bfloat16 including the router (`model.moe.router.dtype=bfloat16`: the router's input,
weight and logits in bfloat16; the softmax and the rest of routing stay float32, so the arm keeps
the logits' rounding, the larger part of a bfloat16 softmax's error for logits above about 1). A
higher learning rate (1e-2 against the experiments' 3e-3) is added to expose instability, where
there is any, and at 1e-2 an arm without the router z-loss, as Switch trained; a run that
diverges stops with an error (moejax's non-finite check) and is listed as failed in the report.

On a CPU, bfloat16 matmuls are not faster than float32 (there is no bfloat16 hardware on the
development machine), so the tokens/s column measures XLA's CPU bfloat16 path, not the speed-up
an accelerator gives. Nor are they slower at this size: `benchmarks/train_speed.py --study
precision --steps 10 --repeats 3`, best of 3 rounds, gave every run 0.97-1.06 times float32's
tokens/s (2.9k; measured beside two study runs, load average 4).

Run time: about 5 minutes per run two at a time (27 runs, 24 trainings: float32 at 3e-3 is
switch_small, shared with the other studies; 40 + 25 minutes on the 2-core machine).

Measured result (2026-11-26, 3 seeds): not reproduced, nothing destabilised. Validation loss at
3e-3: float32 4.1984, bfloat16 4.1972, bfloat16 router 4.1981; at 1e-2: 3.9021, 3.8972, 3.9003;
at 1e-2 without z-loss: 3.9072, 3.8974, 3.8971. No run diverged; within an arm the precisions
differ by at most 1.2 standard errors. The router logits stay about 1 (z-loss on) to 3 (off) in
size, where bfloat16 rounds a logit by at most 0.008 (docs/studies/README.md).
"""

from moejax.study import Run, Study

SWITCH = "experiments/switch_small.py"
BF16 = "model.dtype=bfloat16"
BF16_ROUTER = "model.moe.router.dtype=bfloat16"
HIGH_LR = "optimizer.learning_rate=0.01"
# Switch Transformer trained without a router z-loss (ST-MoE introduced it later, against
# exactly this instability); switch_small has one (1e-3), which keeps the router logits small.
NO_Z_LOSS = "model.moe.router.z_loss_weight=0.0"
ARMS = (("", ()), ("_lr1e-2", (HIGH_LR,)), ("_lr1e-2_no_z", (HIGH_LR, NO_Z_LOSS)))


def get_study() -> Study:
  runs = []
  for suffix, settings in ARMS:
    runs += [Run(f"float32{suffix}", SWITCH, overrides=settings),
             Run(f"bfloat16{suffix}", SWITCH, overrides=(BF16, *settings),
                 note="float32 router"),
             Run(f"bfloat16_router{suffix}", SWITCH, overrides=(BF16, BF16_ROUTER, *settings),
                 note="bfloat16 router logits")]
  return Study(
      description=(
          "Switch Transformer, Table 2: a bfloat16 router destabilises training; a float32 "
          "router fixes it at bfloat16 speed. float32, bfloat16 compute with a float32 router, "
          "and bfloat16 including the router's logits, at the experiments' learning rate 3e-3, "
          "at 1e-2, and at 1e-2 without the router z-loss (as Switch trained)."),
      runs=tuple(runs),
      seeds=(0, 1, 2),
      metrics=("eval/loss", "eval/perplexity", "train/grad_norm", "eval/moe/*/router_z_loss"),
      plots=("eval/loss", "train/tokens_per_sec_mean"),
      curves=("eval/loss", "train/loss"),
      evaluations=4,
  )
