"""mesh_layouts: switch_small on 8 devices under four ways of laying the mesh out.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m moejax.main \
        --config=experiments/mesh_layouts.py:expert_data --workdir=runs/expert_data
    launch/local.sh 2 --config=experiments/mesh_layouts.py:expert_parallel:tiny --workdir=/tmp/ep

The argument names a layout, optionally followed by ":tiny" (base.py's smoke-test variant):

    layout            data expert model   where the 8 experts (E, M, F) of each MoE layer live
    data_parallel        8      1     1   all 8 on every device; no all-to-all crosses devices
    expert_parallel      1      8     1   one expert per device; all-to-alls span all 8 devices
    expert_data          2      4     1   2 experts per device, two copies (one per data row);
                                          all-to-alls within each row of 4 devices
    expert_model         1      4     2   2 experts per device, each with half of its F (the other
                                          half on the device's "model" partner; heads and the
                                          dense FFN's F are split over "model" too)

The model, data, optimizer and sharding rules are switch_small's (DEFAULT_RULES: tokens over
("data", "expert"), experts over "expert", F and heads over "model"); only `config.mesh` differs.
tests/golden/mesh_layout_<layout>.txt lists every parameter's PartitionSpec and per-device shard
shape under each layout, and tests/test_layouts.py checks them.

Hardware: 8 devices (on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=8, or
launch/local.sh N for N processes). The layouts compute the same function: the tokens of one
routing group (one sequence) never span devices, so training losses agree across layouts to
float32 rounding (tests/test_layouts.py compares the tiny variant's first steps with one device:
within one ulp). A full run was not timed here; it should end close to switch_small's result
(see its docstring), more slowly on 8 simulated devices of a 2-core CPU.
"""

from experiments import switch_small

LAYOUTS = {
    "data_parallel": dict(data=8, expert=1, model=1),
    "expert_parallel": dict(data=1, expert=8, model=1),
    "expert_data": dict(data=2, expert=4, model=1),
    "expert_model": dict(data=1, expert=4, model=2),
}


def get_config(arg: str | None = None):
  """`arg`: "LAYOUT" or "LAYOUT:VARIANT" with LAYOUT from `LAYOUTS`, VARIANT from base.VARIANTS."""
  layout, _, variant = (arg or "").partition(":")
  if layout not in LAYOUTS:
    raise ValueError(f"mesh_layouts: layout {layout!r} is not known; choose one of "
                     f"{sorted(LAYOUTS)}, optionally followed by ':tiny' "
                     "(e.g. --config=experiments/mesh_layouts.py:expert_data:tiny).")
  config = switch_small.get_config(variant or None)
  config.mesh.update(LAYOUTS[layout])
  return config

