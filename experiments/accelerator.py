"""Settings shared by the experiments sized for accelerators (GPUs, TPU slices).

`dense_base`, `switch_base_8`, `switch_base_64` and `mixtral_small` start here: bfloat16 compute
with float32 parameters, optimizer state and router (`model.dtype="bfloat16"`,
`model.param_dtype="float32"`; the router always runs in float32), sequences of 512 tokens of a
32,000-piece SentencePiece vocabulary (the size of T5's, which Switch Transformer used) on the
embedded public-domain corpus, AdamW with warm-up and cosine decay.

The corpus holds about 2M tokens: a run of a few hundred steps of 64 x 512 tokens sees it
several times. These experiments measure speed (tokens/s, MFU) and check that training works at
scale; pointing `data.name` at a larger TFDS dataset (`data.data_dir`) turns them into quality
runs.

Variants: "tiny" (every experiment) shrinks the model, sequence and run for CPU smoke tests.
"""

from __future__ import annotations

import ml_collections

from experiments import base

# The Switch-Base shape (Fedus et al. 2021, Table 9; T5-Base): 12 blocks, M=768, 12 heads of 64,
# F=3072.
BASE_SHAPE = dict(num_layers=12, model_dim=768, num_heads=12, head_dim=64, ffn_dim=3072)


def get_config(**model) -> ml_collections.ConfigDict:
  """The shared accelerator base: a dense model of `model`'s shape (BASE_SHAPE by default)."""
  config = base.get_config()
  config.model.update(**{**BASE_SHAPE, **model})
  config.model.update(activation="relu", dtype="bfloat16", param_dtype="float32", remat="none",
                      tie_embeddings=True)
  config.data.update(vocab_size=32000, seq_len=512, read_threads=16, prefetch_buffer_size=8)
  config.optimizer.update(learning_rate=1e-3, warmup_steps=100, weight_decay=0.1, b2=0.98,
                          clip_norm=1.0)
  config.train.update(num_steps=500, batch_size=64, log_every=50, eval_every=0, eval_batches=16,
                      checkpoint_every=0, max_checkpoints=1)
  return config


def set_experts(config: ml_collections.ConfigDict, *, kind: str, num_experts: int, k: int = 1,
                ffn_dim: int | None = None, every: int = 2) -> ml_collections.ConfigDict:
  """An MoE layer every `every` blocks: `num_experts` experts of width `ffn_dim` (the dense F by
  default), router `kind` with k experts per token, one routing group per sequence."""
  base.set_moe(config, kind=kind, ffn_dim=ffn_dim or config.model.ffn_dim, every=every,
               num_experts=num_experts, group_size=config.data.seq_len)
  config.model.moe.activation = config.model.activation
  if kind != "switch":
    config.model.moe.router.k = k
  return config
