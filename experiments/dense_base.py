"""dense_base: a dense T5-Base-shaped decoder in bfloat16, the baseline of `switch_base_8`.

    python -m moejax.main --config=experiments/dense_base.py --workdir=runs/dense_base

12 blocks, M=768, 12 heads of 64, dense FFN F=3072 (relu) in every block, a 32,000-piece
vocabulary, 64 sequences of 512 tokens per step, bfloat16 compute with float32 parameters
(experiments/accelerator.py). About 85M parameters outside the embedding. Its active FLOPs per
token equal `switch_base_8`'s but for that model's routers.

Hardware: one GPU (mesh data=-1). On 8 GPUs, `--config.train.batch_size=512` keeps 64 sequences
per device.

Expected result: not yet measured (tokens/s and MFU on one H100: see docs/benchmarks.md once
measured).
"""

from experiments import accelerator, base


def get_config(arg: str | None = None):
  return base.apply_variant(accelerator.get_config(), arg)
