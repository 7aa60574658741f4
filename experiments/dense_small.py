"""dense_small: the dense baseline of the small MoE comparison.

    python -m moejax.main --config=experiments/dense_small.py --workdir=runs/dense_small

A 4-layer, M=128 decoder with a dense FFN (F=512) in every block, trained exactly like
`switch_small` (same data, batch 32 x 128 tokens, 500 steps, optimizer): the reference that the
MoE experiments match in active FFN FLOPs per token.

Hardware: one CPU. Run time on the 2-core development machine: about 6 minutes (about 7.6k
training tokens/s). Expected result (seed 0): validation loss 4.231, perplexity 68.8 after 500
steps. Measured over three seeds (the `compare` study, `make compare`; docs/studies/compare.md):
4.2290 ± 0.0031, behind switch_small (4.1996 ± 0.0113) and gshard_small (4.1877 ± 0.0090);
10-13 minutes per run on one core, two runs at a time.
"""

from experiments import base


def get_config(arg: str | None = None):
  config = base.get_config()
  return base.apply_variant(config, arg)
