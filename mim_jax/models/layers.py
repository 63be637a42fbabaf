"""Building blocks shared by the image transformers: patch embedding, fixed 2D sin-cos position
embeddings, pre-norm transformer blocks and the patchify helpers used by losses and decoders."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def sincos_posemb_2d(grid: tuple[int, int], dim: int, *, with_cls: bool = False) -> np.ndarray:
  """Fixed 2D sin-cos position embedding, shape [(1+)gh*gw, dim] (MAE, He et al. 2021, sec. A.1).

  The first half of the channels encodes the column (x), the second half the row (y): the
  order of MAE's released models, so imported weights see the positions they were trained with.
  Each half is [sin, cos] of the coordinate times frequencies 1/10000^(k/(dim/4)) as in
  "Attention is all you need". The cls token, when present, gets a zero embedding. Computed in
  numpy: it is a constant, not a param.
  """
  if dim % 4:
    raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
  gh, gw = grid
  rows, cols = np.meshgrid(np.arange(gh, dtype=np.float64), np.arange(gw, dtype=np.float64),
                           indexing="ij")
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

  def encode(pos: np.ndarray) -> np.ndarray:
    angles = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  emb = np.concatenate([encode(cols), encode(rows)], axis=1).astype(np.float32)
  if with_cls:
    emb = np.concatenate([np.zeros((1, dim), np.float32), emb], axis=0)
  return emb


def patchify(images: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], patches in row-major order, pixels (py, px, c)."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // patch, patch, w // patch, patch, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: jax.Array, patch: int, grid: tuple[int, int], channels: int) -> jax.Array:
  """Inverse of `patchify`: [B, gh*gw, p*p*C] -> [B, gh*p, gw*p, C]."""
  b = patches.shape[0]
  gh, gw = grid
  x = patches.reshape(b, gh, gw, patch, patch, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * patch, gw * patch, channels)


class PatchEmbed(nn.Module):
  """Non-overlapping patch projection, the strided conv of ViT written as patchify + matmul.

  The kernel keeps the conv layout [p, p, C, D] so released conv weights load by a transpose,
  but runs as one [B*N, p*p*C] x [p*p*C, D] matmul, which XLA's CPU backend runs faster than a
  strided convolution.
  """
  patch: int
  width: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    c = images.shape[-1]
    kernel = self.param("kernel", nn.initializers.xavier_uniform(),
                        (self.patch, self.patch, c, self.width), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.width,), self.param_dtype)
    x = patchify(images.astype(self.dtype), self.patch)
    w = kernel.reshape(-1, self.width).astype(self.dtype)
    return x @ w + bias.astype(self.dtype)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(head_dim)) v for [B, N, H, head_dim] inputs; logits and softmax in
  float32.

  The math of `jax.nn.dot_product_attention(implementation='xla')`, written so that XLA's CPU
  backend runs it faster: the scale multiplies q, where it fuses into the copy that lays q out
  for the batched matmul, instead of the [B, H, N, N] logits.
  """
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def gelu(x: jax.Array, exact: bool = True) -> jax.Array:
  """GELU, x * Phi(x). Exact: Phi = 0.5 (1 + erf(x / sqrt 2)), PyTorch's formula. It is the
  function of `jax.nn.gelu(approximate=False)`, which writes Phi with erfc, which XLA's CPU
  backend evaluates at about twice the cost of erf. Not exact: the tanh approximation."""
  if not exact:
    return nn.gelu(x, approximate=True)
  return x * (0.5 + 0.5 * jax.lax.erf(x * jnp.asarray(np.sqrt(0.5), x.dtype)))


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection.

  `implementation`: 'cudnn' asks `jax.nn.dot_product_attention` for the fused flash kernel on
  GPU (bf16/fp16); None or 'xla' run `dot_product_attention` above, plain einsums.
  """
  heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    if d % self.heads:
      raise ValueError(f"width {d} is not divisible by heads {self.heads}")
    dense = lambda features, name: nn.Dense(
        features, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(), name=name)
    qkv = dense(3 * d, "qkv")(x).reshape(b, n, 3, self.heads, d // self.heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.implementation == "cudnn":
      out = jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    else:
      out = dot_product_attention(q, k, v)
    return dense(d, "proj")(out.reshape(b, n, d))


class Mlp(nn.Module):
  """Two-layer GELU MLP. `exact_gelu` picks erf (the papers' PyTorch default) over tanh."""
  hidden: int
  exact_gelu: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = lambda features, name: nn.Dense(
        features, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(), name=name)
    d = x.shape[-1]
    x = gelu(dense(self.hidden, "fc1")(x), self.exact_gelu)
    return dense(d, "fc2")(x)


def stochastic_depth(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
  """Stochastic depth (Huang et al. 2016), per sample: each example's residual branch `x`
  [B, ...] is zeroed with probability `rate`, and kept ones are scaled by 1 / (1 - rate), so
  the expectation is `x`."""
  if rate <= 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


class Block(nn.Module):
  """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)).

  LayerNorm eps is 1e-6 as in ViT and MAE. Norm statistics are computed in float32 even when
  the block computes in bf16. `drop_path` > 0 drops each residual branch per sample (stochastic
  depth, as in DeiT and MAE fine-tuning), drawing from the 'dropout' rng; 0 (the default, and
  what evaluation uses) is the plain block. It adds no parameters.
  """
  heads: int
  mlp_dim: int
  exact_gelu: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    norm = lambda name: nn.LayerNorm(epsilon=1e-6, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)
    branch = lambda y: (stochastic_depth(y, self.drop_path, self.make_rng("dropout"))
                        if self.drop_path > 0 else y)
    x = x + branch(Attention(self.heads, self.dtype, self.param_dtype, self.attention_impl,
                             name="attn")(norm("norm1")(x)))
    x = x + branch(Mlp(self.mlp_dim, self.exact_gelu, self.dtype, self.param_dtype,
                       name="mlp")(norm("norm2")(x)))
    return x


class Stack(nn.Module):
  """`depth` transformer blocks named block_0 .. block_{depth-1}, optionally rematerialised.

  Returns the output and a dict of every block's output, so evaluators can read any layer.
  Unused intermediates cost nothing under jit: XLA removes them.

  `drop_path` is the stochastic-depth rate of the last block; block i gets
  drop_path * i / (depth - 1), rising linearly from 0 (the DeiT/MAE schedule).
  """
  depth: int
  heads: int
  mlp_dim: int
  exact_gelu: bool = True
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    block_cls = nn.remat(Block) if self.remat else Block
    aux = {}
    for i in range(self.depth):
      rate = self.drop_path * i / max(1, self.depth - 1)
      x = block_cls(self.heads, self.mlp_dim, self.exact_gelu, self.dtype, self.param_dtype,
                    self.attention_impl, rate, name=f"block_{i}")(x)
      aux[f"block_{i}"] = x
    return x, aux
