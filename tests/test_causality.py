"""The causal LM refuses a router that looks at later tokens unless explicitly allowed."""

import pytest

from moejax.model import ModelConfig, check_causality
from moejax.moe import MoeConfig
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


def test_dense_model_has_no_router_to_check():
  config = ModelConfig(vocab_size=64, num_layers=2, model_dim=16, num_heads=2, head_dim=8,
                       ffn_dim=32, moe_every=0)
  check_causality(config)
