"""dense_base: a dense T5-Base-shaped decoder in bfloat16, the baseline of `switch_base_8`.

    python -m moejax.main --config=experiments/dense_base.py --workdir=runs/dense_base

12 blocks, M=768, 12 heads of 64, dense FFN F=3072 (relu) in every block, a 32,000-piece
vocabulary, 64 sequences of 512 tokens per step, bfloat16 compute with float32 parameters
(experiments/accelerator.py). About 85M parameters outside the embedding. Its active FLOPs per
token equal `switch_base_8`'s but for that model's routers.

Hardware: one GPU (mesh data=-1). On 8 GPUs, `--config.train.batch_size=512` keeps 64 sequences
per device.

Measured on one NVIDIA H100 80GB (2026-11-25; docs/benchmarks.md, logs in docs/h100/), 300 steps
with `--config.model.attention_impl=cudnn --config.train.num_steps=300`: 436.7k tokens/s, 312
model TFLOP/s, MFU 31.5% (bfloat16 peak 989 TFLOP/s); validation loss 4.376 at step 300. The
first compilation takes about 2 minutes. With XLA's attention (no cuDNN): 295k tokens/s, MFU 21%.
"""

from experiments import accelerator, base


def get_config(arg: str | None = None):
  return base.apply_variant(accelerator.get_config(), arg)
