"""Generates text from a training run's newest checkpoint, with a key/value cache.

    python -m moejax.sample --workdir=runs/switch_small --prompt="The king said"
    python -m moejax.sample --workdir=runs/switch_small --prompt="The king said" \
        --temperature=0.8 --top_p=0.9 --seed=3 --max_new_tokens=40 --show_experts

The prompt is encoded as the start of a document (the end-of-document token, then the prompt's
tokens) and run through the model once (prefill), filling every layer's key/value cache; then
each new token is one decoding step of a single position (`model.Transformer.decode`). The MoE
layers route every token alone (groups of one token, evaluation capacity: no token is dropped),
so a generated token's experts depend only on the text before it. Generation stops after
`--max_new_tokens` or at the end-of-document token. The model runs on one device.

Choosing the next token from the logits z: temperature 0 takes argmax z (greedy); otherwise
z / temperature is sampled from, restricted to the smallest set of most likely tokens whose
probability reaches `--top_p` (nucleus sampling; 1 keeps every token, the most likely token is
always kept). `--seed` fixes the random draws.

With `--show_experts`, a table follows the text: for each generated token, the expert(s) it took
in each MoE layer. Exit statuses: `moejax.command`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import command
from moejax import workdir as workdir_lib


def next_token(logits_BV: jax.Array, key: jax.Array, temperature: jax.Array,
               top_p: jax.Array) -> jax.Array:
  """Token ids (B,) int32: argmax when temperature is 0, else a nucleus (top-p) sample of
  softmax(logits / temperature). See the module docstring."""
  greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  scaled_BV = logits_BV.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
  probs_BV = jax.nn.softmax(scaled_BV, axis=-1)
  order_BV = jnp.argsort(-probs_BV, axis=-1, stable=True)  # most likely first
  sorted_BV = jnp.take_along_axis(probs_BV, order_BV, axis=-1)
  before_BV = jnp.cumsum(sorted_BV, axis=-1) - sorted_BV  # mass of the more likely tokens
  keep_sorted_BV = (before_BV < top_p).at[:, 0].set(True)
  keep_BV = jnp.zeros_like(keep_sorted_BV).at[
      jnp.arange(logits_BV.shape[0])[:, None], order_BV].set(keep_sorted_BV)
  sampled_B = jax.random.categorical(key, jnp.where(keep_BV, scaled_BV, -jnp.inf), axis=-1)
  return jnp.where(temperature > 0, sampled_B.astype(jnp.int32), greedy_B)


@dataclasses.dataclass(frozen=True)
class Generation:
  """What `generate` returns."""

  tokens: list[int]  # the generated ids (without the prompt; the end-of-document id excluded)
  experts: list[dict[str, list[int]]]  # per generated token: MoE layer name -> experts taken
  logits: np.ndarray  # (len(tokens), V) float32: the logits each token was chosen from


@functools.partial(jax.jit, static_argnums=0)
def _step(graphdef, state, inputs_1L, caches, key, temperature, top_p):
  """One decoding call (the prefill or one token): the next token, its logits, the caches and
  the experts the last position took in each MoE layer."""
  logits_1LV, caches, aux = nnx.merge(graphdef, state).decode(inputs_1L, caches)
  logits_1V = logits_1LV[:, -1]
  token_1 = next_token(logits_1V, key, temperature, top_p)
  kept = {name: a.kept_GE[-1] > 0 for name, a in aux.moe.items()}  # one row per token
  return token_1, logits_1V[0], caches, kept


def on_one_device(model):
  """The model with its arrays on the first device, outside any mesh (a checkpoint restored
  onto a mesh carries mesh-typed shardings, which a cache built without a mesh does not match)."""
  graphdef, state = nnx.split(model)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return nnx.merge(graphdef, jax.device_put(state, device))


def generate(model, prompt_ids: Sequence[int], *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, stop_id: int | None = None) -> Generation:
  """Continues `prompt_ids` (non-empty) with a key/value cache; see the module docstring."""
  if not prompt_ids:
    raise ValueError("the prompt holds no token; start it with the end-of-document id.")
  graphdef, state = nnx.split(on_one_device(model))
  caches = model.init_cache(1, len(prompt_ids) + max_new_tokens)
  keys = jax.random.split(jax.random.key(seed), max_new_tokens)
  inputs_1L = jnp.asarray([list(prompt_ids)], jnp.int32)
  tokens, experts, logits = [], [], []
  for i in range(max_new_tokens):
    token_1, logits_V, caches, kept = _step(graphdef, state, inputs_1L, caches, keys[i],
                                            jnp.float32(temperature), jnp.float32(top_p))
    token = int(token_1[0])
    if stop_id is not None and token == stop_id:
      break
    tokens.append(token)
    logits.append(np.asarray(logits_V))
    experts.append({name: np.flatnonzero(np.asarray(e)).tolist() for name, e in kept.items()})
    inputs_1L = token_1[:, None]
  width = model.config.vocab_size
  return Generation(tokens=tokens, experts=experts,
                    logits=np.stack(logits) if logits else np.zeros((0, width), np.float32))


def check_sampling(model_config) -> None:
  """Raises ValueError unless this model can be sampled one token at a time."""
  if not model_config.causal:
    raise ValueError(f"model.objective={model_config.objective.value!r}: sampling needs a causal "
                     "language model ('causal_lm').")
  router = model_config.moe.router if model_config.moe is not None else None
  if router is not None and not router.causal(train=False):
    raise ValueError(f"{router.PATH}.kind={router.kind.value!r} routes a token by the other "
                     "tokens of its group, which one-token-at-a-time sampling does not have; "
                     "sampling needs a causal router.")


def _check_flags(args) -> None:
  if args.max_new_tokens < 1:
    raise ValueError(f"--max_new_tokens={args.max_new_tokens} must be an integer >= 1.")
  if not (math.isfinite(args.temperature) and args.temperature >= 0):
    raise ValueError(f"--temperature={args.temperature} must be a number >= 0 (0: greedy).")
  if not (math.isfinite(args.top_p) and 0 < args.top_p <= 1):
    raise ValueError(f"--top_p={args.top_p} must be a number in (0, 1] (1: no restriction).")


def _main(args) -> None:
  _check_flags(args)
  run = workdir_lib.load(args.workdir, single_device=True)
  check_sampling(run.model_config)
  tokenizer = run.tokenizer
  prompt_ids = [tokenizer.eos_id] + list(tokenizer.encode(args.prompt))
  result = generate(run.model(), prompt_ids, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                    stop_id=tokenizer.eos_id if args.stop_at_eos else None)
  print(args.prompt + _joined(tokenizer, prompt_ids[1:], result.tokens))
  if args.show_experts:
    print(_experts_table(tokenizer, result))


def _joined(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
  """The generated text as it continues the prompt (decoding both keeps the spacing right)."""
  prompt = tokenizer.decode(prompt_ids)
  both = tokenizer.decode(prompt_ids + new_ids)
  return both[len(prompt):] if both.startswith(prompt) else " " + tokenizer.decode(new_ids)


def _experts_table(tokenizer, result: Generation) -> str:
  layers = sorted({name for row in result.experts for name in row},
                  key=lambda name: int(name.rsplit("_", 1)[1]))
  if not layers:
    return "(a dense model: no MoE layer)"
  texts = [repr(tokenizer.decode([t])) for t in result.tokens]
  width = max([len("token"), *map(len, texts)])
  lines = [f"{'#':>4}  {'token':<{width}}  " + "  ".join(f"{name:>9}" for name in layers)]
  for i, (text, row) in enumerate(zip(texts, result.experts)):
    cells = ["+".join(map(str, row.get(name, []))) or "-" for name in layers]
    lines.append(f"{i:>4}  {text:<{width}}  " + "  ".join(f"{c:>9}" for c in cells))
  return "experts each generated token took, per MoE layer:\n" + "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = command.Parser(prog="python -m moejax.sample",
                          description="Generate text from the newest checkpoint of a run.")
  parser.add_argument("--workdir", required=True, help="the training run's workdir")
  parser.add_argument("--prompt", required=True, help="the text to continue")
  parser.add_argument("--max_new_tokens", type=int, default=50)
  parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--stop_at_eos", action=argparse.BooleanOptionalAction, default=True,
                      help="stop at the end-of-document token (--no-stop_at_eos: never)")
  parser.add_argument("--show_experts", action="store_true",
                      help="print the experts each generated token took in each MoE layer")
  return command.run(parser, _main, argv)


if __name__ == "__main__":
  sys.exit(main())
