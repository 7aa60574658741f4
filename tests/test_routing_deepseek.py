"""The deepseek router family, shared experts and the aux-loss-free balancing bias.

Hand cases pick the sigmoid affinities s directly (logits = log(s / (1 - s))), so every weight is
a simple fraction; softmax cases pick probabilities p (logits = log p). Property cases compare
with a sequential float64 reference written from the papers (DeepSeek-V3 eq. 13-20, V2 Sec. 2.1.3).
Layer cases reuse tests/test_moe.py's helpers: M=16, F=32, E=8, S=8, x (8, 16, 16).
"""

import functools
import math
import zlib
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_moe as moe_tests
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax import sharding
from moejax.model import ModelConfig, active_ffn_flops_per_token
from moejax.moe import MoeConfig, MoeLayer
from moejax.routing import BalanceConfig, DeepseekConfig, RouterConfig, RouterInputs, route

ATOL = 1e-6


def _config(num_experts=4, k=2, *, min_capacity=1, deepseek=None, balance=0.0, **kwargs):
  return RouterConfig(kind="deepseek", num_experts=num_experts, k=k, min_capacity=min_capacity,
                      deepseek=DeepseekConfig(**(deepseek or {})),
                      balance=BalanceConfig(bias_update_rate=balance), **kwargs)


def _sigmoid_logits(s):
  s = np.asarray(s, np.float64)
  return jnp.asarray(np.log(s / (1.0 - s)), jnp.float32)


@functools.partial(jax.jit, static_argnames=("config", "train"),
                   compiler_options={"xla_backend_optimization_level": 0})
def _route_jit(logits, mask, bias, *, config, train):
  decision = route(logits, config, train=train, padding_mask_GS=mask,
                   inputs=RouterInputs(bias_E=bias))
  losses, metrics = decision.stats.summarize()
  return decision, losses, metrics


def _route(logits, config, *, train=True, mask=None, bias=None):
  as_array = lambda a: None if a is None else jnp.asarray(a)
  return jax.tree.map(np.asarray, _route_jit(jnp.asarray(logits), as_array(mask),
                                             as_array(bias), config=config, train=train))


# ======================================================================= hand cases

# G=1, S=3 tokens, E=4 experts in 2 groups {0, 1}, {2, 3}; one group kept, k=2.
_S = [[[0.9, 0.1, 0.6, 0.5],   # groups: 0.9+0.1=1.0 < 0.6+0.5=1.1 -> experts 2, 3 (6/11, 5/11)
       [0.8, 0.7, 0.2, 0.1],   # 1.5 > 0.3 -> experts 0, 1 (8/15, 7/15)
       [0.3, 0.4, 0.9, 0.2]]]  # 0.7 < 1.1 -> experts 2, 3 (9/11, 2/11)
_GROUPED = dict(num_groups=2, topk_groups=1, routed_scaling_factor=2.0)


def test_group_limited_top2_weights_capacity_and_losses_by_hand():
  # C = ceil(2 * 0.5 * 3 / 4) = 1, claimed token by token: t0 -> e2, e3; t1 -> e0, e1; t2's e2
  # and e3 are full: t2 is dropped. (Every first choice before any second gives the same here.)
  config = _config(capacity_factor_train=0.5, deepseek=_GROUPED)
  decision, losses, metrics = _route(_sigmoid_logits(_S), config)
  assert decision.capacity == 1
  np.testing.assert_array_equal(decision.expert_index_GSK, [[[2, 3], [0, 1], [2, 3]]])
  np.testing.assert_array_equal(decision.keep_GSK, [[[1, 1], [1, 1], [0, 0]]])
  np.testing.assert_array_equal(decision.slot_GSK, [[[0, 0], [0, 0], [0, 0]]])
  np.testing.assert_allclose(decision.weight_GSK,
                             [[[12 / 11, 10 / 11], [16 / 15, 14 / 15], [0, 0]]], atol=ATOL)
  # Sequence-wise balance loss: T=3, K=2, E=4; selections per expert [1, 1, 2, 2] (before
  # capacity), f = 4 / (2 * 3) * [1, 1, 2, 2]; P = the mean of s / sum(s) over the tokens.
  f = [Fraction(2, 3), Fraction(2, 3), Fraction(4, 3), Fraction(4, 3)]
  p = [(Fraction(9, 21) + Fraction(8, 18) + Fraction(3, 18)) / 3,
       (Fraction(1, 21) + Fraction(7, 18) + Fraction(4, 18)) / 3,
       (Fraction(6, 21) + Fraction(2, 18) + Fraction(9, 18)) / 3,
       (Fraction(5, 21) + Fraction(1, 18) + Fraction(2, 18)) / 3]
  assert sum(a * b for a, b in zip(f, p)) == Fraction(542, 567)
  np.testing.assert_allclose(losses["sequence_balance_loss"], 542 / 567, rtol=1e-6)
  assert set(losses) == {"sequence_balance_loss", "router_z_loss"}
  np.testing.assert_allclose(metrics["expert_load"], [1 / 6, 1 / 6, 2 / 6, 2 / 6], atol=ATOL)
  np.testing.assert_allclose(metrics["max_load_violation"], 2 * 4 / 6 - 1, atol=ATOL)
  np.testing.assert_allclose(metrics["dropped_fraction"], 1 / 3, atol=ATOL)
  np.testing.assert_allclose(metrics["experts_per_token"], 4 / 3, atol=ATOL)
  # Router confidence: the mean of max_i s_i / sum_j s_j.
  np.testing.assert_allclose(metrics["router_confidence"], (9 / 21 + 8 / 18 + 9 / 18) / 3,
                             atol=ATOL)
  # The config weights the sequence-wise loss by deepseek.sequence_balance_loss_weight.
  weighted = _config(deepseek=dict(_GROUPED, sequence_balance_loss_weight=0.25))
  assert weighted.loss_weights() == {"router_z_loss": 1e-3, "sequence_balance_loss": 0.25}


@pytest.mark.parametrize("name,deepseek,bias,normalize,experts,weights", [
    # Without the group limit: the plain top-2 of s.
    ("no groups", dict(routed_scaling_factor=2.0), None, True, [0, 2], [1.2, 0.8]),
    # V2: a group scored by its best expert: 0.9 > 0.6 keeps group 0.
    ("V2 group max", dict(_GROUPED, group_score_experts=1), None, True, [0, 1], [1.8, 0.2]),
    # The bias reorders the selection (0.5 + 0.2 > 0.6); the weights stay the affinities.
    ("bias reorders", _GROUPED, [0, 0, 0, 0.2], True, [3, 2], [10 / 11, 12 / 11]),
    # The bias enters the group scores: 1.4 + 0.1 > 1.1 keeps group 0.
    ("bias picks group", _GROUPED, [0.5, 0, 0, 0], True, [0, 1], [1.8, 0.2]),
    # Outside the kept groups selection scores are -inf, not 0: s + b = [0.9, -0.2, -0.4, -0.5]
    # keeps group 0 (0.7 > -0.9), whose expert 1 (-0.2) must still beat experts 2 and 3.
    ("negative bias", _GROUPED, [0, -0.3, -1.0, -1.0], True, [0, 1], [1.8, 0.2]),
    # normalize_weights=False (V2): the raw affinities times the routed scaling factor.
    ("unnormalised", _GROUPED, None, False, [2, 3], [1.2, 1.0]),
])
def test_selection_variants_by_hand(name, deepseek, bias, normalize, experts, weights):
  config = _config(capacity_factor_train=4.0, normalize_weights=normalize, deepseek=deepseek)
  decision, _, _ = _route(_sigmoid_logits([_S[0][:1]]), config, bias=bias)
  np.testing.assert_array_equal(decision.expert_index_GSK[0, 0], experts, err_msg=name)
  np.testing.assert_allclose(decision.weight_GSK[0, 0], weights, atol=ATOL, err_msg=name)


def test_softmax_scores_of_deepseek_v2():
  # p = [0.4, 0.1, 0.3, 0.2]; V2 device-limited routing: group 0's best 0.4 > group 1's 0.3.
  logits = jnp.log(jnp.asarray([[[0.4, 0.1, 0.3, 0.2]]], jnp.float32))
  for normalize, want in ((False, [0.4, 0.1]), (True, [0.8, 0.2])):
    config = _config(capacity_factor_train=4.0, normalize_weights=normalize,
                     deepseek=dict(score="softmax", num_groups=2, topk_groups=1,
                                   group_score_experts=1))
    decision, _, metrics = _route(logits, config)
    np.testing.assert_array_equal(decision.expert_index_GSK[0, 0], [0, 1])
    np.testing.assert_allclose(decision.weight_GSK[0, 0], want, atol=ATOL)
    np.testing.assert_allclose(metrics["router_confidence"], 0.4, atol=ATOL)


def test_padding_takes_no_capacity_and_counts_in_no_loss():
  # Token 0 is padding with NaN logits: token 2 now gets the slots token 0 took (C = 1), and the
  # balance loss sees tokens 1 and 2 only: f = 4 / (2 * 2) * [1, 1, 1, 1], so L = sum_i P_i = 1.
  logits = np.asarray(_sigmoid_logits(_S)).copy()
  logits[0, 0] = np.nan
  config = _config(capacity_factor_train=0.5, deepseek=_GROUPED)
  decision, losses, metrics = _route(logits, config, mask=[[False, True, True]])
  np.testing.assert_array_equal(decision.keep_GSK, [[[0, 0], [1, 1], [1, 1]]])
  np.testing.assert_allclose(decision.weight_GSK[0, 1:],
                             [[16 / 15, 14 / 15], [18 / 11, 4 / 11]], atol=ATOL)
  np.testing.assert_array_equal(decision.weight_GSK[0, 0], [0, 0])
  np.testing.assert_allclose(losses["sequence_balance_loss"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(metrics["expert_load"], [0.25] * 4, atol=ATOL)
  for name, value in {**losses, **metrics}.items():
    assert np.all(np.isfinite(value)), name
  # A group of padding only: zero loss, no load.
  _, losses, metrics = _route(logits, config, mask=[[False, False, False]])
  assert float(losses["sequence_balance_loss"]) == 0.0
  assert float(metrics["max_load_violation"]) == 0.0


# ======================================================================= sequential reference


def _scores64(logits, score):
  logits = np.asarray(logits, np.float64)
  if score == "sigmoid":
    return 1.0 / (1.0 + np.exp(-logits))
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def reference(logits, mask, bias, case, capacity):
  """DeepSeek routing token by token in float64: selection, weights, capacity claim, loss."""
  G, S, E = logits.shape
  k, groups, kept_groups, per_score = case["k"], case["groups"], case["topk_groups"], case["gse"]
  s = _scores64(logits, case["score"])
  select = s + (0.0 if bias is None else np.asarray(bias, np.float64))
  per = E // groups
  expert = np.zeros((G, S, k), np.int64)
  weight = np.zeros((G, S, k))
  for g in range(G):
    for t in range(S):
      candidates = list(range(E))
      if groups > 1:
        score_of = [sum(sorted(select[g, t, j * per:(j + 1) * per])[-per_score:])
                    for j in range(groups)]
        best = sorted(range(groups), key=lambda j: -score_of[j])[:kept_groups]
        candidates = [e for e in range(E) if e // per in best]
      chosen = sorted(candidates, key=lambda e: -select[g, t, e])[:k]
      w = s[g, t, chosen]
      if case["normalize"]:
        w = w / w.sum()
      expert[g, t], weight[g, t] = chosen, w * case["scale"]
  probs = s / s.sum(-1, keepdims=True)
  keep = np.zeros((G, S, k), bool)
  slot = np.zeros((G, S, k), np.int64)
  balance = []
  for g in range(G):
    order = list(range(S))
    if case["prioritized"]:
      order.sort(key=lambda t: (-probs[g, t].max(), t))
    count = [0] * E
    queue = ([(t, j) for j in range(k) for t in order] if case["order"] == "choice" else
             [(t, j) for t in order for j in range(k)])
    for t, j in queue:
      if mask[g, t] and count[expert[g, t, j]] < capacity:
        keep[g, t, j], slot[g, t, j] = True, count[expert[g, t, j]]
        count[expert[g, t, j]] += 1
    real = mask[g]
    if real.any():
      f = E / (k * real.sum()) * np.bincount(expert[g, real].ravel(), minlength=E)
      balance.append(np.sum(f * probs[g, real].mean(0)))
  return dict(expert=expert, weight=weight, keep=keep, slot=slot, probs=probs,
              balance=np.mean(balance) if balance else 0.0)


def _draw(rng, case, G, S, E):
  """Logits, padding and bias with no near-tie in group scores or selections (redrawn)."""
  while True:
    logits = (rng.normal(size=(G, S, E)) * rng.choice([0.5, 2.0])).astype(np.float32)
    bias = rng.uniform(-0.3, 0.3, E).astype(np.float32) if case["bias"] else None
    s = _scores64(logits, case["score"])
    select = s + (0 if bias is None else bias)
    per = E // case["groups"]
    grouped = np.sort(select.reshape(G, S, case["groups"], per), -1)[..., -case["gse"]:].sum(-1)
    gaps = [np.diff(np.sort(select, -1), axis=-1).min()]
    if case["groups"] > 1:
      gaps.append(np.diff(np.sort(grouped, -1), axis=-1).min())
    if min(gaps) > 1e-4 and np.diff(np.sort(s.max(-1), -1), axis=-1).min() > 1e-4:
      mask = rng.random((G, S)) >= case["pad"]
      if case["pad"] > 0:
        mask[-1] = False
      return logits, mask, bias


_CASES = [
    dict(score="sigmoid", E=8, k=2, groups=4, topk_groups=2, gse=2, normalize=True, scale=2.5,
         factor=1.0, prioritized=False, train=True, S=8, pad=0.3, bias=True, order="position"),
    dict(score="sigmoid", E=8, k=3, groups=2, topk_groups=1, gse=2, normalize=True, scale=1.0,
         factor=0.5, prioritized=True, train=False, S=8, pad=0.0, bias=True, order="choice"),
    dict(score="sigmoid", E=6, k=4, groups=3, topk_groups=2, gse=1, normalize=False, scale=1.5,
         factor=1.25, prioritized=False, train=True, S=6, pad=0.3, bias=False, order="choice"),
    dict(score="softmax", E=8, k=2, groups=4, topk_groups=3, gse=1, normalize=False, scale=16.0,
         factor=0.75, prioritized=True, train=True, S=8, pad=0.3, bias=False, order="position"),
    dict(score="softmax", E=6, k=2, groups=1, topk_groups=1, gse=2, normalize=True, scale=1.0,
         factor=1.0, prioritized=False, train=True, S=4, pad=0.0, bias=True, order="choice"),
    dict(score="sigmoid", E=8, k=8, groups=1, topk_groups=1, gse=2, normalize=True, scale=1.0,
         factor=0.25, prioritized=False, train=True, S=8, pad=0.3, bias=True, order="position"),
    dict(score="sigmoid", E=8, k=2, groups=8, topk_groups=2, gse=1, normalize=True, scale=1.0,
         factor=2.0, prioritized=True, train=True, S=8, pad=0.7, bias=True, order="choice"),
]


@pytest.mark.parametrize("case", _CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_properties_and_sequential_reference(case):
  G, S, E, k = 6, case["S"], case["E"], case["k"]
  other = case["factor"] * 2 + 0.5  # the other mode's capacity factor must not be used
  deepseek = dict(score=case["score"], num_groups=case["groups"],
                  topk_groups=case["topk_groups"], routed_scaling_factor=case["scale"])
  if case["groups"] > 1:
    deepseek["group_score_experts"] = case["gse"]
  config = _config(
      E, k, deepseek=deepseek, normalize_weights=case["normalize"],
      batch_prioritized=case["prioritized"], balance=0.01 if case["bias"] else 0.0,
      claim_order=case["order"],
      capacity_factor_train=case["factor"] if case["train"] else other,
      capacity_factor_eval=other if case["train"] else case["factor"])
  rng = np.random.default_rng(zlib.crc32(repr(case).encode()))
  logits, mask, bias = _draw(rng, case, G, S, E)
  decision, losses, metrics = _route(logits, config, train=case["train"], mask=mask, bias=bias)
  C = min(max(1, math.ceil(k * Fraction(case["factor"]) * S / E)), S)
  assert decision.capacity == C
  ref = reference(logits, mask, bias, case, C)
  np.testing.assert_array_equal(decision.expert_index_GSK, ref["expert"])
  np.testing.assert_array_equal(decision.keep_GSK, ref["keep"])
  np.testing.assert_array_equal(decision.slot_GSK[ref["keep"]], ref["slot"][ref["keep"]])
  np.testing.assert_allclose(decision.weight_GSK, np.where(ref["keep"], ref["weight"], 0.0),
                             rtol=1e-5, atol=ATOL)
  # Capacity never exceeded; padding never kept; a token's experts are distinct.
  kept_GE = np.zeros((G, E), int)
  np.add.at(kept_GE, (np.repeat(np.arange(G), S * k),
                      decision.expert_index_GSK.ravel()), decision.keep_GSK.ravel())
  assert kept_GE.max() <= C
  assert not decision.keep_GSK[~mask].any()
  assert all(len(set(row)) == k for row in decision.expert_index_GSK.reshape(-1, k).tolist())
  # The weights as the papers define them: with normalisation, a fully kept token's weights
  # sum to the routed scaling factor.
  full = decision.keep_GSK.all(-1)
  if case["normalize"] and full.any():
    np.testing.assert_allclose(decision.weight_GSK[full].sum(-1), case["scale"], rtol=1e-5)
  np.testing.assert_allclose(losses["sequence_balance_loss"], ref["balance"], rtol=1e-5,
                             atol=1e-6)
  real = mask.astype(bool)
  assigned = np.bincount(ref["expert"][real].ravel(), minlength=E)
  np.testing.assert_allclose(metrics["expert_load"], assigned / max(assigned.sum(), 1),
                             atol=ATOL)
  np.testing.assert_allclose(metrics["router_confidence"],
                             ref["probs"].max(-1)[real].sum() / max(real.sum(), 1), rtol=1e-5)


# ======================================================================= validation


@pytest.mark.parametrize("make,message", [
    (lambda: _config(6, deepseek=dict(num_groups=4, topk_groups=2)),
     r"model\.moe\.router\.deepseek\.num_groups=4 must divide model\.moe\.router\."
     r"num_experts=6"),
    (lambda: _config(8, 5, deepseek=dict(num_groups=4, topk_groups=2)),
     r"model\.moe\.router\.k=5 must be <= .*topk_groups \* num_experts / num_groups = 2 \* 2 = 4"),
    (lambda: _config(8, deepseek=dict(num_groups=8, topk_groups=2)),
     r"deepseek\.group_score_experts=2 must be in \[1, num_experts / num_groups = 1\]"),
    (lambda: _config(8, deepseek=dict(group_score_experts=1)),
     r"deepseek\.group_score_experts=1 is not used: .*num_groups=1"),
    (lambda: _config(8, deepseek=dict(num_groups=2, group_score_experts=0)),
     r"deepseek\.group_score_experts=0 must be an integer >= 1"),
    (lambda: _config(8, deepseek=dict(num_groups=2, topk_groups=3)),
     r"deepseek\.topk_groups=3 must be an integer in \[1, num_groups=2\]"),
    (lambda: _config(8, load_balancing_loss_weight=0.1),
     r"load_balancing_loss_weight=0\.1 is not used: .*kind='deepseek'"),
    (lambda: RouterConfig(kind="deepseek", num_experts=8),
     r"model\.moe\.router\.k=None is not allowed .*kind='deepseek'"),
    (lambda: MoeConfig(shared_ffn_dim=-1),
     r"model\.moe\.shared_ffn_dim=-1 must be an integer >= 0"),
])
def test_bad_settings_name_the_field_value_and_allowed(make, message):
  with pytest.raises(ValueError, match=message):
    make()


# ======================================================================= through MoeLayer

M, F, E, S = moe_tests.M, moe_tests.F, moe_tests.E, moe_tests.S
_BIAS = np.random.default_rng(3).uniform(-0.05, 0.05, E).astype(np.float32)


def make_layer(*, dispatch="index", shared_ffn_dim=24, rate=0.01, groups=(4, 2), seed=0,
               **router_kw):
  router_kw.setdefault("capacity_factor_train", 1.0)
  router = _config(E, 2, balance=rate, deepseek=dict(
      num_groups=groups[0], topk_groups=groups[1], routed_scaling_factor=2.5,
      sequence_balance_loss_weight=0.1), **router_kw)
  # Batched experts compile fastest; tests/test_moe.py shows every expert loop agrees.
  config = MoeConfig(router=router, ffn_dim=F, group_size=S, dispatch=dispatch,
                     activation="swiglu", shared_ffn_dim=shared_ffn_dim, expert_loop="batched")
  layer = MoeLayer(M, config, rngs=nnx.Rngs(seed))
  if rate > 0:
    layer.balance_bias[...] = jnp.asarray(_BIAS)  # routing reads a nonzero bias
  return layer


def test_einsum_and_index_agree_with_gradients():
  x, mask, r = moe_tests.inputs()
  results = {}
  for dispatch in ("einsum", "index"):
    graphdef, state = nnx.split(make_layer(dispatch=dispatch))
    results[dispatch] = moe_tests.grads_fn(graphdef)(state, x, mask, r)
  want = results["index"]
  assert float(want[0][1][1].metrics["dropped_assignment_fraction"]) > 0.05
  moe_tests.assert_same_results(results["einsum"], want, "deepseek einsum vs index")


_MESHES = [("index", (2, 4, 1)), ("einsum", (1, 8, 1)), ("index", (1, 4, 2))]


@pytest.mark.slow
@pytest.mark.parametrize("dispatch,mesh_shape", _MESHES,
                         ids=[f"{d}-{'x'.join(map(str, m))}" for d, m in _MESHES])
def test_sharded_matches_single_device(dispatch, mesh_shape):
  layer = make_layer(dispatch=dispatch)
  x, mask, r = moe_tests.inputs()
  graphdef, state = nnx.split(layer)
  want = moe_tests.grads_fn(graphdef)(state, x, mask, r)
  got = moe_tests.sharded_grads(layer, mesh_shape, x, mask, r)
  moe_tests.assert_same_results(got, want, f"deepseek/{dispatch} on {mesh_shape}")


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (1, 4, 2)])
def test_hlo_has_two_all_to_alls_with_shared_experts(mesh_shape):
  x, _, _ = moe_tests.inputs()
  # pylint: disable=protected-access
  hlo = moe_tests._compiled_forward_text(make_layer(), mesh_shape, x)
  assert len(moe_tests._all_to_alls(hlo)) == 2, "the shared experts must add no all-to-all"


# ----------------------------------------------------------------------------- shared experts


def test_shared_experts_add_an_ffn_of_every_real_token():
  x, mask, _ = moe_tests.inputs()
  layer = make_layer()
  y, _ = moe_tests.apply(layer, x, mask, train=False)
  shared = layer.shared
  wo = shared.wo[...]
  shared.wo[...] = jnp.zeros_like(wo)  # the routed experts alone
  y_routed, _ = moe_tests.apply(layer, x, mask, train=False)
  shared.wo[...] = wo
  x64 = np.asarray(x, np.float64)
  gate = x64 @ np.asarray(shared.wg[...], np.float64)
  hidden = gate / (1.0 + np.exp(-gate)) * (x64 @ np.asarray(shared.wi[...], np.float64))
  want = np.where(np.asarray(mask)[..., None], hidden @ np.asarray(wo, np.float64), 0.0)
  np.testing.assert_allclose(np.asarray(y) - np.asarray(y_routed), want, rtol=1e-5, atol=1e-5)
  assert np.abs(want).max() > 0.1
  assert np.all(np.asarray(y)[~np.asarray(mask)] == 0.0)


def test_shared_expert_parameters_and_flops():
  specs = sharding.partition_specs(nnx.state(make_layer(), nnx.Param))
  assert specs["shared"]["wi"] == P(None, "model")
  assert specs["shared"]["wg"] == P(None, "model")
  assert specs["shared"]["wo"] == P("model", None)
  shapes = {"/".join(map(str, path)): v[...].shape
            for path, v in nnx.to_flat_state(nnx.state(make_layer(), nnx.Param))}
  assert {p: s for p, s in shapes.items() if p.startswith("shared")} == {
      "shared/wi": (M, 24), "shared/wg": (M, 24), "shared/wo": (24, M)}
  without = nnx.to_flat_state(nnx.state(make_layer(shared_ffn_dim=0), nnx.Param))
  assert sorted("/".join(map(str, p)) for p, _ in without) == ["router", "wg", "wi", "wo"]
  # Active FLOPs per token count the shared experts: (k * F + F_shared) * 3 matmuls * 2 * M.
  model = ModelConfig(num_layers=2, model_dim=M, num_heads=2, head_dim=8, ffn_dim=64,
                      moe_every=2, vocab_size=64, moe=make_layer().config)
  assert active_ffn_flops_per_token(model) == 2 * 2 * M * 64 + (2 * F + 24) * 3 * 2 * M


# ----------------------------------------------------------------------------- balancing bias


def _train_call(layer, x, mask):
  return moe_tests.apply(layer, x, mask, train=True)


def test_bias_update_after_one_training_call_by_hand():
  rate = 0.01
  layer = make_layer(rate=rate, capacity_factor_train=1.0)
  x, mask, _ = moe_tests.inputs()
  bias_before = np.asarray(layer.balance_bias[...])
  moe_tests.apply(layer, x, mask, train=False)
  np.testing.assert_array_equal(layer.balance_bias[...], bias_before)  # eval: no update
  # The load before capacity, real tokens only, from the float64 reference selection.
  logits = np.asarray(x, np.float64).reshape(1, -1, M) @ np.asarray(layer.router[...])
  case = dict(k=2, groups=4, topk_groups=2, gse=2, score="sigmoid", normalize=True, scale=2.5,
              prioritized=False, order="position")
  real = np.asarray(mask).reshape(1, -1)
  ref = reference(logits, real, bias_before, case, capacity=S)
  load = np.bincount(ref["expert"][real].ravel(), minlength=E)
  assert load.min() != load.max()
  _, aux = _train_call(layer, x, mask)
  np.testing.assert_allclose(aux.metrics["balance_bias"], bias_before)  # routing read the old one
  want = bias_before + rate * np.sign(load.mean() - load)
  np.testing.assert_allclose(layer.balance_bias[...], want, rtol=0, atol=1e-7)
  assert not isinstance(layer.balance_bias, nnx.Param)
  assert "balance_bias" not in nnx.state(layer, nnx.Param)


def _skewed_layer(rate):
  """A router that sends every token to expert 0 first: feature 0 of x is 3, and the router
  reads it only for expert 0 (+6 on its logit)."""
  layer = make_layer(rate=rate, groups=(1, 1), capacity_factor_train=8.0)
  router = np.asarray(layer.router[...]).copy()
  router[0] = 0.0
  router[0, 0] = 2.0
  layer.router[...] = jnp.asarray(router)
  if rate > 0:
    layer.balance_bias[...] = jnp.zeros((E,), jnp.float32)
  return layer


def test_max_load_violation_falls_with_the_bias_on_and_not_off():
  x, mask, _ = moe_tests.inputs()
  x = x.at[..., 0].set(3.0)
  violations = {}
  for rate in (0.0, 0.05):
    layer = _skewed_layer(rate)
    violations[rate] = [float(_train_call(layer, x, mask)[1].metrics["max_load_violation"])
                        for _ in range(30)]
  off, on = violations[0.0], violations[0.05]
  # Expert 0 takes one of each token's two assignments: MaxVio = 8 * 1/2 - 1 = 3.
  np.testing.assert_allclose(off, 3.0, atol=1e-5)
  np.testing.assert_allclose(on[0], 3.0, atol=1e-5)
  # A sign update with a fixed rate ends oscillating around balance (here between two loads).
  assert max(on[-10:]) < 2.0 and np.mean(on[-10:]) < 1.0, on


def test_bias_update_is_the_same_on_a_mesh():
  x, mask, _ = moe_tests.inputs()
  single = make_layer()
  _train_call(single, x, mask)
  layer = make_layer()
  mesh = sharding.make_mesh(sharding.MeshConfig(1, 8, 1))
  with jax.set_mesh(mesh):
    graphdef, state = nnx.split(layer)
    state = jax.device_put(state, sharding.shardings(state, mesh))
    layer = nnx.merge(graphdef, state)
    tokens = NamedSharding(mesh, P(("data", "expert")))
    _train_call(layer, jax.device_put(x, tokens), jax.device_put(mask, tokens))
  assert np.abs(np.asarray(single.balance_bias[...]) - _BIAS).max() > 0
  np.testing.assert_array_equal(layer.balance_bias[...], single.balance_bias[...])
