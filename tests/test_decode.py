"""Decoding with a key/value cache (`Transformer.decode`) against full forward passes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.model import ModelConfig, Transformer
from moejax.moe import MoeConfig, MoeLayer
from moejax.routing import RouterConfig

VOCAB, B, T = 40, 2, 11


def _config(**router) -> ModelConfig:
  router = {"kind": "switch", "num_experts": 4, **router}
  moe = MoeConfig(router=RouterConfig(**router), ffn_dim=16, group_size=4)
  return ModelConfig(vocab_size=VOCAB, num_layers=2, model_dim=16, num_heads=2, head_dim=8,
                     ffn_dim=32, moe_every=1, moe=moe)


@nnx.jit
def _full(model, tokens_BL):
  logits, aux = model(tokens_BL, routing_group_size=1)
  return logits, {name: a.kept_GE for name, a in aux.moe.items()}


@nnx.jit
def _decode(model, tokens_BL, caches):
  logits, caches, aux = model.decode(tokens_BL, caches)
  return logits, caches, {name: a.kept_GE for name, a in aux.moe.items()}


@pytest.mark.parametrize("router", [dict(), dict(kind="topk", k=2), dict(kind="hash")],
                         ids=["switch", "top2", "hash"])
def test_cached_decoding_equals_the_full_forward_pass(router):
  """Prefill 5 tokens, then 6 single steps: logits and experts equal a forward pass over the
  whole sequence (each token routed alone in both)."""
  model = Transformer(_config(**router), rngs=nnx.Rngs(0))
  tokens_BL = jax.random.randint(jax.random.key(1), (B, T), 0, VOCAB)
  full_logits, full_kept = _full(model, tokens_BL)
  caches = model.init_cache(B, T)
  logits, caches, kept = _decode(model, tokens_BL[:, :5], caches)
  pieces, kept_pieces = [logits], [kept]
  for t in range(5, T):
    logits, caches, kept = _decode(model, tokens_BL[:, t:t + 1], caches)
    pieces.append(logits)
    kept_pieces.append(kept)
  assert int(caches[0].length) == T
  decoded = np.concatenate([np.asarray(p) for p in pieces], axis=1)
  np.testing.assert_allclose(decoded, np.asarray(full_logits), rtol=1e-5, atol=1e-5)
  for name in ("layer_0", "layer_1"):
    # kept_GE rows are tokens in (B, L) order; the pieces split L.
    steps = [np.asarray(k[name]).reshape(B, -1, 4) for k in kept_pieces]
    np.testing.assert_array_equal(np.concatenate(steps, axis=1),
                                  np.asarray(full_kept[name]).reshape(B, T, 4))
  k = router.get("k", 1)
  assert (np.asarray(full_kept["layer_1"]).sum(-1) == k).all()  # every token took k experts


def test_rope_positions_continue_across_steps():
  """A cache that forgot its length (positions restarting at 0) gives other logits."""
  model = Transformer(_config(), rngs=nnx.Rngs(0))
  tokens_BL = jax.random.randint(jax.random.key(2), (B, 6), 0, VOCAB)
  full_logits, _ = _full(model, tokens_BL)
  caches = model.init_cache(B, 6)
  _, caches, _ = _decode(model, tokens_BL[:, :5], caches)
  right, _, _ = _decode(model, tokens_BL[:, 5:], caches)
  np.testing.assert_allclose(right[:, 0], full_logits[:, 5], rtol=1e-5, atol=1e-5)
  wrong_caches = [dataclasses.replace(c, length=jnp.int32(0)) for c in caches]
  wrong, _, _ = _decode(model, tokens_BL[:, 5:], wrong_caches)
  assert np.abs(np.asarray(wrong) - np.asarray(right)).max() > 1e-3


def test_a_lone_token_is_never_dropped():
  """Groups of one token have capacity 1 per expert, whatever the capacity factor."""
  config = _config(kind="topk", k=2, capacity_factor_eval=0.1, min_capacity=1).moe
  layer = MoeLayer(16, config, rngs=nnx.Rngs(0))
  x_BLM = jax.random.normal(jax.random.key(3), (2, 8, 16))
  run = nnx.jit(lambda layer, x, size: layer(x, group_size=size), static_argnums=2)
  _, grouped = run(layer, x_BLM, None)
  _, alone = run(layer, x_BLM, 1)
  # C = 1 for groups of 4 tokens making 8 assignments to 4 experts: some must drop.
  assert float(grouped.metrics["dropped_assignment_fraction"]) > 0.1
  assert float(alone.metrics["dropped_assignment_fraction"]) == 0.0
  np.testing.assert_array_equal(np.asarray(alone.kept_GE).sum(-1), 2)


def test_decoding_needs_a_causal_lm():
  model = Transformer(dataclasses.replace(_config(), objective="masked_lm"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"model\.objective='masked_lm': decoding needs a causal"):
    model.decode(jnp.zeros((1, 2), jnp.int32), model.init_cache(1, 2))
