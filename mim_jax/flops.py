"""Analytic FLOP counts, from the architecture rather than from XLA.

A matmul of [m, k] x [k, n] costs 2mkn FLOPs. Training costs about 3x the forward pass (the
backward computes two matmuls per forward one). XLA's cost_analysis() is a cross-check only: it
counts a scan body once, includes remat recompute and reports per device under sharding.
"""

import functools
import math
import os
import time

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np

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


def conv_taps(length: int, kernel: int, stride: int, pad: tuple[int, int]) -> int:
  """Kernel taps of a 1-D convolution over `length` inputs that land on an input rather than on
  the padding, summed over its output positions: the multiplications per (in, out) channel
  pair. Unpadded, it is outputs x kernel; at a padded edge, fewer."""
  lo, hi = pad
  outputs = (length + lo + hi - kernel) // stride + 1
  return sum(max(0, min(kernel, length + lo - o * stride) - max(0, lo - o * stride))
             for o in range(outputs))


def conformer(frames: int, num_mels: int, width: int, depth: int, heads: int, conv_kernel: int,
              ff_mult: int = 4) -> int:
  """Forward FLOPs of the Conformer encoder (models/conformer.py) on one utterance of `frames`
  log-mel frames of `num_mels` bins. `heads` does not change the count (the heads split the
  width); it is taken so a variant's fields pass straight through.

  Subsampling: two 3x3 stride-2 convs (1 -> d, then d -> d channels; time padded by 1 each side,
  frequency unpadded) to n = ceil(T / 4) frames of F2 bins (19 from 80), then the F2 d -> d
  linear per frame. Per block, on n frames of width d: two FFNs (d -> ff_mult d -> d); q, k, v
  and output projections (4 d^2 per frame); the positional projection of the 2n - 1
  relative-distance embeddings (d^2 each); the position term (q + v) . W R against all 2n - 1
  distances (2 n (2n - 1) d) and the two attention products q k^T and weights @ v (2 n^2 d
  each); the conv module's pointwise d -> 2d and d -> d and its depthwise conv (kernel K, SAME).
  A conv costs 2 c_in c_out per kernel tap that lands on the input (`conv_taps`; about 2 K per
  output and channel pair, less at padded edges, as `jaxpr_matmul_flops` counts). Norms,
  softmax, activations, the gather of the position term and the masking are left out.

  In a batch the positional projection depends on n only and runs once, not per utterance:
  a batch of B costs B times this minus (B - 1) * depth * 2 (2n - 1) d^2.
  """
  del heads
  d = width
  time_1, freq_1 = conv_taps(frames, 3, 2, (1, 1)), conv_taps(num_mels, 3, 2, (0, 0))
  t1, f1 = -(-frames // 2), (num_mels - 3) // 2 + 1
  time_2, freq_2 = conv_taps(t1, 3, 2, (1, 1)), conv_taps(f1, 3, 2, (0, 0))
  n, f2 = -(-t1 // 2), (f1 - 3) // 2 + 1
  subsampling = 2 * d * time_1 * freq_1 + 2 * d * d * time_2 * freq_2 + dense(n, f2 * d, d)
  ffns = 2 * (dense(n, d, ff_mult * d) + dense(n, ff_mult * d, d))
  attention = (dense(n, d, 3 * d) + dense(n, d, d) + dense(2 * n - 1, d, d)
               + 2 * n * (2 * n - 1) * d + 2 * 2 * n * n * d)
  depthwise = 2 * d * conv_taps(n, conv_kernel, 1, ((conv_kernel - 1) // 2, conv_kernel // 2))
  conv = dense(n, d, 2 * d) + depthwise + dense(n, d, d)
  return subsampling + depth * (ffns + attention + conv)


def _conv_general_dilated_flops(eqn) -> int:
  """2 x (output batch x output features) x (kernel input features) x the kernel taps, summed
  over output positions, that land on an input element: taps on the padding and on the zeros
  an lhs dilation inserts (the input gradient of a strided conv is a conv over the
  stride-dilated cotangent) multiply zeros and are not counted. So, as for a matmul, a conv's
  weight and input gradients each count what its forward does."""
  p = eqn.params
  lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
  lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
  out = eqn.outvars[0].aval.shape
  taps = 1
  for i, (l, r, o) in enumerate(zip(lhs_spec[2:], rhs_spec[2:], out_spec[2:])):
    dilation = p["lhs_dilation"][i]
    position = (np.arange(out[o])[:, None] * p["window_strides"][i]
                + np.arange(rhs[r])[None] * p["rhs_dilation"][i] - p["padding"][i][0])
    on_input = ((position >= 0) & (position <= (lhs[l] - 1) * dilation)
                & (position % dilation == 0))
    taps *= int(on_input.sum())
  return 2 * out[out_spec[0]] * out[out_spec[1]] * rhs[rhs_spec[1]] * taps


def jaxpr_matmul_flops(jaxpr) -> int:
  """FLOPs of every dot_general and conv_general_dilated in a traced program (a Jaxpr or
  ClosedJaxpr from jax.make_jaxpr), sub-programs included: an independent check of the
  analytic counts. 2 * (output size) * (contracted size) per matmul, convolutions as
  `_conv_general_dilated_flops`; a scan body counts once per iteration (scanned layers,
  models/layer_loop.py), a while loop's body, whose trip count is not static, once."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
    elif eqn.primitive.name == "conv_general_dilated":
      total += _conv_general_dilated_flops(eqn)
    times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, (jax_core.ClosedJaxpr, jax_core.Jaxpr)):
          total += times * jaxpr_matmul_flops(sub)
  return total


PEAK_ENV = "MIM_JAX_MATMUL_PEAK"


@functools.cache  # one measurement per process: every run in it reports against the same peak
def matmul_peak(dtype: jnp.dtype = jnp.float32, sizes: tuple[int, ...] | None = None,
                repeats: int = 5) -> float:
  """Measured FLOP/s of one device on square matmuls: the ceiling MFU is reported against.

  Using a measured peak rather than a datasheet number keeps MFU meaningful on CPUs, where the
  achievable peak depends on the core count, the vector units and the BLAS XLA links. It is the
  best over several sizes, each timed over enough back-to-back calls to last ~20 ms: which size
  runs fastest depends on the caches and the kernel's tiling (on a 2-core CPU, 512-1536 reach
  ~210 GFLOP/s where 2048 reaches ~185), and a ceiling measured too low would inflate MFU.

  The environment variable MIM_JAX_MATMUL_PEAK (FLOP/s of one device, for the run's compute
  dtype) replaces the measurement: a datasheet peak, or one measured once and handed to many
  processes (the test suite does, saving each trainer it starts ~2.5 s of CPU).
  """
  given = os.environ.get(PEAK_ENV)
  if given:
    try:
      return float(given)
    except ValueError as e:
      raise ValueError(f"{PEAK_ENV}={given!r} is not a number of FLOP/s, e.g. 2.1e11") from e
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
