"""dense_small: the dense baseline of the small MoE comparison.

    python -m moejax.main --config=experiments/dense_small.py --workdir=runs/dense_small

A 4-layer, M=256 decoder with a dense FFN (F=1024) in every block, trained like `switch_small`
(same data, batch, steps, optimizer). Hardware: one CPU (2 cores) is enough. Run time and
result on the 2-core development machine: see `switch_small` and docs/compare.md.
"""

from experiments import base


def get_config(arg: str | None = None):
  config = base.get_config()
  return base.apply_variant(config, arg)
