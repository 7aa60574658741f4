"""The trainer carries the routers' non-parameter state (the aux-loss-free balancing bias).

The bias moves after every training step by rate * sign(mean load - load), is not touched by the
optimizer, is checkpointed, and a resumed run continues it bitwise.
"""


import jax
import numpy as np
import pytest

from experiments import switch_small
from moejax import metrics, train

RATE = 0.01

pytestmark = pytest.mark.usefixtures("compile_once")


def _config(ptb_dir, num_steps):
  config = switch_small.get_config("tiny")
  config.data.update(name="ptb", data_dir=ptb_dir)
  config.mesh.update(data=2, expert=4)
  config.train.update(num_steps=num_steps, log_every=1, checkpoint_every=2)
  config.optimizer.decay_steps = 4  # the same schedule whatever num_steps a shortened run has
  config.model.moe.router.balance.bias_update_rate = RATE
  return config


def _bias_records(workdir):
  """Per step: the layer's bias as logged ("moe/layer_1/balance_bias/e") and the loads."""
  out = {}
  for record in metrics.read_jsonl(workdir / "metrics.jsonl"):
    prefix = "moe/layer_1/balance_bias/"
    bias = [record[f"{prefix}{e}"] for e in range(8)]
    out[record["step"]] = (record["train/loss"], bias)
  return out


def _final_bias(workdir, ptb_dir, num_steps):
  """The bias in the newest checkpoint, read back through the trainer's own restore."""
  return _saved_router_state(workdir, _config(ptb_dir, num_steps))[0]


def _saved_router_state(workdir, config):
  """The leaves of the router state in the newest checkpoint of `workdir`."""
  from moejax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from moejax import config as config_lib  # pylint: disable=g-import-not-at-top
  from moejax import data as data_lib  # pylint: disable=g-import-not-at-top
  from moejax import sharding  # pylint: disable=g-import-not-at-top
  experiment = config_lib.experiment_config_from(config)
  mesh = sharding.make_mesh(experiment.mesh)
  tokenizer = data_lib.prepare(experiment.data)
  model_config = train._with_vocab(experiment.model, tokenizer.vocab_size, config)  # pylint: disable=protected-access
  with jax.set_mesh(mesh):
    state = train.create_train_state(model_config, experiment, mesh)
    checkpointer = checkpoint_lib.Checkpointer(workdir / "checkpoints")
    restored = checkpointer.restore(checkpointer.latest_step(),
                                    checkpoint_lib.abstract_like(state.checkpoint_items()))
    checkpointer.close()
  return [np.asarray(leaf) for leaf in jax.tree.leaves(restored["router_state"])]


def test_bias_moves_by_the_rule_is_checkpointed_and_resumes_bitwise(ptb_dir, tmp_path):
  full_dir, half_dir = tmp_path / "full", tmp_path / "half"
  train.train_and_evaluate(_config(ptb_dir, 4), full_dir)
  train.train_and_evaluate(_config(ptb_dir, 2), half_dir)
  train.train_and_evaluate(_config(ptb_dir, 4), half_dir)
  full, half = _bias_records(full_dir), _bias_records(half_dir)
  assert sorted(full) == sorted(half) == [1, 2, 3, 4]
  for step in full:  # losses and the bias each step saw, bitwise
    assert full[step] == half[step], step
  # The logged bias is the one a step routed with: 0 at step 1, then one update per step, each
  # of +-RATE (or 0 for an expert exactly at the mean load).
  biases = np.array([full[s][1] for s in sorted(full)])
  assert np.all(biases[0] == 0.0)
  steps = np.diff(biases, axis=0)
  np.testing.assert_allclose(np.abs(steps[np.abs(steps) > 0]), RATE, rtol=1e-6)
  assert np.any(steps != 0)
  # The checkpoint holds the bias after the last update: step 4's logged bias plus one more move.
  saved = _final_bias(full_dir, ptb_dir, 4)
  last_move = saved - biases[-1]
  assert np.all(np.isclose(np.abs(last_move), RATE, rtol=1e-6) | (last_move == 0))
  np.testing.assert_array_equal(saved, _final_bias(half_dir, ptb_dir, 4))


def test_a_balanced_hash_table_is_built_from_the_training_counts(ptb_dir, tmp_path):
  from moejax import config as config_lib  # pylint: disable=g-import-not-at-top
  from moejax import data as data_lib  # pylint: disable=g-import-not-at-top
  from moejax.routing import hash_routing  # pylint: disable=g-import-not-at-top
  config = _config(ptb_dir, 1)
  config.model.moe.router.update(kind="hash")
  config.model.moe.router.balance.bias_update_rate = 0.0
  config.model.moe.router.hash.table = "balanced"
  train.train_and_evaluate(config, tmp_path)
  (table,) = _saved_router_state(tmp_path, config)
  experiment = config_lib.experiment_config_from(config)
  tokenizer = data_lib.prepare(experiment.data)
  counts = data_lib.count_tokens(experiment.data, tokenizer)
  expected = hash_routing.balanced_table(counts, 8, 0)
  np.testing.assert_array_equal(table[:counts.shape[0]], expected)
  # Balanced: the experts' shares of the training tokens differ by at most the largest count.
  loads = np.bincount(expected, weights=counts, minlength=8)
  assert loads.max() - loads.min() <= counts.max()
  assert not np.array_equal(table, hash_routing.random_table(table.shape[0], 8, 0))
