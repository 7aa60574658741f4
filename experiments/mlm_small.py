"""mlm_small: switch_small as a bidirectional masked LM, where every router is legitimate.

    python -m moejax.main --config=experiments/mlm_small.py --workdir=runs/mlm_small

As `switch_small` (4 blocks, every second one an MoE layer of 8 top-1 experts of width F=512, one
routing group per sequence, the same data, batch, steps and optimizer), but trained with the
masked-LM objective (`model.objective="masked_lm"`, moejax/objective.py): attention is
bidirectional, 15% of the real tokens (at least one per sequence) are chosen, of which 80% become
the mask token, 10% a random token and 10% stay, and the loss is the cross-entropy of the original
tokens at the chosen positions. The vocabulary is the tokenizer's 2048 pieces plus the mask token.

Because every position sees the whole sequence anyway, routers that look at later tokens of
their group (expert choice, soft MoE, Sinkhorn in training) leak nothing here: compare routers
in this setting with, for example,

    python -m moejax.main --config=experiments/mlm_small.py --workdir=runs/mlm_expert_choice \\
      --config.model.moe.router.kind=expert_choice

(kinds that take k, such as topk, noisy_topk, sinkhorn or random, also need
`--config.model.moe.router.k=1` to keep switch_small's active FLOPs).

The reported "loss" and "perplexity" are the masked-token loss and exp of it: a masked-token
perplexity, not comparable with the causal experiments' numbers.

Hardware: one CPU; on 8 devices, `--config.mesh.expert=8` shards the experts.
Run time: 7 minutes on the 2-core development machine, nothing else running (5.6k tokens/s).

Measured result (seed 0, 500 steps, the command above): validation masked-token loss 4.671,
masked-token perplexity 106.8 over 9,950 masked tokens; 0.68% and 0.46% of the tokens of the two
MoE layers dropped at evaluation (capacity factor 2.0). One seed; router comparisons in this
setting are not yet run.
"""

from experiments import base


def get_config(arg: str | None = None):
  config = base.get_config()
  base.set_moe(config, kind="switch", ffn_dim=config.model.ffn_dim)
  config.model.objective = "masked_lm"
  config.model.masked_lm.update(mask_rate=0.15, mask_token_fraction=0.8,
                                random_token_fraction=0.1)
  return base.apply_variant(config, arg)
