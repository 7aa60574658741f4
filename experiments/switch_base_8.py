"""switch_base_8: Switch-Base with 8 experts (Fedus et al. 2021) in bfloat16.

    python -m moejax.main --config=experiments/switch_base_8.py --workdir=runs/switch_base_8

`dense_base` (12 blocks, M=768, F=3072, bfloat16 compute, float32 parameters) with every other
block's FFN an MoE layer of 8 experts of width 3072, top-1 routing, capacity factor 1.25 in
training and 2.0 in evaluation, load-balancing loss 0.01 and router z-loss 0.001, one routing
group per 512-token sequence. Its active FFN FLOPs per token equal `dense_base`'s; its expert
parameters are 8 times the FFN parameters of the MoE blocks (about 283M parameters outside the
embedding, 85M of them active per token).

Hardware: one GPU (mesh data=-1, every expert on the device). On 8 GPUs:
`--config.mesh.expert=8 --config.train.batch_size=512` puts one expert on each GPU.

Measured on one NVIDIA H100 80GB (2026-11-25; docs/benchmarks.md, logs in docs/h100/), 300 steps
with `--config.model.attention_impl=cudnn --config.train.num_steps=300`: 404.7k tokens/s (0.93x
dense_base), 289 model TFLOP/s, MFU 29.2%; validation loss 4.290 at step 300 (dense_base: 4.376),
every expert of every MoE layer between 9% and 15% of the validation load, under 0.1% of tokens
dropped.
"""

from experiments import accelerator, base


def get_config(arg: str | None = None):
  config = accelerator.set_experts(accelerator.get_config(), kind="switch", num_experts=8)
  return base.apply_variant(config, arg)
