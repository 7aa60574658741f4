"""switch_base_64: Switch-Base with 64 experts, expert-parallel over 8 GPUs.

    python -m moejax.main --config=experiments/switch_base_64.py --workdir=runs/switch_base_64

`switch_base_8` with 64 experts (Switch Transformer's Switch-Base 64 configuration): every
other block of 12 an MoE layer of 64 experts of width 3072, top-1, capacity factor 1.25. About
1.87B parameters outside the embedding, of which 85M are active per token. The mesh is
(data=1, expert=8, model=1): 8 experts per GPU, 64 sequences of 512 tokens per GPU (a global
batch of 512), two all-to-alls per MoE layer.

Hardware: one node of 8 GPUs (launch/slurm_gpu.sbatch). On one GPU, override
`--config.mesh.expert=1 --config.train.batch_size=64` (the 64 experts then fit on an 80 GB GPU
with float32 parameters, gradients and AdamW state: about 30 GB).

Expected result: not yet measured (no 8-GPU machine has run it).
"""

from experiments import accelerator, base


def get_config(arg: str | None = None):
  config = accelerator.set_experts(accelerator.get_config(), kind="switch", num_experts=64)
  config.mesh.update(data=1, expert=8, model=1)
  config.train.batch_size = 512
  config = base.apply_variant(config, arg)
  if arg:  # the tiny variant runs anywhere: one device holds every expert
    config.mesh.update(data=-1, expert=1)
  return config
