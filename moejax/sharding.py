"""Meshes, logical axes and partition specs.

Worked example: 8 devices as a mesh (data=2, expert=4, model=1).

    devices      d0 d1 d2 d3 | d4 d5 d6 d7         data index 0 | data index 1
    expert idx    0  1  2  3 |  0  1  2  3

* Tokens (the batch) are split over ("data", "expert") jointly: 8 shards, one per device.
* Expert weights (E, M, F) are split over "expert" on E: with E = 8, devices with expert index j
  hold experts 2j and 2j+1 (the two data rows hold the same copy).
* F is split over "model" (size 1 here); the router and the other non-expert weights are replicated.

Model code names *logical* axes only ("batch", "expert", "embed", "mlp", ...). A short rules table,
set in the experiment config, maps them to mesh axes; `logical_to_spec` applies it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import ClassVar

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from moejax import typed_config
from moejax.typed_config import ConfigError

DATA, EXPERT, MODEL = "data", "expert", "model"
MESH_AXES = (DATA, EXPERT, MODEL)
# Mesh axes that split tokens: the batch is sharded over data and expert jointly.
TOKEN_AXES = (DATA, EXPERT)

# logical axis -> mesh axis (or tuple of mesh axes, or None for replicated).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", TOKEN_AXES),
    ("expert", EXPERT),
    ("mlp", MODEL),
    ("heads", MODEL),
    ("embed", None),
    ("vocab", None),
    ("kv", None),
    ("length", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes (`mesh`); one of them may be -1, meaning "all remaining devices"."""

  PATH: ClassVar[str] = "mesh"

  data: int = -1
  expert: int = 1
  model: int = 1

  def __post_init__(self):
    typed_config.check_fields(self)
    sizes = dataclasses.asdict(self)
    for name, size in sizes.items():
      if size < 1 and size != -1:
        raise ConfigError(f"mesh.{name}", size, "must be a positive integer or -1 (the rest).")
    if list(sizes.values()).count(-1) > 1:
      raise ConfigError("mesh", sizes, "is not allowed: at most one axis may be -1.")

  def resolve(self, num_devices: int) -> tuple[int, int, int]:
    sizes = dataclasses.asdict(self)
    known = math.prod(s for s in sizes.values() if s != -1)
    if -1 in sizes.values():
      if num_devices % known:
        raise ValueError(
            f"mesh={sizes}: the fixed axes ({known} devices) do not divide the {num_devices} "
            "devices available.")
      sizes = {k: (num_devices // known if v == -1 else v) for k, v in sizes.items()}
    if math.prod(sizes.values()) != num_devices:
      raise ValueError(
          f"mesh={sizes} needs {math.prod(sizes.values())} devices but {num_devices} are "
          "available.")
    return sizes[DATA], sizes[EXPERT], sizes[MODEL]


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None
              ) -> jax.sharding.Mesh:
  """A (data, expert, model) mesh over `devices` (default: all devices of all processes).

  Axes are Explicit: jit under `jax.set_mesh(mesh)` and arrays carry their shardings in their types.
  The expert axis is innermost-but-one so that, on a pod, expert all-to-alls stay within a slice
  of neighbouring devices whenever the axis is smaller than the slice.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = config.resolve(len(devices))
  device_array = np.asarray(devices, dtype=object).reshape(shape)
  return jax.sharding.Mesh(device_array, MESH_AXES, axis_types=(AxisType.Explicit,) * 3)


def logical_to_spec(logical_axes: Sequence[str | None],
                    rules: Sequence[tuple[str, str | tuple[str, ...] | None]] = DEFAULT_RULES
                    ) -> P:
  """Maps logical axis names to a PartitionSpec; unknown names raise ValueError."""
  table: Mapping = dict(rules)
  spec = []
  for name in logical_axes:
    if name is None:
      spec.append(None)
    elif name in table:
      spec.append(table[name])
    else:
      raise ValueError(
          f"logical axis {name!r} has no sharding rule; known axes: {sorted(table)}.")
  return P(*spec)


def param(value: jax.Array, logical_axes: tuple[str | None, ...]) -> nnx.Param:
  """An nnx.Param that records its logical axes (read by `partition_specs`)."""
  if len(logical_axes) != value.ndim:
    raise ValueError(f"logical_axes={logical_axes} do not match a value of shape {value.shape}.")
  return nnx.Param(value, logical_axes=logical_axes)


def partition_specs(state, rules=DEFAULT_RULES):
  """PartitionSpecs for an nnx.State (or any tree of Variables) from their `logical_axes`."""

  def spec(variable):
    axes = variable.get_metadata().get("logical_axes")
    return logical_to_spec(axes, rules) if axes is not None else P()

  return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shardings(state, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES):
  """NamedShardings for an nnx.State on `mesh`."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), partition_specs(state, rules))


def mesh_axis_size(mesh, axis: str) -> int:
  """Size of `axis` on `mesh` (an abstract or concrete mesh), 1 if absent or no mesh."""
  if mesh is None or mesh.empty or axis not in mesh.axis_names:
    return 1
  return dict(zip(mesh.axis_names, mesh.axis_sizes))[axis]


def batch_sharded_like(x: jax.Array, ndim: int):
  """`out_sharding` for a result that keeps x's batch (leading axis) sharding, else None.

  Needed only on meshes with Explicit axes, for einsums that contract an axis split over "model"
  (heads, F): there the output sharding is ambiguous and must be stated.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or AxisType.Explicit not in mesh.axis_types:
    return None
  return P(jax.typeof(x).sharding.spec[0], *([None] * (ndim - 1)))
