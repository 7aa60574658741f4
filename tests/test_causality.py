"""The causal LM refuses a router that looks at later tokens unless explicitly allowed."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import family_checks
from experiments import switch_small
from moejax import config as config_lib
from moejax import run_report
from moejax.model import ModelConfig, Transformer, check_causality
from moejax.moe import MoeConfig, MoeLayer
from moejax.routing import RouterConfig, SinkhornConfig, SoftConfig
from moejax.typed_config import ConfigError

ROUTERS = {
    "expert_choice": dict(),
    "soft": dict(soft=SoftConfig(slots_per_expert=2)),
    "sinkhorn": dict(k=1, sinkhorn=SinkhornConfig(iterations=5)),
    "switch": dict(),
}


def _model(kind, **router_kw):
  router = RouterConfig(kind=kind, num_experts=4, **ROUTERS[kind], **router_kw)
  moe = MoeConfig(router=router, ffn_dim=32, group_size=8,
                  dispatch="einsum" if kind == "soft" else "index")
  return ModelConfig(vocab_size=64, num_layers=2, model_dim=16, num_heads=2, head_dim=8,
                     ffn_dim=32, moe_every=1, moe=moe)


@pytest.mark.parametrize("kind,modes", [("expert_choice", "training and evaluation"),
                                        ("soft", "training and evaluation"),
                                        ("sinkhorn", "training")])
def test_noncausal_router_is_refused_naming_router_and_flag(kind, modes):
  with pytest.raises(ConfigError) as error:
    _model(kind)
  message = str(error.value)
  assert message.startswith(f"model.moe.router.kind='{kind}' is not causal in {modes}:"), message
  assert "model.moe.router.allow_noncausal=True" in message
  assert error.value.field == "model.moe.router.kind"


@pytest.mark.parametrize("kind", ["expert_choice", "soft", "sinkhorn"])
def test_noncausal_router_is_accepted_when_allowed(kind):
  config = _model(kind, allow_noncausal=True)
  assert config.moe.router.allow_noncausal
  check_causality(config)  # the check itself passes too


def test_allow_noncausal_is_unused_with_a_causal_router():
  assert _model("switch").moe.router.causal(train=True)
  with pytest.raises(ConfigError, match=r"model\.moe\.router\.allow_noncausal=True is not used: "
                     r"model\.moe\.router\.kind='switch' is causal in training and evaluation"):
    _model("switch", allow_noncausal=True)


@pytest.mark.parametrize("field,value,router_kw,why", [
    ("claim_order", "choice", dict(kind="gshard", claim_order="choice"),
     "every first choice claims capacity before any second choice"),
    ("batch_prioritized", True, dict(kind="switch", batch_prioritized=True),
     "capacity is claimed in order of router confidence"),
])
def test_a_capacity_claim_that_looks_ahead_is_refused_naming_its_field(field, value, router_kw,
                                                                       why):
  router = RouterConfig(num_experts=4, **router_kw)
  assert not router.causal(train=True) and not router.causal(train=False)
  moe = MoeConfig(router=router, ffn_dim=32, group_size=8)
  with pytest.raises(ConfigError) as error:
    ModelConfig(vocab_size=64, num_layers=2, model_dim=16, num_heads=2, head_dim=8, ffn_dim=32,
                moe_every=1, moe=moe)
  message = str(error.value)
  assert error.value.field == f"model.moe.router.{field}"
  assert message.startswith(f"model.moe.router.{field}={value!r} is not causal in training and "
                            f"evaluation: {why}"), message
  assert "model.moe.router.allow_noncausal=True" in message
  allowed = RouterConfig(num_experts=4, allow_noncausal=True, **router_kw)
  check_causality(ModelConfig(vocab_size=64, num_layers=2, model_dim=16, num_heads=2, head_dim=8,
                              ffn_dim=32, moe_every=1,
                              moe=MoeConfig(router=allowed, ffn_dim=32, group_size=8)))


def test_position_claim_order_is_causal_and_the_default():
  for kind, kw in (("gshard", {}), ("topk", dict(k=3)), ("deepseek", dict(k=2))):
    router = RouterConfig(kind=kind, num_experts=4, **kw)
    assert router.claim_order.value == "position"
    assert router.causal(train=True) and router.causal(train=False)


def test_claim_order_is_unused_with_one_choice_per_token():
  with pytest.raises(ConfigError, match=r"model\.moe\.router\.claim_order=.*choice.* is not "
                     r"used.*model\.moe\.router\.k=1: each token makes one claim"):
    RouterConfig(kind="switch", num_experts=4, claim_order="choice")
  with pytest.raises(ConfigError, match=r"claim_order"):
    RouterConfig(kind="topk", k=1, num_experts=4, claim_order="choice")
  with pytest.raises(ConfigError, match=r"claim_order"):
    RouterConfig(kind="expert_choice", num_experts=4, claim_order="choice")


def test_dense_model_has_no_router_to_check():
  config = ModelConfig(vocab_size=64, num_layers=2, model_dim=16, num_heads=2, head_dim=8,
                       ffn_dim=32, moe_every=0)
  check_causality(config)


# ----------------------------------------------------------------------------- measured causality

# Every kind at the layer sizes of tests/test_moe.py (groups of S=8 tokens, capacity factor 0.5
# so that tokens overflow), with what it needs to run.
LAYER_ROUTERS = {
    "switch": dict(capacity_factor_train=0.5, capacity_factor_eval=0.5),
    "switch_batch_prioritized": dict(kind="switch", batch_prioritized=True, allow_noncausal=True,
                                     capacity_factor_train=0.5, capacity_factor_eval=0.5),
    "gshard": dict(capacity_factor_train=0.5, capacity_factor_eval=0.5),
    "gshard_choice_order": dict(kind="gshard", claim_order="choice", allow_noncausal=True,
                                capacity_factor_train=0.5, capacity_factor_eval=0.5),
    "topk": dict(k=2, capacity_factor_train=0.5, capacity_factor_eval=0.5),
    "noisy_topk": dict(k=2, capacity_factor_train=0.5, capacity_factor_eval=0.5),
    "expert_choice": dict(allow_noncausal=True),
    "soft": dict(soft=SoftConfig(slots_per_expert=1), allow_noncausal=True),
    "sinkhorn": dict(k=1, normalize_weights=False, sinkhorn=SinkhornConfig(iterations=5),
                     allow_noncausal=True, capacity_factor_train=0.5, capacity_factor_eval=0.5),
    "hash": dict(capacity_factor_train=0.5, capacity_factor_eval=0.5),
    "random": dict(k=1, capacity_factor_train=0.5, capacity_factor_eval=0.5),
    "deepseek": dict(k=2, capacity_factor_train=0.5, capacity_factor_eval=0.5),
    "deepseek_choice_order": dict(kind="deepseek", k=2, claim_order="choice", allow_noncausal=True,
                                  capacity_factor_train=0.5, capacity_factor_eval=0.5),
}


def _outputs(layer, x, ids, train):
  graphdef, state = nnx.split(layer)  # the same state each call: the same random numbers
  return np.asarray(jax.jit(lambda state, x, ids: nnx.merge(graphdef, state)(
      x, token_ids_BL=ids, train=train)[0])(state, x, ids))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", sorted(LAYER_ROUTERS))
def test_a_router_declared_causal_never_lets_a_later_token_change_an_earlier_output(name, train):
  """Changing the tokens from position j on leaves the layer's outputs before j bitwise
  unchanged for a router that declares itself causal; a non-causal one changes some."""
  kw = dict(LAYER_ROUTERS[name])
  kind = kw.pop("kind", name)
  if kind == "soft":  # no capacity settings; its only dispatch form
    router = RouterConfig(kind=kind, num_experts=family_checks.E, **kw)
    layer = MoeLayer(family_checks.M, MoeConfig(router=router, ffn_dim=family_checks.F,
                                                group_size=family_checks.S, dispatch="einsum"),
                     rngs=nnx.Rngs(0))
  else:
    layer = family_checks.make_layer(kind, **kw)
  causal = layer.config.router.causal(train=train)
  x, _, _ = family_checks.inputs()
  ids = family_checks.token_ids() if layer.config.router.family.token_ids else None
  j = 3  # groups hold positions 0-7 and 8-15 of each sequence: change positions 3-7 and 11-15
  later = (np.arange(x.shape[1]) % family_checks.S) >= j
  rng = np.random.default_rng(5)
  x2 = np.where(later[None, :, None], rng.standard_normal(x.shape, np.float32), x)
  ids2 = None if ids is None else np.where(later[None], (np.asarray(ids) + 7) % 37, ids)
  y, y2 = _outputs(layer, x, ids, train), _outputs(layer, jnp.asarray(x2), ids2, train)
  earlier = ~later
  if causal:
    np.testing.assert_array_equal(y2[:, earlier], y[:, earlier],
                                  err_msg=f"{name} declares itself causal")
  else:
    assert np.any(y2[:, earlier] != y[:, earlier]), f"{name} is declared non-causal yet is not"


# ----------------------------------------------------------------------------- what a run prints

@pytest.mark.parametrize("overrides,line", [
    (dict(kind="gshard", claim_order="choice"),
     "NON-CAUSAL: model.moe.router.claim_order='choice': every first choice claims capacity "
     "before any second choice"),
    (dict(kind="expert_choice"),
     "NON-CAUSAL: model.moe.router.kind='expert_choice': a token's routing depends on later "
     "tokens of its group"),
])
def test_a_noncausal_run_names_the_field_that_makes_it_so(overrides, line, capsys):
  config = switch_small.get_config("tiny")
  config.model.moe.router.update(allow_noncausal=True, **overrides)
  experiment = config_lib.experiment_config_from(config, num_devices=8, num_processes=1)
  model_config = dataclasses.replace(experiment.model, vocab_size=64)
  scalars = run_report.report_params(Transformer(model_config, rngs=nnx.Rngs(0)), experiment)
  assert scalars["model/noncausal_routing"] == 1.0
  assert line in capsys.readouterr().out
