"""Study scales: every run of a study grown to a size for accelerators, its comparisons kept.

    python -m moejax.study NAME --scale base [--set data.name=... data.data_dir=...]

The studies are defined at the size a 2-core CPU trains in minutes (experiments/base.py: 4
blocks, M=128, 500 steps of 32 x 128 tokens). A scale multiplies the shape of every run, after
the study's and the run's own settings, so what a study compares stays compared: runs at equal
active FFN FLOPs per token stay equal (every FFN and expert width is multiplied by the same
factor, a top-2 run's half-width experts stay half the width), capacity in slots per expert
follows the group size, soft MoE's slots per expert follow the sequence (E * p / S is kept).
Settings a study varies (router, precision, learning rate, balancing weights, initialisation
scale) are not touched.

Scales:

    base   Switch-Base's shape (Fedus et al. 2021, Table 9: 12 blocks, M=768, 12 heads of 64,
           F=3072), 512-token sequences of a 32,000-piece vocabulary, 5,000 steps of 256 x 512
           tokens (655M tokens per run). On one H100, Switch-Base with 8 experts trains at about
           400k tokens/s (docs/benchmarks.md): about 30 minutes per run. The embedded corpus
           (about 2M tokens) is far too small for it: point `data.name` at a large TFDS text
           dataset with `--set`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections


@dataclasses.dataclass(frozen=True)
class Scale:
  """A size for every run of a study.

  Attributes:
    multiply: path -> integer factor applied to the run's own value.
    settings: path -> value set outright.
    only_if: path (of `multiply`) -> whether the run reads the field; a field a run does not
      read keeps its default (moejax refuses another value there).
  """

  multiply: Mapping[str, int]
  settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  only_if: Mapping[str, Callable[[ml_collections.ConfigDict], bool]] = dataclasses.field(
      default_factory=dict)

  def overrides(self, config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The "path=value" settings that bring `config` (a run, its overrides applied) to scale."""
    out = []
    for path, factor in self.multiply.items():
      value = _at(config, path)
      if value is not None and self.only_if.get(path, lambda _: True)(config):
        out.append(f"{path}={value * factor}")
    out += [f"{path}={value}" for path, value in self.settings.items()]
    return tuple(out)


def _at(config: ml_collections.ConfigDict, path: str) -> Any:
  node = config
  for part in path.split("."):
    node = node[part]
  return node


def _has_moe(config: ml_collections.ConfigDict) -> bool:
  return config.model.moe_every > 0


SCALES = {
    "base": Scale(
        multiply={
            "model.num_layers": 3, "model.model_dim": 6, "model.num_heads": 3,
            "model.head_dim": 2, "model.ffn_dim": 6, "model.moe.ffn_dim": 6,
            "model.moe.shared_ffn_dim": 6, "data.seq_len": 4, "model.moe.group_size": 4,
            "model.moe.router.soft.slots_per_expert": 4, "train.batch_size": 8,
            "train.num_steps": 10, "optimizer.warmup_steps": 10, "train.log_every": 4,
            "train.checkpoint_every": 10,
        },
        settings={"data.vocab_size": 32000},
        only_if={"model.moe.ffn_dim": _has_moe, "model.moe.shared_ffn_dim": _has_moe,
                 "model.moe.group_size": _has_moe,
                 "model.moe.router.soft.slots_per_expert":
                     lambda config: _has_moe(config) and config.model.moe.router.kind == "soft"}),
}
