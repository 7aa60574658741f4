"""switch_small: a Switch Transformer (top-1 routing, 8 experts) small enough for a laptop CPU.

    python -m moejax.main --config=experiments/switch_small.py --workdir=runs/switch_small

Every second block's FFN (blocks 1 and 3 of 4) is an MoE layer of 8 experts of width F=512 with
top-1 routing (Fedus et al. 2021): capacity factor 1.25 in training and 2.0 in evaluation, load-
balancing loss weight 0.01, router z-loss weight 0.001, one routing group per sequence (S=L=128,
which keeps top-1 routing causal). Active FFN FLOPs per token equal `dense_small`'s; everything
else (M=128, 2048 SentencePiece pieces, batch 32 x 128 tokens, 500 steps, AdamW 3e-3 with cosine
decay) is shared (experiments/base.py says why this size).

Hardware: one CPU is enough; on 8 devices, `--config.mesh.expert=8` shards the experts.

Run time on the 2-core x86_64 development machine: `make train` on a fresh clone took 5 min 25 s,
creating .venv included (compilation, 500 steps at about 8k tokens/s, three evaluations of 16
batches, two checkpoints; building the dataset and tokenizer on first use adds a few seconds).
A later fresh clone (2026-11-25, .venv already created by `make test`, the machine shared) took
6 min 37 s at 5.6k tokens/s, with the same validation loss to the last digit. Since attention
runs through `jax.nn.dot_product_attention` (float32 rounding differs), a fresh clone gave
validation loss 4.2022 (9 min 10 s, 4.0k tokens/s, a test run sharing the machine for part of it).
On 2026-11-26, quiet, a fresh clone's `make train` took 2 min 41 s (13.8k tokens/s on both cores)
and gave 4.1962; the same seed in a study run, pinned to one core with XLA on one thread, gave
4.2022: the float reduction order follows XLA's thread count, so the loss repeats to the last
digit only on the same machine type and thread setting.

Expected result (seed 0, deterministic for a machine type and XLA thread count): validation loss
4.204, perplexity 66.9 after 500 steps, against 4.231 for `dense_small` (docs/compare.md); every
expert in use, under 0.1% of validation tokens dropped. Over three seeds (the `compare` and
`routers` studies, docs/studies/): 4.1996 ± 0.0113 against dense_small's 4.2290 ± 0.0031, 4.3
standard errors of the difference. The workdir then holds checkpoints/{250,500}, metrics.jsonl and
TensorBoard events (`.venv/bin/tensorboard --logdir runs/switch_small/tensorboard`). Rerunning the
command resumes (or, when finished, re-evaluates); SIGTERM saves and exits 0.
"""

from experiments import base


def get_config(arg: str | None = None):
  config = base.get_config()
  base.set_moe(config, kind="switch", ffn_dim=config.model.ffn_dim)
  return base.apply_variant(config, arg)
