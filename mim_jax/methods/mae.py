"""Masked Autoencoder (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners").

The encoder sees only the visible patches; a narrow decoder fills in mask tokens and predicts
pixels; the loss is the mean squared error on masked patches, optionally against per-patch
normalised pixels (`norm_pix_loss`, which the paper finds improves representations, table 1d).

`encoder_mask_tokens` instead feeds the encoder every patch, masked ones replaced by its learned
mask token (SimMIM style, MAE table 1c "w/ [M]"), and the decoder takes all its outputs. It is
there to measure what dropping tokens saves, and it is CRATE-MAE's pipeline
(methods/crate_mae.py builds this module with a CRATE encoder and decoder).

`config.method.hpm` adds HPM's loss predictor and hard-patch masks (methods/hpm.py);
`config.mask.teacher` with `mask.name='attention'` adds a frozen ViT teacher whose cls attention
guides the mask (methods/teacher_attention.py). Off, the module and its parameters are MAE's.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mim_jax import flops
from mim_jax import masking
from mim_jax import models
from mim_jax.methods import hpm
from mim_jax.methods import teacher_attention
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


def patch_mse(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Each patch's mean squared error [B, N]."""
  return ((pred.astype(jnp.float32) - target) ** 2).mean(-1)


def masked_mean(per_patch: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of per-patch values [B, N] over the masked patches (mask 1)."""
  return (per_patch * mask).sum() / mask.sum()


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over masked patches of the per-patch mean squared error."""
  return masked_mean(patch_mse(pred, target), mask)


class MAE(nn.Module):
  """A masked autoencoder: an encoder (ViT, CRATE: anything taking `ids_keep` / `token_mask`
  and exposing `.patch`) and a decoder mapping its output, plus `ids_restore` when the encoder
  saw only the visible patches, to per-patch pixels. Randomness comes from the 'mask' stream.
  With `hpm_spec`, `loss_predictor` (a twin of the decoder) predicts each patch's loss; with
  `frozen_teacher` (a ViT), its cls attention scores the attention mask."""
  encoder: nn.Module
  decoder: nn.Module
  image_size: int
  channels: int
  mask_spec: masking.MaskSpec = masking.MaskSpec("random", 0.75)
  norm_pix_loss: bool = True
  encoder_mask_tokens: bool = False
  loss_predictor: nn.Module | None = None
  hpm_spec: hpm.HPMSpec | None = None
  frozen_teacher: nn.Module | None = None

  @property
  def grid(self) -> tuple[int, int]:
    side = self.image_size // self.encoder.patch
    return (side, side)

  def draw_mask(self, images: jax.Array, step: jax.Array | None = None) -> masking.Mask:
    """The configured mask; HPM's hard-patch mask reads the loss predictor on the whole image
    (every patch visible, as the official teacher sees it) at the ramp's `step`; the attention
    mask reads the frozen teacher on the whole image."""
    rng = self.make_rng("mask")
    if self.frozen_teacher is not None:
      _, attention = teacher_attention.forward(self.frozen_teacher, images)
      return teacher_attention.draw(rng, attention, self.grid, self.mask_spec)
    if self.hpm_spec is None or self.mask_spec.name != hpm.HARD_PATCH:
      return masking.draw(rng, images.shape[0], self.grid, self.mask_spec)
    latent, _ = self.encoder(images)
    predicted_loss = jax.lax.stop_gradient(self.loss_predictor(latent)[0].mean(-1))
    return masking.hard_patch_mask(rng, images.shape[0], self.grid, self.mask_spec.ratio,
                                   **dict(self.mask_spec.knobs), predicted_loss=predicted_loss,
                                   hard_share=hpm.hard_share(step, self.hpm_spec))

  def decode(self, decoder: nn.Module, latent: jax.Array, mask: masking.Mask) -> jax.Array:
    """Per-patch outputs [B, N, out] of `decoder` (the decoder, or HPM's loss predictor)."""
    return decoder(latent, None if self.encoder_mask_tokens else mask.ids_restore)[0]

  def encode_and_decode(self, images: jax.Array, mask: masking.Mask | None = None,
                        step: jax.Array | None = None
                        ) -> tuple[jax.Array, jax.Array, masking.Mask]:
    """Draws a mask (unless one is given), encodes (the visible patches, or all with mask
    tokens) and decodes every patch: (latent, prediction, mask)."""
    if mask is None:
      mask = self.draw_mask(images, step)
    if self.encoder_mask_tokens:
      latent, _ = self.encoder(images, token_mask=mask.mask)
    else:
      latent, _ = self.encoder(images, mask.ids_keep)
    return latent, self.decode(self.decoder, latent, mask), mask

  def predict(self, images: jax.Array, mask: masking.Mask | None = None
              ) -> tuple[jax.Array, masking.Mask]:
    """The prediction of every patch and the mask (drawn unless given)."""
    _, pred, mask = self.encode_and_decode(images, mask)
    return pred, mask

  def __call__(self, image: jax.Array, *, train: bool = True, mask: masking.Mask | None = None,
               step: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (loss, metrics) on a batch of images [B, H, W, C]. `mask` replaces the drawn one
    (to compare with another implementation on the same mask); `step` sets HPM's ramp."""
    del train  # MAE has no dropout; kept for the method interface.
    latent, pred, mask = self.encode_and_decode(image, mask, step)
    target = patch_targets(image, self.encoder.patch, self.norm_pix_loss)
    per_patch = patch_mse(pred, target)
    loss_rec = masked_mean(per_patch, mask.mask)
    if self.hpm_spec is None:
      return loss_rec, {"loss": loss_rec}
    predicted_loss = self.decode(self.loss_predictor, latent, mask).mean(-1)
    loss_pred = hpm.ranking_loss(predicted_loss, jax.lax.stop_gradient(per_patch), mask.mask)
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
  masking.validate(config.mask, grid,
                   hpm.supplies(config) + teacher_attention.validate_mask_teacher(config))
  if config.method.decoder_width % config.method.decoder_heads:
    raise ValueError(f"decoder_width {config.method.decoder_width} is not divisible by "
                     f"decoder_heads {config.method.decoder_heads}")
  hpm.validate(config)


def build(config: ml_collections.ConfigDict) -> MAE:
  m = config.method
  encoder = models.build_encoder(config)
  side = config.image_size // encoder.patch
  decoder = MAEDecoder(
      m.decoder_width, m.decoder_depth, m.decoder_heads, 4 * m.decoder_width, (side, side),
      encoder.patch * encoder.patch * config.data.channels, encoder.exact_gelu, encoder.remat,
      encoder.dtype, encoder.param_dtype, encoder.attention_impl, encoder.scan_layers)
  return MAE(encoder=encoder, decoder=decoder, image_size=config.image_size,
             channels=config.data.channels, mask_spec=masking.MaskSpec.from_config(config.mask),
             norm_pix_loss=m.norm_pix_loss, encoder_mask_tokens=m.encoder_mask_tokens,
             frozen_teacher=teacher_attention.mask_teacher(config), **hpm_fields(config, decoder))


def hpm_fields(config: ml_collections.ConfigDict, decoder: nn.Module) -> dict[str, object]:
  """MAE's HPM fields for `config.method.hpm` (methods/hpm.py): the loss predictor, a twin of
  `decoder`, and its spec; none when HPM is off, so the module is plain MAE's."""
  hpm_spec = hpm.spec(config)
  return {} if hpm_spec is None else {"loss_predictor": decoder.clone(), "hpm_spec": hpm_spec}


def train_flops_per_example(config: ml_collections.ConfigDict) -> int:
  """Analytic training FLOPs of one image: patch embedding of all patches, the encoder on the
  cls token plus the visible patches (every patch with encoder_mask_tokens), the decoder on
  every position, times 3 for training; plus what HPM adds (hpm.train_flops) and the mask
  teacher's forward (teacher_attention.mask_flops)."""
  size, patch = vit.parse_variant(config.model.variant)
  m = config.method
  side = config.image_size // patch
  n = side * side
  visible = n + 1 if m.encoder_mask_tokens else 1 + masking.num_kept(config.mask, (side, side))
  patch_dim = patch * patch * config.data.channels
  embed = flops.dense(n, patch_dim, size.width)
  encoder = lambda tokens: flops.transformer(tokens, size.width, size.depth, size.mlp_dim)
  decoder = lambda tokens: (  # `tokens` from the encoder; every position after the mask tokens
      flops.dense(tokens, size.width, m.decoder_width)
      + flops.transformer(n + 1, m.decoder_width, m.decoder_depth, 4 * m.decoder_width)
      + flops.dense(n + 1, m.decoder_width, patch_dim))
  return (flops.TRAIN_MULTIPLIER * (embed + encoder(visible) + decoder(visible))
          + hpm.train_flops(config, decoder(visible), embed + encoder(n + 1) + decoder(n + 1))
          + teacher_attention.mask_flops(config))


frozen_encoders = teacher_attention.frozen_encoders  # The attention mask's teacher, if any.
