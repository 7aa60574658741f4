"""The training objectives: causal LM and masked LM (moejax/objective.py).

Config checks, the bidirectional attention of a masked LM, the masks (a function of the seed and
the step only, real tokens only, BERT's replacement shares), the masked-token loss against a
numpy recomputation, and a masked-LM run that resumes bitwise. Runs use the PTB fixture and the
"tiny" variant of experiments/mlm_small.py.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments import mlm_small, switch_small
from moejax import attention as attention_lib
from moejax import config as config_lib
from moejax import data as data_lib
from moejax import metrics, sharding, train
from moejax import routing
from moejax.model import ModelConfig, Transformer
from moejax.moe import MoeConfig
from moejax.objective import MaskedLmConfig, Objective, TrainingObjective
from moejax.routing import RouterConfig
from moejax.typed_config import ConfigError

VOCAB, L = 50, 16


pytestmark = pytest.mark.usefixtures("compile_once")


def mlm_config(data_dir, **train_overrides):
  config = mlm_small.get_config("tiny")
  config.data.update(name="ptb", data_dir=data_dir)
  config.mesh.update(data=2, expert=4)
  config.train.update(train_overrides)
  return config


# ----------------------------------------------------------------------------- config


def test_objective_defaults_to_causal_lm_and_masked_lm_fills_its_group():
  causal = ModelConfig(vocab_size=VOCAB)
  assert causal.objective is Objective.CAUSAL_LM and causal.causal
  assert causal.masked_lm is None
  masked = ModelConfig(vocab_size=VOCAB, objective="masked_lm")
  assert masked.objective is Objective.MASKED_LM and not masked.causal
  assert masked.masked_lm == MaskedLmConfig(mask_rate=0.15, mask_token_fraction=0.8,
                                            random_token_fraction=0.1)


def test_masked_lm_settings_are_an_error_under_causal_lm():
  config = switch_small.get_config("tiny")
  config.model.masked_lm.mask_rate = 0.3
  with pytest.raises(ConfigError, match=r"model\.masked_lm\.mask_rate=0\.3 is not used: "
                     r"model\.objective='causal_lm'"):
    config_lib.experiment_config_from(config, num_devices=1, num_processes=1)


@pytest.mark.parametrize("path, value, message", [
    ("objective", "bert", r"model\.objective='bert' is not allowed; choose one of 'causal_lm', "
     r"'masked_lm'"),
    ("masked_lm.mask_rate", 0.0, r"model\.masked_lm\.mask_rate=0\.0 must be in \(0, 1\]"),
    ("masked_lm.mask_rate", 1.5, r"model\.masked_lm\.mask_rate=1\.5 must be in \(0, 1\]"),
    ("masked_lm.mask_token_fraction", -0.1, r"model\.masked_lm\.mask_token_fraction=-0\.1"),
    ("masked_lm.random_token_fraction", 0.3, r"model\.masked_lm\.random_token_fraction=0\.3 "
     r"must be at most 1 - mask_token_fraction \(0\.2\)"),
    ("vocab_size", 2, r"model\.vocab_size=2 must be >= 3 with model\.objective='masked_lm'"),
])
def test_bad_masked_lm_values_name_the_field(path, value, message):
  config = mlm_small.get_config("tiny")
  node = config.model
  *parents, name = path.split(".")
  for part in parents:
    node = node[part]
  node[name] = value
  with pytest.raises(ConfigError, match=message):
    config_lib.experiment_config_from(config, num_devices=1, num_processes=1)


def test_masked_lm_vocabulary_has_the_mask_token_row(ptb_dir):
  config = mlm_config(ptb_dir)
  experiment = config_lib.experiment_config_from(config)
  tokenizer = data_lib.prepare(experiment.data)
  with_vocab = train._with_vocab  # pylint: disable=protected-access
  assert with_vocab(experiment.model, tokenizer.vocab_size, config).vocab_size == (
      tokenizer.vocab_size + 1)
  config.model.vocab_size = tokenizer.vocab_size  # no room for the mask token
  experiment = config_lib.experiment_config_from(config)
  with pytest.raises(ValueError, match=rf"model.vocab_size={tokenizer.vocab_size} is smaller "
                     r"than the tokenizer's vocabulary \(\d+\) plus the mask token"):
    with_vocab(experiment.model, tokenizer.vocab_size, config)


# ----------------------------------------------------------------------------- attention


def test_bidirectional_attention_mask_excludes_only_padding_keys():
  mask_BL = jnp.array([[False, True, True]])
  allowed = np.asarray(attention_lib.attention_mask(3, mask_BL, causal=False))[0]
  # The padding query 0 sees the real keys and itself; the real queries see the real keys.
  np.testing.assert_array_equal(allowed, [[1, 1, 1], [0, 1, 1], [0, 1, 1]])
  np.testing.assert_array_equal(
      np.asarray(attention_lib.attention_mask(3, None, causal=False))[0], np.ones((3, 3)))


def _tiny_model(objective, moe_every):
  moe = MoeConfig(router=RouterConfig(kind="switch", num_experts=4), ffn_dim=32, group_size=L)
  config = ModelConfig(vocab_size=VOCAB, num_layers=2, model_dim=32, num_heads=4, head_dim=8,
                       ffn_dim=64, moe_every=moe_every, moe=moe if moe_every else None,
                       objective=objective)
  return Transformer(config, rngs=nnx.Rngs(0))


@nnx.jit
def _apply(model, inputs_BL, mask_BL):
  return model(inputs_BL, mask_BL=mask_BL)[0]


@pytest.mark.parametrize("moe_every", [0, 2])
def test_masked_lm_sees_later_tokens_and_causal_lm_does_not(moe_every):
  inputs = jax.random.randint(jax.random.key(3), (2, L), 1, VOCAB)
  changed = inputs.at[:, L - 1].set(inputs[:, L - 1] % (VOCAB - 1) + 1)  # another real id
  mask = jnp.ones((2, L), jnp.bool_)
  for objective, sees_later in (("causal_lm", False), ("masked_lm", True)):
    model = _tiny_model(objective, moe_every)
    before, after = _apply(model, inputs, mask), _apply(model, changed, mask)
    difference = float(np.abs(np.asarray(after[:, 0] - before[:, 0])).max())
    if sees_later:
      assert difference > 1e-3, objective
    else:
      assert difference == 0.0, objective


def test_masked_lm_ignores_padding_content():
  model = _tiny_model("masked_lm", 2)
  inputs = jax.random.randint(jax.random.key(4), (2, L), 1, VOCAB)
  mask = jnp.arange(L)[None, :].repeat(2, axis=0) < 10  # the last 6 positions are padding
  other = jnp.where(mask, inputs, (inputs + 7) % VOCAB)
  before, after = _apply(model, inputs, mask), _apply(model, other, mask)
  np.testing.assert_array_equal(np.asarray(after[:, :10]), np.asarray(before[:, :10]))
  # Without the mask the same change does reach the first positions.
  unmasked = jnp.ones_like(mask)
  assert np.abs(np.asarray(_apply(model, other, unmasked)[:, :10] -
                           _apply(model, inputs, unmasked)[:, :10])).max() > 1e-3


# ----------------------------------------------------------------------------- masks


def _objective(seed=0, **masked_lm):
  return TrainingObjective(kind=Objective.MASKED_LM, vocab_size=VOCAB, seed=seed,
                           masked_lm=MaskedLmConfig(**masked_lm))


def _batch(B=8, length=32, seed=0):
  """Random real tokens; row r has length - 3 * r real positions (padding after), the last row
  none."""
  rng = np.random.default_rng(seed)
  targets = rng.integers(1, VOCAB - 1, size=(B, length)).astype(np.int32)
  real = np.arange(length)[None, :] < (length - 3 * np.arange(B))[:, None]
  real[-1] = False
  inputs = np.roll(targets, 1, axis=1)  # the masked LM does not read them
  return {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(np.where(real, targets, 0)),
          "mask": jnp.asarray(real)}


def _example(objective, batch, step=None, index=None):
  """The objective's example of `batch` at training `step` or evaluation batch `index`."""

  @jax.jit
  def run(batch, counter):
    key = objective.train_key(counter) if index is None else objective.eval_key(counter)
    return objective.example(batch, key)

  return jax.device_get(run(batch, jnp.int32(step if index is None else index)))


def test_masks_are_a_function_of_the_seed_and_the_step():
  batch = _batch()
  at_5 = _example(_objective(), batch, step=5)
  again = _example(_objective(), batch, step=5)
  np.testing.assert_array_equal(again.loss_mask, at_5.loss_mask)
  np.testing.assert_array_equal(again.inputs, at_5.inputs)
  others = [_example(_objective(), batch, step=6), _example(_objective(seed=1), batch, step=5),
            _example(_objective(), batch, index=5)]
  for other in others:
    assert not np.array_equal(other.loss_mask, at_5.loss_mask)
  # An evaluation batch's mask depends on its index alone, the same at every evaluation.
  np.testing.assert_array_equal(_example(_objective(), batch, index=5).loss_mask,
                                others[2].loss_mask)


def test_only_real_tokens_are_chosen_and_every_sequence_gets_one():
  batch = _batch()
  real, targets = np.asarray(batch["mask"]), np.asarray(batch["targets"])
  for step in range(20):
    example = _example(_objective(), batch, step=step)
    chosen = example.loss_mask
    assert not (chosen & ~real).any()
    assert chosen[:-1].sum(axis=1).min() >= 1 and not chosen[-1].any()
    np.testing.assert_array_equal(example.targets, targets)  # the uncorrupted sequence
    np.testing.assert_array_equal(example.mask, real)
    np.testing.assert_array_equal(example.inputs[~chosen], targets[~chosen])


def test_replacement_shares_follow_the_settings():
  batch = _batch(B=64, length=256)
  real, targets = np.asarray(batch["mask"]), np.asarray(batch["targets"])
  mask_id = VOCAB - 1
  example = _example(_objective(), batch, step=0)
  chosen, inputs = example.loss_mask, example.inputs
  np.testing.assert_allclose(chosen.sum() / real.sum(), 0.15, atol=0.01)
  n = chosen.sum()
  as_mask = (inputs == mask_id) & chosen
  changed = (inputs != targets) & chosen & ~as_mask  # random tokens that differ from the original
  np.testing.assert_allclose(as_mask.sum() / n, 0.8, atol=0.03)
  # A random token equals the original with probability 1/(V - 2).
  np.testing.assert_allclose(changed.sum() / n, 0.1 * (1 - 1 / (VOCAB - 2)), atol=0.02)
  assert inputs[real].min() >= 1 and (inputs[real & ~as_mask] < mask_id).all()

  only_mask = _example(_objective(mask_token_fraction=1.0, random_token_fraction=0.0), batch, 0)
  assert (only_mask.inputs[only_mask.loss_mask] == mask_id).all()
  keep = _example(_objective(mask_token_fraction=0.0, random_token_fraction=0.0), batch, 0)
  np.testing.assert_array_equal(keep.inputs, targets)
  only_random = _example(_objective(mask_token_fraction=0.0, random_token_fraction=1.0), batch, 0)
  picked = only_random.inputs[only_random.loss_mask]
  assert (picked >= 1).all() and (picked <= VOCAB - 2).all()
  np.testing.assert_allclose((picked != targets[only_random.loss_mask]).mean(),
                             1 - 1 / (VOCAB - 2), atol=0.02)


def test_masks_do_not_depend_on_the_mesh():
  batch = _batch(B=8, length=32)
  reference = _example(_objective(), batch, step=3)
  mesh = jax.make_mesh((2, 4, 1), sharding.MESH_AXES)
  with jax.set_mesh(mesh):
    sharded = jax.device_put(batch, NamedSharding(mesh, P(("data", "expert"))))
    on_mesh = _example(_objective(), sharded, step=3)
  np.testing.assert_array_equal(on_mesh.loss_mask, reference.loss_mask)
  np.testing.assert_array_equal(on_mesh.inputs, reference.inputs)


def test_causal_lm_example_is_the_batch():
  batch = _batch()
  objective = TrainingObjective(kind=Objective.CAUSAL_LM, vocab_size=VOCAB, seed=0)
  assert objective.train_key(jnp.int32(0)) is None
  example = objective.example(batch, None)
  assert example.inputs is batch["inputs"] and example.targets is batch["targets"]
  assert example.mask is batch["mask"] and example.loss_mask is batch["mask"]


# ----------------------------------------------------------------------------- loss and runs


def _numpy_loss(logits, targets, weight):
  """(sum, count) of -log softmax(logits)[target] over `weight`, in float64."""
  logits = np.asarray(logits, np.float64)
  log_probs = logits - logits.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  picked = np.take_along_axis(log_probs, np.asarray(targets)[..., None], axis=-1)[..., 0]
  return -(picked * weight).sum(), weight.sum()


def test_masked_lm_loss_is_the_cross_entropy_of_the_masked_positions(ptb_dir):
  config = mlm_config(ptb_dir)
  experiment = config_lib.experiment_config_from(config)
  tokenizer = data_lib.prepare(experiment.data)
  with_vocab = train._with_vocab  # pylint: disable=protected-access
  model_config = with_vocab(experiment.model, tokenizer.vocab_size, config)
  mesh = sharding.make_mesh(experiment.mesh)
  batch_np = next(data_lib.train_iterator(experiment.data, tokenizer, batch_size=8))
  with jax.set_mesh(mesh):
    state = train.create_train_state(model_config, experiment, mesh)
    spec = P(("data", "expert"))
    batch = train.device_batch(batch_np, NamedSharding(mesh, spec))
    objective = state.objective
    assert objective.mask_id == tokenizer.vocab_size

    @jax.jit
    def forward(state, batch, step, index):
      train_example = objective.example(batch, objective.train_key(step))
      model = nnx.merge(state.graphdef, state.params, train.step_rngs(state.rngs, step),
                        state.router_state)
      logits, aux = model(train_example.inputs, mask_BL=train_example.mask, train=True)
      eval_example = objective.example(batch, objective.eval_key(index))
      eval_logits, _ = state.model()(eval_example.inputs, mask_BL=eval_example.mask)
      return train_example, logits, aux.aux_loss, eval_example, eval_logits

    reference = jax.device_get(forward(state, batch, state.step, jnp.int32(3)))
    step_fn, evaluate = train.compile_steps(state, mesh, spec)
    evaluated = jax.device_get(evaluate(state, batch, np.int32(3)))
    _, out = jax.device_get(step_fn(state, batch))
  example, logits, aux_loss, eval_example, eval_logits = reference
  assert (example.inputs == tokenizer.vocab_size).any()  # the mask token is in use
  total, count = _numpy_loss(logits, example.targets, example.loss_mask)
  assert out["train"]["target_tokens"] == count == example.loss_mask.sum()
  np.testing.assert_allclose(out["train"]["cross_entropy"], total / count, rtol=1e-5)
  np.testing.assert_allclose(out["train"]["loss"], total / count + aux_loss, rtol=1e-5)
  # Not the loss over every real position: the masked positions alone count.
  everywhere, n = _numpy_loss(logits, example.targets, example.mask)
  assert n > count and abs(everywhere / n - total / count) > 1e-3
  eval_total, eval_count = _numpy_loss(eval_logits, eval_example.targets, eval_example.loss_mask)
  assert evaluated["tokens"] == eval_count
  np.testing.assert_allclose(evaluated["loss_sum"], eval_total, rtol=1e-5)


def _records(workdir):
  return {r["step"]: r for r in metrics.read_jsonl(workdir / "metrics.jsonl")}


@pytest.mark.slow  # three short runs: about 20 s on a quiet 2-core machine, 50 s on a busy one
def test_masked_lm_resume_is_bitwise_exact(ptb_dir, tmp_path, capsys):
  full_dir, half_dir = tmp_path / "full", tmp_path / "half"
  settings = dict(num_steps=4, log_every=1, eval_every=2, eval_batches=2)
  full_result = train.train_and_evaluate(mlm_config(ptb_dir, **settings), full_dir)
  train.train_and_evaluate(mlm_config(ptb_dir, **{**settings, "num_steps": 2}), half_dir)
  resumed = train.train_and_evaluate(mlm_config(ptb_dir, **settings), half_dir)
  full, half = _records(full_dir), _records(half_dir)
  assert sorted(half) == [1, 2, 3, 4]
  assert len({full[s]["train/loss"] for s in full}) == 4  # the loss moves
  for step in (3, 4):
    assert half[step]["train/loss"] == full[step]["train/loss"], step
    assert half[step]["train/target_tokens"] == full[step]["train/target_tokens"], step
  assert resumed["eval/loss"] == full_result["eval/loss"]
  # The evaluations of a run mask the same positions: same counts, different losses.
  assert full[2]["eval/tokens"] == full[4]["eval/tokens"]
  assert full[2]["eval/loss"] != full[4]["eval/loss"]
  out = capsys.readouterr().out
  assert (f"step 4: validation masked-token loss {resumed['eval/loss']:.4f}, perplexity "
          f"{resumed['eval/perplexity']:.2f} ({int(resumed['eval/tokens'])} masked tokens)") in out


def test_mlm_config_differs_from_switch_small_only_in_the_objective():
  mlm = config_lib.experiment_config_from(mlm_small.get_config(), num_devices=1, num_processes=1)
  switch = config_lib.experiment_config_from(switch_small.get_config(), num_devices=1,
                                             num_processes=1)
  assert mlm.model.objective is Objective.MASKED_LM
  assert dataclasses.replace(mlm.model, objective=Objective.CAUSAL_LM, masked_lm=None) == (
      switch.model)
  assert (mlm.data, mlm.optimizer, mlm.train, mlm.mesh) == (
      switch.data, switch.optimizer, switch.train, switch.mesh)


@pytest.mark.parametrize("overrides", [
    ["model.moe.router.kind=topk", "model.moe.router.k=1"],
    ["model.moe.router.kind=gshard"],
])
def test_mlm_small_takes_a_router_from_the_command_line(overrides):
  config = config_lib.apply_overrides(mlm_small.get_config(), overrides)
  experiment = config_lib.experiment_config_from(config, num_devices=1, num_processes=1)
  assert experiment.model.moe.router.kind.value == overrides[0].split("=")[1]
  assert experiment.model.objective is Objective.MASKED_LM


# Router settings beside the kind, for the masked-LM experiment (switch_small's router otherwise).
_ROUTER_OVERRIDES = {
    "topk": dict(k=2), "noisy_topk": dict(k=1), "sinkhorn": dict(k=1), "random": dict(k=1),
    "deepseek": dict(k=2), "soft": {}, "expert_choice": {}, "hash": {},
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", [k.value for k in routing.RouterKind])
def test_the_masked_lm_experiment_trains_with_every_router(kind, ptb_dir, tmp_path):
  config = mlm_small.get_config("tiny")
  config.data.update(name="ptb", data_dir=ptb_dir)
  config.mesh.update(data=2, expert=4)
  config.train.update(num_steps=1, eval_batches=1)
  config.model.moe.router.kind = kind
  config.model.moe.router.update(_ROUTER_OVERRIDES.get(kind, {}))
  if kind == "soft":
    config.model.moe.dispatch = "einsum"
  result = train.train_and_evaluate(config, tmp_path)
  assert result["step"] == 1
  assert math.isfinite(result["train/loss"]) and math.isfinite(result["eval/loss"])
  assert result["model/noncausal_routing"] == 0.0  # a bidirectional model: nothing to mark
