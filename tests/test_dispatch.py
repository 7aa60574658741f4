"""EinsumDispatcher and IndexDispatcher against each other and against a numpy reference.

The index form runs both ways: from the tokens' side ("index": K gathers per token) and from the
buffer's side ("buffer": one gather or scatter-add per buffer row), whichever the ratio would pick.

Routing decisions come from `moejax.routing.route` on random logits, with capacities small enough
that many assignments overflow. The numpy reference reads only the decision fields
(`expert_index_GSK`, `slot_GSK`, `keep_GSK`, `weight_GSK`):

    dispatch:  x_EGCM[e, g, c] = x_GSM[g, s]                  for each kept (g, s, k) at (e, c)
    combine:   y_GSM[g, s]     = sum_k keep * weight * y_EGCM[e, g, c]

Tolerances: moving rows (dispatch, and every zero) must be exact; sums of at most K products are
compared with rtol=1e-6, atol=1e-6 (values are O(1)); gradients with rtol=1e-5, atol=1e-6.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.dispatch import EinsumDispatcher, IndexDispatcher
from moejax.routing import RouterConfig, route

DISPATCHERS = {"einsum": EinsumDispatcher,
               "index": functools.partial(IndexDispatcher, buffer_side=False),
               "buffer": functools.partial(IndexDispatcher, buffer_side=True)}

G, S, E, M = 4, 8, 8, 16


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  router: RouterConfig
  train: bool = True
  masked: bool = False
  fills_every_slot: bool = False  # expert choice: each expert fills its C slots


CASES = [
    # k=1, C = ceil(1 * 0.5 * 8 / 8) = 1: most tokens overflow.
    Case("switch_c1", RouterConfig(kind="switch", num_experts=E, capacity_factor_train=0.5,
                                   min_capacity=1)),
    # k=2, C = ceil(2 * 0.5 * 8 / 8) = 1, with padding and batch-prioritised claiming.
    Case("gshard_c1_masked", RouterConfig(kind="gshard", num_experts=E, capacity_factor_train=0.5,
                                          min_capacity=1, batch_prioritized=True), masked=True),
    # GShard's random second-expert policy (needs uniform numbers in training).
    Case("gshard_random", RouterConfig(kind="gshard", num_experts=E, capacity_factor_train=1.0,
                                       min_capacity=1, second_expert_policy="random",
                                       second_expert_threshold=0.3)),
    # k=3 raw softmax weights, eval capacity C = ceil(3 * 0.25 * 8 / 8) = 1, padding.
    Case("topk3_eval_masked", RouterConfig(kind="topk", k=3, num_experts=E,
                                           normalize_weights=False, capacity_factor_eval=0.25,
                                           min_capacity=1), train=False, masked=True),
    # Expert choice: K = E, C = ceil(1 * 8 / 8) = 1 pick per expert among a group's real tokens
    # (padding is never picked): every slot filled, tokens no expert picked dropped.
    Case("expert_choice_masked", RouterConfig(kind="expert_choice", num_experts=E,
                                              capacity_factor_train=1.0, min_capacity=1,
                                              allow_noncausal=True), masked=True,
         fills_every_slot=True),
]


def _inputs(seed):
  keys = jax.random.split(jax.random.key(seed), 6)
  # Skewed logits: experts 0 and 1 are popular, so their buffers overflow.
  bias_E = jnp.array([2.0, 1.5] + [0.0] * (E - 2))
  logits_GSE = 1.5 * jax.random.normal(keys[0], (G, S, E)) + bias_E
  x_GSM = jax.random.normal(keys[1], (G, S, M))
  mask_GS = jax.random.bernoulli(keys[2], 0.7, (G, S))
  uniform_GS = jax.random.uniform(keys[3], (G, S))
  d_x_EGCM_key, d_y_GSM_key = keys[4], keys[5]
  return logits_GSE, x_GSM, mask_GS, uniform_GS, d_x_EGCM_key, d_y_GSM_key


def _run(case: Case, seed: int):
  """Routes, then dispatches/combines with both dispatchers; returns a dict of numpy arrays."""
  logits_GSE, x_GSM, mask_GS, uniform_GS, key_dx, key_dy = _inputs(seed)
  mask = mask_GS if case.masked else None

  def decide(logits):
    return route(logits, case.router, train=case.train, padding_mask_GS=mask,
                 uniform_GS=uniform_GS)

  C = case.router.capacity(S, train=case.train)
  y_EGCM = jax.random.normal(jax.random.fold_in(key_dx, 1), (E, G, C, M))
  r_EGCM = jax.random.normal(key_dx, (E, G, C, M))  # cotangent for dispatch
  r_GSM = jax.random.normal(key_dy, (G, S, M))  # cotangent for combine

  @jax.jit
  def both(logits, x, y):
    decision = decide(logits)
    out = {"decision": decision}
    for tag, cls in DISPATCHERS.items():

      def dispatch_loss(x, cls=cls):
        return jnp.sum(cls(decision).dispatch(x) * r_EGCM)

      def combine_loss(y, logits, cls=cls):
        return jnp.sum(cls(decide(logits)).combine(y) * r_GSM)

      out[f"{tag}_dispatch"] = cls(decision).dispatch(x)
      out[f"{tag}_combine"] = cls(decision).combine(y)
      out[f"{tag}_dx"] = jax.grad(dispatch_loss)(x)
      out[f"{tag}_dy"], out[f"{tag}_dlogits"] = jax.grad(combine_loss, argnums=(0, 1))(y, logits)

    def gather_combine_loss(logits):
      # A third, differentiable formulation: advanced indexing on the decision fields.
      d = decide(logits)
      g_GSK = jnp.arange(G)[:, None, None]
      rows_GSKM = y[d.expert_index_GSK, g_GSK, d.slot_GSK]
      w_GSK = jnp.where(d.keep_GSK, d.weight_GSK, 0.0)
      return jnp.sum(jnp.einsum("GSKM,GSK->GSM", rows_GSKM, w_GSK) * r_GSM)

    out["reference_dlogits"] = jax.grad(gather_combine_loss)(logits)
    return out

  out = jax.tree.map(np.asarray, both(logits_GSE, x_GSM, y_EGCM))
  out.update(x=np.asarray(x_GSM), y=np.asarray(y_EGCM), r_EGCM=np.asarray(r_EGCM),
             r_GSM=np.asarray(r_GSM), mask=np.asarray(mask_GS) if case.masked else None, C=C)
  return out


_RESULTS = {}


def _results(case: Case, seed: int = 0):
  if (case.name, seed) not in _RESULTS:
    _RESULTS[case.name, seed] = _run(case, seed)
  return _RESULTS[case.name, seed]


# ----------------------------------------------------------------------------- numpy reference


def _fields(decision):
  return (np.asarray(decision.expert_index_GSK), np.asarray(decision.slot_GSK),
          np.asarray(decision.keep_GSK), np.asarray(decision.weight_GSK))


def np_dispatch(decision, x_GSM, C):
  """Returns (x_EGCM, filled_EGC); asserts that no slot is filled twice."""
  e_GSK, c_GSK, keep_GSK, _ = _fields(decision)
  x_EGCM = np.zeros((E, G, C, M), np.float32)
  filled_EGC = np.zeros((E, G, C), bool)
  for g, s, k in zip(*np.nonzero(keep_GSK)):
    e, c = e_GSK[g, s, k], c_GSK[g, s, k]
    assert 0 <= c < C, f"kept assignment (g={g}, s={s}, k={k}) has slot {c} outside [0, {C})"
    assert not filled_EGC[e, g, c], f"slot (e={e}, g={g}, c={c}) filled twice"
    filled_EGC[e, g, c] = True
    x_EGCM[e, g, c] = x_GSM[g, s]
  return x_EGCM, filled_EGC


def np_combine(decision, y_EGCM):
  e_GSK, c_GSK, keep_GSK, w_GSK = _fields(decision)
  y_GSM = np.zeros((G, S, M), np.float64)
  for g, s, k in zip(*np.nonzero(keep_GSK)):
    y_GSM[g, s] += np.float64(w_GSK[g, s, k]) * y_EGCM[e_GSK[g, s, k], g, c_GSK[g, s, k]]
  return y_GSM


def np_dispatch_vjp(decision, r_EGCM):
  """d/dx of sum(dispatch(x) * r): each token collects r at the slots it fills."""
  e_GSK, c_GSK, keep_GSK, _ = _fields(decision)
  d_GSM = np.zeros((G, S, M), np.float64)
  for g, s, k in zip(*np.nonzero(keep_GSK)):
    d_GSM[g, s] += r_EGCM[e_GSK[g, s, k], g, c_GSK[g, s, k]]
  return d_GSM


def np_combine_vjp(decision, r_GSM, C):
  """d/dy of sum(combine(y) * r): each filled slot gets weight * r of its token."""
  e_GSK, c_GSK, keep_GSK, w_GSK = _fields(decision)
  d_EGCM = np.zeros((E, G, C, M), np.float64)
  for g, s, k in zip(*np.nonzero(keep_GSK)):
    d_EGCM[e_GSK[g, s, k], g, c_GSK[g, s, k]] += np.float64(w_GSK[g, s, k]) * r_GSM[g, s]
  return d_EGCM


# ----------------------------------------------------------------------------- tests

TAGS = tuple(DISPATCHERS)
parametrize_cases = pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])


@parametrize_cases
def test_decisions_overflow(case):
  """The cases exercise what they claim: dropped assignments, and dropped whole tokens."""
  out = _results(case)
  keep_GSK = out["decision"].keep_GSK
  real_GS = np.ones((G, S), bool) if out["mask"] is None else out["mask"]
  assert np.sum(~keep_GSK & real_GS[..., None]) > 0, "no real assignment was dropped"
  assert np.sum(~keep_GSK.any(-1) & real_GS) > 0, "no real token was dropped entirely"
  if (case.router.k or E) > 1:  # expert choice: k unset, up to E experts per token
    partial = keep_GSK.any(-1) & ~keep_GSK.all(-1) & real_GS
    assert np.sum(partial) > 0, "no token was dropped at only some of its experts"


@parametrize_cases
@pytest.mark.parametrize("tag", TAGS)
def test_dispatch_matches_numpy_and_empty_slots_are_zero(case, tag):
  out = _results(case)
  ref_EGCM, filled_EGC = np_dispatch(out["decision"], out["x"], out["C"])
  got_EGCM = out[f"{tag}_dispatch"]
  assert got_EGCM.shape == (E, G, out["C"], M)
  np.testing.assert_array_equal(got_EGCM, ref_EGCM, err_msg=f"{tag} dispatch != numpy reference")
  assert np.all(got_EGCM[~filled_EGC] == 0.0), f"{tag}: an empty slot is not exactly zero"
  if case.fills_every_slot:
    assert filled_EGC.all()
  else:
    assert 0 < filled_EGC.sum() < filled_EGC.size  # some slots filled, some empty


@parametrize_cases
@pytest.mark.parametrize("tag", TAGS)
def test_combine_matches_numpy(case, tag):
  out = _results(case)
  ref_GSM = np_combine(out["decision"], out["y"])
  np.testing.assert_allclose(out[f"{tag}_combine"], ref_GSM, rtol=1e-6, atol=1e-6,
                             err_msg=f"{tag} combine != numpy reference")


@parametrize_cases
@pytest.mark.parametrize("tag", TAGS)
def test_dropped_tokens_get_exactly_zero_or_only_kept_experts(case, tag):
  out = _results(case)
  decision = out["decision"]
  keep_GSK = decision.keep_GSK
  got_GSM = out[f"{tag}_combine"]
  dropped_GS = ~keep_GSK.any(-1)  # includes padding, which is never kept
  assert np.all(got_GSM[dropped_GS] == 0.0), f"{tag}: a fully dropped token has nonzero output"
  partial_GS = keep_GSK.any(-1) & ~keep_GSK.all(-1)
  ref_GSM = np_combine(decision, out["y"])
  np.testing.assert_allclose(got_GSM[partial_GS], ref_GSM[partial_GS], rtol=1e-6, atol=1e-6)
  if out["mask"] is not None:
    assert not keep_GSK[~out["mask"]].any(), "a padding token was kept"


@parametrize_cases
@pytest.mark.parametrize("tag", ["index", "buffer"])
def test_einsum_and_index_agree(case, tag):
  out = _results(case)
  np.testing.assert_array_equal(out["einsum_dispatch"], out[f"{tag}_dispatch"])
  np.testing.assert_allclose(out["einsum_combine"], out[f"{tag}_combine"], rtol=1e-6, atol=1e-6)
  for grad in ("dx", "dy", "dlogits"):
    np.testing.assert_allclose(out[f"einsum_{grad}"], out[f"{tag}_{grad}"], rtol=1e-5,
                               atol=1e-6, err_msg=f"einsum vs {tag} gradient {grad}")


@pytest.mark.parametrize("kind, buffer_side", [("switch", False), ("gshard", False),
                                                ("expert_choice", True)])
def test_the_index_form_works_from_the_side_with_fewer_rows(kind, buffer_side):
  """Expert choice's token table holds K = E = 8 assignments per token against about one
  buffer row per token: its index form works from the buffer side; token choice's does not."""
  config = RouterConfig(kind=kind, num_experts=E, capacity_factor_train=1.0, min_capacity=1,
                        allow_noncausal=kind == "expert_choice")
  logits_GSE, *_ = _inputs(0)
  decision = route(logits_GSE, config, train=True, uniform_GS=jnp.zeros((G, S)))
  assert IndexDispatcher(decision).buffer_side is buffer_side


@parametrize_cases
@pytest.mark.parametrize("tag", TAGS)
def test_gradients_match_reference(case, tag):
  out = _results(case)
  decision = out["decision"]
  np.testing.assert_allclose(out[f"{tag}_dx"], np_dispatch_vjp(decision, out["r_EGCM"]),
                             rtol=1e-5, atol=1e-6, err_msg=f"{tag} d/dx")
  np.testing.assert_allclose(out[f"{tag}_dy"], np_combine_vjp(decision, out["r_GSM"], out["C"]),
                             rtol=1e-5, atol=1e-6, err_msg=f"{tag} d/dy")
  d_logits = out[f"{tag}_dlogits"]
  np.testing.assert_allclose(d_logits, out["reference_dlogits"], rtol=1e-5, atol=1e-6,
                             err_msg=f"{tag} d/dlogits")
  # The logits get gradient only through kept weights: tokens kept nowhere get none.
  dropped_GS = ~decision.keep_GSK.any(-1)
  assert np.all(d_logits[dropped_GS] == 0.0)
  assert np.abs(d_logits[~dropped_GS]).max() > 1e-3


def test_gradients_through_the_whole_chain_agree():
  """combine(f(dispatch(x))) with a nonlinear f: d/dx and d/dlogits agree between forms."""
  case = CASES[1]
  logits_GSE, x_GSM, mask_GS, _, key, _ = _inputs(1)
  r_GSM = jax.random.normal(key, (G, S, M))

  @jax.jit
  def grads(logits, x):
    result = {}
    for tag, cls in DISPATCHERS.items():

      def loss(logits, x, cls=cls):
        decision = route(logits, case.router, train=True, padding_mask_GS=mask_GS)
        dispatcher = cls(decision)
        return jnp.sum(dispatcher.combine(jnp.tanh(dispatcher.dispatch(x)) ** 2) * r_GSM)

      result[tag] = jax.grad(loss, argnums=(0, 1))(logits, x)
    return result

  result = grads(logits_GSE, x_GSM)
  for tag in ("index", "buffer"):
    for a, b, name in zip(result["einsum"], result[tag], ("logits", "x")):
      assert np.abs(np.asarray(b)).max() > 1e-3, f"{tag}: d/d{name} is all zero"
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"{tag}: d/d{name}")


@pytest.mark.parametrize("tag", TAGS)
def test_non_finite_padding_does_not_leak_into_expert_buffers(tag):
  """Padding may hold anything (routing keeps NaN/inf padding out of its statistics too)."""
  case = CASES[1]  # masked
  out = _results(case)
  x_GSM = out["x"].copy()
  pad_GS = ~out["mask"]
  x_GSM[pad_GS] = np.where(np.arange(M) % 2 == 0, np.nan, np.inf)
  cls = DISPATCHERS[tag]
  got_EGCM = np.asarray(jax.jit(lambda d, x: cls(d).dispatch(x))(out["decision"], x_GSM))
  ref_EGCM, _ = np_dispatch(out["decision"], x_GSM, out["C"])
  assert np.isfinite(ref_EGCM).all()
  finite = bool(np.isfinite(got_EGCM).all())
  assert finite, (
      f"{tag} dispatch: NaN/inf held by padding tokens (never kept) leaks into the expert buffers "
      f"({np.sum(~np.isfinite(got_EGCM))} of {got_EGCM.size} entries non-finite): multiplying by a "
      "zero one-hot entry does not remove NaN/inf; select instead of multiply")
  np.testing.assert_array_equal(got_EGCM, ref_EGCM)


@pytest.mark.parametrize("tag", TAGS)
def test_non_finite_cotangent_of_an_unrouted_token_reaches_no_gradient(tag):
  """The output of a token kept nowhere (padding, dropped) is zero whatever it gets back: a NaN/inf
  cotangent there (a NaN padding token's loss times a zero mask) leaves every gradient unchanged.
  """
  case = CASES[1]  # padding and dropped tokens
  out = _results(case)
  cls = DISPATCHERS[tag]
  logits_GSE, *_ = _inputs(0)
  unrouted_GS = ~out["decision"].keep_GSK.any(-1)
  assert 0 < unrouted_GS.sum() < unrouted_GS.size

  @jax.jit
  def grads(r_GSM):
    def loss(y, logits):
      decision = route(logits, case.router, train=case.train, padding_mask_GS=out["mask"])
      return jnp.sum(cls(decision).combine(y) * r_GSM)
    return jax.grad(loss, argnums=(0, 1))(out["y"], logits_GSE)

  r_zero = np.where(unrouted_GS[..., None], 0.0, out["r_GSM"]).astype(np.float32)
  r_bad = np.where(unrouted_GS[..., None], np.where(np.arange(M) % 2, np.nan, -np.inf),
                   out["r_GSM"]).astype(np.float32)
  want_dy, want_dlogits = (np.asarray(g) for g in grads(r_zero))
  got_dy, got_dlogits = (np.asarray(g) for g in grads(r_bad))
  assert np.isfinite(got_dy).all() and np.isfinite(got_dlogits).all(), (
      f"{tag} combine: NaN/inf cotangents of unrouted tokens leak into the gradients "
      f"({np.sum(~np.isfinite(got_dy))} of {got_dy.size} expert-output gradients non-finite)")
  np.testing.assert_array_equal(got_dy, want_dy)
  np.testing.assert_array_equal(got_dlogits, want_dlogits)
  assert np.abs(want_dy).max() > 1e-3 and np.abs(want_dlogits).max() > 1e-3
