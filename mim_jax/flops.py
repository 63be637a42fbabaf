"""Analytic FLOP counts, from the architecture rather than from XLA.

A matmul of [m, k] x [k, n] costs 2mkn FLOPs. Training costs about 3x the forward pass (the
backward computes two matmuls per forward one). XLA's cost_analysis() is a cross-check only: it
counts a scan body once, includes remat recompute and reports per device under sharding.
"""

import math
import time

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp

from mim_jax.models import swin

TRAIN_MULTIPLIER = 3


def dense(tokens: int, d_in: int, d_out: int) -> int:
  return 2 * tokens * d_in * d_out


def transformer(tokens: int, width: int, depth: int, mlp_dim: int,
                context: int | None = None) -> int:
  """Forward FLOPs of `depth` pre-norm blocks on one sequence of `tokens` tokens, whose keys and
  values come from `context` of them (all when None; layers.Attention's kv_ids, MP3).

  Per block: q and output projections (d^2 each) and MLP (2 d m) matmuls per token, k and v
  projections (2 d^2) per context token, plus q k^T and attention-weighted v (2 n c d each).
  Norms, softmax and GELU are left out.
  """
  context = tokens if context is None else context
  per_block = (2 * dense(tokens, width, width) + dense(context, width, 2 * width)
               + 2 * dense(tokens, width, mlp_dim) + 2 * 2 * tokens * context * width)
  return depth * per_block


def crate_encoder(tokens: int, width: int, depth: int) -> int:
  """Forward FLOPs of `depth` CRATE layers (models/crate.py) on one sequence.

  Per layer: MSSA's U and output projection (d^2 each per token) and its two n^2 d products;
  ISTA's D z and D^T (z - D z) (d^2 each per token). Norms, softmax and ReLU are left out.
  """
  per_layer = (2 * dense(tokens, width, width) + 2 * 2 * tokens * tokens * width
               + 2 * dense(tokens, width, width))
  return depth * per_layer


def crate_decoder(tokens: int, width: int, depth: int) -> int:
  """Forward FLOPs of `depth` CRATE-MAE decoding layers: D (d^2 per token), then MSSA."""
  per_layer = (dense(tokens, width, width) + 2 * dense(tokens, width, width)
               + 2 * 2 * tokens * tokens * width)
  return depth * per_layer


def swin_encoder(image_size: int, size: swin.SwinSize, patch: int, window: int,
                 channels: int) -> int:
  """Forward FLOPs of the Swin encoder (models/swin.py) on one image.

  Per stage at r x r tokens of width d with (effective) window M: per block qkv (3d^2), proj
  (d^2) and MLP (2 * 4 d^2) per token, and windowed attention: each of the r^2/M^2 windows
  computes q k^T and weights @ v over its M^2 tokens, 2 * 2 * (M^2)^2 * d per window, i.e.
  4 r^2 M^2 d per block, linear in the number of tokens. Patch merging is a 4d -> 2d matmul on
  the r^2/4 merged tokens. Norms, softmax and GELU are left out."""
  total = dense((image_size // patch) ** 2, patch * patch * channels, size.embed_dim)
  resolutions = swin.stage_resolutions(image_size, patch, len(size.depths))
  for i, (res, depth) in enumerate(zip(resolutions, size.depths)):
    d = size.embed_dim * 2 ** i
    if i:
      total += dense(res * res, 2 * d, d)  # merging: (res*2)^2/4 tokens, 4(d/2) -> d
    win, _ = swin.stage_window(res, window)
    n = res * res
    per_block = (dense(n, d, 3 * d) + dense(n, d, d) + 2 * dense(n, d, swin.MLP_RATIO * d)
                 + 2 * 2 * n * win * win * d)
    total += depth * per_block
  return total


def jaxpr_matmul_flops(jaxpr) -> int:
  """FLOPs of every dot_general in a traced program (a Jaxpr or ClosedJaxpr from
  jax.make_jaxpr), sub-programs included: an independent check of the analytic counts.
  2 * (output size) * (contracted size) per matmul; a scan body is counted once."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, (jax_core.ClosedJaxpr, jax_core.Jaxpr)):
          total += jaxpr_matmul_flops(sub)
  return total


def matmul_peak(dtype: jnp.dtype = jnp.float32, sizes: tuple[int, ...] | None = None,
                repeats: int = 5) -> float:
  """Measured FLOP/s of one device on square matmuls: the ceiling MFU is reported against.

  Using a measured peak rather than a datasheet number keeps MFU meaningful on CPUs, where the
  achievable peak depends on the core count, the vector units and the BLAS XLA links. It is the
  best over several sizes, each timed over enough back-to-back calls to last ~20 ms: which size
  runs fastest depends on the caches and the kernel's tiling (on a 2-core CPU, 512-1536 reach
  ~210 GFLOP/s where 2048 reaches ~185), and a ceiling measured too low would inflate MFU.
  """
  device = jax.devices()[0]
  sizes = sizes or ((512, 1024, 1536, 2048) if device.platform == "cpu" else (4096, 8192))
  best = 0.0
  for size in sizes:
    a = jax.device_put(jnp.ones((size, size), dtype), device)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()  # compile and warm up
    start = time.perf_counter()
    matmul(a).block_until_ready()
    calls = max(1, math.ceil(0.02 / (time.perf_counter() - start)))
    for _ in range(repeats):
      start = time.perf_counter()
      for _ in range(calls):
        out = matmul(a)
      out.block_until_ready()
      best = max(best, 2 * size ** 3 * calls / (time.perf_counter() - start))
  return best
