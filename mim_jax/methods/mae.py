"""Masked Autoencoder (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners").

The encoder sees only the visible patches; a narrow decoder fills in mask tokens and predicts
pixels; the loss is the mean squared error on masked patches, optionally against per-patch
normalised pixels (`norm_pix_loss`, which the paper finds improves representations, table 1d).

`encoder_mask_tokens` instead feeds the encoder every patch, masked ones replaced by its learned
mask token (SimMIM style, MAE table 1c "w/ [M]"), and the decoder takes all its outputs. It is
there to measure what dropping tokens saves, and it is CRATE-MAE's pipeline
(methods/crate_mae.py builds this module with a CRATE encoder and decoder).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mim_jax import flops
from mim_jax import masking
from mim_jax import models
from mim_jax.models import layers
from mim_jax.models import vit
from mim_jax.models.mae_decoder import MAEDecoder


def patch_targets(images: jax.Array, patch: int, norm_pix: bool) -> jax.Array:
  """Pixel targets per patch [B, N, p*p*C], normalised per patch when `norm_pix`: eps 1e-6 and
  the unbiased variance (n - 1 in the denominator), as MAE's code computes it (torch's var)."""
  target = layers.patchify(images.astype(jnp.float32), patch)
  if norm_pix:
    mean = target.mean(-1, keepdims=True)
    var = target.var(-1, keepdims=True, ddof=1)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  return target


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over masked patches of the per-patch mean squared error."""
  per_patch = ((pred.astype(jnp.float32) - target) ** 2).mean(-1)
  return (per_patch * mask).sum() / mask.sum()


class MAE(nn.Module):
  """A masked autoencoder: an encoder (ViT, CRATE: anything taking `ids_keep` / `token_mask`
  and exposing `.patch`) and a decoder mapping its output, plus `ids_restore` when the encoder
  saw only the visible patches, to per-patch pixels. Randomness comes from the 'mask' stream."""
  encoder: nn.Module
  decoder: nn.Module
  image_size: int
  channels: int
  mask_spec: masking.MaskSpec = masking.MaskSpec("random", 0.75)
  norm_pix_loss: bool = True
  encoder_mask_tokens: bool = False

  @property
  def grid(self) -> tuple[int, int]:
    side = self.image_size // self.encoder.patch
    return (side, side)

  def predict(self, images: jax.Array, mask: masking.Mask | None = None
              ) -> tuple[jax.Array, masking.Mask]:
    """Draws a mask (unless one is given), encodes (the visible patches, or all with mask
    tokens) and decodes every patch."""
    if mask is None:
      mask = masking.draw(self.make_rng("mask"), images.shape[0], self.grid, self.mask_spec)
    if self.encoder_mask_tokens:
      latent, _ = self.encoder(images, token_mask=mask.mask)
      pred, _ = self.decoder(latent)
    else:
      latent, _ = self.encoder(images, mask.ids_keep)
      pred, _ = self.decoder(latent, mask.ids_restore)
    return pred, mask

  def __call__(self, image: jax.Array, *, train: bool = True, mask: masking.Mask | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (loss, metrics) on a batch of images [B, H, W, C]. `mask` replaces the drawn one
    (to compare with another implementation on the same mask)."""
    del train  # MAE has no dropout; kept for the method interface.
    pred, mask = self.predict(image, mask)
    target = patch_targets(image, self.encoder.patch, self.norm_pix_loss)
    loss = masked_mse(pred, target, mask.mask)
    return loss, {"loss": loss}

  def features(self, image: jax.Array) -> dict[str, jax.Array]:
    """Encoder features of the full, unmasked image (for probes and k-NN)."""
    _, aux = self.encoder(image)
    return aux

  def reconstruct(self, images: jax.Array) -> dict[str, jax.Array]:
    """Images for a reconstruction grid: the masked input, the prediction, and the prediction
    pasted over the visible patches. With norm_pix_loss the prediction is un-normalised with the
    true patch statistics, as MAE's visualisation does."""
    pred, mask = self.predict(images)
    patch = self.encoder.patch
    target = layers.patchify(images.astype(jnp.float32), patch)
    pred = pred.astype(jnp.float32)
    if self.norm_pix_loss:
      pred = (pred * jnp.sqrt(target.var(-1, keepdims=True, ddof=1) + 1e-6)
              + target.mean(-1, keepdims=True))
    m = mask.mask[..., None]
    to_image = lambda p: layers.unpatchify(p, patch, self.grid, self.channels)
    return {"masked": to_image(target * (1 - m)), "prediction": to_image(pred),
            "pasted": to_image(target * (1 - m) + pred * m)}


def inputs(config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
  """Images only, as every masked-image method here consumes them: [S, S, C] float32."""
  return {"image": jax.ShapeDtypeStruct((config.image_size, config.image_size,
                                         config.data.channels), jnp.float32)}


def validate(config: ml_collections.ConfigDict) -> None:
  grid = models.patch_grid(config, method="MAE (it drops masked tokens)", supported=("vit",))
  masking.validate(config.mask, grid)
  if config.method.decoder_width % config.method.decoder_heads:
    raise ValueError(f"decoder_width {config.method.decoder_width} is not divisible by "
                     f"decoder_heads {config.method.decoder_heads}")


def build(config: ml_collections.ConfigDict) -> MAE:
  m = config.method
  encoder = models.build_encoder(config)
  side = config.image_size // encoder.patch
  decoder = MAEDecoder(
      m.decoder_width, m.decoder_depth, m.decoder_heads, 4 * m.decoder_width, (side, side),
      encoder.patch * encoder.patch * config.data.channels, encoder.exact_gelu, encoder.remat,
      encoder.dtype, encoder.param_dtype, encoder.attention_impl)
  return MAE(encoder=encoder, decoder=decoder, image_size=config.image_size,
             channels=config.data.channels, mask_spec=masking.MaskSpec.from_config(config.mask),
             norm_pix_loss=m.norm_pix_loss, encoder_mask_tokens=m.encoder_mask_tokens)


def train_flops_per_example(config: ml_collections.ConfigDict) -> int:
  """Analytic training FLOPs of one image: patch embedding of all patches, the encoder on the
  cls token plus the visible patches (every patch with encoder_mask_tokens), the decoder on
  every position, times 3 for training."""
  size, patch = vit.parse_variant(config.model.variant)
  m = config.method
  side = config.image_size // patch
  n = side * side
  visible = n + 1 if m.encoder_mask_tokens else 1 + masking.num_kept(config.mask, (side, side))
  patch_dim = patch * patch * config.data.channels
  forward = (flops.dense(n, patch_dim, size.width)
             + flops.transformer(visible, size.width, size.depth, size.mlp_dim)
             + flops.dense(visible, size.width, m.decoder_width)
             + flops.transformer(n + 1, m.decoder_width, m.decoder_depth, 4 * m.decoder_width)
             + flops.dense(n + 1, m.decoder_width, patch_dim))
  return flops.TRAIN_MULTIPLIER * forward
