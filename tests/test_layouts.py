"""The mesh layouts of experiments/mesh_layouts.py: golden PartitionSpecs, the trainer's shardings.

Each layout has a golden file, tests/golden/mesh_layout_<layout>.txt, with one line per parameter
of the full-size model: its path, global shape, PartitionSpec (`sharding.partition_specs` with the
experiment's rules) and the shape of the shard each device holds on the layout's 8-device mesh.
The model is built abstractly (`nnx.eval_shape`), so these tests allocate nothing large.

After an intended change (new parameters, other rules), regenerate and review the goldens:

    MOEJAX_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_layouts.py -k golden
    git diff tests/golden
"""

import os
import pathlib
import re

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments import mesh_layouts
from moejax import config as config_lib
from moejax import sharding, train
from moejax.model import Transformer

GOLDEN_DIR = pathlib.Path(__file__).resolve().parent / "golden"
LAYOUTS = sorted(mesh_layouts.LAYOUTS)
UPDATE = os.environ.get("MOEJAX_UPDATE_GOLDEN") == "1"


def _experiment(arg: str):
  return config_lib.experiment_config_from(mesh_layouts.get_config(arg), num_devices=8,
                                           num_processes=1)


def _flat(tree, is_leaf) -> dict[str, object]:
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf
          for path, leaf in leaves}


def _layout_table(arg: str) -> list[tuple[str, tuple[int, ...], P, tuple[int, ...]]]:
  """(path, shape, spec, per-device shard shape) of every parameter, built abstractly."""
  experiment = _experiment(arg)
  mesh = sharding.make_mesh(experiment.mesh)
  with jax.set_mesh(mesh):
    model = nnx.eval_shape(lambda: Transformer(experiment.model, rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  is_variable = lambda x: isinstance(x, nnx.Variable)
  specs = _flat(sharding.partition_specs(params, experiment.sharding_rules),
                lambda x: isinstance(x, P))
  shapes = {path: tuple(v.get_value().shape) for path, v in _flat(params, is_variable).items()}
  assert specs.keys() == shapes.keys()
  return [(path, shapes[path], specs[path], NamedSharding(mesh, specs[path]).shard_shape(
      shapes[path])) for path in sorted(shapes)]


def _golden_text(layout: str) -> str:
  sizes = mesh_layouts.LAYOUTS[layout]
  lines = [
      f"# experiments/mesh_layouts.py:{layout} (full size) on 8 devices: mesh "
      + " ".join(f"{axis}={size}" for axis, size in sizes.items()),
      "# regenerate: MOEJAX_UPDATE_GOLDEN=1 pytest tests/test_layouts.py -k golden",
      f"# {'parameter':<30} {'shape':<16} {'PartitionSpec':<32} per-device shard",
  ]
  for path, shape, spec, shard in _layout_table(layout):
    lines.append(f"{path:<32} {str(shape):<16} {str(spec):<32} {shard}")
  return "\n".join(lines) + "\n"


def _golden_path(layout: str) -> pathlib.Path:
  return GOLDEN_DIR / f"mesh_layout_{layout}.txt"


def _golden_specs(layout: str) -> dict[str, str]:
  """path -> PartitionSpec text, read from the golden file."""
  out = {}
  for line in _golden_path(layout).read_text().splitlines():
    if line.startswith("#"):
      continue
    match = re.fullmatch(r"(\S+) +(\([\d, ]*\)) +(P\(.*\)) +(\([\d, ]*\))", line)
    assert match, f"unreadable golden line: {line!r}"
    out[match.group(1)] = match.group(3)
  return out


# ----------------------------------------------------------------------------- golden files


@pytest.mark.parametrize("layout", LAYOUTS)
def test_golden_partition_specs(layout):
  text, path = _golden_text(layout), _golden_path(layout)
  if UPDATE:
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
  assert path.exists(), f"{path} is missing; create it with MOEJAX_UPDATE_GOLDEN=1."
  assert text == path.read_text(), (
      f"the partition specs of layout {layout!r} differ from {path}; if the change is intended, "
      "regenerate with MOEJAX_UPDATE_GOLDEN=1 and review `git diff tests/golden`.")


def test_golden_files_cover_exactly_the_layouts():
  assert sorted(p.name for p in GOLDEN_DIR.glob("mesh_layout_*.txt")) == [
      f"mesh_layout_{layout}.txt" for layout in LAYOUTS]


def test_shard_shapes_by_hand():
  """Shards worked out by hand for an MoE layer's wi (E=8, M=128, F=512) and attention wq."""
  shards = {layout: {path: shard for path, _, _, shard in _layout_table(layout)}
            for layout in LAYOUTS}
  wi, wq = "blocks/1/ffn/wi", "blocks/1/attention/wq"  # wq: (M=128, H=4, D=32)
  assert {layout: shards[layout][wi] for layout in LAYOUTS} == {
      "data_parallel": (8, 128, 512),  # every expert everywhere
      "expert_parallel": (1, 128, 512),  # one expert per device
      "expert_data": (2, 128, 512),  # 8 experts over 4 expert shards
      "expert_model": (2, 128, 256),  # ... and F halved over model=2
  }
  assert {layout: shards[layout][wq] for layout in LAYOUTS} == {
      "data_parallel": (128, 4, 32), "expert_parallel": (128, 4, 32),
      "expert_data": (128, 4, 32), "expert_model": (128, 2, 32)}  # heads over model=2
  # Without a model axis, every parameter but the MoE blocks' (1 and 3) experts is whole on
  # every device.
  experts = {f"blocks/{block}/ffn/{w}" for block in (1, 3) for w in ("wi", "wo")}
  for layout in ("data_parallel", "expert_parallel", "expert_data"):
    for path, shape, _, shard in _layout_table(layout):
      assert (shard == shape) == (path not in experts or layout == "data_parallel"), path


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_configs_fit_eight_devices(layout):
  for arg in (layout, f"{layout}:tiny"):
    experiment = _experiment(arg)
    expected = tuple(mesh_layouts.LAYOUTS[layout][axis] for axis in sharding.MESH_AXES)
    assert experiment.mesh.resolve(8) == expected
    assert experiment.sharding_rules == sharding.DEFAULT_RULES
  assert _experiment(f"{layout}:tiny").model.model_dim == 32


def test_unknown_layout_names_the_choices():
  with pytest.raises(ValueError, match=r"'pipeline'.*'data_parallel'"):
    mesh_layouts.get_config("pipeline")
  with pytest.raises(ValueError, match="layout ''"):
    mesh_layouts.get_config(None)
  with pytest.raises(ValueError, match="'huge'"):
    mesh_layouts.get_config("expert_data:huge")


# ----------------------------------------------------------------------------- the trainer

def _batches(num: int, batch_size: int = 8, seq_len: int = 16, vocab: int = 512):
  """Fixed random token batches; the last row's final 5 targets are padding."""
  rng = np.random.default_rng(0)
  out = []
  for _ in range(num):
    mask = np.ones((batch_size, seq_len), bool)
    mask[-1, -5:] = False
    out.append({"inputs": rng.integers(3, vocab, (batch_size, seq_len), dtype=np.int32),
                "targets": rng.integers(3, vocab, (batch_size, seq_len), dtype=np.int32),
                "mask": mask})
  return out


def _train_losses(experiment, mesh, check_state=None, num_steps: int = 2) -> list[float]:
  """The losses of `num_steps` trainer steps on `_batches`; `check_state(state)` sees the
  initial state first (training donates its buffers)."""
  batch_spec = sharding.logical_to_spec(("batch", None), experiment.sharding_rules)
  with jax.set_mesh(mesh):
    state = train.create_train_state(experiment.model, experiment, mesh)
    if check_state is not None:
      check_state(state)
    train_fn, _ = train.compile_steps(state, mesh, batch_spec)
    losses = []
    for batch in _batches(num_steps):
      state, metrics = train_fn(state, train.device_batch(batch, NamedSharding(mesh, batch_spec)))
      losses.append(float(metrics["train"]["loss"]))
  return losses


@pytest.fixture(scope="module")
def one_device_losses():
  config = mesh_layouts.get_config("data_parallel:tiny")
  config.mesh.update(data=1, expert=1, model=1)
  experiment = config_lib.experiment_config_from(config, num_devices=1, num_processes=1)
  mesh = sharding.make_mesh(experiment.mesh, devices=jax.devices()[:1])
  return _train_losses(experiment, mesh)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_trainer_shardings_match_the_goldens_and_losses_match_one_device(layout,
                                                                          one_device_losses):
  """Tiny variant: the trainer's parameters carry the golden specs; training matches 1 device.

  Losses: the layouts sum the same float32 numbers in other orders (token-shard reductions, F
  split over "model"), so they agree with one device to a few ulps; rtol 1e-6 (measured: at most
  7e-8 relative, i.e. one ulp).
  """
  experiment = _experiment(f"{layout}:tiny")
  mesh = sharding.make_mesh(experiment.mesh)
  check = lambda state: _check_golden_shardings(layout, state.params, mesh)
  losses = _train_losses(experiment, mesh, check)
  np.testing.assert_allclose(losses, one_device_losses, rtol=1e-6)
  assert losses[0] != losses[1]  # the update changed the model


def _check_golden_shardings(layout, params, mesh):
  golden = _golden_specs(layout)
  params = _flat(params, lambda x: isinstance(x, jax.Array))
  assert params.keys() <= golden.keys()  # the tiny model has blocks 0-1 of the full model's 0-3
  assert {p.split("/")[1] for p in golden if p.startswith("blocks/")} == {"0", "1", "2", "3"}
  for path, array in params.items():
    assert isinstance(array.sharding, NamedSharding) and array.sharding.mesh == mesh, path
    assert str(array.sharding.spec) == golden[path], path
    expected_shard = array.sharding.shard_shape(array.shape)
    assert len(array.addressable_shards) == 8
    for shard in array.addressable_shards:
      assert shard.data.shape == expected_shard, path
    # Devices that hold the same block hold the same numbers (replicas agree).
    by_index = {}
    for shard in array.addressable_shards:
      key = tuple((s.start, s.stop) for s in shard.index)
      by_index.setdefault(key, []).append(np.asarray(shard.data))
    for copies in by_index.values():
      for copy in copies[1:]:
        np.testing.assert_array_equal(copy, copies[0], err_msg=path)
