"""Writes tests/golden/deepseek_v3_moe.npz: transformers' DeepseekV3MoE block on random weights.

tests/test_deepseek_reference.py builds moejax's MoeLayer (kind='deepseek', SwiGLU experts,
shared experts) from the same weights and compares its outputs with these, without torch.
Regenerate from the repository root, in an environment of its own with the packages of
setup.cfg's `reference` extra (the script needs neither jax nor moejax):

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install 'transformers>=5.24' torch==2.13.0 numpy
    /tmp/refvenv/bin/python tests/golden/make_deepseek_golden.py
    git diff --stat tests/golden    # rerunning with the same versions rewrites identical bytes

The block (transformers' models/deepseek_v3/modeling_deepseek_v3.py): hidden size 32, 8 routed
experts of intermediate size 16 in 4 groups, top-2 groups, 2 experts per token, one shared expert,
routed scaling factor 2.5, normalised top-k weights, a random non-negative score-correction bias.
All weights and inputs come from a seeded numpy generator, so the file depends only on the seed
and the transformers/torch versions (recorded in it). The routing in the file is checked to be
exercised and free of near-ties: the bias and the group limit each change some token's experts,
and no selection or group score is within 1e-3 of the next one.
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch
import transformers
from transformers.models.deepseek_v3 import modeling_deepseek_v3

OUT = pathlib.Path(__file__).resolve().parent / "deepseek_v3_moe.npz"
SEED = 0
HIDDEN, INTERMEDIATE, EXPERTS, GROUPS, TOPK_GROUPS, K = 32, 16, 8, 4, 2, 2
SHARED, SCALING = 1, 2.5
BATCH, LENGTH = 2, 16
MIN_GAP = 1e-3


def _config():
  config = transformers.DeepseekV3Config(
      hidden_size=HIDDEN, moe_intermediate_size=INTERMEDIATE, n_routed_experts=EXPERTS,
      n_group=GROUPS, topk_group=TOPK_GROUPS, num_experts_per_tok=K, n_shared_experts=SHARED,
      routed_scaling_factor=SCALING, norm_topk_prob=True, hidden_act="silu")
  config._experts_implementation = "eager"  # the per-expert loop, not a fused kernel
  return config


def _weights(rng):
  normal = lambda *shape, fan_in: rng.standard_normal(shape).astype(np.float32) / np.sqrt(fan_in)
  shared = INTERMEDIATE * SHARED
  return {
      "router_weight_EM": normal(EXPERTS, HIDDEN, fan_in=HIDDEN) * 2.0,
      "bias_E": rng.uniform(0.0, 0.3, EXPERTS).astype(np.float32),
      "gate_up_proj_E2FM": normal(EXPERTS, 2 * INTERMEDIATE, HIDDEN, fan_in=HIDDEN),
      "down_proj_EMF": normal(EXPERTS, HIDDEN, INTERMEDIATE, fan_in=INTERMEDIATE),
      "shared_gate_proj_FM": normal(shared, HIDDEN, fan_in=HIDDEN),
      "shared_up_proj_FM": normal(shared, HIDDEN, fan_in=HIDDEN),
      "shared_down_proj_MF": normal(HIDDEN, shared, fan_in=shared),
  }


def _load(block, w):
  t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
  with torch.no_grad():
    block.gate.weight.copy_(t(w["router_weight_EM"]))
    block.gate.e_score_correction_bias.copy_(t(w["bias_E"]))
    block.experts.gate_up_proj.copy_(t(w["gate_up_proj_E2FM"]))
    block.experts.down_proj.copy_(t(w["down_proj_EMF"]))
    block.shared_experts.gate_proj.weight.copy_(t(w["shared_gate_proj_FM"]))
    block.shared_experts.up_proj.weight.copy_(t(w["shared_up_proj_FM"]))
    block.shared_experts.down_proj.weight.copy_(t(w["shared_down_proj_MF"]))


def _routing_checks(w, x_TM, topk_TK):
  """Near-ties, and whether the bias and the group limit each matter, in float64."""
  s = 1.0 / (1.0 + np.exp(-(x_TM.astype(np.float64) @ w["router_weight_EM"].T)))
  biased = s + w["bias_E"]
  grouped = biased.reshape(len(s), GROUPS, -1)
  group_score = np.sort(grouped, -1)[..., -2:].sum(-1)
  ranked = np.sort(group_score, -1)[:, ::-1]
  if np.min(ranked[:, TOPK_GROUPS - 1] - ranked[:, TOPK_GROUPS]) < MIN_GAP:
    return "a near-tie between kept and dropped groups"
  kept = np.argsort(-group_score, -1)[:, :TOPK_GROUPS]
  masked = np.full_like(biased, -np.inf)
  for t, groups in enumerate(kept):
    for g in groups:
      span = slice(g * (EXPERTS // GROUPS), (g + 1) * (EXPERTS // GROUPS))
      masked[t, span] = biased[t, span]
  ordered = np.sort(masked, -1)[:, ::-1]
  if np.min(ordered[:, K - 1] - ordered[:, K]) < MIN_GAP:
    return "a near-tie in the top-k"
  chosen = np.sort(np.argsort(-masked, -1)[:, :K], -1)
  if not np.array_equal(chosen, np.sort(topk_TK, -1)):
    return "transformers chose other experts than the float64 check"
  without_bias = np.sort(np.argsort(-s, -1)[:, :K], -1)
  without_groups = np.sort(np.argsort(-biased, -1)[:, :K], -1)
  if np.array_equal(chosen, without_bias):
    return "the bias changes no token's experts"
  if np.array_equal(chosen, without_groups):
    return "the group limit changes no token's experts"
  return None


def main():
  torch.manual_seed(SEED)
  block = modeling_deepseek_v3.DeepseekV3MoE(_config()).eval()
  for attempt in range(100):
    rng = np.random.default_rng([SEED, attempt])
    w = _weights(rng)
    x_BLM = rng.standard_normal((BATCH, LENGTH, HIDDEN)).astype(np.float32)
    _load(block, w)
    with torch.no_grad():
      x = torch.from_numpy(x_BLM)
      _, topk_weights, topk_indices = block.gate(x)
      y_BLM = block(x).numpy()
    problem = _routing_checks(w, x_BLM.reshape(-1, HIDDEN), topk_indices.numpy())
    if problem is None:
      break
    print(f"attempt {attempt}: {problem}; drawing again")
  else:
    raise SystemExit("no draw without near-ties in 100 attempts")
  np.savez_compressed(
      OUT, **w, x_BLM=x_BLM, y_BLM=y_BLM,
      topk_indices_TK=topk_indices.numpy().astype(np.int32),
      topk_weights_TK=topk_weights.numpy(),
      num_groups=GROUPS, topk_groups=TOPK_GROUPS, k=K, routed_scaling_factor=SCALING,
      transformers_version=transformers.__version__, torch_version=torch.__version__)
  print(f"wrote {OUT} (attempt {attempt}; transformers {transformers.__version__}, "
        f"torch {torch.__version__})")


if __name__ == "__main__":
  main()
