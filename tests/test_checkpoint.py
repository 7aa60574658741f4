"""Checkpoints: round trip with the data position, restore onto other mesh shapes, SIGTERM flag,
errors in one line. Damaged checkpoints and failing saves: tests/test_faults.py."""

import dataclasses
import os
import pathlib
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments import switch_small
from moejax import checkpoint, config as config_lib, data as data_lib, metrics, sharding, train
from moejax.data import corpora

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


pytestmark = pytest.mark.usefixtures("compile_once")


@pytest.fixture(scope="module")
def ptb_config(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("ptb")
  corpora.build("ptb", data_dir, source_dir=FIXTURES / "ptb")
  config = switch_small.get_config("tiny")
  config.data.update(name="ptb", data_dir=str(data_dir))
  return config


def _mesh(data, expert, devices=None):
  return sharding.make_mesh(sharding.MeshConfig(data, expert, 1), devices=devices)


def test_round_trip_restores_arrays_in_the_requested_layout_and_the_data_position(
    ptb_config, tmp_path):
  experiment = config_lib.experiment_config_from(ptb_config)
  tokenizer = data_lib.prepare(experiment.data)
  iterator = data_lib.train_iterator(experiment.data, tokenizer, batch_size=8)
  next(iterator), next(iterator)
  mesh = _mesh(2, 4)
  tree = {"step": jnp.int32(7),
          "w": jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(mesh, P("expert"))),
          "blocks": {0: {"b": jnp.ones(3)}}}
  manager = checkpoint.Checkpointer(tmp_path)
  assert manager.save(2, tree, iterator)
  assert not manager.save(2, tree, iterator)  # a step is saved once
  manager.wait_until_finished()
  expected_next = next(iterator)

  other = _mesh(1, 8)
  fresh = data_lib.train_iterator(experiment.data, tokenizer, batch_size=8)
  restored = manager.restore(2, checkpoint.abstract_like(tree, other), fresh)
  manager.close()
  np.testing.assert_array_equal(restored["w"], np.arange(64.0).reshape(8, 8))
  assert restored["w"].sharding == NamedSharding(other, P("expert"))
  assert int(restored["step"]) == 7 and restored["blocks"][0]["b"].shape == (3,)
  got_next = next(fresh)
  for key in ("inputs", "targets", "mask"):
    np.testing.assert_array_equal(got_next[key], expected_next[key])


def test_restore_onto_other_mesh_shapes_gives_same_params_and_next_loss(ptb_config, tmp_path):
  # Run A on (data=2, expert=4): checkpoints after steps 2 and 3.
  config = ptb_config.copy_and_resolve_references()
  config.mesh.update(data=2, expert=4)
  config.train.update(num_steps=3, checkpoint_every=2, log_every=1)
  run_a = tmp_path / "a"
  train.train_and_evaluate(config, run_a)
  loss_a = {r["step"]: r["train/loss"] for r in metrics.read_jsonl(run_a / "metrics.jsonl")}

  # Run B resumes A's step-2 checkpoint on (data=1, expert=8) and takes step 3.
  run_b = tmp_path / "b"
  shutil.copytree(run_a, run_b)
  shutil.rmtree(run_b / "checkpoints" / "3")
  config.mesh.update(data=1, expert=8)
  train.train_and_evaluate(config, run_b)
  loss_b = {r["step"]: r["train/loss"] for r in metrics.read_jsonl(run_b / "metrics.jsonl")}
  assert loss_b[2] == loss_a[2]  # steps up to the checkpoint are A's own records
  np.testing.assert_allclose(loss_b[3], loss_a[3], rtol=1e-5)

  # The step-2 parameters restored on (2, 4), (1, 8) and one device are the same numbers.
  experiment = config_lib.experiment_config_from(config)
  tokenizer = data_lib.prepare(experiment.data)
  model_config = dataclasses.replace(experiment.model, vocab_size=tokenizer.vocab_size)
  mesh_a = _mesh(2, 4)
  with jax.set_mesh(mesh_a):
    template = train.create_train_state(model_config, experiment, mesh_a)
  manager = checkpoint.Checkpointer(run_a / "checkpoints")
  restored = {}
  one_device = _mesh(1, 1, devices=jax.devices()[:1])
  for name, mesh in (("2x4", mesh_a), ("1x8", _mesh(1, 8)), ("1", one_device)):
    abstract = checkpoint.abstract_like(template.checkpoint_items(), mesh)
    iterator = data_lib.train_iterator(experiment.data, tokenizer, batch_size=8)
    restored[name] = (manager.restore(2, abstract, iterator), iterator)
  manager.close()
  params = {name: jax.device_get(items["params"]) for name, (items, _) in restored.items()}
  for name in ("1x8", "1"):
    jax.tree.map(np.testing.assert_array_equal, params[name], params["2x4"])
  wi = restored["1x8"][0]["params"]["blocks"][1]["ffn"]["wi"]
  assert wi.sharding.spec == P("expert", None, "model") and len(wi.sharding.device_set) == 8

  # Step 3 on one device, from the restored state and data position, gives A's loss.
  items, iterator = restored["1"]
  with jax.set_mesh(one_device):
    rngs = jax.device_put(template.rngs, NamedSharding(one_device, P()))
    state = template.replace(rngs=rngs, **items)
    step_fn, _ = train.compile_steps(state, one_device, P(("data", "expert")))
    batch = train.device_batch(next(iterator), NamedSharding(one_device, P(("data", "expert"))))
    _, out = step_fn(state, batch)
  np.testing.assert_allclose(float(out["train"]["loss"]), loss_a[3], rtol=1e-5)


def test_preemption_flag_records_sigterm_and_restores_the_handler():
  before = signal.getsignal(signal.SIGTERM)
  with checkpoint.PreemptionFlag() as flag:
    assert not flag.should_stop()
    os.kill(os.getpid(), signal.SIGTERM)
    assert flag.requested and flag.should_stop()
  assert signal.getsignal(signal.SIGTERM) is before


def test_relative_checkpoint_directory_saves_and_restores(tmp_path, monkeypatch):
  """`make train` passes a relative workdir; Orbax alone rejects relative paths."""
  monkeypatch.chdir(tmp_path)
  tree = {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3), "step": jnp.int32(7)}
  checkpointer = checkpoint.Checkpointer("runs/relative/checkpoints")
  assert checkpointer.directory == checkpoint.epath.Path(tmp_path / "runs/relative/checkpoints")
  assert checkpointer.save(7, tree)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(7, checkpoint.abstract_like(tree))
  checkpointer.close()
  np.testing.assert_array_equal(restored["w"], tree["w"])
  assert int(restored["step"]) == 7
  assert (tmp_path / "runs/relative/checkpoints/7").is_dir()


# ----------------------------------------------------------------------------- error messages


def _throw(error):
  raise error


def _raised(make):
  """What `make()` raises, with its causes and traceback as Python set them."""
  try:
    make()
  except BaseException as error:  # pylint: disable=broad-except
    return error
  raise AssertionError("nothing raised")


def test_describe_error_finds_the_os_error_among_the_causes():
  def write():
    try:
      raise OSError(28, "No space left on device", "/ckpt/3.orbax-checkpoint-tmp/d/ab")
    except OSError as error:
      raise RuntimeError("commit failed") from error

  assert checkpoint.describe_error(_raised(write)) == (
      "[Errno 28] No space left on device: '/ckpt/3.orbax-checkpoint-tmp/d/ab'")

  def group():
    raise ExceptionGroup("writes failed", [ValueError("other"), PermissionError(13, "denied")])

  assert checkpoint.describe_error(_raised(group)) == "[Errno 13] denied"


def test_describe_error_reads_the_os_error_in_a_tensorstore_message():
  message = ('OUT_OF_RANGE: Error writing "w/0.0" in OCDBT database at local file '
             '"/ckpt/3.orbax-checkpoint-tmp/state/": Failed writing: '
             '"/ckpt/3.orbax-checkpoint-tmp/state/d/e32e": Failed to write 168937 bytes to file '
             "4: No space left on device [os_error_code='28']\nsecond line")
  error = _raised(lambda: _throw(ValueError(message)))
  assert checkpoint.describe_error(error) == (
      "[Errno 28] No space left on device: '/ckpt/3.orbax-checkpoint-tmp/state/d/e32e'")


def test_describe_error_without_an_os_error_gives_the_innermost_cause_in_one_line():
  import json  # pylint: disable=g-import-not-at-top
  error = _raised(lambda: json.loads("{garbage"))  # raised `from None` over a StopIteration
  assert checkpoint.describe_error(error) == (
      "JSONDecodeError: Expecting property name enclosed in double quotes: line 1 column 2 "
      "(char 1)")

  def wrapped():
    try:
      raise KeyError("state")
    except KeyError as error:
      raise RuntimeError("restore failed\n" + "details " * 100) from error

  assert checkpoint.describe_error(_raised(wrapped)) == "KeyError: 'state'"
  long = checkpoint.describe_error(_raised(lambda: _throw(ValueError("x" * 500))))
  assert len(long) == len("ValueError: ") + 300 and "\n" not in long
