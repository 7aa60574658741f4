"""`moejax.evaluate` and `moejax.sample` on a tiny trained checkpoint (the PTB fixture)."""

import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import switch_small
from moejax import evaluate, sample, train
from moejax import data as data_lib
from moejax import workdir as workdir_lib
from moejax.model import ModelConfig
from moejax.moe import MoeConfig
from moejax.routing import RouterConfig

# No persistent compilation cache here (no `compile_once`): in full `make test` runs, writing
# the cache entry of a program compiled for a one-device mesh (workdir.load(single_device=True),
# the decoding steps) crashed the process inside XLA's executable serialization, twice; it did
# not recur when this module ran alone.


@pytest.fixture(scope="module")
def trained(ptb_dir, tmp_path_factory):
  """A 4-step run of the tiny switch experiment on 8 devices (data=2 x expert=4)."""
  config = switch_small.get_config("tiny")
  config.data.update(name="ptb", data_dir=ptb_dir)
  config.mesh.update(data=2, expert=4)
  workdir = tmp_path_factory.mktemp("trained")
  result = train.train_and_evaluate(config, workdir)
  return workdir, result


@pytest.fixture(scope="module")
def run(trained):
  return workdir_lib.load(trained[0], single_device=True)


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_equals_the_trainers_evaluation(trained, tmp_path, capsys):
  workdir, result = trained
  output = tmp_path / "eval.json"
  assert evaluate.main([f"--workdir={workdir}", "--batches=2", f"--output={output}"]) == 0
  record = json.loads(output.read_text())
  assert record["loss"] == result["eval/loss"]  # the same batches, the same compiled step
  assert record["tokens"] == result["eval/tokens"]
  assert record["step"] == 4 and record["split"] == "validation"
  assert record["moe"]["layer_1"]["dropped_fraction"] == result[
      "eval/moe/layer_1/dropped_fraction"]
  out, err = capsys.readouterr()
  assert f"step 4: validation loss {result['eval/loss']:.4f}" in out
  assert "evaluating step 4 on 'validation': batch 1, " in err


def test_evaluate_takes_the_whole_split_by_default(trained, ptb_dir, capsys):
  workdir, _ = trained
  assert evaluate.main([f"--workdir={workdir}", "--split=train", "--quiet"]) == 0
  record = json.loads((workdir / "eval_train_step4.json").read_text())
  experiment = workdir_lib.load(workdir, changes={"data.eval_split": "train"}).experiment
  tokenizer = data_lib.prepare(experiment.data)
  batches = list(data_lib.eval_batches(experiment.data, tokenizer,
                                       batch_size=experiment.train.batch_size))
  assert record["batches"] == len(batches) > experiment.train.eval_batches
  assert record["tokens"] == sum(int(b["mask"].sum()) for b in batches)
  assert "batch" not in capsys.readouterr().err  # --quiet


def test_evaluate_set_equals_evaluating_an_edited_config(trained, tmp_path):
  """--set changes the loaded config as editing config.json would; the record names it."""
  workdir, _ = trained
  edited = tmp_path / "edited"
  shutil.copytree(workdir, edited)
  config = json.loads((edited / "config.json").read_text())
  config["model"]["moe"]["router"]["capacity_factor_eval"] = 8.0
  (edited / "config.json").write_text(json.dumps(config))
  records = {}
  for name, argv in (("set", [f"--workdir={workdir}",
                              "--set=model.moe.router.capacity_factor_eval=8.0"]),
                     ("edited", [f"--workdir={edited}"]), ("default", [f"--workdir={workdir}"])):
    output = tmp_path / f"{name}.json"
    assert evaluate.main([*argv, "--batches=2", "--quiet", f"--output={output}"]) == 0
    records[name] = json.loads(output.read_text())
  assert records["set"]["settings"] == {"model.moe.router.capacity_factor_eval": 8.0}
  assert records["default"]["settings"] == {}
  assert records["set"]["loss"] == records["edited"]["loss"]
  assert records["set"]["moe"] == records["edited"]["moe"]
  # Factor 8 >= E gives every expert room for a whole group: nothing is dropped, where the
  # run's own evaluation factor (2.0) drops tokens.
  dropped = {name: r["moe"]["layer_1"]["dropped_fraction"] for name, r in records.items()}
  assert dropped["set"] == 0.0 < dropped["default"]


@pytest.mark.parametrize("argv, message", [
    (["--split=bogus"], "--split='bogus' is not a split of 'ptb'; its splits are"),
    (["--batches=0"], "--batches=0 must be an integer >= 1"),
    (["--set=bogus"], "--set='bogus' must look like group.field=value"),
    (["--set=model.num_layers=3"], "--set=model.num_layers=3: model.num_layers is not a setting "
     "evaluation may change (it would not be the trained model); allowed: train.num_steps"),
    (["--set=model.moe.router.capacity_factor_eval=-1"],
     "--set=model.moe.router.capacity_factor_eval=-1: model.moe.router.capacity_factor_eval=-1"),
])
def test_evaluate_bad_flags(trained, argv, message, capsys):
  assert evaluate.main([f"--workdir={trained[0]}", *argv]) == 2
  assert message in capsys.readouterr().err


def test_commands_on_a_workdir_without_checkpoint(tmp_path):
  """Real processes: one line on stderr, exit status 2."""
  (tmp_path / "config.json").write_text("{}")
  for module, extra in (("moejax.evaluate", []), ("moejax.sample", ["--prompt=a"])):
    done = subprocess.run([sys.executable, "-m", module, f"--workdir={tmp_path}", *extra],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (f"moejax: --workdir='{tmp_path}': no checkpoint in "
                                   f"{tmp_path}/checkpoints; a training run writes one at "
                                   "train.checkpoint_every and at its end.")
  missing = tmp_path / "missing"
  assert evaluate.main([f"--workdir={missing}"]) == 2


# ----------------------------------------------------------------------------- sample


def _prompt(run):
  return [run.tokenizer.eos_id] + run.tokenizer.encode("the company said")


@pytest.mark.slow  # ~40 s: one forward compilation per sequence length
def test_greedy_sampling_is_deterministic_and_equals_a_recompute_without_cache(run):
  model = sample.on_one_device(run.model())
  first = sample.generate(model, _prompt(run), max_new_tokens=4)
  again = sample.generate(model, _prompt(run), max_new_tokens=4)
  assert first.tokens == again.tokens and len(first.tokens) == 4
  forward = nnx.jit(lambda m, x: m(x, routing_group_size=1))
  sequence = _prompt(run)
  for i, token in enumerate(first.tokens):
    logits_1LV, aux = forward(model, jnp.asarray([sequence]))
    np.testing.assert_allclose(first.logits[i], logits_1LV[0, -1], rtol=1e-5, atol=1e-5)
    assert token == int(jnp.argmax(logits_1LV[0, -1]))
    assert first.experts[i] == {"layer_1": np.flatnonzero(aux.moe["layer_1"].kept_GE[-1]).tolist()}
    sequence.append(token)


def test_top_p_tiny_equals_greedy_and_sampling_follows_the_seed(run):
  model = run.model()
  greedy = sample.generate(model, _prompt(run), max_new_tokens=5)
  tiny_p = sample.generate(model, _prompt(run), max_new_tokens=5, temperature=1.0, top_p=1e-6,
                           seed=7)
  assert tiny_p.tokens == greedy.tokens
  draws = [sample.generate(model, _prompt(run), max_new_tokens=5, temperature=1.0, seed=s).tokens
           for s in (1, 1, 2)]
  assert draws[0] == draws[1] and draws[0] != draws[2]


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
  logits_1V = jnp.log(jnp.asarray([[0.2, 0.5, 0.3]]))
  keys = jax.random.split(jax.random.key(0), 2000)
  draw = jax.jit(jax.vmap(lambda key, p: sample.next_token(logits_1V, key, 1.0, p)[0],
                          in_axes=(0, None)))
  counts = np.bincount(np.asarray(draw(keys, 0.6)), minlength=3)
  assert counts[0] == 0 and abs(counts[1] / 2000 - 0.625) < 0.04  # {0.5, 0.3}, renormalised
  assert set(np.asarray(draw(keys, 0.45)).tolist()) == {1}
  assert (np.bincount(np.asarray(draw(keys, 1.0)), minlength=3) > 300).all()
  assert int(sample.next_token(logits_1V, keys[0], 0.0, 1.0)[0]) == 1  # greedy


def test_sample_command_prints_text_and_experts(trained, run, capsys):
  argv = [f"--workdir={trained[0]}", "--prompt=the company said", "--max_new_tokens=4",
          "--no-stop_at_eos", "--show_experts"]
  assert sample.main(argv) == 0
  out = capsys.readouterr().out.splitlines()
  expected = sample.generate(run.model(), _prompt(run), max_new_tokens=4)
  assert out[0].startswith("the company said ")
  assert out[0] == "the company said " + run.tokenizer.decode(expected.tokens)
  assert out[1] == "experts each generated token took, per MoE layer:"
  rows = out[3:]
  assert len(rows) == 4
  for row, experts in zip(rows, expected.experts):
    assert row.split()[-1] == "+".join(map(str, experts["layer_1"]))


@pytest.mark.parametrize("flag, message", [
    ("--temperature=-1", "--temperature=-1.0 must be a number >= 0 (0: greedy)."),
    ("--top_p=1.5", "--top_p=1.5 must be a number in (0, 1] (1: no restriction)."),
    ("--max_new_tokens=0", "--max_new_tokens=0 must be an integer >= 1."),
    ("--temperature=x", "argument --temperature: invalid float value: 'x'"),
])
def test_sample_bad_flags(trained, flag, message, capsys):
  with pytest.raises(SystemExit) if "invalid" in message else _no_exit():
    assert sample.main([f"--workdir={trained[0]}", "--prompt=a", flag]) == 2
  assert f"moejax: {message}" in capsys.readouterr().err


class _no_exit:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def test_sampling_refuses_models_it_cannot_decode():
  moe = MoeConfig(router=RouterConfig(kind="expert_choice", num_experts=4, allow_noncausal=True),
                  ffn_dim=16, group_size=4)
  base = dict(vocab_size=40, num_layers=1, model_dim=16, num_heads=2, head_dim=8, ffn_dim=32)
  with pytest.raises(ValueError, match=r"model\.moe\.router\.kind='expert_choice' routes a token "
                     "by the other tokens of its group"):
    sample.check_sampling(ModelConfig(**base, moe_every=1, moe=moe))
  with pytest.raises(ValueError, match=r"model\.objective='masked_lm': sampling needs a causal"):
    sample.check_sampling(ModelConfig(**base, objective="masked_lm"))
  sample.check_sampling(ModelConfig(**base))
