"""noisy_topk: Shazeer et al. 2017's noisy top-k gating and V-MoE's fixed-noise variant.

Hand cases give the router logits (clean x W_g, and for learned noise the raw x W_noise chosen as
log(expm1(sigma)) so that softplus returns sigma), the standard normal noise, and then spell out
H(x), the chosen experts, the slots, the gates, and each P(x, i) of the load estimator as
Phi((clean_i - kth_excluding(H, k, i)) / sigma_i) with its threshold worked out in a comment.
"""

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from family_checks import (E, assert_capacity_respected, dispatch_results, forward_all_to_alls,
                           inputs, make_layer, routed, sharded_results, single_device_results)
from moejax.routing import BalanceConfig, NoisyTopkConfig, RouterConfig, RouterInputs, route
from moejax.routing.noisy_topk import prob_in_top_k_GSE
from routing_reference import reference_combine, reference_route
from test_moe import apply, assert_same_results

ATOL = 1e-6


def Phi(z):
  return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def sig(z):  # the logistic function: softmax([a, b])[0] = sig(a - b)
  return 1.0 / (1.0 + math.exp(-z))


def cv2(values):
  values = np.asarray(values, np.float64)
  return values.var() / values.mean() ** 2


def lse(row):
  row = np.asarray(row, np.float64)
  return math.log(np.exp(row).sum())


def raw_noise(sigma):
  """x W_noise whose softplus is sigma."""
  return np.log(np.expm1(np.asarray(sigma, np.float64)))


def learned_logits(clean, sigma):
  """(G, S, 2E) float32 router logits: clean logits, then raw noise logits."""
  return np.concatenate([np.asarray(clean, np.float64), raw_noise(sigma)], -1).astype(np.float32)


def config(noise="learned", num_experts=3, noise_std=None, **kwargs):
  kwargs.setdefault("min_capacity", 1)
  group = NoisyTopkConfig(noise=noise, **({} if noise_std is None else dict(noise_std=noise_std)))
  return RouterConfig(kind="noisy_topk", num_experts=num_experts, noisy_topk=group, **kwargs)


# ======================================================================= learned noise, by hand

# G=1, S=4, E=3, k=2, capacity factor 0.75: C = ceil(2 * 0.75 * 4 / 3) = 2. Token 2 is padding.
_CLEAN = [[[2.0, 1.0, 0.0], [0.0, 0.5, 1.0], [0.1, 9.0, 0.0], [0.0, 0.25, 3.0]]]
_SIGMA = [[[2.0, 1.0, 0.5], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]]
_NORMAL = [[[-1.0, 0.5, 2.0], [1.0, 0.0, -1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]
_MASK = [[True, True, False, True]]
# H = clean + normal * sigma:
_H = [[[0.0, 1.5, 1.0], [1.0, 0.5, 0.0], [0.1, 9.0, 0.0], [0.0, 0.25, 3.0]]]


def _learned(train, **kwargs):
  cfg = config(k=2, capacity_factor_train=0.75, **kwargs)
  return routed(learned_logits(_CLEAN, _SIGMA), cfg, train=train, mask_GS=_MASK,
                normal_GSE=np.asarray(_NORMAL, np.float32) if train else None)


def test_learned_noise_decision_by_hand():
  r = _learned(train=True)
  assert r.capacity == 2
  # t0: H = [0, 1.5, 1.0] -> e1, e2; t1: H = [1, 0.5, 0] -> e0, e1; t3: H = [0, .25, 3] -> e2, e1.
  np.testing.assert_array_equal(r.expert_index_GSK[0, [0, 1, 3]], [[1, 2], [0, 1], [2, 1]])
  # Token by token: t0 e1 slot 0, e2 slot 0; t1 e0 slot 0, e1 slot 1; t3 e2 slot 1, e1 would be
  # slot 2 >= C: dropped. The padded t2 (whose first choice would be e1) takes nothing.
  np.testing.assert_array_equal(r.keep_GSK[0], [[1, 1], [1, 1], [0, 0], [1, 0]])
  np.testing.assert_array_equal(r.slot_GSK[0, [0, 1, 3]], [[0, 0], [0, 1], [1, 0]])
  # Gates: softmax over the two kept noisy logits.
  want = [[sig(0.5), sig(-0.5)], [sig(0.5), sig(-0.5)], [0.0, 0.0], [sig(2.75), 0.0]]
  np.testing.assert_allclose(r.weight_GSK[0], want, atol=ATOL)
  assert_capacity_respected(r, _MASK)


def test_learned_noise_losses_and_metrics_by_hand():
  r = _learned(train=True)
  # Importance: the gates (before capacity) summed per expert over the real tokens.
  importance = [sig(0.5),                                 # t1
                sig(0.5) + sig(-0.5) + sig(-2.75),        # t0, t1, t3
                sig(-0.5) + sig(2.75)]                    # t0, t3
  # Load: P(x, i) = Phi((clean_i - kth_excluding(H, 2, i)) / sigma_i).
  load = np.array([
      # t0, H = [0, 1.5, 1]: e0 out of the top 2 -> 2nd of {1.5, 1} = 1; e1 in -> 2nd of {0, 1}
      # = 0; e2 in -> 2nd of {0, 1.5} = 0.
      [Phi((2 - 1) / 2), Phi((1 - 0) / 1), Phi((0 - 0) / 0.5)],
      # t1, H = [1, .5, 0]: e0 in -> 2nd of {.5, 0} = 0; e1 in -> 2nd of {1, 0} = 0; e2 out ->
      # 2nd of {1, .5} = .5.
      [Phi(0.0), Phi(0.5), Phi(1 - 0.5)],
      # t3, H = [0, .25, 3]: e0 out -> .25; e1 in -> 2nd of {0, 3} = 0; e2 in -> 2nd of {0, .25}.
      [Phi(-0.25), Phi(0.25), Phi(3.0)],
  ]).sum(0)
  np.testing.assert_allclose(r.losses["importance_loss"], cv2(importance), rtol=1e-5)
  np.testing.assert_allclose(r.losses["load_loss"], cv2(load), rtol=1e-5)
  z = np.mean([lse(_CLEAN[0][t]) ** 2 for t in (0, 1, 3)])  # z-loss of the clean logits
  np.testing.assert_allclose(r.losses["router_z_loss"], z, rtol=1e-5)
  assert set(r.losses) == {"importance_loss", "load_loss", "router_z_loss"}
  np.testing.assert_allclose(r.metrics["expert_load"], [1 / 6, 3 / 6, 2 / 6], atol=ATOL)
  np.testing.assert_allclose(r.metrics["dropped_assignment_fraction"], 1 / 6, atol=ATOL)
  np.testing.assert_allclose(r.metrics["dropped_fraction"], 0.0, atol=ATOL)
  np.testing.assert_allclose(r.metrics["capacity_utilisation"], 5 / 6, atol=ATOL)
  # Entropy and confidence are of softmax(H), the distribution the router routed with.
  p = [np.exp(_H[0][t]) / np.exp(_H[0][t]).sum() for t in (0, 1, 3)]
  np.testing.assert_allclose(r.metrics["router_confidence"], np.mean([q.max() for q in p]),
                             rtol=1e-5)
  np.testing.assert_allclose(r.metrics["router_entropy"],
                             np.mean([-(q * np.log(q)).sum() for q in p]), rtol=1e-5)


def test_evaluation_routes_the_clean_logits_without_noise():
  r = _learned(train=False, capacity_factor_eval=2.0)  # C = ceil(2 * 2 * 4 / 3) = 6, at most S
  assert r.capacity == 4
  np.testing.assert_array_equal(r.expert_index_GSK[0, [0, 1, 3]], [[0, 1], [2, 1], [2, 1]])
  np.testing.assert_allclose(r.weight_GSK[0, [0, 1, 3]],
                             [[sig(1), sig(-1)], [sig(0.5), sig(-0.5)], [sig(2.75), sig(-2.75)]],
                             atol=ATOL)
  # The estimator with H = clean: t0 [2, 1, 0]: e0 in -> 2nd of {1, 0} = 0; e1 in -> 0; e2 out
  # -> 1. t1 [0, .5, 1]: e0 out -> .5; e1 in -> 0; e2 in -> 0. t3 as in training.
  load = np.array([[Phi(2 / 2), Phi(1.0), Phi((0 - 1) / 0.5)],
                   [Phi(-0.5), Phi(0.5), Phi(1.0)],
                   [Phi(-0.25), Phi(0.25), Phi(3.0)]]).sum(0)
  importance = [sig(1), sig(-1) + sig(-0.5) + sig(-2.75), sig(0.5) + sig(2.75)]
  np.testing.assert_allclose(r.losses["load_loss"], cv2(load), rtol=1e-5)
  np.testing.assert_allclose(r.losses["importance_loss"], cv2(importance), rtol=1e-5)


def test_training_needs_the_noise():
  with pytest.raises(ValueError, match="noisy_topk.*normal_GSE"):
    routed(learned_logits(_CLEAN, _SIGMA), config(k=2), train=True, mask_GS=_MASK)


# ======================================================================= fixed noise (V-MoE)


def test_fixed_noise_with_vmoe_weights_by_hand():
  # E=3, k=1, noise_std 0.5, weights TOP_k(softmax(H)) (normalize_weights=False).
  cfg = config("fixed", noise_std=0.5, k=1, normalize_weights=False, capacity_factor_train=1.5)
  clean = [[[1.0, 0.0, 0.5], [0.0, 2.0, 0.0]]]
  normal = [[[0.0, 3.0, 0.0], [5.0, 0.0, 0.0]]]
  r = routed(np.asarray(clean, np.float32), cfg, train=True,
             normal_GSE=np.asarray(normal, np.float32))
  # H = clean + 0.5 * normal: t0 [1, 1.5, .5] -> e1; t1 [2.5, 2, 0] -> e0. C = ceil(1.5*2/3) = 1.
  np.testing.assert_array_equal(r.expert_index_GSK[0, :, 0], [1, 0])
  np.testing.assert_array_equal(r.keep_GSK[0, :, 0], [True, True])
  h = np.array([[1.0, 1.5, 0.5], [2.5, 2.0, 0.0]])
  p = np.exp(h) / np.exp(h).sum(-1, keepdims=True)
  np.testing.assert_allclose(r.weight_GSK[0, :, 0], [p[0, 1], p[1, 0]], atol=ATOL)
  # k=1: kth_excluding(H, 1, i) = the largest other entry. t0: e0 -> 1.5, e1 -> 1, e2 -> 1.5;
  # t1: e0 -> 2, e1 -> 2.5, e2 -> 2.5; sigma = 0.5 everywhere.
  load = np.array([[Phi(-0.5 / 0.5), Phi(-1 / 0.5), Phi(-1 / 0.5)],
                   [Phi(-2 / 0.5), Phi(-0.5 / 0.5), Phi(-2.5 / 0.5)]]).sum(0)
  np.testing.assert_allclose(r.losses["load_loss"], cv2(load), rtol=1e-5)
  np.testing.assert_allclose(r.losses["importance_loss"], cv2([p[1, 0], p[0, 1], 0.0]), rtol=1e-5)


def test_fixed_noise_needs_e_logits_and_learned_noise_2e():
  fixed, learned = config("fixed", k=1), config("learned", k=1)
  assert fixed.family.logits_per_expert(fixed) == 1
  assert learned.family.logits_per_expert(learned) == 2
  with pytest.raises(ValueError, match="needs 6"):
    routed(np.zeros((1, 2, 3), np.float32), learned, train=False)


def test_noise_std_is_refused_with_learned_noise():
  with pytest.raises(ValueError, match=r"model\.moe\.router\.noisy_topk\.noise_std=0\.5"):
    NoisyTopkConfig(noise="learned", noise_std=0.5)


# ======================================================================= selection bias


@pytest.mark.parametrize("normalize", [True, False])
def test_balancing_bias_moves_the_choice_not_the_weight(normalize):
  # E=3, k=1, evaluation, sigma = 1: clean [1, 0, .5] + bias [0, 0, .75] -> scores [1, 0, 1.25].
  cfg = config(k=1, normalize_weights=normalize, balance=BalanceConfig(bias_update_rate=0.1))
  logits = learned_logits([[[1.0, 0.0, 0.5]]], [[[1.0, 1.0, 1.0]]])
  r = routed(logits, cfg, train=False, bias_E=np.array([0.0, 0.0, 0.75], np.float32))
  assert r.expert_index_GSK[0, 0, 0] == 2
  p = np.exp([1.0, 0.0, 0.5]) / np.exp([1.0, 0.0, 0.5]).sum()
  np.testing.assert_allclose(r.weight_GSK[0, 0, 0], 1.0 if normalize else p[2], atol=ATOL)
  # The estimator compares clean + bias with kth_excluding(scores): e0 -> 1.25, e1 -> 1.25,
  # e2 -> 1.
  want = [Phi(1 - 1.25), Phi(0 - 1.25), Phi(1.25 - 1)]
  got = prob_in_top_k_GSE(jnp.asarray([[[1.0, 0.0, 0.5]]]), jnp.asarray([[[1.0, 0.0, 0.5]]]),
                          jnp.ones((1, 1, 3)), 1, jnp.asarray([0.0, 0.0, 0.75]))
  np.testing.assert_allclose(got[0, 0], want, atol=ATOL)


# ======================================================================= the load estimator


def test_load_estimator_is_the_probability_of_being_chosen_when_the_noise_is_redrawn():
  """Monte Carlo: redraw expert i's noise, keep the others'; how often is i in the top k?"""
  rng = np.random.default_rng(0)
  E_, k, draws = 5, 2, 40000
  clean = rng.normal(size=(4, E_))
  sigma = rng.uniform(0.3, 2.0, size=(4, E_))
  normal = rng.normal(size=(4, E_))
  bias = rng.normal(size=E_) * 0.3
  noisy = clean + normal * sigma
  got = np.asarray(prob_in_top_k_GSE(*(jnp.asarray(a[None], jnp.float32)
                                       for a in (clean, noisy, sigma)), k,
                                     jnp.asarray(bias, jnp.float32)))[0]
  for t in range(4):
    for i in range(E_):
      scores = np.repeat((noisy[t] + bias)[None], draws, 0)
      scores[:, i] = clean[t, i] + bias[i] + rng.normal(size=draws) * sigma[t, i]
      chosen = (np.argsort(-scores, axis=1, kind="stable")[:, :k] == i).any(1).mean()
      assert abs(got[t, i] - chosen) < 0.012, (t, i, got[t, i], chosen)


def test_load_estimator_is_one_when_every_expert_is_chosen():
  got = prob_in_top_k_GSE(jnp.zeros((1, 2, 3)), jnp.ones((1, 2, 3)), jnp.ones((1, 2, 3)), 3)
  np.testing.assert_array_equal(got, 1.0)


def test_both_losses_send_gradient_to_both_halves_of_the_router():
  cfg = config(num_experts=4, k=2)
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(2, 6, 8)), jnp.float32)
  normal = jnp.asarray(rng.normal(size=(2, 6, 4)), jnp.float32)

  def losses(logits):
    decision = route(logits, cfg, train=True, inputs=RouterInputs(normal_GSE=normal))
    return decision.stats.summarize()[0]

  grads = jax.jit(jax.jacrev(losses))(logits)
  for name in ("importance_loss", "load_loss"):
    grad = np.asarray(grads[name])
    assert np.all(np.isfinite(grad)), name
    assert np.abs(grad[..., :4]).max() > 1e-6, f"{name}: no gradient to W_g"
    assert np.abs(grad[..., 4:]).max() > 1e-6, f"{name}: no gradient to W_noise"


# ======================================================================= properties


def _reference_losses(h, clean, sigma, bias, mask, k, gates, experts):
  """Importance and load by brute force in float64 (kth_excluding by sorting without i)."""
  G, S, E_ = h.shape
  importance, load = np.zeros(E_), np.zeros(E_)
  for g in range(G):
    for s in range(S):
      if not mask[g, s]:
        continue
      for j in range(k):
        importance[experts[g, s, j]] += gates[g, s, j]
      scores = h[g, s] + bias
      for i in range(E_):
        if k == E_:
          load[i] += 1.0
          continue
        others = np.sort(np.delete(scores, i))[::-1]
        load[i] += Phi((clean[g, s, i] + bias[i] - others[k - 1]) / sigma[g, s, i])
  return cv2(importance) if importance.any() else 0.0, cv2(load) if load.any() else 0.0


# (noise, E, k, normalize, factor, batch_prioritized, train, pad rate, bias, claim order)
_CASES = [
    ("learned", 4, 1, True, 1.0, False, True, 0.3, False, "position"),
    ("learned", 6, 2, True, 0.5, True, True, 0.3, True, "position"),
    ("learned", 6, 3, False, 1.25, False, False, 0.0, False, "choice"),
    ("learned", 4, 4, True, 1.0, False, True, 0.3, False, "position"),
    ("fixed", 4, 2, False, 0.75, True, True, 0.3, False, "choice"),
    ("fixed", 6, 1, True, 0.5, False, True, 0.5, True, "position"),
    ("fixed", 3, 2, True, 2.0, False, False, 0.3, False, "choice"),
]


def _draw(rng, G, S, E_, noise, train, bias):
  """Inputs whose noisy logits have no near-tie (float32 and float64 must rank alike)."""
  while True:
    clean = rng.normal(size=(G, S, E_)) * rng.choice([0.5, 2.0])
    raw = rng.normal(size=(G, S, E_))
    normal = rng.normal(size=(G, S, E_)) if train else np.zeros((G, S, E_))
    clean, raw, normal = (a.astype(np.float32).astype(np.float64) for a in (clean, raw, normal))
    sigma = np.log1p(np.exp(raw)) if noise == "learned" else np.full_like(clean, 0.7)
    h = clean + normal * sigma
    scores = h + bias
    gaps = np.diff(np.sort(scores, -1), axis=-1)
    probs = np.exp(h - h.max(-1, keepdims=True))
    top = np.sort(probs / probs.sum(-1, keepdims=True), -1).max(-1)
    if gaps.min() > 1e-4 and np.diff(np.sort(top.ravel())).min() > 1e-5:
      return clean, raw, normal, sigma, h


@pytest.mark.parametrize("case", _CASES, ids=lambda c: "-".join(map(str, c)))
def test_properties_and_reference(case):
  noise, E_, k, normalize, factor, prioritized, train, pad, with_bias, claim_order = case
  G, S = 6, 8
  rng = np.random.default_rng(zlib.crc32(repr(case).encode()))
  bias = rng.normal(size=E_).astype(np.float32).astype(np.float64) if with_bias else np.zeros(E_)
  clean, raw, normal, sigma, h = _draw(rng, G, S, E_, noise, train, bias)
  mask = rng.random((G, S)) >= pad
  mask[-1] = pad == 0  # the last group is all padding when there is padding
  cfg = config(noise, num_experts=E_, noise_std=0.7 if noise == "fixed" else None, k=k,
               normalize_weights=normalize, capacity_factor_train=factor,
               capacity_factor_eval=factor, batch_prioritized=prioritized,
               **({"claim_order": claim_order} if k > 1 else {}))
  logits = np.concatenate([clean, raw], -1) if noise == "learned" else clean
  # Padded tokens hold NaN logits: they must reach no output, loss or metric.
  logits = np.where(mask[..., None], logits, np.nan).astype(np.float32)
  r = routed(logits, cfg, train=train, mask_GS=mask,
             normal_GSE=normal.astype(np.float32) if train else None,
             bias_E=bias.astype(np.float32) if with_bias else None)
  capacity = cfg.capacity(S, train=train)
  # The claim on H + bias, with the weights of H: reference_route ranks by softmax(H + bias),
  # whose order is that of H + bias; the weights are then recomputed from H.
  ref = reference_route(h + bias, kind="topk", k=k, normalize=normalize, capacity=capacity,
                        mask_GS=mask, batch_prioritized=False, claim_order=claim_order)
  probs = np.exp(h - h.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  ref["gate"] = np.take_along_axis(probs, ref["expert"], -1)
  if normalize:
    ref["gate"] /= ref["gate"].sum(-1, keepdims=True)
  if prioritized:  # V-MoE's priority: the confidence max_i softmax(H)_i
    ref = _reclaim_by_priority(ref, probs.max(-1), mask, capacity, E_, claim_order)
  np.testing.assert_array_equal(r.expert_index_GSK[mask], ref["expert"][mask])
  np.testing.assert_array_equal(r.keep_GSK, ref["keep"])
  np.testing.assert_array_equal(r.slot_GSK[r.keep_GSK], ref["slot"][ref["keep"]])
  np.testing.assert_allclose(r.combine, reference_combine(ref, E_, capacity), atol=ATOL)
  assert_capacity_respected(r, mask)
  if normalize:  # eq. 3: the kept gates of a token sum to 1
    gates = np.where(ref["active"], ref["gate"], 0).sum(-1)
    np.testing.assert_allclose(gates[mask], 1.0, rtol=1e-6)
  importance, load = _reference_losses(h, clean, sigma, bias, mask, k, ref["gate"], ref["expert"])
  np.testing.assert_allclose(r.losses["importance_loss"], importance, rtol=2e-4, atol=1e-7)
  np.testing.assert_allclose(r.losses["load_loss"], load, rtol=2e-4, atol=1e-7)
  for name, value in {**r.losses, **r.metrics}.items():
    assert np.all(np.isfinite(value)), name


def _reclaim_by_priority(ref, priority_GS, mask, capacity, E_, claim_order):
  """The claim with tokens in descending priority (stable), as V-MoE orders them: token by
  token ("position"), or every first choice before any second ("choice")."""
  G, S, K = ref["expert"].shape
  keep = np.zeros((G, S, K), bool)
  slot = np.full((G, S, K), -1)
  for g in range(G):
    order = sorted(range(S), key=lambda s: (-priority_GS[g, s], s))
    queue = ([(s, j) for j in range(K) for s in order] if claim_order == "choice" else
             [(s, j) for s in order for j in range(K)])
    count = [0] * E_
    for s, j in queue:
      if mask[g, s]:
        e = ref["expert"][g, s, j]
        if count[e] < capacity:
          keep[g, s, j], slot[g, s, j] = True, count[e]
        count[e] += 1
  return {**ref, "keep": keep, "slot": slot}


# ======================================================================= through MoeLayer


def _layer(dispatch="index", **kwargs):
  kwargs.setdefault("k", 2)
  kwargs.setdefault("capacity_factor_train", 1.0)
  return make_layer("noisy_topk", dispatch=dispatch, **kwargs)


def test_layer_router_width_and_training_noise():
  layer = _layer()
  assert layer.router.shape == (16, 2 * E)  # [W_g | W_noise]
  assert _layer(noisy_topk=NoisyTopkConfig(noise="fixed")).router.shape == (16, E)
  x, mask, _ = inputs()
  y_eval, _ = apply(layer, x, mask, train=False)
  y_eval_2, _ = apply(layer, x, mask, train=False)
  y_train, aux = apply(layer, x, mask, train=True)
  y_train_2, _ = apply(layer, x, mask, train=True)
  np.testing.assert_array_equal(y_eval, y_eval_2)  # no noise in evaluation
  assert np.abs(np.asarray(y_train - y_eval)).max() > 1e-3  # noise in training
  assert np.abs(np.asarray(y_train - y_train_2)).max() > 1e-3  # a fresh draw every call
  assert set(aux.losses) == {"importance_loss", "load_loss", "router_z_loss"}
  np.testing.assert_allclose(aux.aux_loss, 1e-2 * aux.losses["importance_loss"]
                             + 1e-2 * aux.losses["load_loss"]
                             + 1e-3 * aux.losses["router_z_loss"], rtol=1e-6)


@pytest.mark.parametrize("noise", ["learned", "fixed"])
def test_einsum_and_index_layers_agree_with_gradients(noise):
  group = NoisyTopkConfig(noise=noise)
  results = dispatch_results(lambda dispatch: _layer(dispatch, activation="swiglu",
                                                     noisy_topk=group))
  assert float(results["index"][0][1][1].metrics["dropped_assignment_fraction"]) > 0.05
  assert_same_results(results["einsum"], results["index"], f"noisy_topk {noise}")


_SHARDED = [
    ((2, 4, 1), dict()),
    ((1, 8, 1), dict(noisy_topk=NoisyTopkConfig(noise="fixed", noise_std=0.3),
                     normalize_weights=False, batch_prioritized=True)),
    ((1, 4, 2), dict(k=3, dispatch="einsum", balance=BalanceConfig(bias_update_rate=0.01))),
]


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape,settings", _SHARDED, ids=[str(c[0]) for c in _SHARDED])
def test_sharded_matches_single_device(mesh_shape, settings):
  layer = _layer(**settings)
  want = single_device_results(layer)
  assert float(want[0][1][1].metrics["dropped_assignment_fraction"]) > 0.05
  assert_same_results(sharded_results(layer, mesh_shape), want, f"noisy_topk on {mesh_shape}")


def test_forward_holds_two_all_to_alls():
  ops = forward_all_to_alls(_layer(), (2, 4, 1))
  assert len(ops) == 2, f"expected 2 all-to-alls, found {len(ops)}"
