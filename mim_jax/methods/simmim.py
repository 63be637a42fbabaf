"""SimMIM (Xie et al. 2022, "SimMIM: A Simple Framework for Masked Image Modeling"), on Swin or ViT.

Random masking of large square cells (config.mask 'coarse': 32 px, ratio 0.6, the paper's
default; any registered mask works); the encoder sees every patch, masked ones replaced by a
learned mask token; a one-layer prediction head, a 1x1 convolution from the final feature map
to stride^2 * C values per token, pixel-shuffled back to the image; and an L1 loss on the raw
(input-normalised) pixels of the masked area only, divided by the number of masked pixels times
channels, as in the paper's released code.

`config.method.hpm` adds HPM's loss predictor (methods/hpm.py): a twin of the prediction head on
the encoder's output, its pixel outputs averaged over each patch into one predicted loss, ranked
against the patches' stop-gradient L1; with `mask.name='hard_patch'` it picks the hard cells
(`mask.hard_patch.cell`, SimMIM's coarse cell) from the whole, unmasked image. `mask.teacher`
with `mask.name='attention'` adds a frozen ViT teacher whose cls attention guides the mask
(methods/teacher_attention.py).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mim_jax import flops
from mim_jax import masking
from mim_jax import models
from mim_jax.methods import hpm
from mim_jax.methods import mae
from mim_jax.methods import teacher_attention
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


def patch_means(pixels: jax.Array, grid: tuple[int, int], patch: int) -> jax.Array:
  """[B, gh*patch, gw*patch] per-pixel values -> [B, gh*gw], each patch's mean."""
  b = pixels.shape[0]
  return pixels.reshape(b, grid[0], patch, grid[1], patch).mean((2, 4)).reshape(b, -1)


class SimMIM(nn.Module):
  """SimMIM on a Swin or ViT encoder. Randomness comes from the 'mask' rng stream.

  patch: the encoder's patch size (the grid the mask lives on); stride: pixels per final token
  (Swin: patch * 2^(stages - 1), 32 for the paper's variants; ViT: the patch). The head is a
  per-token linear map to stride^2 * C values (a 1x1 convolution on the feature map), laid out
  (row, column, channel) within each token's stride x stride square by `layers.unpatchify`,
  i.e. a pixel shuffle. (PyTorch's PixelShuffle orders the channels (C, row, column); a
  released head would need its output channels permuted.)

  With `hpm_spec`, 'loss_predictor', a twin of the head, predicts each patch's L1; with
  `frozen_teacher` (a ViT), its cls attention scores the attention mask.
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
  hpm_spec: hpm.HPMSpec | None = None
  frozen_teacher: nn.Module | None = None

  @property
  def grid(self) -> tuple[int, int]:
    side = self.image_size // self.patch
    return (side, side)

  def setup(self):
    dense = lambda name: layers.Dense(self.stride * self.stride * self.channels,
                                      dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    self.head = dense("head")
    if self.hpm_spec is not None:
      self.loss_predictor = dense("loss_predictor")

  def encode(self, images: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
    """The encoder's final tokens [B, T, D] (the cls token dropped), mask tokens in place of
    the patches where `token_mask` is 1."""
    tokens, _ = self.encoder(images, token_mask=token_mask)
    return tokens[:, 1:] if self.has_cls else tokens

  def pixels(self, head: nn.Module, tokens: jax.Array) -> jax.Array:
    """A head's per-token outputs pixel-shuffled to an image [B, H, W, C] float32."""
    side = self.image_size // self.stride
    return layers.unpatchify(head(tokens).astype(jnp.float32), self.stride, (side, side),
                             self.channels)

  def predicted_loss(self, tokens: jax.Array) -> jax.Array:
    """HPM's loss predictor on the encoder's tokens: one predicted loss per patch [B, N]."""
    return patch_means(self.pixels(self.loss_predictor, tokens).mean(-1), self.grid, self.patch)

  def draw_mask(self, images: jax.Array, step: jax.Array | None = None) -> masking.Mask:
    """The configured mask; the attention mask reads the frozen teacher on the whole images,
    HPM's hard-patch mask the loss predictor on them (every patch visible) at the ramp's
    `step`."""
    rng, spec, batch = self.make_rng("mask"), self.mask_spec, images.shape[0]
    if self.frozen_teacher is not None:
      _, attention = teacher_attention.forward(self.frozen_teacher, images)
      return teacher_attention.draw(rng, attention, self.grid, spec)
    if self.hpm_spec is None or spec.name != hpm.HARD_PATCH:
      return masking.draw(rng, batch, self.grid, spec)
    predicted = jax.lax.stop_gradient(self.predicted_loss(self.encode(images)))
    return masking.hard_patch_mask(rng, batch, self.grid, spec.ratio, **dict(spec.knobs),
                                   predicted_loss=predicted,
                                   hard_share=hpm.hard_share(step, self.hpm_spec))

  def encode_and_predict(self, images: jax.Array, step: jax.Array | None = None
                         ) -> tuple[jax.Array, jax.Array, masking.Mask]:
    """Draws a mask, encodes all patches with mask tokens and predicts every pixel.
    Returns (encoder tokens, prediction [B, H, W, C] float32, mask on the patch grid)."""
    mask = self.draw_mask(images, step)
    tokens = self.encode(images, mask.mask)
    return tokens, self.pixels(self.head, tokens), mask

  def predict(self, images: jax.Array) -> tuple[jax.Array, masking.Mask]:
    """The prediction of every pixel [B, H, W, C] float32 and the mask it was made under."""
    _, pred, mask = self.encode_and_predict(images)
    return pred, mask

  def __call__(self, image: jax.Array, *, train: bool = True, step: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (loss, metrics) on a batch of images [B, H, W, C]; `step` sets HPM's ramp."""
    del train  # No dropout; kept for the method interface.
    tokens, pred, mask = self.encode_and_predict(image, step)
    loss_rec = masked_l1(pred, image, pixel_mask(mask.mask, self.grid, self.patch))
    if self.hpm_spec is None:
      return loss_rec, {"loss": loss_rec}
    # Each patch's L1, normalised as the loss is (per pixel and channel): HPM's targets.
    per_patch = patch_means(jnp.abs(pred - image.astype(jnp.float32)).mean(-1), self.grid,
                            self.patch)
    loss_pred = hpm.ranking_loss(self.predicted_loss(tokens), jax.lax.stop_gradient(per_patch),
                                 mask.mask)
    loss = loss_rec + self.hpm_spec.loss_weight * loss_pred
    metrics = {"loss": loss, "loss_rec": loss_rec, "loss_pred": loss_pred}
    if self.mask_spec.name == hpm.HARD_PATCH:
      metrics["hard_share"] = hpm.hard_share(step, self.hpm_spec)
    return loss, metrics

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
  masking.validate(config.mask, (size // patch, size // patch),
                   hpm.supplies(config) + teacher_attention.validate_mask_teacher(config))
  hpm.validate(config)


def build(config: ml_collections.ConfigDict) -> SimMIM:
  patch, stride = geometry(config)
  return SimMIM(encoder=models.build_encoder(config), image_size=config.image_size,
                channels=config.data.channels, patch=patch, stride=stride,
                mask_spec=masking.MaskSpec.from_config(config.mask),
                has_cls=config.model.name == "vit", dtype=models.dtype(config.model.dtype),
                param_dtype=models.dtype(config.model.param_dtype), hpm_spec=hpm.spec(config),
                frozen_teacher=teacher_attention.mask_teacher(config))


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
  each final token, times 3 for training; plus what HPM adds (hpm.train_flops: its predictor, a
  twin of the head, trained, and for the hard-patch mask a forward pass of encoder and
  predictor on the whole image) and the mask teacher's forward (teacher_attention.mask_flops)."""
  _, stride = geometry(config)
  final_tokens = (config.image_size // stride) ** 2
  if config.model.name == "swin":
    size = swin.parse_variant(config.model.variant)
    width = size.embed_dim * 2 ** (len(size.depths) - 1)
  else:
    width = vit.parse_variant(config.model.variant)[0].width
  head = flops.dense(final_tokens, width, stride * stride * config.data.channels)
  encoder = encoder_forward_flops(config)
  return (flops.TRAIN_MULTIPLIER * (encoder + head) + hpm.train_flops(config, head, encoder + head)
          + teacher_attention.mask_flops(config))


frozen_encoders = teacher_attention.frozen_encoders  # The attention mask's teacher, if any.
