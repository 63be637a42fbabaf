"""XLA options for the trainer's large jits (the train step and the random init), by backend.

On a CPU, XLA runs the matmuls in its linked libraries (YNNPACK, Eigen) and generates LLVM code
for the rest, the fusions around them. LLVM at -O1 instead of XLA's default -O3 cuts that
compile by a fifth to a quarter and leaves the step's speed and results unchanged; -O0 makes
the step 1.75x slower. Measured in one process, interleaved, on a 2-core CPU, MAE Ti/4 bench
config (`make bench`): compile 9.7 s at -O1 against 12.3 s at -O3, step time ratio 0.99 (noise),
and the loss after 18 steps bit-identical; the runlocal step compiles in 8.2 s against 11.3 s.
Accelerators keep XLA's defaults: there this level also drives the device code.

An option that XLA_FLAGS sets is left to it: the test suite compiles everything at -O0
(tests/conftest.py), which compiles faster still for programs that run only a few steps.
"""

import os
from typing import Any

import jax

CPU = {"xla_backend_optimization_level": 1}


def for_platform(platform: str | None = None) -> dict[str, Any]:
  """The options for jax.jit(..., compiler_options=...) compiling for `platform` ('cpu', 'gpu',
  'tpu'; the default backend's when None), less those that the XLA_FLAGS environment variable
  sets (a per-jit option would override it). The platform is the devices' the program runs on,
  which is not the default backend's when mim_jax.tools.dryrun plans for a TPU topology from a
  CPU host."""
  if (platform or jax.default_backend()) != "cpu":
    return {}
  from_env = os.environ.get("XLA_FLAGS", "")
  return {name: value for name, value in CPU.items() if f"--{name}=" not in from_env}
