"""Every in-process test sees 8 fake CPU devices: the flag must be set before jax is imported."""

import os

_DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES_FLAG}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
