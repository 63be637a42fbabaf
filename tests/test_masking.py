"""Tests of mim_jax.masking: MAE's random masking (He et al. 2021, sec. 3) and `keep_lowest`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax import masking


# One compiled program per shape, rather than one dispatch per primitive.
random_mask = jax.jit(masking.random_mask, static_argnums=(1, 2, 3))


def draw(seed: int = 0, batch: int = 8, grid=(4, 4), ratio: float = 0.75) -> masking.Mask:
  return random_mask(jax.random.key(seed), batch, grid, ratio)


@pytest.mark.parametrize("grid,ratio,keep", [((4, 4), 0.75, 4), ((14, 14), 0.75, 49),
                                             ((3, 5), 0.6, 6), ((2, 2), 0.5, 2)])
def test_fixed_number_kept_and_masked_per_row(grid, ratio, keep):
  n = grid[0] * grid[1]
  assert masking.num_visible(n, ratio) == keep
  m = draw(batch=16, grid=grid, ratio=ratio)
  assert m.ids_keep.shape == (16, keep) and m.ids_keep.dtype == jnp.int32
  assert m.ids_restore.shape == (16, n) and m.ids_restore.dtype == jnp.int32
  assert m.mask.shape == (16, n) and m.mask.dtype == jnp.float32
  mask = np.asarray(m.mask)
  assert set(np.unique(mask)) <= {0.0, 1.0}
  np.testing.assert_array_equal(mask.sum(1), n - keep)
  # Kept indices are distinct, valid patch indices.
  ids_keep = np.asarray(m.ids_keep)
  assert ((ids_keep >= 0) & (ids_keep < n)).all()
  assert all(len(set(row)) == keep for row in ids_keep)


def test_ids_keep_are_exactly_the_visible_positions():
  m = draw(seed=1, batch=32, grid=(6, 6))
  mask, ids_keep = np.asarray(m.mask), np.asarray(m.ids_keep)
  for row_mask, row_keep in zip(mask, ids_keep):
    np.testing.assert_array_equal(np.sort(row_keep), np.flatnonzero(row_mask == 0))


def test_ids_restore_inverts_the_shuffle():
  batch, grid = 16, (5, 5)
  n = grid[0] * grid[1]
  scores = jax.random.uniform(jax.random.key(2), (batch, n))
  m = jax.jit(masking.keep_lowest, static_argnums=1)(scores, 7)
  ids_shuffle = np.argsort(np.asarray(scores), axis=1)
  ids_restore = np.asarray(m.ids_restore)
  # ids_restore is a permutation and the inverse of the shuffle.
  np.testing.assert_array_equal(np.sort(ids_restore, 1), np.tile(np.arange(n), (batch, 1)))
  np.testing.assert_array_equal(np.take_along_axis(ids_shuffle, ids_restore, 1),
                                np.tile(np.arange(n), (batch, 1)))
  # Tokens gathered into shuffled order and back with ids_restore come out in the original order:
  # this is what the MAE decoder does.
  tokens = np.random.default_rng(0).normal(size=(batch, n, 3)).astype(np.float32)
  shuffled = np.take_along_axis(tokens, ids_shuffle[..., None], 1)
  restored = jnp.take_along_axis(jnp.asarray(shuffled), m.ids_restore[..., None], 1)
  np.testing.assert_array_equal(np.asarray(restored), tokens)
  # The kept patches are the first k of the shuffle, i.e. the k lowest scores.
  np.testing.assert_array_equal(np.asarray(m.ids_keep), ids_shuffle[:, :7])
  np.testing.assert_array_equal(np.asarray(m.mask), (ids_restore >= 7).astype(np.float32))


def test_marginal_is_uniform_over_patches():
  """Every patch is masked with probability 0.75. With 2000 independent rows, each patch's masked
  count is Binomial(2000, 0.75) (sd 19.4, i.e. 0.0097 in frequency). A position bias, e.g. from a
  sort that is not by the noise, would push some patches far outside 5 sd."""
  rows, grid, ratio = 2000, (8, 8), 0.75
  n = grid[0] * grid[1]
  mask = np.asarray(random_mask(jax.random.key(3), rows, grid, ratio).mask)
  counts = mask.sum(0)
  expected, var = rows * ratio, rows * ratio * (1 - ratio)
  freq = counts / rows
  assert np.abs(freq - ratio).max() < 5 * np.sqrt(var) / rows, freq
  # Chi-square over the 64 patches (the row sums are fixed, so about 63 degrees of freedom:
  # mean 63, sd 11.2). A bound of mean + 6 sd fails on any systematic bias.
  chi2 = ((counts - expected) ** 2 / var).sum()
  assert chi2 < 63 + 6 * np.sqrt(2 * 63), chi2
  # Rows are not all the same mask.
  assert len({row.tobytes() for row in mask}) > rows // 2
  # The patch kept first (ids_keep[:, 0]) is also uniform: the shuffle itself is unbiased.
  first = np.bincount(np.asarray(random_mask(jax.random.key(4), rows, grid, ratio).ids_keep[:, 0]),
                      minlength=n)
  p = 1 / n
  assert np.abs(first - rows * p).max() < 5 * np.sqrt(rows * p * (1 - p)) + 1, first


def test_different_rngs_give_different_masks_and_same_rng_same_mask():
  a, b, c = draw(seed=5), draw(seed=5), draw(seed=6)
  np.testing.assert_array_equal(np.asarray(a.ids_keep), np.asarray(b.ids_keep))
  assert not np.array_equal(np.asarray(a.mask), np.asarray(c.mask))


def test_jittable_with_static_shapes():
  fn = random_mask
  rng = jax.random.key(7)
  m = fn(rng, 4, (4, 4), 0.75)
  eager = masking.random_mask(rng, 4, (4, 4), 0.75)
  for got, want in zip(m, eager):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # Inside a jitted function with a traced rng, the shapes are known at trace time.
  shapes = jax.eval_shape(lambda r: masking.random_mask(r, 4, (4, 4), 0.75), rng)
  assert shapes.ids_keep.shape == (4, 4) and shapes.mask.shape == (4, 16)
  # Different rngs through the same compiled function: no retrace needed, different masks.
  m2 = fn(jax.random.key(8), 4, (4, 4), 0.75)
  assert not np.array_equal(np.asarray(m.mask), np.asarray(m2.mask))


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_bad_mask_ratio_raises_naming_the_value(ratio):
  with pytest.raises(ValueError, match=f"mask.ratio.*{ratio}"):
    masking.random_mask(jax.random.key(0), 2, (4, 4), ratio)


def test_ratio_that_keeps_nothing_raises():
  # 0.95 of 16 patches keeps int(0.8) = 0 patches: static shapes cannot hold that.
  with pytest.raises(ValueError, match="keeps no patch"):
    masking.num_visible(16, 0.95)


def test_registry():
  assert masking.GENERATORS["random"] is masking.random_mask
  with pytest.raises(ValueError, match="unknown mask generator 'blocky'.*random"):
    masking.GENERATORS["blocky"]  # pylint: disable=pointless-statement


@pytest.mark.parametrize("kind", ["ties", "constant", "extremes", "random"])
def test_any_scores_give_a_valid_mask_and_ties_break_by_position(kind):
  """The family's shared step, keep_lowest: whatever the scores (ties, all equal, +-inf and
  float32's extremes), the mask keeps exactly k distinct patches, ids_restore inverts the shuffle,
  and equal scores keep the lower patch index first (argsort is stable), so a draw is a function
  of its scores alone. (Denormals are left out: XLA's CPU sort flushes them to zero, so they tie
  with 0 where numpy orders them.)"""
  rng = np.random.default_rng(0)
  n, k = 24, 7
  scores = {
      "ties": rng.integers(0, 3, (64, n)).astype(np.float32),
      "constant": np.full((64, n), 0.5, np.float32),
      "extremes": rng.choice(np.array([-np.inf, np.inf, np.finfo(np.float32).max,
                                       np.finfo(np.float32).min, 0.0, -0.0, 1.0],
                                      np.float32), (64, n)),
      "random": rng.normal(size=(64, n)).astype(np.float32),
  }[kind]
  m = jax.jit(masking.keep_lowest, static_argnums=1)(jnp.asarray(scores), k)
  ids_keep, ids_restore, mask = (np.asarray(x) for x in m)
  np.testing.assert_array_equal(mask.sum(1), n - k)
  for row in range(64):
    order = np.argsort(scores[row], kind="stable")  # numpy's stable sort as the reference
    np.testing.assert_array_equal(ids_keep[row], order[:k])
    np.testing.assert_array_equal(ids_restore[row][order], np.arange(n))
    np.testing.assert_array_equal(mask[row], (ids_restore[row] >= k).astype(np.float32))
