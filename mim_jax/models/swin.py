"""Swin Transformer encoder (Liu et al. 2021, "Swin Transformer: Hierarchical Vision Transformer
using Shifted Windows").

Self-attention runs inside non-overlapping M x M windows; every second block shifts the window
grid by M // 2 (sec. 3.2). The shift is computed as a cyclic shift of the feature map
(`jnp.roll`) plus a mask, so a shifted block still has (H/M) x (W/M) full windows: tokens that
the roll brought together from opposite borders sit in different regions and may not attend to
each other. Each block adds a learned relative position bias, one (2M-1)^2 x heads table per
block (sec. 3.2, eq. 4). Between stages, patch merging concatenates each 2 x 2 group of tokens
and projects 4C -> 2C, halving the resolution (sec. 3.1).

For masked image modeling (SimMIM) the encoder takes a per-token mask and puts a learned mask
token in place of the masked patch embeddings before the first stage: windowed attention needs
the full grid, so Swin cannot drop tokens the way MAE's ViT does.

Tokens stay in [B, H, W, C] layout through the stages, which makes windowing, shifting and
merging reshapes rather than gathers.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mim_jax.models import layer_loop
from mim_jax.models import layers

Dtype = Any
# Swin initialises every linear layer and the relative position bias tables with a truncated
# normal of std 0.02 (Liu et al. 2021, released code) and uses PyTorch's LayerNorm eps, 1e-5.
_INIT = nn.initializers.truncated_normal(0.02)
_LN_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class SwinSize:
  embed_dim: int               # C, the width of the first stage; stage i has C * 2^i.
  depths: tuple[int, ...]      # blocks per stage
  heads: tuple[int, ...]       # heads per stage (head dim 32 in every paper variant)


# Liu et al. 2021, sec. 3.3: T/S/B/L with C = 96/96/128/192, depths {2,2,6,2} for T and
# {2,2,18,2} otherwise, heads 3/4/6 in the first stage doubling per stage. MLP ratio 4.
SIZES = {
    # Micro: not from the paper. Two stages of one W-MSA and one SW-MSA block each, for tests
    # and CPU runs.
    "Mu": SwinSize(32, (2, 2), (1, 2)),
    "T": SwinSize(96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "S": SwinSize(96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "B": SwinSize(128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "L": SwinSize(192, (2, 2, 18, 2), (6, 12, 24, 48)),
}
MLP_RATIO = 4


def parse_variant(variant: str) -> SwinSize:
  if variant not in SIZES:
    raise ValueError(f"unknown Swin variant {variant!r}; valid: {sorted(SIZES)} (the patch size "
                     f"and window are model.patch and model.window)")
  return SIZES[variant]


# ---------------------------------------------------------------------------------------------
# Geometry: per-stage resolutions and windows, window partition, shift mask, bias index.
# ---------------------------------------------------------------------------------------------

def stage_window(resolution: int, window: int) -> tuple[int, int]:
  """(window, shift) of a stage at `resolution` x `resolution` tokens. As in Swin's code, a stage
  no larger than the window attends over the whole map in one window and does not shift."""
  if resolution <= window:
    return resolution, 0
  return window, window // 2


def stage_resolutions(image_size: int, patch: int, num_stages: int) -> list[int]:
  return [image_size // patch // 2 ** i for i in range(num_stages)]


def check_geometry(image_size: int, patch: int, window: int, num_stages: int) -> None:
  """Raises ValueError unless every stage has an integer resolution that the window tiles."""
  if patch < 1 or window < 1:
    raise ValueError(f"Swin patch and window must be positive, got patch={patch}, "
                     f"window={window}")
  stride = patch * 2 ** (num_stages - 1)
  if image_size % stride:
    raise ValueError(f"image_size {image_size} must be divisible by Swin's total stride {stride} "
                     f"(patch {patch} x 2^{num_stages - 1} patch mergings)")
  for i, res in enumerate(stage_resolutions(image_size, patch, num_stages)):
    win, _ = stage_window(res, window)
    if res % win:
      valid = [w for w in range(1, res + 1) if res % w == 0]
      raise ValueError(f"Swin window {window} does not tile stage {i} ({res}x{res} tokens at "
                       f"image_size {image_size}, patch {patch}); windows that divide {res}: "
                       f"{valid}, or any window >= {res}")


def window_partition(x: jax.Array, window: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/M)*(W/M), M*M, C]: windows in row-major order, tokens row-major."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // window) * (w // window), window * window, c)


def window_merge(x: jax.Array, height: int, width: int) -> jax.Array:
  """Inverse of `window_partition`: [B, nW, M*M, C] -> [B, H, W, C]."""
  b, _, t, c = x.shape
  window = int(round(t ** 0.5))
  x = x.reshape(b, height // window, width // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, height, width, c)


def relative_position_index(window: int) -> np.ndarray:
  """[M*M, M*M] int32: row of the (2M-1)^2 bias table for each (query, key) pair of a window.

  The offset (dy, dx) = (query - key) in rows and columns lies in [-(M-1), M-1]^2; shifted by
  M - 1 it indexes a (2M-1) x (2M-1) table in row-major order (Liu et al. 2021, sec. 3.2)."""
  rows, cols = np.meshgrid(np.arange(window), np.arange(window), indexing="ij")
  coords = np.stack([rows.reshape(-1), cols.reshape(-1)])            # [2, T]
  offset = coords[:, :, None] - coords[:, None, :] + (window - 1)    # [2, T, T]
  return (offset[0] * (2 * window - 1) + offset[1]).astype(np.int32)


def shifted_window_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
  """[nW, M*M, M*M] bool, True where a query may attend to a key, for windows taken after the
  feature map has been rolled by (-shift, -shift).

  The roll wraps the first `shift` rows (and columns) to the bottom (right). Rolled rows fall in
  three bands: [0, H-M), [H-M, H-shift) and [H-shift, H) (the wrapped ones); likewise columns.
  Tokens attend only within their own (row band, column band) region, so no window mixes
  tokens that were not neighbours in the image."""
  def bands(n: int) -> np.ndarray:
    label = np.zeros(n, np.int32)
    label[n - window:] = 1
    label[n - shift:] = 2
    return label
  region = bands(height)[:, None] * 3 + bands(width)[None, :]           # [H, W]
  region = window_partition(region[None, :, :, None], window)[0, :, :, 0]  # [nW, T]
  return region[:, :, None] == region[:, None, :]


# ---------------------------------------------------------------------------------------------
# Layers.
# ---------------------------------------------------------------------------------------------

def _dense(module: nn.Module, features: int, name: str, use_bias: bool = True) -> nn.Dense:
  return layers.dense(features, name, module.dtype, module.param_dtype, use_bias=use_bias,
                      kernel_init=_INIT)


def _norm(module: nn.Module, name: str) -> nn.LayerNorm:
  return layers.layer_norm(name, module.dtype, module.param_dtype, eps=_LN_EPS)


class WindowAttention(nn.Module):
  """(Shifted-)window multi-head self-attention with a relative position bias, on [B, H, W, C].

  Runs `layers.dot_product_attention` on every window, the bias added to the logits and the
  shift mask applied there: a masked pair's weight is exactly 0 (Swin's code adds -100, whose
  weight e^-100 is below float32's normal range: the same thing).
  """
  heads: int
  window: int
  shift: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    m, s = self.window, self.shift
    if c % self.heads:
      raise ValueError(f"Swin width {c} is not divisible by heads {self.heads}")
    if h % m or w % m:
      raise ValueError(f"window {m} does not tile the {h}x{w} feature map")
    if s:
      x = jnp.roll(x, (-s, -s), axis=(1, 2))
    windows = window_partition(x, m)                                    # [B, nW, T, C]
    nw, t = windows.shape[1], windows.shape[2]
    qkv = _dense(self, 3 * c, "qkv")(windows)
    qkv = qkv.reshape(b, nw, t, 3, self.heads, c // self.heads)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]  # [B, nW, T, heads, hd]

    table = self.param("relative_position_bias_table", _INIT, ((2 * m - 1) ** 2, self.heads),
                       self.param_dtype)
    bias = table[relative_position_index(m)].transpose(2, 0, 1)        # [heads, T, T]
    # [nW, T, T] -> broadcastable to the logits [B, nW, heads, T, T].
    mask = shifted_window_mask(h, w, m, s)[None, :, None] if s else None
    out = layers.dot_product_attention(q, k, v, bias=bias, mask=mask).reshape(b, nw, t, c)
    out = _dense(self, c, "proj")(out)
    out = window_merge(out, h, w)
    if s:
      out = jnp.roll(out, (s, s), axis=(1, 2))
    return out


class SwinBlock(nn.Module):
  """Pre-norm block on [B, H, W, C]: x + (S)W-MSA(LN(x)), then x + MLP(LN(x)) (sec. 3.2, eq. 3)."""
  heads: int
  window: int
  shift: int = 0
  exact_gelu: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    x = x + WindowAttention(self.heads, self.window, self.shift, self.dtype, self.param_dtype,
                            name="attn")(_norm(self, "norm1")(x))
    y = _dense(self, MLP_RATIO * c, "fc1")(_norm(self, "norm2")(x))
    y = nn.gelu(y, approximate=not self.exact_gelu)
    return x + _dense(self, c, "fc2")(y)


class PatchMerging(nn.Module):
  """[B, H, W, C] -> [B, H/2, W/2, 2C]: each 2x2 group concatenated (4C), LayerNorm, then a
  bias-free linear 4C -> 2C (sec. 3.1). The 4C order is (row 0, col 0), (1, 0), (0, 1), (1, 1),
  as in the released models, so their weights load unpermuted."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5)  # [.., dx, dy, C]
    x = x.reshape(b, h // 2, w // 2, 4 * c)
    x = _norm(self, "norm")(x)
    return _dense(self, 2 * c, "reduction", use_bias=False)(x)


class Swin(nn.Module):
  """Swin encoder. Returns (final tokens after the last LayerNorm [B, N_last, C_last], aux).

  token_mask [B, N] (1 = masked), N the patch grid: masked patch embeddings are replaced by a
  learned mask token before the first stage (SimMIM, Xie et al. 2022).

  aux: 'embed' (the tokens entering stage 0, mask tokens in place), 'stage_i' (stage i's output
  before patch merging, [B, N_i, C_i]) and 'gap' (mean of the final normed tokens, the feature
  Swin's classifier and linear probes read).
  """
  embed_dim: int
  depths: tuple[int, ...]
  heads: tuple[int, ...]
  patch: int = 4
  window: int = 7
  exact_gelu: bool = True
  remat: bool | str = "none"  # layer_loop.REMAT_POLICIES; True / False: 'full' / 'none'.
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, token_mask: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    _, height, width, _ = images.shape
    if height != width:
      raise ValueError(f"Swin takes square images, got {height}x{width}")
    check_geometry(height, self.patch, self.window, len(self.depths))
    # Swin's patch embedding is an nn.Conv2d left at PyTorch's default init.
    x = layers.PatchEmbed(self.patch, self.embed_dim, self.dtype, self.param_dtype,
                          layers.pytorch_patch_init, name="patch_embed")(images)
    x = _norm(self, "patch_norm")(x)  # Swin's patch_norm=True
    if token_mask is not None:
      mask_token = self.param("mask_token", _INIT, (1, 1, self.embed_dim), self.param_dtype)
      m = token_mask[..., None].astype(self.dtype)
      x = x * (1 - m) + mask_token.astype(self.dtype) * m
    aux = {"embed": x}
    b, res = x.shape[0], height // self.patch
    x = x.reshape(b, res, res, self.embed_dim)
    block_cls = layer_loop.remat(SwinBlock, self.remat)
    for i, (depth, heads) in enumerate(zip(self.depths, self.heads)):
      if i:
        x = PatchMerging(self.dtype, self.param_dtype, name=f"merge_{i}")(x)
        res //= 2
      window, shift = stage_window(res, self.window)
      for j in range(depth):
        x = block_cls(heads, window, shift if j % 2 else 0, self.exact_gelu, self.dtype,
                      self.param_dtype, name=f"stage_{i}_block_{j}")(x)
      aux[f"stage_{i}"] = x.reshape(b, res * res, -1)
    x = _norm(self, "norm")(x.reshape(b, res * res, -1))
    aux["gap"] = x.mean(axis=1)
    return x, aux


# ---------------------------------------------------------------------------------------------
# Config.
# ---------------------------------------------------------------------------------------------

def total_stride(patch: int, num_stages: int) -> int:
  """Pixels per final token along each side: the patch, then x2 per patch merging."""
  return patch * 2 ** (num_stages - 1)


def build(config: ml_collections.ConfigDict) -> Swin:
  m = config.model
  size = parse_variant(m.variant)
  check_geometry(config.image_size, m.patch, m.window, len(size.depths))
  return Swin(size.embed_dim, size.depths, size.heads, patch=m.patch, window=m.window,
              exact_gelu=m.exact_gelu, remat=m.remat, dtype=layers.dtype(m.dtype),
              param_dtype=layers.dtype(m.param_dtype))
