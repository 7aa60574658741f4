"""Study files: `get_study()` returns a `moejax.study.Study` (runs x seeds, metrics to report).

    python -m moejax.study NAME            # or: make study STUDY=NAME
    python -m moejax.study NAME --list     # the runs, seeds and their state; trains nothing

The studies (docs/studies/README.md has each one's claim and results):

    compare          dense_small, switch_small, gshard_small (`make compare`)
    routers          every router kind of this build, plus dense
    num_experts      dense, then 2 to 32 experts, top-1 (Switch Transformer, Fig. 4)
    capacity_factor  training capacity factors 0.5 to 2.0, top-1 and top-2 (Switch, Table 1)
    precision        float32 and bfloat16 compute (Switch, Table 2)
    balancing        load-balancing weights, z-loss on and off, aux-loss-free bias
    ptb              dense, Switch, GShard on Penn Treebank (test perplexity)

Every study compares at equal active FFN FLOPs per token (tests/test_study.py checks it) and uses
three seeds, since each claims a difference. Not defined: the initialisation-scale study (Switch,
Table 3), because moejax has no setting for it: the router's initialiser scale (0.1, fan-in
truncated normal) and the experts' (1.0) are fixed in `moejax/moe.py`, and the dense layers use
their defaults; a field such as `model.init_scale` is needed first.
"""
