"""moejax's deepseek MoE layer equals transformers' DeepseekV3MoE block (golden file, no torch).

tests/golden/deepseek_v3_moe.npz holds the weights, inputs and outputs of a small DeepseekV3MoE
(hidden 32, 8 routed SwiGLU experts of width 16 in 4 groups, top-2 groups, 2 experts per token,
one shared expert of width 16, routed scaling 2.5, normalised weights, a non-negative score-
correction bias) run by transformers in float32; tests/golden/make_deepseek_golden.py writes it
and says how to rerun it. Here the same weights go into an `MoeLayer` (kind='deepseek',
activation='swiglu', shared_ffn_dim=16, capacity C = S so nothing is dropped), with the bias as
the layer's aux-loss-free balancing bias, and the outputs must agree to float32 rounding.

Weight layouts: transformers' linear layers compute x @ W.T, so every matrix is transposed; its
experts' fused `gate_up_proj` (E, 2F, M) holds the gate projection in rows [0, F) and the up
projection in rows [F, 2F): moejax's `wg` and `wi` (E, M, F) respectively.
"""

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.moe import MoeConfig, MoeLayer
from moejax.routing import BalanceConfig, DeepseekConfig, RouterConfig
from moejax.routing import deepseek

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "deepseek_v3_moe.npz"


@pytest.fixture(scope="module")
def golden():
  with np.load(GOLDEN) as data:
    return {name: data[name] for name in data.files}


def _router_config(g, *, num_groups=None):
  E = g["bias_E"].shape[0]
  S = g["x_BLM"].shape[1]
  return RouterConfig(
      kind="deepseek", num_experts=E, k=int(g["k"]),
      # C = ceil(k * (E / k) * S / E) = S: no token is dropped, as in transformers.
      capacity_factor_eval=E / int(g["k"]), capacity_factor_train=E / int(g["k"]),
      deepseek=DeepseekConfig(num_groups=int(num_groups or g["num_groups"]),
                              topk_groups=int(g["topk_groups"]) if num_groups is None else 1,
                              routed_scaling_factor=float(g["routed_scaling_factor"])),
      balance=BalanceConfig(bias_update_rate=1e-3))


def make_layer(g, dispatch="index", **router_overrides):
  """An MoeLayer holding the golden file's weights (one routing group per sequence)."""
  E, two_f, M = g["gate_up_proj_E2FM"].shape
  F = two_f // 2
  router = _router_config(g, **router_overrides)
  config = MoeConfig(router=router, ffn_dim=F, group_size=g["x_BLM"].shape[1],
                     activation="swiglu", dispatch=dispatch,
                     shared_ffn_dim=g["shared_up_proj_FM"].shape[0])
  layer = MoeLayer(M, config, rngs=nnx.Rngs(0))
  gate_up = g["gate_up_proj_E2FM"]
  layer.router[...] = jnp.asarray(g["router_weight_EM"].T)
  layer.wg[...] = jnp.asarray(gate_up[:, :F].transpose(0, 2, 1))
  layer.wi[...] = jnp.asarray(gate_up[:, F:].transpose(0, 2, 1))
  layer.wo[...] = jnp.asarray(g["down_proj_EMF"].transpose(0, 2, 1))
  layer.shared.wg[...] = jnp.asarray(g["shared_gate_proj_FM"].T)
  layer.shared.wi[...] = jnp.asarray(g["shared_up_proj_FM"].T)
  layer.shared.wo[...] = jnp.asarray(g["shared_down_proj_MF"].T)
  layer.balance_bias[...] = jnp.asarray(g["bias_E"])
  return layer


@nnx.jit
def _evaluate(layer, x_BLM):
  return layer(x_BLM, train=False)


def _assert_matches(y, want, name):
  y, want = np.asarray(y), np.asarray(want)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6 * np.abs(want).max(), err_msg=name)


@pytest.mark.parametrize("dispatch", ["index", "einsum"])
def test_layer_equals_transformers_deepseek_v3_moe(golden, dispatch):
  layer = make_layer(golden, dispatch)
  assert layer.config.router.capacity(golden["x_BLM"].shape[1], train=False) == \
      golden["x_BLM"].shape[1]
  y, aux = _evaluate(layer, jnp.asarray(golden["x_BLM"]))
  _assert_matches(y, golden["y_BLM"], f"{dispatch} output")
  assert float(aux.metrics["dropped_assignment_fraction"]) == 0.0
  # Evaluation leaves the balancing bias alone.
  np.testing.assert_array_equal(layer.balance_bias[...], golden["bias_E"])


def test_routing_equals_transformers_top_k(golden):
  x_TM = golden["x_BLM"].reshape(-1, golden["x_BLM"].shape[-1])
  logits = jnp.asarray(x_TM @ golden["router_weight_EM"].T)[None]
  _, index_GSK, weight_GSK = deepseek.select(logits, _router_config(golden),
                                             jnp.asarray(golden["bias_E"]))
  # transformers returns its k experts in no particular order (topk with sorted=False).
  want_order = np.argsort(golden["topk_indices_TK"], axis=-1)
  got_order = np.argsort(np.asarray(index_GSK[0]), axis=-1)
  np.testing.assert_array_equal(np.take_along_axis(np.asarray(index_GSK[0]), got_order, -1),
                                np.take_along_axis(golden["topk_indices_TK"], want_order, -1))
  np.testing.assert_allclose(np.take_along_axis(np.asarray(weight_GSK[0]), got_order, -1),
                             np.take_along_axis(golden["topk_weights_TK"], want_order, -1),
                             rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("change", ["no bias", "no group limit", "no shared experts"])
def test_golden_file_exercises_bias_group_limit_and_shared_experts(golden, change):
  """Each feature changes the golden outputs: a layer without it does not match them."""
  layer = make_layer(golden, num_groups=1 if change == "no group limit" else None)
  if change == "no bias":
    layer.balance_bias[...] = jnp.zeros_like(layer.balance_bias[...])
  if change == "no shared experts":
    layer.shared.wo[...] = jnp.zeros_like(layer.shared.wo[...])
  y, _ = _evaluate(layer, jnp.asarray(golden["x_BLM"]))
  assert np.abs(np.asarray(y) - golden["y_BLM"]).max() > 1e-2
