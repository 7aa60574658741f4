"""Model FLOPs per token, achieved FLOP/s and MFU (model FLOPs utilisation).

MFU (Chowdhery et al. 2022, PaLM, App. B) is the model's FLOPs per second over the device's peak:
the FLOPs are those the model needs by its definition, not those the compiled program happens to
execute, so rematerialisation, capacity padding and dispatch do not raise it. moejax counts, per
token and forward pass (a multiply-add is 2 FLOPs):

    attention projections   2 * 4 * M * H * D                 per block (q, k, v, output)
    attention itself        2 * 2 * L * H * D                 per block (q.k scores and p.v,
                                                              over all L keys: PaLM's convention,
                                                              which does not halve causal masks)
    FFN / MoE               `active_ffn_flops_per_token`      the experts a token is sent to
                                                              (k, or E * C / S) and shared ones
    router                  2 * M * router width              per MoE block
    logits                  2 * M * V

and a training step as three forward passes (the backward pass costs two: gradients with respect
to activations and to weights). Norms, softmax, RoPE, activations and the optimizer are left out;
they are a few percent at most. moejax/device_peak.py gives the denominator.
"""

from __future__ import annotations

from moejax.model import ModelConfig, active_ffn_flops_per_token

# A training step's FLOPs over its forward pass's.
TRAIN_OVER_FORWARD = 3


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Forward-pass model FLOPs per token of `config` on sequences of `seq_len` (see the module
  docstring for what is counted)."""
  M, H, D, L = config.model_dim, config.num_heads, config.head_dim, seq_len
  per_block_attention = 2 * 4 * M * H * D + 2 * 2 * L * H * D
  total = config.num_layers * per_block_attention + active_ffn_flops_per_token(config)
  if config.moe is not None:
    router = config.moe.router
    width = router.num_experts * router.family.logits_per_expert(router)
    total += 2 * M * width * sum(config.is_moe_block(i) for i in range(config.num_layers))
  total += 2 * M * config.vocab_size
  return float(total)


def train_flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Model FLOPs of one training step per token: three forward passes."""
  return TRAIN_OVER_FORWARD * forward_flops_per_token(config, seq_len)


def performance_metrics(flops_per_token: float, tokens_per_sec: float, num_devices: int,
                        peak_per_device: float | None) -> dict[str, float]:
  """`perf/*` scalars of an interval that trained `tokens_per_sec` tokens/s on `num_devices`.

  perf/tflops_per_device: achieved model TFLOP/s per device.
  perf/mfu: that over the device's peak (absent where the peak is not known, e.g. CPUs).
  """
  per_device = flops_per_token * tokens_per_sec / num_devices
  scalars = {"perf/tflops_per_device": per_device / 1e12}
  if peak_per_device:
    scalars["perf/mfu"] = per_device / peak_per_device
  return scalars
