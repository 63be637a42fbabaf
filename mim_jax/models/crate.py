"""CRATE, the white-box transformer of Yu et al. 2023 ("White-Box Transformers via Sparse Rate
Reduction"), and the decoder of CRATE-MAE (Pai et al. 2023, "Masked Completion via Structured
Diffusion with White-Box Transformers").

Each encoder layer is one step of alternating minimisation of the sparse rate reduction:
  z_half = z + MSSA(LN(z))           compression against K subspaces (one per head)
  z_next = ISTA(LN(z_half))          one proximal-gradient step towards a sparse code
  MSSA(z) = W_out [SSA(z | U_1); ...; SSA(z | U_K)] + b_out,
  SSA(z | U_k) = softmax((U_k^T z)^T (U_k^T z) / sqrt(d_head)) applied to U_k^T z,
i.e. one bias-free projection U per head is query, key and value at once.
  ISTA(z) = ReLU(z + eta D^T (z - D z) - eta lambda)
with a square (complete) dictionary D, eta = 0.1 and lambda = 0.1 (Yu et al.'s ISTA
block and the released code), and no residual connection around it. The ReLU is the non-negative
soft-threshold. D^T (z - D z) equals the released code's D^T z - D^T D z with one matmul fewer.

The CRATE-MAE decoder layer approximately inverts an encoder layer (Pai et al.; the
released crate_ae decoder):
  y = D LN(x),   x_next = y - MSSA(LN(y)).

Layout: `D` is stored as [out, in], so D z is `z @ D.T` on row-vector tokens, the layout of
the released PyTorch weights. Norms inside layers use eps 1e-5 (PyTorch's default, as in the
released layers); the final norm 1e-6, as CRATE-MAE's.
"""

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mim_jax.models import layer_loop
from mim_jax.models import layers

Dtype = Any
LAYER_NORM_EPS = 1e-5
FINAL_NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class CrateSize:
  width: int
  depth: int
  heads: int


# Yu et al. 2023, table 1 (head dim = width / heads). micro is not from the paper: it is for
# tests and CPU smoke runs.
SIZES = {
    "micro": CrateSize(64, 2, 2),
    "tiny": CrateSize(384, 12, 6),
    "small": CrateSize(576, 12, 12),
    "base": CrateSize(768, 12, 12),
    "large": CrateSize(1024, 24, 16),
}


def parse_variant(variant: str) -> tuple[CrateSize, int]:
  """'base/16' -> (SIZES['base'], 16). Raises ValueError naming the valid forms."""
  match = re.fullmatch(r"(\w+)/(\d+)", variant)
  if not match or match.group(1) not in SIZES or int(match.group(2)) < 1:
    raise ValueError(f"unknown CRATE variant {variant!r}: expected <size>/<patch> with size in "
                     f"{sorted(SIZES)} and a positive integer patch, e.g. 'base/16' or 'tiny/4'")
  return SIZES[match.group(1)], int(match.group(2))


def _norm(module: nn.Module, name: str, eps: float = LAYER_NORM_EPS) -> nn.LayerNorm:
  return layers.layer_norm(name, module.dtype, module.param_dtype, eps=eps)


def _dictionary(module: nn.Module, width: int) -> jax.Array:
  """The square dictionary D [out, in]. Kaiming-uniform, as the released code initialises it
  (bound sqrt(6 / width))."""
  d = module.param("dictionary", nn.initializers.he_uniform(), (width, width),
                   module.param_dtype)
  return d.astype(module.dtype)


class MSSA(nn.Module):
  """Multi-head subspace self-attention: per head one bias-free U as q = k = v, then an output
  projection with bias."""
  heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    b, n, d = z.shape
    if d % self.heads:
      raise ValueError(f"width {d} is not divisible by heads {self.heads}")
    w = layers.dense(d, "u", self.dtype, self.param_dtype, use_bias=False)(z)
    w = w.reshape(b, n, self.heads, d // self.heads)
    # Scale 1/sqrt(head dim), softmax over keys: the released code's attention.
    out = layers.dot_product_attention(w, w, w, implementation=self.implementation)
    return layers.dense(d, "proj", self.dtype, self.param_dtype)(out.reshape(b, n, d))


class ISTA(nn.Module):
  """One ISTA step with a complete dictionary: ReLU(z + eta D^T (z - D z) - eta lambda)."""
  eta: float = 0.1
  lam: float = 0.1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    d = _dictionary(self, z.shape[-1])
    residual = z - z @ d.T                 # z - D z
    return nn.relu(z + self.eta * (residual @ d) - self.eta * self.lam)


class CrateLayer(nn.Module):
  """z' = ISTA(LN(z + MSSA(LN(z))))."""
  heads: int
  eta: float = 0.1
  lam: float = 0.1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    z = z + MSSA(self.heads, self.dtype, self.param_dtype, self.attention_impl,
                 name="mssa")(_norm(self, "norm1")(z))
    return ISTA(self.eta, self.lam, self.dtype, self.param_dtype,
                name="ista")(_norm(self, "norm2")(z))


class CrateDecoderLayer(nn.Module):
  """CRATE-MAE's decoding layer: y = D LN(x), then x' = y - MSSA(LN(y))."""
  heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = _norm(self, "norm1")(x) @ _dictionary(self, x.shape[-1]).T
    return y - MSSA(self.heads, self.dtype, self.param_dtype, self.attention_impl,
                    name="mssa")(_norm(self, "norm2")(y))


class Crate(nn.Module):
  """CRATE encoder. Returns (tokens after the final norm, aux), like `vit.ViT`.

  Patches are embedded, a cls token is prepended, fixed 2D sin-cos position embeddings are
  added (the cls token's is zero), then `depth` CRATE layers and a LayerNorm. As in ViT:
    ids_keep [B, k]: encode only these patches (the others are dropped);
    token_mask [B, N] (1 = masked): every patch is encoded, masked ones replaced by a learned
      mask token before the position embedding is added (CRATE-MAE's reference code).
  `patch_norm` wraps the patch projection in LayerNorms (LN, linear, LN), the tokenizer of the
  supervised CRATE code; CRATE-MAE's is the plain projection (False).

  aux: every layer's output ('block_i'), 'cls' (the normed cls token) and 'gap' (the mean of the
  normed patch tokens). `remat` and `scan_layers` as in layers.Stack.
  """
  width: int
  depth: int
  heads: int
  patch: int
  ista_eta: float = 0.1
  ista_lambda: float = 0.1
  patch_norm: bool = False
  remat: bool | str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  posemb: str = "sincos"
  scan_layers: bool = False

  @nn.compact
  def __call__(self, images: jax.Array, ids_keep: jax.Array | None = None,
               token_mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    if self.posemb not in ("sincos", "none"):
      raise ValueError(f"unknown posemb {self.posemb!r}; valid: 'sincos', 'none'")
    _, h, w, _ = images.shape
    x = layers.embed_tokens(self, self._embed(images), (h // self.patch, w // self.patch),
                            self.posemb, ids_keep, token_mask)
    fields = dict(heads=self.heads, eta=self.ista_eta, lam=self.ista_lambda, dtype=self.dtype,
                  param_dtype=self.param_dtype, attention_impl=self.attention_impl)
    x, aux = layer_loop.run(self, CrateLayer, fields, self.depth, x, scan=self.scan_layers,
                            remat_policy=self.remat)
    x = _norm(self, "norm", FINAL_NORM_EPS)(x)
    aux["cls"] = x[:, 0]
    aux["gap"] = x[:, 1:].mean(axis=1)
    return x, aux

  def _embed(self, images: jax.Array) -> jax.Array:
    if not self.patch_norm:  # MAE's init, as CRATE-MAE's code (crate_ae.py) has it.
      return layers.PatchEmbed(self.patch, self.width, self.dtype, self.param_dtype,
                               name="patch_embed")(images)
    # Xavier, like every Linear of this CRATE (CRATE-MAE's init), where the supervised CRATE code
    # (model/crate.py) leaves this Linear at PyTorch's default, U(+-1/sqrt(fan_in)).
    x = layers.patchify(images.astype(self.dtype), self.patch)
    x = layers.dense(self.width, "patch_embed", self.dtype,
                     self.param_dtype)(_norm(self, "patch_norm_in")(x))
    return _norm(self, "patch_norm_out")(x)


class CrateDecoder(nn.Module):
  """CRATE-MAE's decoder: `depth` decoding layers at the encoder's width, a LayerNorm and a
  linear prediction of each patch's pixels. Maps [B, 1+N, D] to [B, N, out_dim].

  With `ids_restore` the encoder saw only the visible patches ([B, 1+k, D], a faster option the
  paper does not have): a learned mask token is put at every masked position and fixed sin-cos
  position embeddings are added, as MAE's decoder does. Without it the encoder saw every
  position (the paper's pipeline) and the tokens go straight into the layers, which is what
  the reference code does. `remat` and `scan_layers` as in layers.Stack.
  """
  depth: int
  heads: int
  grid: tuple[int, int]
  out_dim: int
  remat: bool | str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  scan_layers: bool = False

  @nn.compact
  def __call__(self, latent: jax.Array, ids_restore: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    x = latent
    width = x.shape[-1]
    if ids_restore is not None:
      x = layers.insert_mask_tokens(x, layers.mask_token(self, width), ids_restore)
      x = x + jnp.asarray(layers.sincos_posemb_2d(self.grid, width, with_cls=True),
                          self.dtype)[None]
    fields = dict(heads=self.heads, dtype=self.dtype, param_dtype=self.param_dtype,
                  attention_impl=self.attention_impl)
    x, aux = layer_loop.run(self, CrateDecoderLayer, fields, self.depth, x,
                            scan=self.scan_layers, remat_policy=self.remat)
    x = _norm(self, "norm", FINAL_NORM_EPS)(x)
    pred = layers.dense(self.out_dim, "pred", self.dtype, self.param_dtype)(x)
    return pred[:, 1:], aux


def build(config: ml_collections.ConfigDict) -> Crate:
  m = config.model
  size, patch = parse_variant(m.variant)
  return Crate(size.width, size.depth, size.heads, patch, ista_eta=m.ista_eta,
               ista_lambda=m.ista_lambda, patch_norm=m.patch_norm,
               remat=layer_loop.policy_name(m.remat), dtype=layers.dtype(m.dtype),
               param_dtype=layers.dtype(m.param_dtype),
               attention_impl=layers.attention_impl(m.attention_impl), scan_layers=m.scan_layers)
