"""HPM, hard-patch mining (Wang et al. 2023, "Hard Patches Mining for Masked Image Modeling",
CVPR; official code github.com/Haochen-Wang409/HPM): what MAE (methods/mae.py, on a ViT or a
CRATE: CRATE-MAE) and SimMIM (methods/simmim.py) add when `config.method.hpm.enabled`.

- A loss predictor: a twin of the method's decoder whose p*p*C outputs per patch are averaged to
  one predicted loss (models_mae_learn_loss.py: decoder_blocks_losspred, decoder_norm_losspred
  and decoder_pred_losspred as deep and wide as the reconstructor, then .mean(-1)). The official
  predictor shares the reconstructor's input embedding and mask token; this twin has its own
  (one encoder-to-decoder matrix and one token more), so that any decoder can be twinned.
  SimMIM has no decoder: its predictor is a twin of its linear prediction head on the encoder's
  output, whose pixel outputs are averaged over each patch: a twin of what reconstructs, as
  HPM's is of MAE's decoder.
- It reads the student's latent, like the reconstructor, and learns on the masked patches the
  order of their stop-gradient reconstruction losses (`ranking_loss`), added to the
  reconstruction loss with weight 1 (engine_pretrain.py: `loss += loss_learn`).
- With `config.mask.name = 'hard_patch'` the mask comes from it (masking.hard_patch_mask): the
  predictor's losses for every patch of the unmasked image pick the hardest patches for a share
  of the masked ones that ramps linearly from 0 to 0.5 over training (`hard_share`); the rest are
  random. With another mask the predictor is trained and the masks are the configured ones: HPM's
  ablation of the loss-prediction objective alone. SimMIM's per-patch loss is its L1 (MAE's the
  squared error), and its hard patches come in its mask cells (`mask.hard_patch.cell`).

The official code predicts the losses for the mask with an EMA teacher (decay 0.999 rising to
0.9999 over the first 100 epochs; engine_pretrain.py) fed the whole image. Here the current
parameters predict them, under stop_gradient: mim_jax's train state holds parameters and
optimizer state only, and at runlocal's few hundred steps an EMA at 0.999 would still be
close to the random initialisation it started from.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from mim_jax import flops

HARD_PATCH = "hard_patch"  # The mask generator the predictor feeds (masking.GENERATORS).
# The official relative loss takes log(p + 1e-6) (forward_learning_loss): the constant bounds
# each pair's loss at -log(1e-6) ~ 13.8 and flattens its gradient for badly mis-ordered pairs.
LOG_EPS = 1e-6


class HPMSpec(NamedTuple):
  """The predictor's loss weight and the hard share's ramp: hashable, so MAE can hold it."""
  final_share: float = 0.5
  ramp_steps: int = 1
  loss_weight: float = 1.0


def spec(config: ml_collections.ConfigDict) -> HPMSpec | None:
  """`config.method.hpm` as an HPMSpec; None when HPM is off."""
  h = config.method.hpm
  if not h.enabled:
    return None
  return HPMSpec(h.final_share, max(1, round(h.ramp_fraction * config.total_steps)),
                 h.loss_weight)


def hard_share(step: jax.Array | None, hpm: HPMSpec) -> jax.Array:
  """Share of the masked patches that are the predicted-hardest at `step` (int32, 0 at the first
  update): final_share x min(1, (step + 1) / ramp_steps), the official generate_mask's
  (epoch + 1) / epochs x 0.5 counted in steps instead of epochs. None (evaluation, the
  reconstruction grid) is the end of the ramp."""
  if step is None:
    return jnp.asarray(hpm.final_share, jnp.float32)
  progress = jnp.minimum((step + 1) / hpm.ramp_steps, 1.0)
  return (hpm.final_share * progress).astype(jnp.float32)


def ranking_loss(predicted: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """HPM's relative objective: within each image, for every ordered pair (i, j) of masked patches
  whose reconstruction losses `target` differ, binary cross-entropy of sigmoid(pred_j - pred_i)
  against [target_j > target_i]; summed over the batch and divided by the number of such pairs
  (forward_learning_loss with relative=True). `predicted`, `target` and `mask` (1 = masked) are
  [B, N]; pairs with a visible patch are left out, as the official code scores masked ones only.
  Only differences of predictions count, so a shift of all of an image's predictions (the
  predictor's output bias, its final norm's bias) gets no gradient.
  """
  predicted = predicted.astype(jnp.float32)
  logits = predicted[:, None, :] - predicted[:, :, None]      # [b, i, j] = pred_j - pred_i
  harder = (target[:, None, :] > target[:, :, None]).astype(jnp.float32)  # target_j > target_i
  easier = (target[:, None, :] < target[:, :, None]).astype(jnp.float32)
  pairs = mask[:, None, :] * mask[:, :, None]
  bce = (-harder * jnp.log(jax.nn.sigmoid(logits) + LOG_EPS)
         - easier * jnp.log(jax.nn.sigmoid(-logits) + LOG_EPS))
  # A batch whose masked losses are all equal has no pair to rank (the official code divides
  # by zero there).
  return (bce * pairs).sum() / jnp.maximum(((harder + easier) * pairs).sum(), 1.0)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError on `config.method.hpm` knobs outside their range. (The hard-patch mask
  without the predictor is refused by masking.validate: see `supplies`.)"""
  h = config.method.hpm
  if not h.enabled:
    return
  if not 0.0 <= h.final_share <= 1.0:
    raise ValueError(f"method.hpm.final_share must be in [0, 1] (HPM: 0.5), got {h.final_share}")
  if not 0.0 < h.ramp_fraction <= 1.0:
    raise ValueError(f"method.hpm.ramp_fraction must be in (0, 1] (HPM: 1, the whole run), got "
                     f"{h.ramp_fraction}")
  if h.loss_weight <= 0:
    raise ValueError(f"method.hpm.loss_weight must be > 0 (HPM: 1), got {h.loss_weight}: the "
                     f"predictor learns from nothing else")


def supplies(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The model-scored masks (masking.SCORED) the loss predictor of an MAE, CRATE-MAE or SimMIM
  with this config feeds."""
  return (HARD_PATCH,) if config.method.hpm.enabled else ()


def train_flops(config: ml_collections.ConfigDict, predictor_forward: int,
                full_image_forward: int) -> int:
  """Training FLOPs HPM adds to one example: the predictor, a twin of the decoder or head
  (`predictor_forward` FLOPs on the student's latent), trained; with the hard-patch mask, a
  forward pass without gradients of the encoder and predictor on the whole image
  (`full_image_forward`)."""
  if not config.method.hpm.enabled:
    return 0
  mask_pass = full_image_forward if config.mask.name == HARD_PATCH else 0
  return flops.TRAIN_MULTIPLIER * predictor_forward + mask_pass
