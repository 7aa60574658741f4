"""Peak dense matrix-multiply FLOP/s per device, the denominator of MFU (moejax/flops.py).

The figures are the vendors' bfloat16 dense (no sparsity) tensor-core / MXU peaks per device, as
JAX counts devices (one GPU; one TensorCore of a TPU v4 or v5p megacore chip is not a device of
its own, the chip is). MFU is reported against the bfloat16 peak whatever the compute dtype, as
is usual: a float32 run's MFU then says how far it is from what the chip could do in bfloat16.

Keys are matched, longest first, as case-insensitive substrings of `jax.Device.device_kind`
("NVIDIA H100 80GB HBM3", "TPU v5 lite", ...). CPUs have no entry: their achieved FLOP/s is
reported without an MFU.
"""

from __future__ import annotations

import jax

TERA = 1e12

# device_kind substring -> bfloat16 dense peak FLOP/s per device.
PEAK_BF16 = {
    "H100 PCIe": 756 * TERA,
    "H100": 989 * TERA,        # SXM
    "H200": 989 * TERA,
    "H800": 989 * TERA,
    "A100": 312 * TERA,
    "TPU v4": 275 * TERA,
    "TPU v5 lite": 197 * TERA,  # v5e
    "TPU v5e": 197 * TERA,
    "TPU v5p": 459 * TERA,
    "TPU v5": 459 * TERA,       # v5p reports "TPU v5"
    "TPU v6 lite": 918 * TERA,  # v6e (Trillium)
    "TPU v6e": 918 * TERA,
}


def peak_flops_per_device(device_kind: str) -> float | None:
  """The bfloat16 dense peak of a device kind, None when unknown (CPUs, unlisted chips)."""
  kind = device_kind.lower()
  for key in sorted(PEAK_BF16, key=len, reverse=True):
    if key.lower() in kind:
      return PEAK_BF16[key]
  return None


def local_peak_flops() -> tuple[str, float | None]:
  """(device kind, peak FLOP/s per device) of this process's first device."""
  kind = jax.local_devices()[0].device_kind
  return kind, peak_flops_per_device(kind)
