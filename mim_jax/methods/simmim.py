"""SimMIM (Xie et al. 2022, "SimMIM: A Simple Framework for Masked Image Modeling"), on Swin or ViT.

Random masking of large square cells (config.mask 'coarse': 32 px, ratio 0.6, the paper's
default; any registered mask works); the encoder sees every patch, masked ones replaced by a
learned mask token; a one-layer prediction head, a 1x1 convolution from the final feature map
to stride^2 * C values per token, pixel-shuffled back to the image; and an L1 loss on the raw (input-normalised) pixels of the masked area only,
divided by the number of masked pixels times channels, as in the paper's released code.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mim_jax import flops
from mim_jax import masking
from mim_jax import models
from mim_jax.methods import mae
from mim_jax.models import layers
from mim_jax.models import swin
from mim_jax.models import vit

ENCODERS = ("swin", "vit")


def masked_l1(pred: jax.Array, target: jax.Array, pixel_mask: jax.Array) -> jax.Array:
  """L1 over the masked pixels, divided by (masked pixels x channels): SimMIM's normalisation.

  pred, target [B, H, W, C]; pixel_mask [B, H, W], 1 = masked."""
  err = jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32)).sum(-1)
  return (err * pixel_mask).sum() / (pixel_mask.sum() * target.shape[-1])


def pixel_mask(token_mask: jax.Array, grid: tuple[int, int], patch: int) -> jax.Array:
  """[B, gh*gw] token mask -> [B, gh*patch, gw*patch] pixel mask."""
  b = token_mask.shape[0]
  m = token_mask.reshape(b, grid[0], 1, grid[1], 1)
  m = jnp.broadcast_to(m, (b, grid[0], patch, grid[1], patch))
  return m.reshape(b, grid[0] * patch, grid[1] * patch)


class SimMIM(nn.Module):
  """SimMIM on a Swin or ViT encoder. Randomness comes from the 'mask' rng stream.

  patch: the encoder's patch size (the grid the mask lives on); stride: pixels per final token
  (Swin: patch * 2^(stages - 1), 32 for the paper's variants; ViT: the patch). The head is a
  per-token linear map to stride^2 * C values (a 1x1 convolution on the feature map), laid out
  (row, column, channel) within each token's stride x stride square by `layers.unpatchify`,
  i.e. a pixel shuffle. (PyTorch's PixelShuffle orders the channels (C, row, column); a
  released head would need its output channels permuted.)
  """
  encoder: nn.Module
  image_size: int
  channels: int
  patch: int
  stride: int
  mask_spec: masking.MaskSpec = masking.MaskSpec("coarse", 0.6, (("cell", 8),))
  has_cls: bool = False  # ViT prepends a cls token, which the head ignores.
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def grid(self) -> tuple[int, int]:
    side = self.image_size // self.patch
    return (side, side)

  def setup(self):
    self.head = nn.Dense(self.stride * self.stride * self.channels, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="head")

  def predict(self, images: jax.Array) -> tuple[jax.Array, masking.Mask]:
    """Draws a mask, encodes all patches with mask tokens and predicts every pixel.
    Returns (prediction [B, H, W, C] float32, mask on the patch grid)."""
    mask = masking.draw(self.make_rng("mask"), images.shape[0], self.grid, self.mask_spec)
    tokens, _ = self.encoder(images, token_mask=mask.mask)
    if self.has_cls:
      tokens = tokens[:, 1:]
    out = self.head(tokens).astype(jnp.float32)
    side = self.image_size // self.stride
    return layers.unpatchify(out, self.stride, (side, side), self.channels), mask

  def __call__(self, image: jax.Array, *, train: bool = True
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (loss, metrics) on a batch of images [B, H, W, C]."""
    del train  # No dropout; kept for the method interface.
    pred, mask = self.predict(image)
    loss = masked_l1(pred, image, pixel_mask(mask.mask, self.grid, self.patch))
    return loss, {"loss": loss}

  def features(self, image: jax.Array) -> dict[str, jax.Array]:
    """Encoder features of the full, unmasked image (for probes and k-NN)."""
    _, aux = self.encoder(image)
    return aux

  def reconstruct(self, images: jax.Array) -> dict[str, jax.Array]:
    """The masked input, the prediction, and the prediction pasted into the masked area."""
    pred, mask = self.predict(images)
    images = images.astype(jnp.float32)
    m = pixel_mask(mask.mask, self.grid, self.patch)[..., None]
    return {"masked": images * (1 - m), "prediction": pred, "pasted": images * (1 - m) + pred * m}


# ---------------------------------------------------------------------------------------------
# Config: geometry, build, FLOPs.
# ---------------------------------------------------------------------------------------------

def geometry(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(patch, stride) of the configured encoder; raises ValueError on an unknown one."""
  m = config.model
  if m.name == "swin":
    size = swin.parse_variant(m.variant)
    return m.patch, swin.total_stride(m.patch, len(size.depths))
  if m.name == "vit":
    _, patch = vit.parse_variant(m.variant)
    return patch, patch
  raise ValueError(f"SimMIM needs model.name in {ENCODERS}, got {m.name!r}")


inputs = mae.inputs  # Images only.


def validate(config: ml_collections.ConfigDict) -> None:
  patch, _ = geometry(config)
  size = config.image_size
  if config.model.name == "swin":
    swin.check_geometry(size, patch, config.model.window,
                        len(swin.parse_variant(config.model.variant).depths))
  elif size % patch:
    raise ValueError(f"image_size {size} is not divisible by the patch size {patch} of variant "
                     f"{config.model.variant!r}")
  masking.validate(config.mask, (size // patch, size // patch))


def build(config: ml_collections.ConfigDict) -> SimMIM:
  patch, stride = geometry(config)
  return SimMIM(encoder=models.build_encoder(config), image_size=config.image_size,
                channels=config.data.channels, patch=patch, stride=stride,
                mask_spec=masking.MaskSpec.from_config(config.mask), has_cls=config.model.name == "vit", dtype=models.dtype(config.model.dtype),
                param_dtype=models.dtype(config.model.param_dtype))


def encoder_forward_flops(config: ml_collections.ConfigDict) -> int:
  """Forward FLOPs of the encoder on one image with every patch (mask tokens included)."""
  m, size, channels = config.model, config.image_size, config.data.channels
  if m.name == "swin":
    return flops.swin_encoder(size, swin.parse_variant(m.variant), m.patch, m.window, channels)
  vit_size, patch = vit.parse_variant(m.variant)
  n = (size // patch) ** 2
  return (flops.dense(n, patch * patch * channels, vit_size.width)
          + flops.transformer(n + 1, vit_size.width, vit_size.depth, vit_size.mlp_dim))


def train_flops_per_example(config: ml_collections.ConfigDict) -> int:
  """Analytic training FLOPs of one image: the encoder on all patches plus the linear head on
  each final token, times 3 for training."""
  _, stride = geometry(config)
  final_tokens = (config.image_size // stride) ** 2
  if config.model.name == "swin":
    size = swin.parse_variant(config.model.variant)
    width = size.embed_dim * 2 ** (len(size.depths) - 1)
  else:
    width = vit.parse_variant(config.model.variant)[0].width
  head = flops.dense(final_tokens, width, stride * stride * config.data.channels)
  return flops.TRAIN_MULTIPLIER * (encoder_forward_flops(config) + head)
