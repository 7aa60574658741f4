"""Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks") and V-MoE's
fixed-noise variant (Riquelme et al. 2021, "Scaling Vision with Sparse Mixture of Experts").

Gating (Sec. 2.1, eq. 3-5), in float32 per token x:

    H(x)_i = (x W_g)_i + N(0, 1) * softplus((x W_noise)_i)      noise="learned" (eq. 4)
    H(x)_i = (x W_g)_i + N(0, noise_std^2)                       noise="fixed"   (V-MoE)
    G(x)   = Softmax(KeepTopK(H(x), k))                                          (eq. 3, 5)

With learned noise the router projection is (M, 2E): its first E columns are W_g, its last E
columns W_noise (`logits_per_expert` = 2). The noise is drawn in training only (`normal_GSE`, by the
layer); in evaluation H(x) = x W_g and the choice is the deterministic top-k of the clean logits.

Weights: with `normalize_weights=True` (the default) the k kept experts' weights are the softmax of
their noisy logits H(x), eq. 3; this equals the softmax over all E renormalised over the kept k.
With `normalize_weights=False` the weights are the softmax over all E of H(x) at the kept experts,
not renormalised: V-MoE's TOP_k(softmax(W x + eps)). Expert capacity and the claim are the shared
token-choice ones (`token_choice.finish`): k-major, position order or V-MoE's batch priority (the
router confidence max_i softmax(H(x))_i).

Losses (both over the real tokens of the whole batch, as squared coefficients of variation of
per-expert batch totals, `RoutingStats.expert_sums_GE`):

* importance (Sec. 4, eq. 6-7): Importance(X)_i = sum_x G(x)_i, the gates before capacity;
  `importance_loss` = CV(Importance(X))^2.
* load (Appendix A, eq. 8-11): the smooth estimator of how many tokens choose expert i,
      P(x, i) = Phi(((x W_g)_i - kth_excluding(H(x), k, i)) / sigma_i(x)),
  with Phi the standard normal CDF, sigma_i(x) = softplus((x W_noise)_i) (learned) or noise_std
  (fixed), and kth_excluding(v, k, i) the k-th largest entry of v once entry i is left out: the
  probability that expert i is chosen if its own noise were drawn again while the other experts'
  noise stays. Load(X)_i = sum_x P(x, i); `load_loss` = CV(Load(X))^2. With k = E every expert is
  always chosen: P = 1.

Notes on choices moejax makes:
* V-MoE's reference code differs from the above in its losses: its importance sums the dense softmax
  of the clean logits, its load threshold is the k-th noisy logit without leaving expert i out,
  and both are computed per group. moejax uses Shazeer et al.'s definitions for both noise kinds,
  so that the two differ only in the noise. V-MoE draws its noise with std = 1/E: set
  `noise_std` to 1/E for its setting (`noise_std` is the absolute std here).
* sigma_i(x) is floored at 1e-6 so that an underflowing softplus cannot divide zero by zero; the
  floor is orders of magnitude below any std that changes a routing decision.
* In evaluation (no noise) the losses are still reported, with H(x) = x W_g in the estimator.
* The aux-loss-free balancing bias (`balance`), when on, is added to H(x) for the selection (and
  therefore to both sides of the load estimator's comparison); the weights stay those of H(x).
* z-loss, router entropy and confidence are of the E clean logits x W_g / of softmax(H(x)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.routing import token_choice
from moejax.routing.config import NoiseKind, RouterConfig, RouterKind
from moejax.routing.decision import RouterInputs, RoutingDecision
from moejax.routing.family import Family, register

MIN_NOISE_STD = 1e-6


def logits_per_expert(config: RouterConfig) -> int:
  """2 with learned noise (W_g and W_noise side by side), 1 with fixed noise."""
  return 2 if config.noisy_topk.noise is NoiseKind.LEARNED else 1


def noise_std_GSE(logits_GSX, config: RouterConfig) -> jax.Array:
  """sigma(x) per token and expert: softplus(x W_noise) (learned, floored) or noise_std (fixed)."""
  E = config.num_experts
  if config.noisy_topk.noise is NoiseKind.LEARNED:
    return jnp.maximum(jax.nn.softplus(logits_GSX[..., E:]), MIN_NOISE_STD)
  return jnp.full(logits_GSX.shape[:-1] + (E,), config.noisy_topk.noise_std, jnp.float32)


def prob_in_top_k_GSE(clean_GSE, noisy_GSE, std_GSE, k: int, bias_E=None) -> jax.Array:
  """P(x, i) of eq. 9: the probability that expert i is among the top k if its noise is redrawn.

  Selection ranks H(x) + bias; an expert is chosen when its score beats kth_excluding(H + bias,
  k, i): the (k+1)-th largest score when i itself is among the top k, else the k-th largest.
  """
  E = clean_GSE.shape[-1]
  if k >= E:
    return jnp.ones_like(clean_GSE)
  bias_E = jnp.zeros((E,), jnp.float32) if bias_E is None else bias_E
  scores_GSE = noisy_GSE + bias_E
  top_GSK1, index_GSK1 = jax.lax.top_k(scores_GSE, k + 1)
  chosen_GSE = jnp.any(jax.nn.one_hot(index_GSK1[..., :k], E, dtype=jnp.bool_), axis=-2)
  threshold_GSE = jnp.where(chosen_GSE, top_GSK1[..., k:k + 1], top_GSK1[..., k - 1:k])
  return jax.scipy.special.ndtr((clean_GSE + bias_E - threshold_GSE) / std_GSE)


def route_noisy_topk(logits_GSX, config: RouterConfig, *, train: bool, mask_GS,
                     inputs: RouterInputs) -> RoutingDecision:
  """Noisy top-k routing (module docstring); logits_GSX is (G, S, E * logits_per_expert)."""
  E, k = config.num_experts, config.k
  clean_GSE = logits_GSX[..., :E]
  std_GSE = noise_std_GSE(logits_GSX, config)
  noisy_GSE = clean_GSE
  if train:
    if inputs.normal_GSE is None:
      raise ValueError(f"{config.PATH}.kind='noisy_topk' needs normal_GSE (standard normal noise, "
                       "one number per token and expert) in training.")
    noisy_GSE = clean_GSE + inputs.normal_GSE * std_GSE
  probs_GSE = jax.nn.softmax(noisy_GSE, axis=-1)
  _, expert_index_GSK = token_choice.top_k(noisy_GSE, k, inputs.bias_E)
  if config.normalize_weights:
    gates_GSK = jax.nn.softmax(jnp.take_along_axis(noisy_GSE, expert_index_GSK, axis=-1), axis=-1)
  else:
    gates_GSK = jnp.take_along_axis(probs_GSE, expert_index_GSK, axis=-1)
  real = lambda a_GSE: jnp.where(mask_GS[..., None], a_GSE, 0.0)
  gates_GSE = jnp.einsum("GSKE,GSK->GSE", jax.nn.one_hot(expert_index_GSK, E, dtype=jnp.float32),
                         gates_GSK)
  load_GSE = prob_in_top_k_GSE(clean_GSE, noisy_GSE, std_GSE, k, inputs.bias_E)
  expert_sums_GE = {"importance": jnp.sum(real(gates_GSE), axis=1),
                    "load": jnp.sum(real(load_GSE), axis=1)}
  return token_choice.finish(config, logits_GSE=clean_GSE, probs_GSE=probs_GSE,
                             gates_GSK=gates_GSK, expert_index_GSK=expert_index_GSK,
                             mask_GS=mask_GS, train=train, expert_sums_GE=expert_sums_GE)


register(RouterKind.NOISY_TOPK, Family(
    route=route_noisy_topk, capacity=token_choice.token_capacity, biased=True,
    reads=token_choice.TOKEN_CAPACITY | token_choice.BALANCED | {"k", "normalize_weights",
                                                                  "noisy_topk"},
    logits_per_expert=logits_per_expert,
    random_inputs=lambda config: ("normal_GSE",),
    losses=(("importance_loss", "noisy_topk.importance_loss_weight"),
            ("load_loss", "noisy_topk.load_loss_weight"))))
