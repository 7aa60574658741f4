"""routers: every router kind of this build, plus dense, at equal active FFN FLOPs per token.

    python -m moejax.study routers
    python -m moejax.study routers --list    # which kinds this build has

Each MoE run is switch_small (every second block of 4 an MoE layer of 8 experts, one routing
group per 128-token sequence) with the router changed and the expert width F chosen so that the
experts a token uses cost what one dense FFN of width 512 costs: F=512 for one expert per token,
F=256 for two. Where a router has its own experiment file, the run is that file as it is
(expert_choice_small: the paper's capacity factor 2 with F=256; soft_small: 16 slots per expert,
no router z-loss; sinkhorn_small; deepseek_small: 16 experts of F=128, k=2, and a shared expert
of 256), so the file's docstring can quote the study's result. `SETTINGS` holds the experiment
and overrides of every `RouterKind`; the study runs the kinds registered in this build
(`moejax.routing.REGISTRY`) and names the others in its description.

Routers whose decision for a token looks at later tokens of its group (expert choice, soft MoE,
Sinkhorn in training) leak the future into a causal language model's training loss; moejax
refuses them unless `model.moe.router.allow_noncausal=True`, which their experiment files set.
Their rows are flagged in the table: their losses are not comparable with the causal routers'.
The setting where they are fair is the masked-LM objective (experiments/mlm_small.py), not part
of this study.

Run time: 10-17 minutes per run on the 2-core development machine (seeds 1-2 two at a time, one
core each), about 7 hours for the 33 runs. Measured result (docs/studies/routers.md, 3 seeds):
hash leads at 4.0689 ± 0.0214, 0.119 below the next (gshard/topk 4.1877 ± 0.0090); deepseek
4.1901, expert_choice* 4.1946, switch 4.1996, sinkhorn* 4.2004, noisy_topk 4.2072, soft* 4.2234,
dense 4.2290, random 4.3397 (* non-causal).
"""

from moejax.routing import REGISTRY, RouterKind
from moejax.study import Run, Study

SWITCH = "experiments/switch_small.py"
ROUTER = "model.moe.router"

# kind -> (experiment, overrides). Kinds not registered in this build are checked (by
# tests/test_study.py) once they are.
SETTINGS = {
    RouterKind.SWITCH: (SWITCH, ()),
    RouterKind.GSHARD: ("experiments/gshard_small.py", ()),
    RouterKind.TOPK: (SWITCH, (f"{ROUTER}.kind=topk", f"{ROUTER}.k=2", "model.moe.ffn_dim=256")),
    RouterKind.NOISY_TOPK: (SWITCH, (f"{ROUTER}.kind=noisy_topk", f"{ROUTER}.k=2",
                                     "model.moe.ffn_dim=256")),
    # The paper's capacity factor 2 with experts of half width (F=256): C = 32 slots per expert,
    # 2 expert rows of width 256 per token on average (experiments/expert_choice_small.py).
    RouterKind.EXPERT_CHOICE: ("experiments/expert_choice_small.py", ()),
    # p = 16 slots per expert: E * p / S = 8 * 16 / 128 = one expert's FLOPs per token; no
    # router z-loss (experiments/soft_small.py).
    RouterKind.SOFT: ("experiments/soft_small.py", ()),
    # Its weight is the router probability (normalize_weights=False): renormalised over k = 1 it
    # would be 1, and the router would learn nothing from the task loss.
    RouterKind.SINKHORN: ("experiments/sinkhorn_small.py", ()),
    RouterKind.HASH: (SWITCH, (f"{ROUTER}.kind=hash",)),
    RouterKind.RANDOM: (SWITCH, (f"{ROUTER}.kind=random", f"{ROUTER}.k=1")),
    RouterKind.DEEPSEEK: ("experiments/deepseek_small.py", ()),
}


def _note(kind: RouterKind) -> str:
  family = REGISTRY[kind]
  if not (family.causal_train and family.causal_eval):
    return "non-causal: sees later tokens of its group (allow_noncausal=True)"
  return ""


def get_study() -> Study:
  available = [kind for kind in RouterKind if kind in REGISTRY]
  missing = [kind.value for kind in RouterKind if kind not in REGISTRY]
  runs = [Run("dense", "experiments/dense_small.py")]
  for kind in available:
    experiment, overrides = SETTINGS[kind]
    runs.append(Run(kind.value, experiment, overrides=overrides, note=_note(kind)))
  description = (
      "Every router of this build against a dense FFN, on the default corpus at equal active "
      "FFN FLOPs per token: quality (validation loss), balance (MaxVio), dropped tokens and "
      "training speed.")
  if missing:
    description += f" Not in this build, so not run: {', '.join(missing)}."
  return Study(
      description=description,
      runs=tuple(runs),
      seeds=(0, 1, 2),
      metrics=("eval/loss", "eval/perplexity", "eval/moe/*/max_load_violation",
               "eval/moe/*/dropped_fraction"),
      plots=("eval/loss", "eval/moe/*/max_load_violation"),
      curves=("eval/loss",),
      evaluations=4,
  )
