"""The config surface: every typed field settable from the command line, validated by path.

The experiment ConfigDict is derived from the typed dataclasses (`config.default_config()`), so
these tests enumerate the dataclasses' fields (not the ConfigDict's) and set each one through the
same absl/ml_collections flags `moejax.main` defines.
"""

import dataclasses
import enum
import json
import pathlib
import re

import pytest
from absl import flags
from ml_collections import config_flags

from experiments import dense_small, switch_small
from moejax import config as config_lib
from moejax import typed_config
from moejax.config import ExperimentConfig
from moejax.typed_config import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENT = "experiments/switch_small.py:tiny"
DEVICES = 8  # what the layout checks assume: enough for mesh.expert=2 or mesh.model=2


def typed_paths(cls=ExperimentConfig, prefix=""):
  """(path, annotation, default) of every leaf field of the typed config tree."""
  hints = typed_config._hints(cls)  # pylint: disable=protected-access
  out = []
  for f in dataclasses.fields(cls):
    path = f"{prefix}.{f.name}" if prefix else f.name
    group = typed_config.group_class(hints[f.name])
    if group is not None:
      out += typed_paths(group, path)
    else:
      out.append((path, hints[f.name], f.default))
  return out


# Values for fields whose neighbour of the default would not fit the tiny experiment (layout
# checks) and for strings, which have no generic "other value".
SPECIAL = {
    "model.moe.router.deepseek.num_groups": 2, "model.moe.router.deepseek.group_score_experts": 1,
    "model.moe.router.kind": "gshard",
    "model.vocab_size": 600, "model.head_dim": 18, "model.moe_every": 1, "model.moe.router.k": 3,
    "model.dtype": "bfloat16", "model.param_dtype": "bfloat16", "model.moe.dtype": "bfloat16",
    "model.moe.router.dtype": "bfloat16",
    "model.moe.group_size": 8, "model.moe.exchange_buffer_factor": 2.0,
    "data.seq_len": 32, "train.batch_size": 16, "mesh.data": 8,
    "data.name": "ptb", "data.data_dir": "/tmp/moejax-data", "data.text_key": "content",
    "data.train_split": "train2", "data.eval_split": "test", "data.tokenizer": "word",
    "data.sentencepiece_model_type": "unigram", "data.process_sharding": "documents",
    "optimizer.name": "adafactor", "optimizer.schedule": "rsqrt",
    "sharding_rules": (("batch", "data"), ("expert", "expert"), ("mlp", "model"),
                       ("heads", "model"), ("embed", None), ("vocab", None), ("kv", None),
                       ("length", None)),
}
# Settings a field needs beside it to be used by the chosen variant (by path prefix).
_ROUTER = "model.moe.router."
CONTEXT = {
    "model.masked_lm.": {"model.objective": "masked_lm"},
    # Settings only dropless experts read.
    "model.moe.grouped_matmul": {"model.moe.dispatch": "dropless"},
    "model.moe.exchange": {"model.moe.dispatch": "dropless"},
    _ROUTER + "k": {_ROUTER + "kind": "topk"},
    _ROUTER + "normalize_weights": {_ROUTER + "kind": "topk", _ROUTER + "k": 2},
    _ROUTER + "second_expert_": {_ROUTER + "kind": "gshard"},
    _ROUTER + "allow_noncausal": {_ROUTER + "kind": "expert_choice"},
    # Capacity claims that let a later token take an earlier token's slot (not causal).
    _ROUTER + "batch_prioritized": {_ROUTER + "allow_noncausal": True},
    _ROUTER + "claim_order": {_ROUTER + "kind": "gshard", _ROUTER + "allow_noncausal": True},
    _ROUTER + "noisy_topk.": {_ROUTER + "kind": "noisy_topk", _ROUTER + "k": 2},
    _ROUTER + "noisy_topk.noise_std": {_ROUTER + "kind": "noisy_topk", _ROUTER + "k": 2,
                                       _ROUTER + "noisy_topk.noise": "fixed"},
    _ROUTER + "soft.": {_ROUTER + "kind": "soft", _ROUTER + "allow_noncausal": True,
                        "model.moe.dispatch": "einsum"},
    _ROUTER + "sinkhorn.": {_ROUTER + "kind": "sinkhorn", _ROUTER + "k": 1,
                            _ROUTER + "allow_noncausal": True},
    _ROUTER + "hash.": {_ROUTER + "kind": "hash"},
    _ROUTER + "deepseek.": {_ROUTER + "kind": "deepseek", _ROUTER + "k": 2},
    _ROUTER + "deepseek.group_score_experts": {_ROUTER + "kind": "deepseek", _ROUTER + "k": 2,
                                               _ROUTER + "deepseek.num_groups": 4},
    _ROUTER + "deepseek.topk_groups": {_ROUTER + "kind": "deepseek", _ROUTER + "k": 2,
                                       _ROUTER + "deepseek.num_groups": 4},
}


def context(path):
  """The settings of the longest CONTEXT prefix of `path`, as (path, value) overrides."""
  matches = [p for p in CONTEXT if path.startswith(p)]
  return list(CONTEXT[max(matches, key=len)].items()) if matches else []


def other_value(path, hint, current):
  """A valid value different from `current` (the tiny experiment's)."""
  if path in SPECIAL:
    return SPECIAL[path]
  inner, _ = typed_config._split_optional(hint)  # pylint: disable=protected-access
  if inner is bool:
    return not current
  if isinstance(inner, type) and issubclass(inner, enum.Enum):
    return next(m.value for m in inner if m.value != current)
  if inner is int:
    return current + 1
  if inner is float:
    return current / 2 if current > 0 else 0.1
  raise AssertionError(f"{path} ({hint}) needs an entry in SPECIAL")


def parse(*overrides):
  """The experiment ConfigDict as `moejax.main` would see it after `--config.<path>=value`s."""
  argv = ["moejax", f"--config={EXPERIMENT}"]
  argv += [f"--config.{path}={_flag_text(value)}" for path, value in overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values.config


def _flag_text(value):
  return repr(value) if isinstance(value, tuple) else str(value)


def lookup(tree, path):
  for part in path.split("."):
    tree = tree[part] if isinstance(tree, dict) else getattr(tree, part)
  return tree


def current_value(path):
  return lookup(parse(), path)


PATHS = typed_paths()


def test_default_config_holds_every_typed_field():
  flat = config_lib.default_config().to_dict()
  for path, _, _ in PATHS:
    lookup(flat, path)  # KeyError if missing
  assert len(PATHS) > 60


@pytest.mark.parametrize("path, hint", [(p, h) for p, h, _ in PATHS], ids=[p for p, _, _ in PATHS])
def test_every_typed_field_is_settable_from_the_command_line(path, hint):
  old = current_value(path)
  new = other_value(path, hint, old)
  assert new != old
  config = parse(*context(path), (path, new))
  assert lookup(config, path) == new
  experiment = config_lib.experiment_config_from(config, num_devices=DEVICES, num_processes=1)
  assert typed_config.as_plain(lookup(experiment, path)) == typed_config.as_plain(new)


FLOATS = [p for p, h, _ in PATHS if typed_config._split_optional(h)[0] is float]  # pylint: disable=protected-access


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("path", FLOATS)
def test_non_finite_floats_are_rejected_naming_the_field(path, value):
  config = parse(*context(path), (path, value))
  with pytest.raises(ConfigError, match="^" + re.escape(f"{path}={value}")) as error:
    config_lib.experiment_config_from(config, num_devices=DEVICES, num_processes=1)
  assert error.value.field == path


def test_float_fields_cover_the_loss_weights():
  assert {"model.moe.router.load_balancing_loss_weight",
          "model.moe.router.z_loss_weight"} <= set(FLOATS)


def test_topk_router_from_the_command_line():
  config = parse(("model.moe.router.kind", "topk"))
  with pytest.raises(ConfigError, match=r"^model\.moe\.router\.k=None is not allowed with "
                     r"model\.moe\.router\.kind='topk'"):
    config_lib.experiment_config_from(config, num_devices=DEVICES, num_processes=1)
  config = parse(("model.moe.router.kind", "topk"), ("model.moe.router.k", 2),
                 ("model.moe.router.normalize_weights", False))
  router = config_lib.experiment_config_from(config, num_devices=DEVICES,
                                             num_processes=1).model.moe.router
  assert (router.kind.value, router.k, router.normalize_weights) == ("topk", 2, False)


@pytest.mark.parametrize("path, value, reason", [
    ("model.moe.router.normalize_weights", False, "model.moe.router.kind='switch' does not"),
    ("model.moe.router.second_expert_policy", "random", "model.moe.router.kind='switch' does "),
    ("model.moe.router.noisy_topk.load_loss_weight", 0.5, "model.moe.router.kind='switch' "),
])
def test_a_setting_the_router_does_not_use_is_an_error(path, value, reason):
  config = parse((path, value))
  with pytest.raises(ConfigError, match="^" + re.escape(path) + f"=.* is not used: {reason}"):
    config_lib.experiment_config_from(config, num_devices=DEVICES, num_processes=1)


def test_moe_settings_of_a_dense_model_are_an_error():
  config = dense_small.get_config("tiny")
  config.model.moe.router.num_experts = 4
  with pytest.raises(ConfigError, match=r"^model\.moe\.router\.num_experts=4 is not used: "
                     r"model\.moe_every=0"):
    config_lib.experiment_config_from(config, num_devices=1, num_processes=1)
  untouched = config_lib.experiment_config_from(dense_small.get_config("tiny"), num_devices=1,
                                                num_processes=1)
  assert untouched.model.moe is None


def test_errors_name_the_field_that_was_set():
  # The experts compute in the model's dtype unless model.moe.dtype is set: a bad model.dtype is
  # reported as model.dtype, not as the MoE field it would have been copied to.
  with pytest.raises(ConfigError, match=r"^model\.dtype='float16' is not allowed"):
    config_lib.experiment_config_from(parse(("model.dtype", "float16")), num_devices=DEVICES,
                                      num_processes=1)
  experiment = config_lib.experiment_config_from(parse(("model.dtype", "bfloat16")),
                                                 num_devices=DEVICES, num_processes=1)
  assert experiment.model.moe.dtype == "bfloat16"
  with pytest.raises(ConfigError, match=r"^data\.seq_len=0 "):
    config_lib.experiment_config_from(parse(("data.seq_len", 0)), num_devices=DEVICES,
                                      num_processes=1)


def test_wrong_types_are_rejected():
  config = switch_small.get_config("tiny").to_dict()  # a ConfigDict itself refuses the change
  config["train"]["progress"] = "yes"
  with pytest.raises(ConfigError, match=r"^train\.progress='yes' must be True or False"):
    config_lib.experiment_config_from(config, num_devices=DEVICES, num_processes=1)


# ----------------------------------------------------------------------------- resume


def _experiment(*overrides):
  return config_lib.experiment_config_from(parse(*overrides), num_devices=DEVICES,
                                           num_processes=1)


def test_resume_saves_the_config_and_allows_listed_changes(tmp_path):
  assert config_lib.check_resume(tmp_path, _experiment(), resuming=False) == []
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["model"]["moe"]["router"]["kind"] == "switch"
  assert saved["train"]["num_steps"] == 4
  changes = config_lib.check_resume(
      tmp_path, _experiment(("train.num_steps", 10), ("model.moe.dispatch", "einsum")),
      resuming=True)
  assert changes == [("model.moe.dispatch", "index", "einsum"), ("train.num_steps", 4, 10)]
  assert json.loads((tmp_path / "config.json").read_text())["train"]["num_steps"] == 10


@pytest.mark.parametrize("path, old, new", [
    ("data.seq_len", 16, 32), ("train.batch_size", 8, 16),
    ("model.moe.router.kind", "switch", "gshard"), ("optimizer.learning_rate", 0.003, 0.01),
    ("model.moe.dispatch", "index", "dropless"),  # index drops tokens where dropless does not
])
def test_resume_refuses_changes_that_would_continue_another_experiment(tmp_path, path, old, new):
  config_lib.check_resume(tmp_path, _experiment(), resuming=False)
  saved = (tmp_path / "config.json").read_text()
  with pytest.raises(ConfigError) as error:
    config_lib.check_resume(tmp_path, _experiment((path, new)), resuming=True)
  message = str(error.value)
  assert error.value.field.startswith(path.rsplit(".", 1)[0])  # kind also changes k: 1 -> 2
  assert f"{path}: {old!r} -> {new!r}" in message
  assert "train.num_steps" in message  # the fields that may change are listed
  assert (tmp_path / "config.json").read_text() == saved  # nothing written


def test_a_fresh_run_replaces_a_stale_saved_config(tmp_path):
  config_lib.check_resume(tmp_path, _experiment(), resuming=False)
  # No checkpoints (a run that died before its first save): a new config is not a resume.
  config_lib.check_resume(tmp_path, _experiment(("data.seq_len", 32)), resuming=False)
  assert json.loads((tmp_path / "config.json").read_text())["data"]["seq_len"] == 32


def test_trainer_refuses_a_changed_config_on_resume_and_accepts_more_steps(tmp_path, compile_once):
  del compile_once
  from moejax import train  # pylint: disable=g-import-not-at-top
  from moejax.data import corpora  # pylint: disable=g-import-not-at-top
  data_dir = tmp_path / "data"
  corpora.build("ptb", data_dir, source_dir=REPO / "tests" / "fixtures" / "ptb")
  workdir = tmp_path / "run"

  def config(**changes):
    cfg = switch_small.get_config("tiny")
    cfg.data.update(name="ptb", data_dir=str(data_dir))
    cfg.mesh.update(data=2, expert=4)
    cfg.train.update(num_steps=1, eval_batches=1)
    for path, value in changes.items():
      group, name = path.split("__")
      cfg[group][name] = value
    return cfg

  train.train_and_evaluate(config(), workdir)
  metrics_before = (workdir / "metrics.jsonl").read_text()
  with pytest.raises(ConfigError, match=r"^data\.seq_len=32 differs from the config of the "
                     r"checkpoints.*data\.seq_len: 16 -> 32"):
    train.train_and_evaluate(config(data__seq_len=32), workdir)
  assert (workdir / "metrics.jsonl").read_text() == metrics_before
  result = train.train_and_evaluate(config(train__num_steps=2), workdir)
  assert result["step"] == 2
  assert json.loads((workdir / "config.json").read_text())["train"]["num_steps"] == 2


def test_a_field_added_since_the_saved_config_is_no_change_at_its_default(tmp_path):
  config_lib.check_resume(tmp_path, _experiment(), resuming=False)
  saved = json.loads((tmp_path / "config.json").read_text())
  del saved["model"]["moe"]["router"]["allow_noncausal"]  # as a config saved before it existed
  del saved["model"]["moe"]["router"]["hash"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  assert config_lib.check_resume(tmp_path, _experiment(), resuming=True) == []
  del saved["train"]["seed"]  # a field at a value other than its default is still refused
  (tmp_path / "config.json").write_text(json.dumps(saved))
  with pytest.raises(ConfigError, match=r"train\.seed: '<missing>' -> 1"):
    config_lib.check_resume(tmp_path, _experiment(("train.seed", 1)), resuming=True)


def _saved_without_claim_order(tmp_path, *overrides):
  config_lib.check_resume(tmp_path, _experiment(*overrides), resuming=False)
  saved = json.loads((tmp_path / "config.json").read_text())
  del saved["model"]["moe"]["router"]["claim_order"]  # saved before the field existed
  (tmp_path / "config.json").write_text(json.dumps(saved))


def test_a_top2_run_saved_before_claim_order_existed_resumes_only_in_its_choice_order(tmp_path):
  # Such runs claimed capacity choice-major; the new default (position) would change them.
  top2 = (("model.moe.router.kind", "gshard"),)
  _saved_without_claim_order(tmp_path, *top2)
  with pytest.raises(ConfigError, match=r"model\.moe\.router\.claim_order: 'choice' -> "
                     r"'position'") as error:
    config_lib.check_resume(tmp_path, _experiment(*top2), resuming=True)
  assert error.value.field == "model.moe.router.claim_order"
  old_order = top2 + (("model.moe.router.claim_order", "choice"),
                      ("model.moe.router.allow_noncausal", True))
  assert config_lib.check_resume(tmp_path, _experiment(*old_order), resuming=True) == [
      ("model.moe.router.allow_noncausal", False, True)]


@pytest.mark.parametrize("overrides", [(), (("model.moe.dispatch", "dropless"),
                                            ("model.moe.router.kind", "topk"),
                                            ("model.moe.router.k", 2))],
                         ids=["top1", "dropless_top2"])
def test_a_run_whose_claim_order_cannot_matter_resumes_without_the_field(tmp_path, overrides):
  _saved_without_claim_order(tmp_path, *overrides)
  assert config_lib.check_resume(tmp_path, _experiment(*overrides), resuming=True) == []
