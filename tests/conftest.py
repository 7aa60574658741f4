"""Test set-up: 8 simulated CPU devices, configured before JAX initialises a backend."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402  (must follow the environment set-up above)

jax.config.update("jax_threefry_partitionable", True)


def pytest_report_header(config):
  return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"
