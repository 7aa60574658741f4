"""Dropless experts (moejax/dropless.py): equal to the index form with capacity S, on one device and
on meshes; the buffer exchange's overflow, counted exactly; the exchanges in the compiled HLO; the
settings it refuses.

The index form with capacity C = S (min_capacity=S) drops nothing, so dropless experts must give
its outputs, losses, metrics and gradients to float32 rounding (test_moe.assert_same_results:
rtol=1e-5, atol 1e-6 of the largest magnitude). The index form is itself checked against a
token-by-token numpy reference in tests/test_moe.py.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.moe import MoeConfig, MoeLayer
from moejax.routing import ConfigError, RouterConfig
from test_moe import (E, F, M, S, T, _all_to_alls, _compiled_forward_text, assert_same_results,
                      grads_fn, inputs, make_layer, sharded_grads)


def dropless_layer(kind="switch", *, activation="relu", seed=0, moe_kw=None, **router_kw):
  router = RouterConfig(kind=kind, num_experts=E, **router_kw)
  config = MoeConfig(router=router, ffn_dim=F, group_size=S, dispatch="dropless",
                     activation=activation, grouped_matmul_tile=4, **(moe_kw or {}))
  return MoeLayer(M, config, rngs=nnx.Rngs(seed))


def results(layer, x, mask, r):
  graphdef, state = nnx.split(layer)
  return grads_fn(graphdef)(state, x, mask, r)


CASES = [
    # (router kind, activation, router settings, MoeConfig settings)
    ("switch", "relu", {}, {}),
    ("gshard", "swiglu", dict(jitter_eps=0.05, second_expert_policy="random"), {}),
    ("topk", "gelu", dict(k=3, normalize_weights=False), dict(grouped_matmul="ragged_dot")),
]


def _index_reference(kind, activation, router_kw, x, mask, r):
  index = make_layer(kind, dispatch="index", activation=activation, min_capacity=S, **router_kw)
  return results(index, x, mask, r)


@pytest.mark.parametrize("kind,activation,router_kw,moe_kw", CASES, ids=[c[0] for c in CASES])
def test_single_device_equals_index_with_capacity_s(kind, activation, router_kw, moe_kw):
  x, mask, r = inputs()
  want = _index_reference(kind, activation, router_kw, x, mask, r)
  got = results(dropless_layer(kind, activation=activation, moe_kw=moe_kw, **router_kw),
                x, mask, r)
  assert_same_results(got, want, f"{kind} dropless vs index C=S")
  metrics = got[0][1][1].metrics
  assert float(metrics["dropped_fraction"]) == 0.0
  assert float(metrics["dropped_assignment_fraction"]) == 0.0
  assert float(metrics["exchange_overflow"]) == 0.0
  # The comparison is not vacuous: at capacity factor 1 the index form drops tokens here.
  capped = results(make_layer(kind, dispatch="index", activation=activation,
                              capacity_factor_train=1.0, **router_kw), x, mask, r)
  assert float(capped[0][1][1].metrics["dropped_assignment_fraction"]) > 0.05


MESH_CASES = [
    ("switch", (2, 4, 1)), ("gshard", (1, 8, 1)), ("topk", (1, 4, 2)),
    pytest.param("switch", (1, 8, 1), marks=pytest.mark.slow),
    pytest.param("topk", (2, 4, 1), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("kind,mesh_shape", MESH_CASES, ids=[
    "switch-2x4x1", "gshard-1x8x1", "topk-1x4x2", "switch-1x8x1", "topk-2x4x1"])
def test_sharded_equals_single_device_index_with_capacity_s(kind, mesh_shape):
  _, activation, router_kw, moe_kw = next(c for c in CASES if c[0] == kind)
  x, mask, r = inputs()
  want = _index_reference(kind, activation, router_kw, x, mask, r)
  layer = dropless_layer(kind, activation=activation, moe_kw=moe_kw, **router_kw)
  got = sharded_grads(layer, mesh_shape, x, mask, r)
  assert_same_results(got, want, f"{kind} dropless on {mesh_shape} vs index C=S")
  assert float(got[0][1][1].metrics["exchange_overflow"]) == 0.0


def _all_to_expert_0(layer):
  """A zero router: equal logits, and top-1 picks the lowest index, expert 0, for every token."""
  layer.router[...] = jnp.zeros_like(layer.router[...])
  return layer


def test_buffer_overflow_is_counted_exactly():
  """Every token routed to expert 0 on mesh (1, 8, 1); B = ceil(1.0 * 16 / 8) = 2 rows per pair.

  Each of the 8 devices holds T/8 = 16 tokens (no padding), all sent to device 0, which owns
  expert 0: 2 fit, 14 overflow, so 8 * 14 = 112 of the 128 assignments are counted. The 2 that
  fit on each device are its first two tokens (the sort is stable) and get expert 0's output
  times its router weight 1/8; every other token's output is exactly zero.
  """
  x, _, r = inputs()
  mask = jnp.ones(x.shape[:2], bool)
  squeezed = _all_to_expert_0(dropless_layer(moe_kw=dict(exchange="buffer",
                                                         exchange_buffer_factor=1.0)))
  (_, (y, aux)), _ = sharded_grads(squeezed, (1, 8, 1), x, mask, r)
  assert float(aux.metrics["exchange_overflow"]) == 112.0
  assert float(aux.metrics["dropped_fraction"]) == 112 / 128
  assert float(aux.metrics["dropped_assignment_fraction"]) == 112 / 128
  roomy = _all_to_expert_0(dropless_layer())
  (_, (y_full, aux_full)), _ = results(roomy, x, mask, r)
  assert float(aux_full.metrics["exchange_overflow"]) == 0.0
  y_T, y_full_T = np.asarray(y).reshape(T, M), np.asarray(y_full).reshape(T, M)
  fits_T = (np.arange(T) % 16) < 2
  np.testing.assert_allclose(y_T[fits_T], y_full_T[fits_T], rtol=1e-5, atol=1e-6)
  assert not np.any(y_T[~fits_T]) and np.all(np.abs(y_full_T[~fits_T]).max(axis=1) > 0)


@pytest.mark.parametrize("mesh_shape", [(2, 4, 1), (1, 8, 1)])
def test_hlo_has_two_all_to_alls_and_gathers_only_counts(mesh_shape):
  layer = dropless_layer("gshard", moe_kw=dict(exchange="buffer"))
  x, _, _ = inputs()
  hlo = _compiled_forward_text(layer, mesh_shape, x)
  ops = _all_to_alls(hlo)
  assert len(ops) == 2, f"expected 2 all-to-alls, found {len(ops)}"
  X = mesh_shape[1]
  copies = T // (mesh_shape[0] * X) * 2  # N = local tokens * K; B = N (the worst case)
  for dtypes, operands, elements in ops:
    assert dtypes == {"f32"} and operands == X
    assert elements == X * copies * M, (elements, X * copies * M)
  gathers = re.findall(r"=\s*(\S+)\s+all-gather(?:-start)?\(", hlo)
  # One all-gather: each device's (E,) int32 expert counts; no expert weights are gathered.
  assert [g.split("{")[0] for g in gathers] == [f"s32[{X},{E}]"], gathers


def test_ragged_exchange_lowers_to_two_ragged_all_to_alls():
  """XLA:CPU cannot run ragged_all_to_all; its lowering (StableHLO) is checked instead."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from moejax import sharding
  layer = dropless_layer("switch", moe_kw=dict(exchange="ragged"))
  x, _, _ = inputs()
  mesh = sharding.make_mesh(sharding.MeshConfig(1, 8, 1))
  with jax.set_mesh(mesh):
    graphdef, state = nnx.split(layer)
    state = jax.device_put(state, sharding.shardings(state, mesh))
    x = jax.device_put(x, NamedSharding(mesh, P(("data", "expert"))))
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, train=True))
    text = forward.lower(state, x).as_text()
  assert text.count("ragged_all_to_all") == 2, text.count("ragged_all_to_all")
  assert "all_to_all" not in text.replace("ragged_all_to_all", "")


BAD = [
    ("expert_choice", lambda: MoeConfig(router=RouterConfig(kind="expert_choice",
                                                            allow_noncausal=True),
                                        dispatch="dropless"),
     r"model\.moe\.dispatch='dropless'.*kind='expert_choice'.*use 'index' or 'einsum'"),
    ("soft", lambda: MoeConfig(router=RouterConfig(kind="soft", allow_noncausal=True),
                               dispatch="dropless"),
     r"model\.moe\.dispatch='dropless'.*kind='soft'.*use 'einsum'"),
    ("dropout", lambda: MoeConfig(dispatch="dropless", expert_dropout=0.1),
     r"model\.moe\.expert_dropout=0\.1 .*dropless"),
    ("capacity", lambda: MoeConfig(router=RouterConfig(capacity_factor_train=2.0),
                                   dispatch="dropless"),
     r"model\.moe\.router\.capacity_factor_train=2\.0 is not read .*dropless"),
    ("tile", lambda: MoeConfig(dispatch="dropless", grouped_matmul_tile=0),
     r"model\.moe\.grouped_matmul_tile=0 must be an integer >= 1"),
    ("factor", lambda: MoeConfig(dispatch="dropless", exchange_buffer_factor=0.0),
     r"model\.moe\.exchange_buffer_factor=0\.0 must be a number > 0"),
    ("index_tile", lambda: MoeConfig(dispatch="index", grouped_matmul_tile=32),
     r"model\.moe\.grouped_matmul_tile=32 is read only with model\.moe\.dispatch='dropless'"),
    ("index_exchange", lambda: MoeConfig(exchange="buffer"),
     r"model\.moe\.exchange='buffer' is read only with"),
    ("unknown_impl", lambda: MoeConfig(dispatch="dropless", grouped_matmul="fast"),
     r"model\.moe\.grouped_matmul='fast'.*'portable'"),
]


@pytest.mark.parametrize("make,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_settings_name_the_field(make, message):
  with pytest.raises(ConfigError, match=message):
    make()
