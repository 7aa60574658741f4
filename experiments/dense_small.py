"""dense_small: the dense baseline of the small MoE comparison.

    python -m moejax.main --config=experiments/dense_small.py --workdir=runs/dense_small

A 4-layer, M=256 decoder with a dense FFN (F=1024) in every block, trained exactly like
`switch_small` (same data, batch 16 x 128 tokens, 250 steps, optimizer): the reference that the
MoE experiments match in active FFN FLOPs per token.

Hardware: one CPU. Run time on the 2-core development machine: about 4 minutes (about 2.9k
training tokens/s). Expected result (seed 0): validation loss 5.109, perplexity 165.5 after 250
steps. `experiments/compare.py` puts it beside switch_small and gshard_small (docs/compare.md).
"""

from experiments import base


def get_config(arg: str | None = None):
  config = base.get_config()
  return base.apply_variant(config, arg)
