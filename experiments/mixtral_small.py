"""mixtral_small: a Mixtral-style MoE (top-2 of 8 SwiGLU experts in every block) for a TPU slice.

    launch/tpu_pod.sh --name=mixtral --zone=us-west4-a --accelerator-type=v5litepod-32 \
        --config=experiments/mixtral_small.py --workdir=gs://BUCKET/runs/mixtral_small

or, on any machine, `python -m moejax.main --config=experiments/mixtral_small.py
--workdir=DIR` with the mesh overridden to fit it (below).

The Mixtral 8x7B layout (Jiang et al. 2024) at a small scale: 16 blocks, M=1024, 16 heads of
64, every block's FFN an MoE layer of 8 SwiGLU experts of width F=3584 (Mixtral's 3.5 M), top-2
routing with the weights renormalised over the two (softmax over the kept logits), capacity
factor 1.25, load-balancing loss 0.01, router z-loss 0.001; untied embeddings; sequences of
1024 tokens. About 1.48B parameters outside the embedding, 0.42B of them active per token.

Hardware: a TPU v5e slice of 32 chips (gcloud's `v5litepod-32`), mesh (data=4, expert=8,
model=1): one expert per chip of each expert row, 8 sequences of 1024 tokens per chip (a global
batch of 256). On one GPU, override `--config.mesh.expert=1 --config.train.batch_size=8`.

Expected result: not yet measured (no TPU slice has run it).
"""

from experiments import accelerator, base


def get_config(arg: str | None = None):
  config = accelerator.get_config(num_layers=16, model_dim=1024, num_heads=16, head_dim=64,
                                  ffn_dim=3584)
  config.model.update(activation="swiglu", tie_embeddings=False)
  config.data.seq_len = 1024
  config = accelerator.set_experts(config, kind="topk", num_experts=8, k=2, every=1)
  config.model.moe.router.normalize_weights = True
  config.mesh.update(data=4, expert=8, model=1)
  config.train.batch_size = 256
  config = base.apply_variant(config, arg)
  if arg:  # the tiny variant runs anywhere
    config.mesh.update(data=-1, expert=1)
  return config
