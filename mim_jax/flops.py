"""Analytic FLOP counts, from the architecture rather than from XLA.

A matmul of [m, k] x [k, n] costs 2mkn FLOPs. Training costs about 3x the forward pass (the
backward computes two matmuls per forward one). XLA's cost_analysis() is a cross-check only: it
counts a scan body once, includes remat recompute and reports per device under sharding.
"""

import time

import jax
import jax.numpy as jnp

TRAIN_MULTIPLIER = 3


def dense(tokens: int, d_in: int, d_out: int) -> int:
  return 2 * tokens * d_in * d_out


def transformer(tokens: int, width: int, depth: int, mlp_dim: int) -> int:
  """Forward FLOPs of `depth` pre-norm blocks on one sequence of `tokens` tokens.

  Per block: qkv (3 d^2), output projection (d^2) and MLP (2 d m) matmuls per token, plus
  q k^T and attention-weighted v (2 n^2 d each). Norms, softmax and GELU are left out.
  """
  per_block = (dense(tokens, width, 3 * width) + dense(tokens, width, width)
               + 2 * dense(tokens, width, mlp_dim) + 2 * 2 * tokens * tokens * width)
  return depth * per_block


def matmul_peak(dtype: jnp.dtype = jnp.float32, size: int | None = None, repeats: int = 5) -> float:
  """Measured FLOP/s of one device on a large square matmul: the ceiling MFU is reported against.

  Using a measured peak rather than a datasheet number keeps MFU meaningful on CPUs, where the
  achievable peak depends on the core count, the vector units and the BLAS XLA links.
  """
  device = jax.devices()[0]
  size = size or (2048 if device.platform == "cpu" else 8192)
  a = jax.device_put(jnp.ones((size, size), dtype), device)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()  # compile and warm up
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best
