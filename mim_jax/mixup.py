"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) for fine-tuning, in jnp inside the
jitted step.

In the step rather than on the host, like the masks (DESIGN decision 2): the draws come from
fold_in(rng, step), so a resumed run mixes exactly as the uninterrupted one would, with no rng
state in the checkpoint, and the host pipeline stays the plain grain one.

As in MAE's fine-tuning recipe (He et al. 2021, table 9: mixup 0.8, cutmix 1.0), the whole batch
shares one draw: with probability `prob` it is mixed, by CutMix with probability `switch_prob`
(when both are on) and by Mixup otherwise, each example with the batch in reverse order (its
partner). The targets (one-hot, already label-smoothed) are mixed with the same weight.
"""

import jax
import jax.numpy as jnp


def cutmix_box(rng: jax.Array, lam: jax.Array, height: int, width: int
               ) -> tuple[jax.Array, jax.Array]:
  """A box covering about 1 - lam of the image: sides sqrt(1 - lam) of the image's, centred
  at a uniform pixel and clipped at the borders. Returns (mask [H, W], 1 = from the partner;
  the exact weight of the original, 1 - box area / image area)."""
  ky, kx = jax.random.split(rng)
  ratio = jnp.sqrt(1.0 - lam)
  box_h = jnp.floor(height * ratio).astype(jnp.int32)
  box_w = jnp.floor(width * ratio).astype(jnp.int32)
  cy = jax.random.randint(ky, (), 0, height)
  cx = jax.random.randint(kx, (), 0, width)
  y0, x0 = jnp.clip(cy - box_h // 2, 0, height), jnp.clip(cx - box_w // 2, 0, width)
  y1, x1 = jnp.clip(cy - box_h // 2 + box_h, 0, height), jnp.clip(cx - box_w // 2 + box_w, 0, width)
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  mask = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  area = ((y1 - y0) * (x1 - x0)).astype(jnp.float32)
  return mask, 1.0 - area / (height * width)


def mix(rng: jax.Array, images: jax.Array, targets: jax.Array, *, mixup_alpha: float,
        cutmix_alpha: float, switch_prob: float, prob: float
        ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mixes a batch. images [B, H, W, C], targets [B, K] (rows summing to 1).

  Mixup: lam ~ Beta(mixup_alpha, mixup_alpha), images lam * x + (1 - lam) * partner.
  CutMix: lam ~ Beta(cutmix_alpha, cutmix_alpha) sets a box pasted from the partner; lam is then
  corrected to the box's actual area. An alpha of 0 turns that kind off.
  Returns (images, targets, lam), lam the weight of the original (1 when nothing was mixed).
  """
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, targets, jnp.ones((), jnp.float32)
  k_apply, k_switch, k_mixup, k_cutmix, k_box = jax.random.split(rng, 5)
  _, height, width, _ = images.shape
  partner = images[::-1]
  candidates = []  # (images, lam) of each enabled kind
  if mixup_alpha > 0:
    lam = jax.random.beta(k_mixup, mixup_alpha, mixup_alpha)
    candidates.append((lam * images + (1.0 - lam) * partner, lam))
  if cutmix_alpha > 0:
    box, lam = cutmix_box(k_box, jax.random.beta(k_cutmix, cutmix_alpha, cutmix_alpha),
                          height, width)
    candidates.append((jnp.where(box[None, :, :, None], partner, images), lam))
  mixed, lam = candidates[0]
  if len(candidates) == 2:
    use_cutmix = jax.random.bernoulli(k_switch, switch_prob)
    mixed = jnp.where(use_cutmix, candidates[1][0], mixed)
    lam = jnp.where(use_cutmix, candidates[1][1], lam)
  apply = jax.random.bernoulli(k_apply, prob)
  images = jnp.where(apply, mixed.astype(images.dtype), images)
  lam = jnp.where(apply, lam, 1.0).astype(jnp.float32)
  targets = lam * targets + (1.0 - lam) * targets[::-1]
  return images, targets, lam
