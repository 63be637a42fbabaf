"""Mask generators, drawn on the device inside the jitted step, picked by `config.mask.name`.

Every generator has the form `(rng, batch, grid, ratio, **knobs) -> Mask` with a static number
of kept tokens, so all shapes are known at trace time; its knobs are the config section
`config.mask.<name>`. The family shares one pattern: give each patch a score, argsort, keep the
k lowest. A new strategy only has to produce a score; `keep_lowest` does the rest. Methods draw
through `draw(rng, batch, grid, spec)`, so any registered generator works with any method by
config alone.
"""

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from mim_jax import color_noise
from mim_jax.registry import Registry


class Mask(NamedTuple):
  ids_keep: jax.Array     # [B, k] int32 indices of visible patches, in shuffled order
  ids_restore: jax.Array  # [B, N] int32, position of each patch in the shuffled order
  mask: jax.Array         # [B, N] float32, 1 = masked (to predict), 0 = visible


def num_visible(num_patches: int, mask_ratio: float) -> int:
  """Number of kept patches. Truncates like MAE: int(N * (1 - ratio))."""
  if not 0.0 < mask_ratio < 1.0:
    raise ValueError(f"mask.ratio must be in (0, 1), got {mask_ratio}")
  keep = int(num_patches * (1 - mask_ratio))
  if keep < 1:
    raise ValueError(f"mask.ratio {mask_ratio} keeps no patch out of {num_patches}; "
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


# ---------------------------------------------------------------------------------------------
# BEiT's block-wise masking (Bao et al. 2021, "BEiT: BERT Pre-Training of Image Transformers",
# algorithm 1), which CAE uses (Chen et al. 2022: 98 of 196 patches masked).
# ---------------------------------------------------------------------------------------------

def block_rectangles(u: jax.Array, grid: tuple[int, int], min_area: float | jax.Array,
                     max_area: float | jax.Array, min_aspect: float = 0.3
                     ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
  """BEiT's candidate blocks, from uniform draws u [..., 4] in [0, 1).

  As in BEiT: area ~ U(min_area, max_area) (arrays broadcasting to u[..., 0]; with min_area >
  max_area the area lies between them, as Python's random.uniform does), aspect ratio h/w
  log-uniform in [min_aspect, 1/min_aspect], h = round(sqrt(area * aspect)),
  w = round(sqrt(area / aspect)), top-left corner uniform over the positions where the block
  lies inside the grid. BEiT rejects blocks with h >= grid height or w >= grid width; `fits`
  flags the others. Returns int32 (top, left, h, w) and bool fits, each of shape u.shape[:-1].
  """
  if not 0.0 < min_aspect <= 1.0:
    raise ValueError(f"mask.block.min_aspect must be in (0, 1], got {min_aspect}")
  height, width = grid
  area = min_area + (max_area - min_area) * u[..., 0]
  aspect = jnp.exp(-math.log(min_aspect) * (2 * u[..., 1] - 1))
  h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (h < height) & (w < width)
  # floor(u * count) is uniform over 0 .. count - 1, i.e. top over 0 .. height - h.
  top = jnp.floor(u[..., 2] * jnp.maximum(height - h + 1, 1)).astype(jnp.int32)
  left = jnp.floor(u[..., 3] * jnp.maximum(width - w + 1, 1)).astype(jnp.int32)
  return top, left, h, w, fits


def paint_rectangles(top: jax.Array, left: jax.Array, h: jax.Array, w: jax.Array,
                     grid: tuple[int, int]) -> jax.Array:
  """Rectangles [...] -> boolean images [..., gh, gw], True inside each rectangle."""
  rows = jnp.arange(grid[0])
  cols = jnp.arange(grid[1])
  in_rows = (rows >= top[..., None]) & (rows < (top + h)[..., None])
  in_cols = (cols >= left[..., None]) & (cols < (left + w)[..., None])
  return in_rows[..., :, None] & in_cols[..., None, :]


def block_union(rng: jax.Array, batch: int, grid: tuple[int, int], num_masked: int, *,
                min_patches: int = 16, max_patches: int | None = None, min_aspect: float = 0.3,
                attempts: int = 64) -> tuple[jax.Array, jax.Array, jax.Array]:
  """BEiT's block-masking loop with a fixed number of attempts, vectorised over the batch.

  Each attempt draws one block per row with area ~ U(min_patches, min(remaining, max_patches))
  (`remaining` = num_masked minus what the row already masks) and accepts it when it fits and
  adds between 1 and that many new patches: BEiT's rule, so a row never masks more than
  `num_masked`. BEiT loops until the count is exact; a static shape needs a fixed loop (one
  `lax.scan` of `attempts` steps), after which a row can be a few patches short. Measured at
  CAE's setting (14x14 grid, 98 masked, blocks of >= 16), over 8192 rows: with 64 attempts 98.2%
  of rows are exact and the mean shortfall is 0.018 patch (32 attempts: 88%, 0.13; 128: 99.9%);
  `fill_to_count` tops up the rest.

  Returns (union [B, gh, gw] bool, rectangles [B, attempts, 4] int32 as (top, left, h, w),
  accepted [B, attempts] bool): the union is exactly the union of the accepted rectangles.
  """
  max_patches = num_masked if max_patches is None else max_patches
  uniforms = jax.random.uniform(rng, (attempts, batch, 4))  # One draw for the whole loop.

  def attempt(union, u):
    remaining = num_masked - union.sum((1, 2))
    max_area = jnp.minimum(remaining, max_patches)
    top, left, h, w, fits = block_rectangles(u, grid, float(min_patches),
                                             max_area.astype(jnp.float32), min_aspect)
    block = paint_rectangles(top, left, h, w, grid)
    new = (block & ~union).sum((1, 2))
    accept = fits & (new > 0) & (new <= max_area)
    union = union | (block & accept[:, None, None])
    return union, (jnp.stack([top, left, h, w], -1), accept)

  union, (rects, accepted) = jax.lax.scan(attempt, jnp.zeros((batch, *grid), jnp.bool_),
                                          uniforms)
  return union, rects.swapaxes(0, 1), accepted.T


def fill_to_count(rng: jax.Array, union: jax.Array, num_keep: int) -> Mask:
  """Masks exactly gh*gw - num_keep patches per row, the patches of `union` [B, gh, gw] first.

  Scores for `keep_lowest`: patches in the union score in [2, 3), their 4-neighbours outside it
  in [1, 2), all others in [0, 1), the fraction being uniform noise (random tie-breaking). The
  highest scores are masked. So a union of exactly the target count is masked as it is; a union
  short of it is grown by random patches on its border (further out only if the border is too
  small), which extends its blocks rather than scattering isolated patches; a union over the
  target (block_union never gives one) is cut to a random subset of itself.
  """
  batch, height, width = union.shape
  pad = jnp.pad(union, ((0, 0), (1, 1), (1, 1)))
  border = (pad[:, :-2, 1:-1] | pad[:, 2:, 1:-1] | pad[:, 1:-1, :-2] | pad[:, 1:-1, 2:]) & ~union
  tier = 2 * union.astype(jnp.float32) + border.astype(jnp.float32)
  scores = (tier.reshape(batch, height * width)
            + jax.random.uniform(rng, (batch, height * width)))
  return keep_lowest(scores, num_keep)


def block_mask(rng: jax.Array, batch: int, grid: tuple[int, int], mask_ratio: float, *,
               min_patches: int = 16, max_patches: int | None = None, min_aspect: float = 0.3,
               attempts: int = 64) -> Mask:
  """BEiT-style block-wise masking with an exact count: N - num_visible(N, mask_ratio) masked.

  Defaults are BEiT's (blocks of at least 16 patches, aspect ratio in [0.3, 1/0.3]); CAE masks
  98 of 196 patches (ratio 0.5). `block_union` draws the blocks, never more than the target;
  `fill_to_count` makes the count exact. How exactness and contiguity interact: a row whose
  blocks reached the target (98% at CAE's setting) is BEiT's blocks only, each a contiguous
  rectangle as drawn; a row left short gets its last few patches (0.018 per row on average) on
  the border of its blocks, so they stay attached to a block but it is no longer a rectangle.
  """
  height, width = grid
  largest = (height - 1) * (width - 1)  # BEiT keeps a block strictly smaller than the grid.
  if not 1 <= min_patches <= largest:
    raise ValueError(f"mask.block.min_patches {min_patches} cannot fit the {height}x{width} patch "
                     f"grid (blocks are at most {height - 1}x{width - 1}); use 1 .. {largest}")
  if attempts < 1:
    raise ValueError(f"mask.block.attempts must be positive, got {attempts}")
  num_patches = height * width
  num_keep = num_visible(num_patches, mask_ratio)
  k_blocks, k_fill = jax.random.split(rng)
  union, _, _ = block_union(k_blocks, batch, grid, num_patches - num_keep,
                            min_patches=min_patches, max_patches=max_patches,
                            min_aspect=min_aspect, attempts=attempts)
  return fill_to_count(k_fill, union, num_keep)


# ---------------------------------------------------------------------------------------------
# SimMIM's coarse random masking (Xie et al. 2022: random masking with a large masked patch).
# ---------------------------------------------------------------------------------------------

def cell_grid(grid: tuple[int, int], cell: int, knob: str) -> tuple[int, int]:
  """The grid of square cells of `cell` x `cell` patches tiling the patch `grid`. Raises
  ValueError, naming the config `knob`, when they do not tile it with more than one cell."""
  height, width = grid
  tiles = lambda c: c >= 1 and not height % c and not width % c and (height // c) * (width // c) > 1
  if not tiles(cell):
    valid = [c for c in range(1, min(height, width) + 1) if tiles(c)]
    raise ValueError(f"{knob} {cell} (in patches) must tile the {height}x{width} patch grid "
                     f"with more than one cell; valid: {valid}")
  return height // cell, width // cell


def keep_lowest_cells(scores: jax.Array, grid: tuple[int, int], cell: int,
                      keep_cells: int) -> Mask:
  """Keeps the patches of the `keep_cells` lowest-scoring cells of each row of `scores`
  [B, cells] (cells of `cell` x `cell` patches, row-major over the patch `grid`). Each cell gets
  a distinct rank (the argsort of its scores, so ties between cells cannot split one); every
  patch takes its cell's rank and `keep_lowest` keeps the patches of the lowest-ranked cells.
  The stable argsort keeps a cell's patches together, so exactly keep_cells * cell^2 patches
  are visible, whole cells only. With cell 1 this is `keep_lowest` itself."""
  if cell == 1:
    return keep_lowest(scores, keep_cells)
  batch = scores.shape[0]
  ch, cw = grid[0] // cell, grid[1] // cell
  rank = jnp.argsort(jnp.argsort(scores, axis=1), axis=1).reshape(batch, ch, 1, cw, 1)
  rank = jnp.broadcast_to(rank, (batch, ch, cell, cw, cell)).reshape(batch, grid[0] * grid[1])
  return keep_lowest(rank.astype(jnp.float32), keep_cells * cell * cell)


def coarse_mask(rng: jax.Array, batch: int, grid: tuple[int, int], mask_ratio: float, *,
                cell: int) -> Mask:
  """Uniform random masking of square cells of `cell` x `cell` patches, the mask repeated up to
  the patch grid: SimMIM masks 32-px squares (cell = 32 / patch, e.g. 8 for Swin's 4-px
  patches, 2 for ViT/16) with ratio 0.6.

  As in SimMIM's generator, ceil(cells * mask_ratio) of the cells are masked, computed here as
  cells - num_visible(cells, mask_ratio), which is the same number without float artefacts
  (ceil(10 * 0.6) is 7 in floating point). The cells' scores are uniform noise
  (`keep_lowest_cells`).
  """
  ch, cw = cell_grid(grid, cell, "mask.coarse.cell")
  noise = jax.random.uniform(rng, (batch, ch * cw))
  return keep_lowest_cells(noise, grid, cell, num_visible(ch * cw, mask_ratio))


# ---------------------------------------------------------------------------------------------
# ColorMAE's coloured-noise masks (Hinojosa et al. 2024): mim_jax/color_noise.py makes the field.
# ---------------------------------------------------------------------------------------------

def color_noise_mask(color: str) -> Callable[..., Mask]:
  """The generator of `color` noise masks: (rng, batch, grid, ratio, *, sigmas) -> Mask, with
  the filter widths `sigmas` in patches (color_noise.response)."""

  def generate(rng: jax.Array, batch: int, grid: tuple[int, int], mask_ratio: float, *,
               sigmas: tuple[float, ...]) -> Mask:
    scores = color_noise.field(rng, batch, grid, color, tuple(sigmas)).reshape(batch, -1)
    # ColorMAE keeps the patches where the noise is highest visible (its argsort is descending).
    return keep_lowest(-scores, num_visible(grid[0] * grid[1], mask_ratio))

  generate.__name__ = f"{color}_noise_mask"
  return generate


# ---------------------------------------------------------------------------------------------
# HPM's hard-patch mask (Wang et al. 2023, "Hard Patches Mining for Masked Image Modeling"): the
# scores come from a loss predictor, which mim_jax/methods/hpm.py adds to MAE, CRATE-MAE and
# SimMIM.
# ---------------------------------------------------------------------------------------------

def hard_patch_mask(rng: jax.Array, batch: int, grid: tuple[int, int], mask_ratio: float, *,
                    cell: int = 1, predicted_loss: jax.Array | None = None,
                    hard_share: float | jax.Array = 0.0) -> Mask:
  """HPM's easy-to-hard mask: of each row's masked patches, floor(hard_share x their count) are
  the patches with the highest `predicted_loss` [B, N] and the rest are uniformly random among
  the others (the official code's generate_mask, which truncates the count the same way).
  `hard_share` may be traced (it ramps with the training step): the number of hard patches
  varies, the number kept is static.

  `cell` > 1 masks square cells of `cell` x `cell` patches, as SimMIM's coarse mask does: a
  cell's predicted loss is the mean of its patches', the hard share counts masked cells, and
  ceil(cells x ratio) whole cells are masked (coarse_mask's count). HPM masks single patches;
  SimMIM's ablation (its table 1) finds large masked squares matter for a model that sees the
  mask tokens, so SimMIM's configs give hard_patch their coarse cell.

  Without `predicted_loss` (drawn by name through `draw`: the mask gallery, shape checks) every
  patch is predicted equally hard and the mask is the uniform one (MAE's at cell 1), as HPM's
  is at share 0; `validate` refuses to train a method that cannot feed it (SCORED).
  """
  ch, cw = cell_grid(grid, cell, "mask.hard_patch.cell")
  num_cells = ch * cw
  keep_cells = num_visible(num_cells, mask_ratio)
  noise = jax.random.uniform(rng, (batch, num_cells))
  if predicted_loss is None:
    return keep_lowest_cells(noise, grid, cell, keep_cells)
  if predicted_loss.shape != (batch, grid[0] * grid[1]):
    raise ValueError(f"predicted_loss of shape {predicted_loss.shape} does not score the "
                     f"{grid[0]}x{grid[1]} patches of {batch} images")
  cell_loss = predicted_loss.astype(jnp.float32).reshape(batch, ch, cell, cw, cell).mean((2, 4))
  num_hard = jnp.floor((num_cells - keep_cells) * jnp.asarray(hard_share, jnp.float32))
  hardness_rank = jnp.argsort(jnp.argsort(-cell_loss.reshape(batch, num_cells), axis=1), axis=1)
  # Noise lies in [0, 1): a hard cell (2 + noise) outscores every other one, so it is masked.
  return keep_lowest_cells(noise + 2.0 * (hardness_rank < num_hard), grid, cell, keep_cells)


# ---------------------------------------------------------------------------------------------
# MaskAlign's attention-guided mask (Xue et al. 2023, "Stare at What You See: Masked Image
# Modeling without Reconstruction"): the scores come from a frozen teacher's attention, which
# mim_jax/methods/teacher_attention.py computes (MaskAlign's teacher, or MAE's, CRATE-MAE's and
# SimMIM's mask.teacher).
# ---------------------------------------------------------------------------------------------

def attention_mask(rng: jax.Array, batch: int, grid: tuple[int, int], mask_ratio: float, *,
                   attention: jax.Array | None = None) -> Mask:
  """Keeps the patches the teacher attends to. `attention` [B, N] is the teacher's cls-token
  attention over the patches (non-negative weights, any scale); the visible patches are drawn
  without replacement with probability proportional to it, as MaskAlign's official code does
  (models_pretrain.py, attention_masking: torch.multinomial on the last block's cls attention,
  averaged over heads). Sampling rather than a plain top-k still shows the student some
  patches the teacher ignores.

  The same law with static shapes: adding Gumbel noise to the log-weights and keeping the k
  largest draws k items without replacement in proportion to the weights (the Gumbel-top-k
  trick; Kool et al. 2019, "Stochastic Beams and Where to Find Them", sec. 3), so the score for
  `keep_lowest` is minus that sum. A zero weight is never kept while positive ones remain.
  Without `attention` (drawn by name through `draw`: the mask gallery, shape checks) every patch
  weighs the same and the mask is MAE's uniform one; `validate` refuses to train a method that
  cannot feed it (SCORED).
  """
  num_patches = grid[0] * grid[1]
  log_weights = (jnp.zeros((batch, num_patches)) if attention is None
                 else jnp.log(attention.astype(jnp.float32)))
  if log_weights.shape != (batch, num_patches):
    raise ValueError(f"attention of shape {log_weights.shape} does not weigh the "
                     f"{grid[0]}x{grid[1]} patches of {batch} images")
  perturbed = log_weights + jax.random.gumbel(rng, (batch, num_patches))
  return keep_lowest(-perturbed, num_visible(num_patches, mask_ratio))


# ---------------------------------------------------------------------------------------------
# The registry, and drawing by name.
# ---------------------------------------------------------------------------------------------

MaskFn = Callable[..., Mask]  # (rng, batch, grid, ratio, **knobs) -> Mask

GENERATORS: Registry = Registry("mask generator", {
    "random": random_mask,
    "block": block_mask,
    "coarse": coarse_mask,
    **{f"{color}_noise": color_noise_mask(color) for color in color_noise.COLORS},
    "hard_patch": hard_patch_mask,
    "attention": attention_mask,
})


class MaskSpec(NamedTuple):
  """A generator by name, its ratio and its knobs: hashable, so a flax module can hold it."""
  name: str = "random"
  ratio: float = 0.75
  knobs: tuple[tuple[str, Any], ...] = ()

  @classmethod
  def from_config(cls, mask_config: ml_collections.ConfigDict, name: str | None = None
                  ) -> "MaskSpec":
    """`config.mask`: its `name` (or the given one), `ratio`, and the knobs of that generator's
    section `config.mask.<name>`."""
    name = name or mask_config.name
    knobs = mask_config[name].to_dict() if name in mask_config else {}
    return cls(name, mask_config.ratio, tuple(sorted(
        (k, tuple(v) if isinstance(v, list) else v) for k, v in knobs.items())))


def draw(rng: jax.Array, batch: int, grid: tuple[int, int], spec: MaskSpec) -> Mask:
  """`batch` masks over the patch grid, from the generator `spec` names."""
  return GENERATORS[spec.name](rng, batch, grid, spec.ratio, **dict(spec.knobs))


def num_kept(mask_config: ml_collections.ConfigDict, grid: tuple[int, int]) -> int:
  """How many patches of `grid` the configured generator keeps visible, read off its traced
  shapes (nothing is computed). Raises ValueError on a `config.mask` that cannot mask `grid`:
  an unknown name, a bad ratio or a bad knob of the generator."""
  spec = MaskSpec.from_config(mask_config)
  return jax.eval_shape(lambda rng: draw(rng, 1, grid, spec), jax.random.key(0)).ids_keep.shape[1]


# Generators whose scores come from the model, not from the rng: the method that owns the model
# passes them in (`supplies` in `validate`). What each needs, for the error message.
SCORED = {
    "hard_patch": "HPM's loss predictor (method mae, crate_mae or simmim with "
                  "method.hpm.enabled=True)",
    "attention": "a teacher's attention (method mae, crate_mae or simmim with mask.teacher set "
                 "to a workdir, an MAE .pth or an .npz; or method maskalign)",
}


def validate(mask_config: ml_collections.ConfigDict, grid: tuple[int, int],
             supplies: tuple[str, ...] = ()) -> None:
  """Raises ValueError on a `config.mask` that cannot mask `grid` (see num_kept), or that names
  a model-scored generator (SCORED) the calling method does not feed: `supplies` lists the
  ones it does. Without its scores such a mask would silently be uniform."""
  if mask_config.name in SCORED and mask_config.name not in supplies:
    usable = sorted(set(GENERATORS.names()) - set(SCORED) | set(supplies))
    raise ValueError(f"mask.name={mask_config.name!r} needs {SCORED[mask_config.name]}, which "
                     f"this config does not have; valid here: {usable}")
  num_kept(mask_config, grid)
