"""MoeLayer with NaN or inf in one token: the fault stays with that token.

Spec (moejax/moe.py, "Non-finite inputs"): a token whose input or router logits hold NaN/inf is
not routed. For a real token, every other token's output, the aux losses, the metrics, and the
gradients with respect to the parameters and to every input equal those of the same batch with
that token marked as padding, and its own output is NaN. For a padded token, everything equals the
clean batch. This holds whatever cotangent the bad token's output gets back (a NaN loss there
gives a NaN one), in both dispatch forms, on one device and on a mesh with expert and model axes.

Each (dispatch form, mesh) compiles one training-mode value-and-grad; the clean and faulty
batches run through that same program, so they are compared exactly. The two dispatch forms are
different programs and are compared with rtol=1e-5 (as in tests/test_moe.py).
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax import sharding
from moejax.moe import MoeConfig, MoeLayer
from moejax.routing import RouterConfig

M, F, E, S = 16, 32, 8, 8
B, L = 8, 16
REAL = (0, 2)  # (b, l): a real token whose slot, once free, goes to another token
PAD = (5, 9)  # a padded token
BAD = {"nan": np.nan, "inf": np.inf, "minus_inf": -np.inf}
MESHES = {"one_device": None, "mesh_1x4x2": (1, 4, 2)}


def _layer(dispatch):
  # GShard with C = ceil(2 * 1.0 * 8 / 8) = 2 slots per expert and group: tokens overflow.
  # Jitter scales the router input, batch priority sorts by router confidence.
  router = RouterConfig(kind="gshard", num_experts=E, capacity_factor_train=1.0, min_capacity=1,
                        jitter_eps=0.05, batch_prioritized=True)
  config = MoeConfig(router=router, ffn_dim=F, group_size=S, dispatch=dispatch)
  return MoeLayer(M, config, rngs=nnx.Rngs(0))


def _loss(layer, x, mask, r):
  y, aux = layer(x, padding_mask_BL=mask, train=True)
  return jnp.sum(y * r) + aux.aux_loss, (y, aux)


_grad = nnx.value_and_grad(_loss, argnums=(0, 1), has_aux=True)


def _batches(router_ME):
  """name -> (x, mask, r): the clean batch, the token REAL marked as padding, and faulty ones.

  Besides NaN/inf entries, "real_overflow" gives REAL a finite input whose router logits overflow
  to inf: entries of 3e38 with the signs of one expert's router column.
  """
  rng = np.random.default_rng(1)
  x = rng.standard_normal((B, L, M), np.float32)
  mask = rng.random((B, L)) < 0.75
  mask[REAL], mask[PAD] = True, False
  r = rng.standard_normal((B, L, M), np.float32)
  as_padding = mask.copy()
  as_padding[REAL] = False
  batches = {"clean": (x, mask, r), "real_as_padding": (x, as_padding, r)}
  for name, value in BAD.items():
    for where, row in (("real", x[REAL].copy()), ("pad", np.full(M, value, np.float32))):
      row[3] = value  # one entry of a real token; every entry of a padded one
      x_bad, r_bad = x.copy(), r.copy()
      x_bad[REAL if where == "real" else PAD] = row
      r_bad[REAL if where == "real" else PAD] = np.nan
      batches[f"{where}_{name}"] = (x_bad, mask, r_bad)
  router_ME = np.asarray(router_ME, np.float64)
  e = int(np.argmax(np.abs(router_ME).sum(0)))
  assert (1 - 0.05) * 3e38 * np.abs(router_ME[:, e]).sum() > 3.5e38, "logit e would not overflow"
  x_big, r_big = x.copy(), r.copy()
  x_big[REAL] = 3e38 * np.sign(router_ME[:, e])
  r_big[REAL] = np.nan
  batches["real_overflow"] = (x_big, mask, r_big)
  return batches


def _run(dispatch, mesh_shape):
  """Every batch through one compiled value-and-grad; returns name -> numpy results."""
  layer = _layer(dispatch)
  graphdef, state = nnx.split(layer)
  step = jax.jit(lambda state, x, mask, r: _grad(nnx.merge(graphdef, state), x, mask, r))
  mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape)) if mesh_shape else None
  results = {}
  with jax.set_mesh(mesh) if mesh else contextlib.nullcontext():
    if mesh:
      state = jax.device_put(state, sharding.shardings(state, mesh))
    for name, batch in _batches(layer.router[...]).items():
      if mesh:
        batch = jax.device_put(batch, NamedSharding(mesh, P(("data", "expert"))))
      (_, (y, aux)), (d_params, d_x) = step(state, *batch)
      grads = {"d_" + "/".join(map(str, path)): v[...]
               for path, v in nnx.to_flat_state(d_params)}
      results[name] = dict(y=y, aux_loss=aux.aux_loss, **aux.losses, **aux.metrics, d_x=d_x,
                           **grads)
  return jax.tree.map(np.asarray, results)


_RESULTS = {}


def _results(dispatch, mesh):
  if (dispatch, mesh) not in _RESULTS:
    _RESULTS[dispatch, mesh] = _run(dispatch, MESHES[mesh])
  return _RESULTS[dispatch, mesh]


def _assert_equal(got, want, tag, skip_y_row=None):
  assert got.keys() == want.keys()
  for name in want:
    g, w = got[name], want[name]
    if name == "y" and skip_y_row is not None:
      keep = np.ones((B, L), bool)
      keep[skip_y_row] = False
      g, w = g[keep], w[keep]
    assert np.all(np.isfinite(g)), f"{tag}: {name} is not finite"
    np.testing.assert_array_equal(g, w, err_msg=f"{tag}: {name}")


parametrize_runs = pytest.mark.parametrize(
    "dispatch,mesh", [(d, m) for m in MESHES for d in ("einsum", "index")])


@parametrize_runs
def test_non_finite_real_token_acts_as_padding_and_outputs_nan(dispatch, mesh):
  results = _results(dispatch, mesh)
  want = results["real_as_padding"]
  others = np.ones((B, L), bool)
  others[REAL] = False
  moved = np.abs(results["clean"]["y"] - want["y"])[others].max()
  assert moved > 1e-3, "freeing the token's slots changes no other token: REAL tests nothing"
  for name in list(BAD) + ["overflow"]:
    got = results[f"real_{name}"]
    assert np.all(np.isnan(got["y"][REAL])), f"{name}: the bad token's own output is not NaN"
    _assert_equal(got, want, f"{dispatch} on {mesh}, real token holding {name}", skip_y_row=REAL)


@parametrize_runs
def test_non_finite_padded_token_changes_nothing(dispatch, mesh):
  results = _results(dispatch, mesh)
  want = results["clean"]
  assert np.abs(want["d_router"]).max() > 0 and np.abs(want["d_x"][PAD]).max() == 0
  for name in BAD:
    _assert_equal(results[f"pad_{name}"], want, f"{dispatch} on {mesh}, padding holding {name}")


@pytest.mark.parametrize("mesh", list(MESHES))
def test_dispatch_forms_agree_with_a_non_finite_token(mesh):
  einsum, index = _results("einsum", mesh), _results("index", mesh)
  for batch in ("real_nan", "real_overflow", "pad_inf"):
    for name, want in index[batch].items():
      got = einsum[batch][name]
      np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{batch} {name}")
      finite = ~np.isnan(want)
      atol = 1e-6 * max(float(np.abs(want[finite]).max(initial=0.0)), 1e-30)
      np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5, atol=atol,
                                 err_msg=f"einsum vs index on {mesh}: {batch} {name}")
