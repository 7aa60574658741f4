"""balancing: load-balancing loss weights, the router z-loss, and aux-loss-free balancing.

    python -m moejax.study balancing

Runs, all switch_small (top-1, 8 experts) at equal active FFN FLOPs per token:

* `model.moe.router.load_balancing_loss_weight` 0, 1e-3, 1e-2 (the experiments') and 1e-1
  (Switch Transformer, Fedus et al. 2021: 1e-2 balances without hurting quality);
* the router z-loss off (`z_loss_weight=0` against 1e-3; ST-MoE, Zoph et al. 2022: the z-loss
  keeps router logits small and training stable, at no cost in quality);
* aux-loss-free balancing (Wang et al. 2024, DeepSeek-V3): no load-balancing loss, a per-expert
  selection bias updated by `model.moe.router.balance.bias_update_rate=1e-3` (the paper's),
  and at 3e-3 and 1e-2 for this short run.

Reported: quality, MaxVio (how far the busiest expert is above the mean load; Wang et al.), the
dropped fraction and the router z-loss, the mean squared log-partition of the router logits,
which measures their magnitude (moejax logs no other logit statistic).

Run time: 5 minutes per run on the 2-core development machine, two at a time with nothing else
running (21 runs trained, lb0.01 shared with num_experts' e8). Measured result
(2026-11-26, 3 seeds): validation loss 4.2558 (no balancing), 4.2190 (1e-3), 4.1984 (1e-2),
4.2196 (1e-1): 1e-2 is best, as Switch reports; the z-loss cuts the logits' squared
log-partition from 9.93 to 0.78 at no cost in quality (4.1924 without it); aux-loss-free at
u = 1e-3 balances training as well as the loss but trails it by 0.019 (2.1 standard errors):
in 500 steps its sign updates move a bias by at most 0.5; at u = 3e-3 (4.2026) and 1e-2
(4.1942) it is level with the loss (docs/studies/README.md).
"""

from moejax.study import Run, Study

SWITCH = "experiments/switch_small.py"
ROUTER = "model.moe.router"


def get_study() -> Study:
  runs = [Run(f"lb{weight:g}", SWITCH, overrides=(f"{ROUTER}.load_balancing_loss_weight={weight}",))
          for weight in (0.0, 1e-3, 1e-2, 1e-1)]
  runs.append(Run("no_z_loss", SWITCH, overrides=(f"{ROUTER}.z_loss_weight=0.0",),
                  note="load balancing 1e-2"))
  runs.append(Run("aux_loss_free", SWITCH,
                  overrides=(f"{ROUTER}.load_balancing_loss_weight=0.0",
                             f"{ROUTER}.balance.bias_update_rate=0.001"),
                  note="bias update rate 1e-3, no balancing loss"))
  # Faster bias updates: in a 500-step run a sign update of 1e-3 moves a bias at most 0.5.
  runs += [Run(f"aux_loss_free_u{rate:g}", SWITCH,
               overrides=(f"{ROUTER}.load_balancing_loss_weight=0.0",
                          f"{ROUTER}.balance.bias_update_rate={rate}"),
               note=f"bias update rate {rate:g}, no balancing loss")
           for rate in (3e-3, 1e-2)]
  return Study(
      description=(
          "Load balancing: the Switch load-balancing loss at weights 0 to 1e-1, the ST-MoE "
          "router z-loss on and off, and DeepSeek's aux-loss-free bias: quality, MaxVio, "
          "dropped tokens and router logit magnitude (the z-loss)."),
      runs=tuple(runs),
      seeds=(0, 1, 2),
      metrics=("eval/loss", "eval/moe/*/max_load_violation", "moe/*/max_load_violation",
               "eval/moe/*/dropped_fraction", "eval/moe/*/router_z_loss"),
      plots=("eval/loss", "eval/moe/*/max_load_violation", "eval/moe/*/router_z_loss"),
      curves=("eval/loss",),
      evaluations=4,
  )
