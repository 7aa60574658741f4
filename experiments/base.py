"""Settings shared by the moejax experiments; each experiment file changes only what it studies.

The three small experiments (`dense_small`, `switch_small`, `gshard_small`) share everything below:
a 4-layer, M=128 decoder on the offline public-domain corpus (SentencePiece, 2048 pieces, L=128),
AdamW with warm-up and cosine decay, the same batch (32 x 128 tokens) and the same number of steps
(500, about 2M training tokens). Their FFNs differ but spend the same active FLOPs per token
(checked in tests/test_experiments.py).

Why this size: an MoE layer adds parameters at constant FLOPs, which pays off only where the dense
model is short of parameters for the tokens it sees. On a 2-core CPU a 5-minute run trains a few
million tokens, so the model is kept small (about 0.8M parameters outside the embedding) and the
batch large. A wider, shorter configuration (M=256, 8192 pieces, 16 x 128 tokens, 250 steps)
left the dense model ahead of both MoE models: docs/compare_studies.md has those runs.

Variants (`get_config("tiny")`): "tiny" shrinks the model, sequence and run for smoke tests
(M=32, L=16, 2 layers, 4 steps); point `data.name`/`data.data_dir` at a small dataset to go with it.
"""

from __future__ import annotations

import ml_collections

from moejax.config import default_config

VARIANTS = ("tiny",)


def get_config() -> ml_collections.ConfigDict:
  """The shared base: a dense model (`model.moe_every = 0`); MoE fields stay at their defaults.

  It starts from `moejax.config.default_config()`, which holds every typed field, so any field
  can be overridden on the command line whether or not it is set here.
  """
  config = default_config()

  config.model.update(
      num_layers=4, model_dim=128, num_heads=4, head_dim=32, ffn_dim=512, activation="relu",
      moe_every=0, dtype="float32", param_dtype="float32", dropout_rate=0.0, rope_base=10000.0,
      tie_embeddings=True)

  config.data.update(name="moejax_public_domain", vocab_size=2048, seq_len=128, shuffle_seed=0)

  # One CPU device: all sizes 1. On 8 devices: data=8; set expert=8 (or 4, 2) for expert
  # parallelism. The expert axis must divide the number of experts.
  config.mesh.update(data=-1, expert=1, model=1)

  config.optimizer.update(
      name="adamw", learning_rate=3e-3, schedule="cosine", warmup_steps=25, decay_steps=0,
      final_learning_rate_fraction=0.1, weight_decay=0.1, b1=0.9, b2=0.98, eps=1e-8,
      clip_norm=1.0)

  config.train.update(
      num_steps=500, batch_size=32, log_every=25, eval_every=250, eval_batches=16,
      checkpoint_every=250, max_checkpoints=2, seed=0, progress=True)
  return config


def set_moe(config: ml_collections.ConfigDict, *, kind: str, ffn_dim: int, every: int = 2,
            num_experts: int = 8, group_size: int = 128) -> ml_collections.ConfigDict:
  """Makes every `every`-th block an MoE layer with router `kind` ("switch", "gshard", "topk").

  group_size = L = 128: each sequence is one routing group, which keeps top-1 routing causal.
  """
  config.model.moe_every = every
  config.model.moe.update(ffn_dim=ffn_dim, group_size=group_size, dispatch="index",
                          activation="relu", expert_dropout=0.0)
  config.model.moe.router.update(
      kind=kind, num_experts=num_experts, capacity_factor_train=1.25, capacity_factor_eval=2.0,
      min_capacity=4, jitter_eps=0.0, load_balancing_loss_weight=1e-2, z_loss_weight=1e-3)
  return config


def apply_variant(config: ml_collections.ConfigDict, arg: str | None
                  ) -> ml_collections.ConfigDict:
  """Applies the variant named by `arg` (None: the experiment as documented)."""
  if arg is None or arg == "":
    return config
  if arg not in VARIANTS:
    raise ValueError(f"config variant {arg!r} is not known; choose one of {VARIANTS} or none.")
  # "tiny": seconds on a CPU, for smoke tests.
  tiny_ffn_dim = 64
  if config.model.moe_every > 0:  # experts keep their width relative to the dense FFN's
    config.model.moe.ffn_dim = config.model.moe.ffn_dim * tiny_ffn_dim // config.model.ffn_dim
    config.model.moe.shared_ffn_dim = (config.model.moe.shared_ffn_dim * tiny_ffn_dim
                                       // config.model.ffn_dim)
    config.model.moe.group_size = 16
  config.model.update(num_layers=2, model_dim=32, num_heads=2, head_dim=16, ffn_dim=tiny_ffn_dim)
  config.data.update(seq_len=16, vocab_size=512)
  config.train.update(num_steps=4, batch_size=8, log_every=1, eval_every=0, eval_batches=2,
                      checkpoint_every=0, progress=False)
  config.optimizer.warmup_steps = 2
  return config
