"""Helpers shared by the router family tests (tests/test_routing_<family>.py).

`routed` runs `route` in one compiled call and returns the decision with its derived tensors,
losses and metrics as numpy arrays; `assert_capacity_respected` checks a decision's slots.

The layer-level checks run a family through `MoeLayer` with the sizes of tests/test_moe.py
(M=16, F=32, E=8, S=8, x of shape (8, 16, 16), ~25% padding):

* `dispatch_results`: both dispatch forms (einsum, index) give the same loss, output, losses,
  metrics and gradients (`test_moe.assert_same_results`);
* `single_device_results` / `sharded_results`: the layer on a mesh equals the layer on one device
  (`forward`: the same for a forward call only, e.g. in evaluation);
* `forward_all_to_alls`: the compiled forward on an expert-parallel mesh holds the all-to-alls
  counted by `test_moe._all_to_alls`.

Routers that read token ids (hash) get them as an extra argument (`token_ids`); for the others it
is None and the layer is called exactly as tests/test_moe.py calls it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax import sharding
from moejax.moe import MoeConfig, MoeLayer
from moejax.routing import RouterConfig, RouterInputs, route
from routing_reference import Routed  # noqa: F401  (re-exported)
from test_moe import B, E, F, L, M, S, _all_to_alls, inputs  # noqa: F401  (re-exported)

VOCAB = 37  # token ids for routers that read them; a prime, so ids do not line up with E


# Tiny programs whose compile time dominates: XLA's backend optimisations are skipped (decisions
# are identical, sums differ by float32 rounding only), as in tests/routing_reference.py.
@functools.partial(jax.jit, static_argnames=("config", "train"),
                   compiler_options={"xla_backend_optimization_level": 0})
def _route_jit(logits, mask_GS, inputs, *, config, train):
  decision = route(logits, config, train=train, padding_mask_GS=mask_GS, inputs=inputs)
  losses, metrics = decision.stats.summarize()
  return decision, decision.dispatch_GSEC(), decision.combine_GSEC(), losses, metrics


def routed(logits, config, *, train, mask_GS=None, **inputs) -> Routed:
  """`route(logits, config, ...)` with RouterInputs(**inputs), everything as numpy arrays."""
  as_array = lambda x: None if x is None else jnp.asarray(x)
  router_inputs = RouterInputs(**{name: as_array(value) for name, value in inputs.items()})
  decision, dispatch, combine, losses, metrics = jax.tree.map(np.asarray, _route_jit(
      as_array(logits), as_array(mask_GS), router_inputs, config=config, train=train))
  return Routed(decision.expert_index_GSK, decision.slot_GSK, decision.keep_GSK,
                decision.weight_GSK, decision.capacity, dispatch, combine, losses, metrics)


def assert_capacity_respected(r: Routed, mask_GS):
  """Kept assignments fill distinct slots below C, padding is in none, every slot holds <= 1."""
  G, S, K = r.keep_GSK.shape
  assert not r.keep_GSK[~np.asarray(mask_GS, bool)].any(), "a padded token was dispatched"
  assert np.all(r.slot_GSK[r.keep_GSK] < r.capacity)
  for g in range(G):
    taken = [(r.expert_index_GSK[g, s, j], r.slot_GSK[g, s, j])
             for s in range(S) for j in range(K) if r.keep_GSK[g, s, j]]
    assert len(taken) == len(set(taken)), f"group {g}: two assignments share a slot"
  assert np.all(r.dispatch.sum(axis=(1, 3)) <= r.capacity), "an expert over capacity"
  assert np.all(r.dispatch.sum(axis=1) <= 1), "a slot holds two tokens"


def make_layer(kind, *, dispatch="index", activation="relu", seed=0, **router_kw):
  """An MoeLayer of the test sizes; `vocab_size` is passed when the family reads token ids."""
  router_kw.setdefault("min_capacity", 1)
  router = RouterConfig(kind=kind, num_experts=E, **router_kw)
  config = MoeConfig(router=router, ffn_dim=F, group_size=S, dispatch=dispatch,
                     activation=activation)
  vocab = VOCAB if router.family.token_ids else None
  return MoeLayer(M, config, rngs=nnx.Rngs(seed), vocab_size=vocab)


def token_ids(seed=3):
  """(B, L) int32 ids in [0, VOCAB)."""
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (B, L)), jnp.int32)


def _loss(layer, x, mask, r, ids):
  y, aux = layer(x, padding_mask_BL=mask, token_ids_BL=ids, train=True)
  return jnp.sum(y * r) + aux.aux_loss, (y, aux)


_grad = nnx.value_and_grad(_loss, argnums=(0, 1), has_aux=True)


def _grads_fn(graphdef):
  return jax.jit(lambda state, x, mask, r, ids: _grad(nnx.merge(graphdef, state), x, mask, r,
                                                      ids))


def single_device_results(layer, ids=None):
  """((loss, (y, aux)), (d_params, d_x)) of one training step's loss on one device."""
  x, mask, r = inputs()
  graphdef, state = nnx.split(layer)
  return _grads_fn(graphdef)(state, x, mask, r, ids)


def sharded_results(layer, mesh_shape, ids=None):
  """The same as `single_device_results`, on a (data, expert, model) mesh with placed params."""
  x, mask, r = inputs()
  mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape))
  with jax.set_mesh(mesh):
    graphdef, state = nnx.split(layer)
    state = jax.device_put(state, sharding.shardings(state, mesh))
    tokens = NamedSharding(mesh, P(("data", "expert")))
    x, mask, r = (jax.device_put(a, tokens) for a in (x, mask, r))
    ids = None if ids is None else jax.device_put(ids, tokens)
    return _grads_fn(graphdef)(state, x, mask, r, ids)


def forward(layer, mesh_shape=None, ids=None, *, train=False):
  """(y, aux) of a jitted call, on one device (mesh_shape None) or on a mesh."""
  x, mask, _ = inputs()
  graphdef, state = nnx.split(layer)
  call = jax.jit(lambda state, x, mask, ids: nnx.merge(graphdef, state)(
      x, padding_mask_BL=mask, token_ids_BL=ids, train=train))
  if mesh_shape is None:
    return call(state, x, mask, ids)
  mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape))
  with jax.set_mesh(mesh):
    state = jax.device_put(state, sharding.shardings(state, mesh))
    tokens = NamedSharding(mesh, P(("data", "expert")))
    x, mask = (jax.device_put(a, tokens) for a in (x, mask))
    ids = None if ids is None else jax.device_put(ids, tokens)
    return call(state, x, mask, ids)


def dispatch_results(make, ids=None):
  """{"einsum": results, "index": results} of layers built by `make(dispatch)`."""
  return {dispatch: single_device_results(make(dispatch), ids) for dispatch in ("einsum", "index")}


def forward_all_to_alls(layer, mesh_shape, ids=None, *, train=True):
  """`_all_to_alls` of the compiled forward of `layer` on a mesh."""
  x, _, _ = inputs()
  mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape))
  with jax.set_mesh(mesh):
    graphdef, state = nnx.split(layer)
    state = jax.device_put(state, sharding.shardings(state, mesh))
    tokens = NamedSharding(mesh, P(("data", "expert")))
    x = jax.device_put(x, tokens)
    ids = None if ids is None else jax.device_put(ids, tokens)
    forward = jax.jit(lambda state, x, ids: nnx.merge(graphdef, state)(
        x, token_ids_BL=ids, train=train))
    return _all_to_alls(forward.lower(state, x, ids).compile().as_text())
