"""CRATE-MAE (Pai et al. 2023, "Masked Completion via Structured Diffusion with White-Box
Transformers"): masked autoencoding with a CRATE encoder (sparsity lambda 0.5) and a decoder of
mirrored white-box layers y = D LN(x), x' = y - MSSA(LN(y)), as deep and as wide as the encoder.

This is MAE's method (methods/mae.py: masking, pixel targets, masked MSE, reconstructions) with
CRATE parts. As in the reference code, the encoder sees every patch, the masked ones replaced
by a learned mask token (`method.encoder_mask_tokens = True`); `False` encodes only the visible
patches and lets the decoder insert the mask tokens, which is cheaper but not in the paper.
HPM (`method.hpm`) and the attention mask's ViT teacher (`mask.teacher`) come with MAE's module.
"""

import ml_collections

from mim_jax import flops
from mim_jax import masking
from mim_jax import models
from mim_jax.methods import hpm
from mim_jax.methods import mae
from mim_jax.methods import teacher_attention
from mim_jax.models import crate


inputs = mae.inputs  # Images only.


def validate(config: ml_collections.ConfigDict) -> None:
  grid = models.patch_grid(config, method="CRATE-MAE", supported=("crate",))
  masking.validate(config.mask, grid,
                   hpm.supplies(config) + teacher_attention.validate_mask_teacher(config))
  if config.method.decoder_depth < 1:
    raise ValueError(f"method.decoder_depth must be at least 1, got "
                     f"{config.method.decoder_depth}")
  if config.model.ista_eta <= 0 or config.model.ista_lambda < 0:
    raise ValueError(f"model.ista_eta must be > 0 and model.ista_lambda >= 0, got "
                     f"{config.model.ista_eta} and {config.model.ista_lambda}")
  hpm.validate(config)


def build(config: ml_collections.ConfigDict) -> mae.MAE:
  m = config.method
  encoder = models.build_encoder(config)
  side = config.image_size // encoder.patch
  decoder = crate.CrateDecoder(
      m.decoder_depth, encoder.heads, (side, side),
      encoder.patch * encoder.patch * config.data.channels, encoder.remat, encoder.dtype,
      encoder.param_dtype, encoder.attention_impl, encoder.scan_layers)
  return mae.MAE(encoder=encoder, decoder=decoder, image_size=config.image_size,
                 channels=config.data.channels,
                 mask_spec=masking.MaskSpec.from_config(config.mask),
                 norm_pix_loss=m.norm_pix_loss, encoder_mask_tokens=m.encoder_mask_tokens,
                 frozen_teacher=teacher_attention.mask_teacher(config),
                 **mae.hpm_fields(config, decoder))


def train_flops_per_example(config: ml_collections.ConfigDict) -> int:
  """Analytic training FLOPs of one image: patch embedding, the encoder on the cls token and
  every patch (the visible ones only without encoder_mask_tokens), the decoder on every
  position and the pixel prediction, times 3 for training; plus what HPM adds
  (hpm.train_flops) and the mask teacher's forward (teacher_attention.mask_flops)."""
  size, patch = crate.parse_variant(config.model.variant)
  m = config.method
  side = config.image_size // patch
  n = side * side
  encoded = n + 1 if m.encoder_mask_tokens else 1 + masking.num_kept(config.mask, (side, side))
  patch_dim = patch * patch * config.data.channels
  embed = flops.dense(n, patch_dim, size.width)
  decoder = (flops.crate_decoder(n + 1, size.width, m.decoder_depth)
             + flops.dense(n + 1, size.width, patch_dim))
  forward = embed + flops.crate_encoder(encoded, size.width, size.depth) + decoder
  full_image = embed + flops.crate_encoder(n + 1, size.width, size.depth) + decoder
  return (flops.TRAIN_MULTIPLIER * forward + hpm.train_flops(config, decoder, full_image)
          + teacher_attention.mask_flops(config))


frozen_encoders = teacher_attention.frozen_encoders  # The attention mask's teacher, if any.
