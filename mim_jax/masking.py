"""Mask generators, drawn on the device inside the jitted step.

Every generator has the form `(rng, batch, grid, ...) -> Mask` with a static number of kept
tokens, so all shapes are known at trace time. The family shares one pattern: give each patch a
score, argsort, keep the k lowest. A new strategy only has to produce a score; `keep_lowest`
does the rest.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


class Mask(NamedTuple):
  ids_keep: jax.Array     # [B, k] int32 indices of visible patches, in shuffled order
  ids_restore: jax.Array  # [B, N] int32, position of each patch in the shuffled order
  mask: jax.Array         # [B, N] float32, 1 = masked (to predict), 0 = visible


def num_visible(num_patches: int, mask_ratio: float) -> int:
  """Number of kept patches. Truncates like MAE: int(N * (1 - ratio))."""
  if not 0.0 < mask_ratio < 1.0:
    raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
  keep = int(num_patches * (1 - mask_ratio))
  if keep < 1:
    raise ValueError(f"mask_ratio {mask_ratio} keeps no patch out of {num_patches}; "
                     f"use a ratio below {1 - 1 / num_patches:.4f}")
  return keep


def keep_lowest(scores: jax.Array, num_keep: int) -> Mask:
  """Keeps the `num_keep` lowest-scoring patches of each row of `scores` [B, N].

  The argsort of the scores is the shuffle; its argsort is the inverse permutation
  (`ids_restore`), which lets a decoder put tokens back in patch order with one gather.
  """
  ids_shuffle = jnp.argsort(scores, axis=1).astype(jnp.int32)
  ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
  ids_keep = ids_shuffle[:, :num_keep]
  mask = (ids_restore >= num_keep).astype(jnp.float32)
  return Mask(ids_keep, ids_restore, mask)


def random_mask(rng: jax.Array, batch: int, grid: tuple[int, int], mask_ratio: float) -> Mask:
  """MAE's uniform random masking (He et al. 2021, sec. 3): i.i.d. uniform noise as the score."""
  num_patches = grid[0] * grid[1]
  scores = jax.random.uniform(rng, (batch, num_patches))
  return keep_lowest(scores, num_visible(num_patches, mask_ratio))


MaskFn = Callable[[jax.Array, int, tuple[int, int], float], Mask]

GENERATORS: dict[str, MaskFn] = {
    "random": random_mask,
}


def get(name: str) -> MaskFn:
  if name not in GENERATORS:
    raise ValueError(f"unknown mask generator {name!r}; valid: {sorted(GENERATORS)}")
  return GENERATORS[name]
