"""`model.init_scale` (moejax/init_scale.py): which matrices it scales, by how much, and its
validation. Every parameter kind is built on a tiny model (attention, dense and MoE FFNs with
SwiGLU, shared experts, an untied output projection) and compared with the usual initialisation
drawn from the same seed."""

import math

import numpy as np
import pytest
from flax import nnx

from experiments import switch_small
from moejax import config as config_lib
from moejax import init_scale as init_scale_lib
from moejax.model import ModelConfig, Transformer
from moejax.moe import MoeConfig
from moejax.routing import RouterConfig
from moejax.typed_config import ConfigError


def _init_config(**changes):
  """Every kind of parameter: attention, dense and MoE FFNs (swiglu), shared experts, unembed.

  Most matrices share one shape (8, 8): eager initialisation compiles once per shape.
  """
  moe = MoeConfig(router=RouterConfig(kind="switch", num_experts=8), ffn_dim=8, group_size=8,
                  activation="swiglu", shared_ffn_dim=8)
  return ModelConfig(vocab_size=8, num_layers=2, model_dim=8, num_heads=2, head_dim=4,
                     ffn_dim=8, activation="swiglu", moe_every=2, moe=moe, tie_embeddings=False,
                     **changes)


def _params(config):
  model = Transformer(config, rngs=nnx.Rngs(0))
  return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_init_scale_multiplies_the_std_of_every_variance_scaled_matrix():
  usual, small = _params(_init_config()), _params(_init_config(init_scale=0.1))
  scaled = set()
  for path, value in usual.items():
    if path[-1] not in ("embed", "scale"):
      scaled.add(path[-1])
      assert small[path].std() / value.std() == pytest.approx(math.sqrt(0.1), rel=1e-5), path
      np.testing.assert_allclose(small[path], value * math.sqrt(0.1), rtol=1e-6, atol=0)
    else:  # the embedding and the norms' unit scales keep their initialisation
      np.testing.assert_array_equal(small[path], value)
  assert scaled == {"wq", "wk", "wv", "wo", "wi", "wg", "router", "unembed"}
  assert {p[-1] for p in usual} - scaled == {"embed", "scale"}


def test_init_scale_one_is_bitwise_the_initialisation_without_it(monkeypatch):
  usual = _params(_init_config(init_scale=1.0))
  monkeypatch.setattr(init_scale_lib, "rescale", lambda model, scale: None)
  without = _params(_init_config(init_scale=0.1))  # rescaling switched off entirely
  assert usual.keys() == without.keys()
  for path in usual:
    np.testing.assert_array_equal(usual[path], without[path])


@pytest.mark.parametrize("value, message", [
    (0.0, r"model\.init_scale=0\.0 must be a finite number > 0"),
    (-0.1, r"model\.init_scale=-0\.1 must be a finite number > 0"),
    (float("nan"), r"model\.init_scale=nan must be a finite number"),
    (float("inf"), r"model\.init_scale=inf must be a finite number"),
])
def test_init_scale_must_be_positive_and_finite(value, message):
  config = switch_small.get_config("tiny")
  config.model.init_scale = value
  with pytest.raises(ConfigError, match=message):
    config_lib.experiment_config_from(config, num_devices=8, num_processes=1)
