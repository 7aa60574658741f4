"""MoeLayer: a token-by-token numpy reference, dispatch forms, sharding, HLO, randomness, errors.

Sizes: M=16, F=32, E=8, S=8 and x of shape (B, L, M) = (8, 16, 16), so 128 tokens in 16 groups;
with min_capacity=1 and small capacity factors, C is a few slots and many tokens overflow.

The numpy reference (`reference`) recomputes everything from the layer's own parameters in
float64: logits, softmax, top-k, capacity claimed in position order per group of S tokens (token by
token, or choice-major with `claim_order="choice"`), and for each token the sum over its kept
experts of weight * expert_ffn(x). The float32 layer is compared with rtol=1e-5, atol=1e-6
(outputs are O(1)).

Multi-device comparisons (sharded vs single device, einsum vs index) use rtol=1e-5 and an
absolute tolerance of 1e-6 times the largest magnitude of the array compared (`assert_close`).
"""

import math
import re

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
T = B * L
RTOL = 1e-5


def make_layer(kind="switch", *, dispatch="index", activation="relu", expert_dropout=0.0,
               seed=0, **router_kw):
  router_kw.setdefault("min_capacity", 1)
  router = RouterConfig(kind=kind, num_experts=E, **router_kw)
  config = MoeConfig(router=router, ffn_dim=F, group_size=S, dispatch=dispatch,
                     activation=activation, expert_dropout=expert_dropout)
  return MoeLayer(M, config, rngs=nnx.Rngs(seed))


def inputs(seed=1):
  """x (B, L, M), a padding mask (B, L) with ~25% padding, and a cotangent r (B, L, M)."""
  rng = np.random.default_rng(seed)
  x_BLM = rng.standard_normal((B, L, M), np.float32)
  mask_BL = rng.random((B, L)) < 0.75
  r_BLM = rng.standard_normal((B, L, M), np.float32)
  return jnp.asarray(x_BLM), jnp.asarray(mask_BL), jnp.asarray(r_BLM)


@nnx.jit(static_argnames="train")
def apply(layer, x_BLM, mask_BL, train):
  return layer(x_BLM, padding_mask_BL=mask_BL, train=train)


def assert_close(actual, expected, name, rtol=RTOL, atol_scale=1e-6):
  actual, expected = np.asarray(actual), np.asarray(expected)
  atol = atol_scale * max(float(np.abs(expected).max()), 1e-30)
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=name)


# ----------------------------------------------------------------------------- numpy reference


def _gelu_tanh(h):
  # jax.nn.gelu's default (approximate=True) form.
  return 0.5 * h * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (h + 0.044715 * h**3)))


def reference(layer, x_BLM, mask_BL=None, *, capacity, second_kept_T=None):
  """The layer recomputed token by token in float64 numpy. Returns a dict of results."""
  rc = layer.config.router
  K = rc.k
  kind = rc.kind.value
  x_TM = np.asarray(x_BLM, np.float64).reshape(-1, M)
  mask_T = np.ones(len(x_TM), bool) if mask_BL is None else np.asarray(mask_BL).reshape(-1)
  logits_TE = x_TM @ np.asarray(layer.router[...], np.float64)
  probs_TE = np.exp(logits_TE - logits_TE.max(1, keepdims=True))
  probs_TE /= probs_TE.sum(1, keepdims=True)
  order_TE = np.argsort(-probs_TE, axis=1, kind="stable")
  sorted_TE = np.take_along_axis(probs_TE, order_TE, axis=1)
  if K < E:
    gap = (sorted_TE[:, K - 1] - sorted_TE[:, K]).min()
    assert gap > 1e-6, f"test data has a near-tie in top-{K} (gap {gap}); change the seed"
  expert_TK, gate_TK = order_TE[:, :K], sorted_TE[:, :K]
  if kind == "gshard" or (kind == "topk" and rc.normalize_weights):
    gate_TK = gate_TK / gate_TK.sum(1, keepdims=True)
  active_TK = np.repeat(mask_T[:, None], K, axis=1)
  if second_kept_T is not None:
    active_TK[:, 1] &= second_kept_T
  keep_TK = np.zeros_like(active_TK)
  choice_major = rc.claim_order.value == "choice"
  for g in range(len(x_TM) // S):
    count_E = np.zeros(E, int)
    tokens = range(g * S, (g + 1) * S)
    queue = ([(t, k) for k in range(K) for t in tokens] if choice_major else
             [(t, k) for t in tokens for k in range(K)])
    for t, k in queue:
      e = expert_TK[t, k]
      if active_TK[t, k] and count_E[e] < capacity:
        keep_TK[t, k] = True
        count_E[e] += 1
  # Every expert on every token (cheap at this size), then pick each token's kept experts.
  wi, wo = (np.asarray(w[...], np.float64) for w in (layer.wi, layer.wo))
  h_TEF = np.einsum("TM,EMF->TEF", x_TM, wi)
  activation = layer.config.activation.value
  if activation == "relu":
    h_TEF = np.maximum(h_TEF, 0.0)
  elif activation == "gelu":
    h_TEF = _gelu_tanh(h_TEF)
  else:
    gate_TEF = np.einsum("TM,EMF->TEF", x_TM, np.asarray(layer.wg[...], np.float64))
    h_TEF = gate_TEF / (1.0 + np.exp(-gate_TEF)) * h_TEF
  ffn_TEM = np.einsum("TEF,EFM->TEM", h_TEF, wo)
  y_TM = np.zeros_like(x_TM)
  for t, k in zip(*np.nonzero(keep_TK)):
    y_TM[t] += gate_TK[t, k] * ffn_TEM[t, expert_TK[t, k]]

  # Losses and metrics over real tokens only.
  groups = len(x_TM) // S
  m_GS = mask_T.reshape(groups, S).astype(np.float64)
  n_G = m_GS.sum(1)
  first_GSE = np.eye(E)[expert_TK[:, 0]].reshape(groups, S, E) * m_GS[..., None]
  p_GSE = probs_TE.reshape(groups, S, E) * m_GS[..., None]
  f_GE = first_GSE.sum(1) / np.maximum(n_G, 1)[:, None]
  pm_GE = p_GSE.sum(1) / np.maximum(n_G, 1)[:, None]
  lb_G = E * (f_GE * pm_GE).sum(1)
  lse_T = np.log(np.exp(logits_TE).sum(1))
  assigned_E = np.bincount(expert_TK[active_TK], minlength=E).astype(np.float64)
  losses = {"load_balancing_loss": lb_G[n_G > 0].mean(),
            "router_z_loss": (lse_T**2)[mask_T].mean()}
  metrics = {
      "expert_load": assigned_E / assigned_E.sum(),
      "dropped_fraction": (~keep_TK.any(1))[mask_T].mean(),
      "dropped_assignment_fraction": 1.0 - keep_TK.sum() / assigned_E.sum(),
      "capacity_utilisation": keep_TK.sum() / (groups * E * capacity),
  }
  aux_loss = (rc.load_balancing_loss_weight * losses["load_balancing_loss"] +
              rc.z_loss_weight * losses["router_z_loss"])
  return dict(y=y_TM.reshape(np.shape(x_BLM)), keep_TK=keep_TK, losses=losses, metrics=metrics,
              aux_loss=aux_loss, ffn_TEM=ffn_TEM, gate_TK=gate_TK, expert_TK=expert_TK)


def assert_matches_reference(y, aux, ref, *, tag=""):
  np.testing.assert_allclose(y, ref["y"], rtol=RTOL, atol=1e-6, err_msg=f"{tag} output")
  for name, value in ref["losses"].items():
    np.testing.assert_allclose(aux.losses[name], value, rtol=RTOL, atol=1e-7, err_msg=name)
  for name, value in ref["metrics"].items():
    np.testing.assert_allclose(aux.metrics[name], value, rtol=RTOL, atol=1e-7, err_msg=name)
  np.testing.assert_allclose(aux.aux_loss, ref["aux_loss"], rtol=RTOL, err_msg="aux_loss")


# ----------------------------------------------------------------------------- single device


@pytest.mark.parametrize("activation,kind,router_kw", [
    ("relu", "switch", {}),
    ("gelu", "gshard", {}),
    ("gelu", "gshard", dict(claim_order="choice")),
    ("swiglu", "topk", dict(k=3, normalize_weights=False)),
])
def test_layer_matches_token_reference(activation, kind, router_kw):
  # Eval capacity C = ceil(k * 1.0 * 8 / 8) = k slots per expert per group: tokens overflow.
  layer = make_layer(kind, activation=activation, capacity_factor_eval=1.0, **router_kw)
  x, _, _ = inputs()
  y, aux = apply(layer, x, None, train=False)
  ref = reference(layer, x, capacity=layer.config.router.k)
  assert ref["metrics"]["dropped_assignment_fraction"] > 0.1  # overflow is exercised
  assert_matches_reference(y, aux, ref, tag=activation)


def test_train_and_eval_use_their_capacity_factors():
  # C_train = ceil(0.5 * 8 / 8) = 1, C_eval = ceil(2.0 * 8 / 8) = 2.
  layer = make_layer("switch", capacity_factor_train=0.5, capacity_factor_eval=2.0)
  x, _, _ = inputs()
  y_train, aux_train = apply(layer, x, None, train=True)
  y_eval, aux_eval = apply(layer, x, None, train=False)
  assert_matches_reference(y_train, aux_train, reference(layer, x, capacity=1), tag="train")
  assert_matches_reference(y_eval, aux_eval, reference(layer, x, capacity=2), tag="eval")
  assert np.abs(np.asarray(y_train - y_eval)).max() > 1e-2


def test_padding_takes_no_capacity_and_no_part_in_losses():
  layer = make_layer("gshard", capacity_factor_eval=1.0)  # C = 2
  x, mask, _ = inputs()
  mask = np.asarray(mask).copy()
  mask[3, :S] = False  # one group is all padding
  y, aux = apply(layer, x, mask, train=False)
  ref = reference(layer, x, mask, capacity=2)
  assert_matches_reference(y, aux, ref, tag="masked")
  assert np.all(np.asarray(y)[~np.asarray(mask)] == 0.0), "a padded token has nonzero output"
  # Without the mask the padded tokens would claim slots: the real tokens' outputs change.
  y_nomask, _ = apply(layer, x, None, train=False)
  assert np.abs(np.asarray(y_nomask - y)[np.asarray(mask)]).max() > 1e-2
  # Whatever the padded tokens hold, real outputs, losses and metrics stay the same.
  garbage = 100.0 * np.random.default_rng(7).standard_normal(x.shape, np.float32)
  x_garbage = np.where(np.asarray(mask)[..., None], np.asarray(x), garbage)
  y2, aux2 = apply(layer, x_garbage, mask, train=False)
  np.testing.assert_allclose(y2, y, rtol=1e-6, atol=1e-7)
  for name in aux.losses:
    np.testing.assert_allclose(aux2.losses[name], aux.losses[name], rtol=1e-6, err_msg=name)
  for name in aux.metrics:
    np.testing.assert_allclose(aux2.metrics[name], aux.metrics[name], rtol=1e-6, err_msg=name)


def _loss(layer, x, mask, r):
  y, aux = layer(x, padding_mask_BL=mask, train=True)
  return jnp.sum(y * r) + aux.aux_loss, (y, aux)


_grad = nnx.value_and_grad(_loss, argnums=(0, 1), has_aux=True)


def grads_fn(graphdef):
  """A jitted (state, x, mask, r) -> ((loss, (y, aux)), (d_params, d_x))."""
  return jax.jit(lambda state, x, mask, r: _grad(nnx.merge(graphdef, state), x, mask, r))


def assert_same_results(got, want, tag):
  (loss_a, (y_a, aux_a)), (dp_a, dx_a) = got
  (loss_b, (y_b, aux_b)), (dp_b, dx_b) = want
  assert_close(loss_a, loss_b, f"{tag} loss")
  assert_close(y_a, y_b, f"{tag} y")
  assert_close(aux_a.aux_loss, aux_b.aux_loss, f"{tag} aux_loss")
  for name in aux_b.losses:
    assert_close(aux_a.losses[name], aux_b.losses[name], f"{tag} {name}")
  for name in aux_b.metrics:
    assert_close(aux_a.metrics[name], aux_b.metrics[name], f"{tag} {name}")
  assert_close(dx_a, dx_b, f"{tag} d/dx")
  flat_a, flat_b = dict(nnx.to_flat_state(dp_a)), dict(nnx.to_flat_state(dp_b))
  assert flat_a.keys() == flat_b.keys()
  for path in flat_b:
    assert np.abs(np.asarray(flat_b[path][...])).max() > 0, f"{tag} d/d{path} is all zero"
    assert_close(flat_a[path][...], flat_b[path][...], f"{tag} d/d{path}")


def test_einsum_and_index_layers_agree_with_gradients():
  x, mask, r = inputs()
  results = {}
  for dispatch in ("einsum", "index"):
    layer = make_layer("gshard", dispatch=dispatch, activation="swiglu", capacity_factor_train=1.0,
                       jitter_eps=0.05)
    graphdef, state = nnx.split(layer)
    results[dispatch] = grads_fn(graphdef)(state, x, mask, r)
  assert_same_results(results["einsum"], results["index"], "einsum vs index")


# ----------------------------------------------------------------------------- sharded


def sharded_grads(layer, mesh_shape, x, mask, r):
  """The jitted loss, output and gradients of `layer` on a mesh, with placed parameters."""
  mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape))
  with jax.set_mesh(mesh):
    graphdef, state = nnx.split(layer)
    state = jax.device_put(state, sharding.shardings(state, mesh))
    tokens = NamedSharding(mesh, P(("data", "expert")))
    x, mask, r = (jax.device_put(a, tokens) for a in (x, mask, r))
    assert state["wi"][...].sharding.spec == P("expert", None, "model")
    assert state["wo"][...].sharding.spec == P("expert", "model", None)
    return grads_fn(graphdef)(state, x, mask, r)


SHARDED_CASES = [
    # (router kind, dispatch, mesh (data, expert, model), extra settings)
    ("switch", "index", (2, 4, 1), dict(capacity_factor_train=1.0)),
    ("switch", "einsum", (1, 4, 2), dict(capacity_factor_train=1.0, batch_prioritized=True)),
    # Jitter, GShard's random policy and expert dropout: random numbers drawn in the global view.
    ("gshard", "einsum", (2, 4, 1), dict(capacity_factor_train=1.0, jitter_eps=0.05,
                                         second_expert_policy="random", expert_dropout=0.2)),
    ("gshard", "index", (1, 8, 1), dict(capacity_factor_train=1.0)),
    ("topk", "index", (1, 4, 2), dict(k=3, capacity_factor_train=0.5, activation="swiglu",
                                      expert_dropout=0.2)),
    ("topk", "einsum", (1, 8, 1), dict(k=3, normalize_weights=False, capacity_factor_train=0.5,
                                       activation="gelu")),
]


@pytest.mark.parametrize("kind,dispatch,mesh_shape,settings", SHARDED_CASES,
                         ids=[f"{c[0]}-{c[1]}-{'x'.join(map(str, c[2]))}" for c in SHARDED_CASES])
def test_sharded_matches_single_device(kind, dispatch, mesh_shape, settings):
  settings = dict(settings)
  activation = settings.pop("activation", "relu")
  dropout = settings.pop("expert_dropout", 0.0)
  layer = make_layer(kind, dispatch=dispatch, activation=activation, expert_dropout=dropout,
                     **settings)
  x, mask, r = inputs()
  graphdef, state = nnx.split(layer)
  want = grads_fn(graphdef)(state, x, mask, r)
  got = sharded_grads(layer, mesh_shape, x, mask, r)
  assert float(want[0][1][1].metrics["dropped_assignment_fraction"]) > 0.05  # overflow exercised
  assert_same_results(got, want, f"{kind}/{dispatch} on {mesh_shape}")


# ----------------------------------------------------------------------------- compiled HLO


def _all_to_alls(hlo_text):
  """Per all-to-all op: (dtypes, number of operands, total elements over them) on one device."""
  ops = []
  for line in hlo_text.splitlines():
    found = re.search(r"=\s*(\(.*?\)|\S+)\s+all-to-all\(", line)
    if found:
      shapes = re.findall(r"([a-z]+\d*)\[([\d,]*)\]", found.group(1))
      total = sum(math.prod(int(d) for d in dims.split(",") if d) for _, dims in shapes)
      ops.append(({dtype for dtype, _ in shapes}, len(shapes), total))
  assert len(ops) == hlo_text.count("all-to-all("), "an all-to-all the parser did not read"
  return ops


class TwoMoe(nnx.Module):

  def __init__(self, layer_a, layer_b):
    self.a, self.b = layer_a, layer_b

  def __call__(self, x, *, train):
    h, aux_a = self.a(x, train=train)
    y, aux_b = self.b(h, train=train)
    return y, aux_a.aux_loss + aux_b.aux_loss


def _compiled_forward_text(module, mesh_shape, x):
  mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape))
  with jax.set_mesh(mesh):
    graphdef, state = nnx.split(module)
    state = jax.device_put(state, sharding.shardings(state, mesh))
    x = jax.device_put(x, NamedSharding(mesh, P(("data", "expert"))))
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, train=True))
    return forward.lower(state, x).compile().as_text()


@pytest.mark.parametrize("mesh_shape", [(2, 4, 1), (1, 8, 1)])
def test_hlo_has_two_all_to_alls_of_the_expected_size_and_no_all_gather(mesh_shape):
  layer = make_layer("gshard", capacity_factor_train=1.0)
  x, _, _ = inputs()
  hlo = _compiled_forward_text(layer, mesh_shape, x)
  ops = _all_to_alls(hlo)
  assert len(ops) == 2, f"expected 2 all-to-alls, found {len(ops)}"
  assert not re.search(r"all-gather(-start)?\(", hlo), "the forward gathers something"
  groups = T // (mesh_shape[0] * mesh_shape[1]) // S  # local groups per device: 2
  capacity = 2  # ceil(2 * 1.0 * 8 / 8)
  for dtypes, operands, elements in ops:
    assert dtypes == {"f32"}
    assert operands == mesh_shape[1], "expected the tuple form: one operand per expert peer"
    assert elements == E * groups * capacity * M, (elements, E * groups * capacity * M)


def test_hlo_of_two_moe_layers_has_four_all_to_alls():
  model = TwoMoe(make_layer("switch", seed=0), make_layer("switch", seed=1))
  x, _, _ = inputs()
  ops = _all_to_alls(_compiled_forward_text(model, (1, 8, 1), x))
  assert len(ops) == 4, f"expected 4 all-to-alls, found {len(ops)}"


# ----------------------------------------------------------------------------- randomness


def test_jitter_in_training_only_and_only_on_the_router_input():
  # C_eval = 1; C_train = S = 8, so no token overflows in training.
  layer = make_layer("switch", jitter_eps=0.2, capacity_factor_eval=1.0,
                     capacity_factor_train=8.0)
  x, _, _ = inputs()
  y_eval1, _ = apply(layer, x, None, train=False)
  y_eval2, _ = apply(layer, x, None, train=False)
  np.testing.assert_array_equal(y_eval1, y_eval2, err_msg="eval is not deterministic")
  assert_matches_reference(y_eval1, apply(layer, x, None, train=False)[1],
                           reference(layer, x, capacity=1), tag="eval with jitter configured")
  y_train1, _ = apply(layer, x, None, train=True)
  y_train2, _ = apply(layer, x, None, train=True)
  assert np.abs(np.asarray(y_train1 - y_train2)).max() > 1e-4, "jitter did not change per step"
  # The experts see the unjittered x: each token's output is c * ffn_e(x) for one expert e,
  # with c in (0, 1] its (jittered) gate.
  ffn_TEM = reference(layer, x, capacity=8)["ffn_TEM"]
  y_TM = np.asarray(y_train1, np.float64).reshape(T, M)
  for t in range(T):
    c_E = ffn_TEM[t] @ y_TM[t] / np.sum(ffn_TEM[t] ** 2, axis=1)
    residual_E = np.abs(y_TM[t] - c_E[:, None] * ffn_TEM[t]).max(1)
    e = int(np.argmin(residual_E))
    assert residual_E[e] < 1e-5 and 0 < c_E[e] <= 1 + 1e-6, f"token {t} is not c * ffn_e(x)"


def test_gshard_random_second_expert_policy():
  # Threshold 1: the second expert is kept with probability min(1, g2) ~ 0.5 here.
  # Capacity factor 8 gives C = S: no capacity drops, only the policy's.
  layer = make_layer("gshard", second_expert_policy="random", second_expert_threshold=1.0,
                     capacity_factor_train=8.0, capacity_factor_eval=8.0)
  x, _, _ = inputs()
  both = reference(layer, x, capacity=S)
  first_only = reference(layer, x, capacity=S, second_kept_T=np.zeros(T, bool))
  y_eval, aux_eval = apply(layer, x, None, train=False)
  assert_matches_reference(y_eval, aux_eval, both, tag="eval keeps both experts")
  y_train, _ = apply(layer, x, None, train=True)
  y_TM = np.asarray(y_train).reshape(T, M)

  def close(ref):
    return np.all(np.abs(y_TM - ref["y"].reshape(T, M)) <= 1e-6 + RTOL * np.abs(y_TM), axis=1)

  kept, dropped = close(both), close(first_only)
  assert np.all(kept | dropped), "a token's output is neither g1*y1 + g2*y2 nor g1*y1"
  g2_mean = both["gate_TK"][:, 1].mean()
  assert abs(kept.mean() - g2_mean) < 0.2, (kept.mean(), g2_mean)
  y_train2, _ = apply(layer, x, None, train=True)
  assert np.abs(np.asarray(y_train2 - y_train)).max() > 1e-4, "the policy did not vary per step"


def test_expert_dropout_in_training_only():
  layer = make_layer("switch", expert_dropout=0.5, capacity_factor_train=8.0,
                     capacity_factor_eval=8.0)
  x, _, _ = inputs()
  ref = reference(layer, x, capacity=S)
  y_eval, aux_eval = apply(layer, x, None, train=False)
  assert_matches_reference(y_eval, aux_eval, ref, tag="eval without dropout")
  y_train1, aux_train = apply(layer, x, None, train=True)
  y_train2, _ = apply(layer, x, None, train=True)
  assert np.abs(np.asarray(y_train1 - y_eval)).max() > 1e-2, "dropout changed nothing in training"
  assert np.abs(np.asarray(y_train1 - y_train2)).max() > 1e-2, "the same dropout mask twice"
  # Dropout acts inside the experts only: routing, losses and metrics are untouched.
  for name, value in ref["losses"].items():
    np.testing.assert_allclose(aux_train.losses[name], value, rtol=RTOL, err_msg=name)


# ----------------------------------------------------------------------------- bad settings


def _layer_call(num_experts=E, group_size=S, mesh_shape=None):
  router = RouterConfig(kind="switch", num_experts=num_experts)
  # Abstract parameters suffice: the shapes are checked before any parameter is read.
  layer = nnx.eval_shape(lambda: MoeLayer(
      M, MoeConfig(router=router, ffn_dim=F, group_size=group_size), rngs=nnx.Rngs(0)))
  x = np.zeros((B, L, M), np.float32)
  if mesh_shape is None:
    return layer(x)
  with jax.set_mesh(sharding.make_mesh(sharding.MeshConfig(*mesh_shape))):
    return layer(x)


BAD_SETTINGS = [
    ("k0", lambda: RouterConfig(kind="topk", k=0, num_experts=8),
     r"model\.moe\.router\.k=0 .*\[1, num_experts=8\]"),
    ("k_gt_E", lambda: RouterConfig(kind="topk", k=9, num_experts=8),
     r"model\.moe\.router\.k=9 .*\[1, num_experts=8\]"),
    ("k_for_switch", lambda: RouterConfig(kind="switch", k=2),
     r"model\.moe\.router\.k=2 is not allowed for .*kind='switch'.*kind='topk'"),
    ("capacity_train_0", lambda: RouterConfig(capacity_factor_train=0.0),
     r"model\.moe\.router\.capacity_factor_train=0\.0 must be .*> 0"),
    ("capacity_eval_neg", lambda: RouterConfig(capacity_factor_eval=-1.5),
     r"model\.moe\.router\.capacity_factor_eval=-1\.5 must be .*> 0"),
    ("router_name", lambda: RouterConfig(kind="bogus"),
     r"model\.moe\.router\.kind='bogus' is not allowed; choose one of 'switch', 'gshard', 'topk'"),
    ("dispatch", lambda: MoeConfig(dispatch="scatter"),
     r"model\.moe\.dispatch='scatter' is not allowed; choose one of 'einsum', 'index'"),
    ("activation", lambda: MoeConfig(activation="tanh"),
     r"model\.moe\.activation='tanh' is not allowed; choose one of 'relu', 'gelu', 'swiglu'"),
    ("E_not_divisible", lambda: _layer_call(num_experts=6, mesh_shape=(2, 4, 1)),
     r"model\.moe\.router\.num_experts=6 must be divisible by the mesh's expert axis size \(4\)"),
    ("group_size_single", lambda: _layer_call(group_size=48),
     r"model\.moe\.group_size=48 must divide the tokens per device \(128 .*divisor of 128"),
    ("group_size_mesh", lambda: _layer_call(group_size=32, mesh_shape=(2, 4, 1)),
     r"model\.moe\.group_size=32 must divide the tokens per device \(16 .*divisor of 16"),
]


@pytest.mark.parametrize("make,message", [b[1:] for b in BAD_SETTINGS],
                         ids=[b[0] for b in BAD_SETTINGS])
def test_bad_settings_raise_value_error_naming_field_value_and_allowed(make, message):
  with pytest.raises(ValueError, match=message):
    make()


@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu"])
def test_expert_loops_give_the_same_outputs_and_gradients(activation):
  """`expert_loop` only changes how the matmuls are issued: batched, scan and unroll agree."""
  from moejax.experts import Activation, ExpertLoop, expert_ffn
  E, G, C, M, F = 4, 2, 3, 8, 16
  keys = jax.random.split(jax.random.key(7), 5)
  x = jax.random.normal(keys[0], (E, G, C, M))
  wi = jax.random.normal(keys[1], (E, M, F)) / math.sqrt(M)
  wo = jax.random.normal(keys[2], (E, F, M)) / math.sqrt(F)
  wg = jax.random.normal(keys[3], (E, M, F)) / math.sqrt(M) if activation == "swiglu" else None
  keep = jax.random.bernoulli(keys[4], 0.7, (E, G, C, F))

  def run(loop):
    def loss(x, wi, wo, wg):
      y = expert_ffn(x, wi, wo, wg, activation=Activation(activation), loop=loop,
                     dropout_rate=0.3, dropout_keep_EGCF=keep)
      return jnp.sum(jnp.sin(y)), y
    (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(x, wi, wo, wg)
    return y, grads

  # Expert 1 by hand: relu/swiglu hidden, dropout mask and 1/(1-0.3) scale, output projection.
  h = x[1] @ wi[1]
  h = {"relu": lambda: jax.nn.relu(h), "gelu": lambda: jax.nn.gelu(h),
       "swiglu": lambda: jax.nn.silu(x[1] @ wg[1]) * h}[activation]()
  expected_1 = jnp.where(keep[1], h / 0.7, 0.0) @ wo[1]
  reference_y, reference_grads = run(ExpertLoop.BATCHED)
  np.testing.assert_allclose(reference_y[1], expected_1, rtol=1e-5, atol=1e-6)
  for loop in (ExpertLoop.SCAN, ExpertLoop.UNROLL):
    y, grads = run(loop)
    np.testing.assert_allclose(y, reference_y, rtol=1e-5, atol=1e-6, err_msg=str(loop))
    for g, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(reference_grads)):
      np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6, err_msg=str(loop))


def test_ordering_dependency_leaves_values_bitwise_unchanged():
  """`_after` only adds a data dependency: every value, signed zeros and NaNs included, is kept."""
  from moejax.experts import _after
  a = jnp.array([1.5, -0.0, 0.0, jnp.inf, -jnp.inf, jnp.nan, -3e-38, 7e30], jnp.float32)
  for dep in (jnp.array([2.0]), jnp.array([-0.0]), jnp.array([jnp.nan, 1.0]),
              jnp.array([-jnp.inf]), jnp.full((2, 3), 5.0, jnp.bfloat16)):
    out = jax.jit(_after)(a, dep, dep * 2)
    np.testing.assert_array_equal(np.asarray(out).view(np.uint32), np.asarray(a).view(np.uint32))
  b = a.astype(jnp.bfloat16)
  out = jax.jit(_after)(b, jnp.array([jnp.nan]))
  np.testing.assert_array_equal(np.asarray(out).view(np.uint16), np.asarray(b).view(np.uint16))
