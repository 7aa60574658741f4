"""Mesh configuration, mesh construction, logical-axis rules and the MoE layer's partition specs."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from moejax import sharding
from moejax.moe import MoeConfig, MoeLayer
from moejax.routing import RouterConfig
from moejax.sharding import MeshConfig


@pytest.mark.parametrize("config,devices,expected", [
    (MeshConfig(), 8, (8, 1, 1)),  # data=-1 takes everything
    (MeshConfig(data=2, expert=-1), 8, (2, 4, 1)),
    (MeshConfig(data=-1, expert=2, model=2), 8, (2, 2, 2)),
    (MeshConfig(data=1, expert=8, model=1), 8, (1, 8, 1)),
    (MeshConfig(data=1, expert=4, model=-1), 8, (1, 4, 2)),
    (MeshConfig(data=-1, expert=4), 4, (1, 4, 1)),
])
def test_mesh_config_resolves(config, devices, expected):
  assert config.resolve(devices) == expected


@pytest.mark.parametrize("make,message", [
    (lambda: MeshConfig(data=0), r"mesh\.data=0 must be a positive integer or -1"),
    (lambda: MeshConfig(expert=-2), r"mesh\.expert=-2 must be a positive integer or -1"),
    (lambda: MeshConfig(model=1.5), r"mesh\.model=1\.5 must be an integer"),
    (lambda: MeshConfig(data=-1, expert=-1), r"at most one axis may be -1"),
    (lambda: MeshConfig(data=-1, expert=3).resolve(8),
     r"fixed axes \(3 devices\) do not divide the 8 devices"),
    (lambda: MeshConfig(data=2, expert=2, model=1).resolve(8), r"needs 4 devices but 8 are"),
    (lambda: MeshConfig(data=4, expert=4, model=1).resolve(8), r"needs 16 devices but 8 are"),
])
def test_mesh_config_errors(make, message):
  with pytest.raises(ValueError, match=message):
    make()


@pytest.mark.parametrize("shape", [(2, 4, 1), (1, 8, 1), (1, 4, 2), (8, 1, 1)])
def test_make_mesh_axis_sizes_and_layout(shape):
  mesh = sharding.make_mesh(MeshConfig(*shape))
  assert mesh.axis_names == ("data", "expert", "model")
  assert tuple(mesh.axis_sizes) == shape
  assert mesh.devices.shape == shape
  assert all(t == AxisType.Explicit for t in mesh.axis_types)
  # Devices fill the mesh in order: the last axis varies fastest.
  ids = np.vectorize(lambda d: d.id)(mesh.devices)
  np.testing.assert_array_equal(ids.reshape(-1), [d.id for d in jax.devices()])
  for axis, size in zip(("data", "expert", "model"), shape):
    assert sharding.mesh_axis_size(mesh, axis) == size


def test_make_mesh_on_a_subset_of_devices():
  mesh = sharding.make_mesh(MeshConfig(data=-1, expert=2), devices=jax.devices()[:4])
  assert tuple(mesh.axis_sizes) == (2, 2, 1)
  assert sharding.mesh_axis_size(mesh, "absent") == 1
  assert sharding.mesh_axis_size(None, "expert") == 1


def test_logical_to_spec_default_rules():
  assert sharding.logical_to_spec(("batch", "length", "embed")) == P(("data", "expert"), None,
                                                                      None)
  assert sharding.logical_to_spec(("expert", "embed", "mlp")) == P("expert", None, "model")
  assert sharding.logical_to_spec(("embed", None)) == P(None, None)
  assert sharding.logical_to_spec(()) == P()


def test_logical_to_spec_custom_rules_and_unknown_axis():
  rules = (("batch", "data"), ("mlp", None), ("expert", ("expert", "model")))
  assert sharding.logical_to_spec(("batch", "expert", "mlp"), rules) == P(
      "data", ("expert", "model"), None)
  with pytest.raises(ValueError, match=r"logical axis 'heads' has no sharding rule; known axes: "
                     r"\['batch', 'expert', 'mlp'\]"):
    sharding.logical_to_spec(("batch", "heads"), rules)


def test_param_checks_the_number_of_axes():
  p = sharding.param(np.zeros((2, 3), np.float32), ("embed", "mlp"))
  assert p.get_metadata()["logical_axes"] == ("embed", "mlp")
  with pytest.raises(ValueError, match=r"logical_axes=\('embed',\) do not match a value of "
                     r"shape \(2, 3\)"):
    sharding.param(np.zeros((2, 3), np.float32), ("embed",))


def _abstract_layer(activation="relu", jitter_eps=0.0):
  config = MoeConfig(router=RouterConfig(num_experts=8, jitter_eps=jitter_eps), ffn_dim=32,
                     group_size=8, activation=activation)
  return nnx.eval_shape(lambda: MoeLayer(16, config, rngs=nnx.Rngs(0)))


def test_partition_specs_of_the_moe_layer():
  specs = sharding.partition_specs(nnx.state(_abstract_layer(jitter_eps=0.1)))
  flat = {".".join(map(str, path)): spec for path, spec in nnx.to_flat_state(specs)}
  assert all(entry is None for entry in flat.pop("router")), "the router must be replicated"
  assert flat.pop("wi") == P("expert", None, "model")
  assert flat.pop("wo") == P("expert", "model", None)
  # What is left is the layer's random-number state: replicated.
  assert flat and all(spec == P() for spec in flat.values()), flat


def test_partition_specs_of_the_swiglu_gate():
  layer = _abstract_layer(activation="swiglu")
  specs = sharding.partition_specs(nnx.state(layer))
  assert specs["wg"] == P("expert", None, "model")


def test_shardings_place_the_moe_layer_on_a_mesh():
  mesh = sharding.make_mesh(MeshConfig(data=1, expert=4, model=2))
  state = nnx.state(_abstract_layer())
  named = sharding.shardings(state, mesh)
  flat = dict(nnx.to_flat_state(named))
  assert all(isinstance(s, NamedSharding) and s.mesh == mesh for s in flat.values())
  wi = flat[("wi",)]
  # (E, M, F) = (8, 16, 32) over expert=4 and model=2: each device holds (2, 16, 16).
  assert wi.shard_shape((8, 16, 32)) == (2, 16, 16)
  assert flat[("wo",)].shard_shape((8, 32, 16)) == (2, 16, 16)
  assert flat[("router",)].shard_shape((16, 8)) == (16, 8)
