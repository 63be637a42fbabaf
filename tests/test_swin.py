"""Tests of the Swin encoder (Liu et al. 2021): shifted-window attention against a brute-force
full attention with the equivalent mask, the relative position bias index, the shift mask, the
per-stage window rule, variant shapes and parameter counts (eval_shape), and the mask token."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax.models import swin


def num_params(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def random_array(shape, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def random_variables(model, *args, seed=0):
  """Variables of the right shapes filled with random numbers (norm scales near 1), without
  compiling the model's init (its random initialisers take longer to compile than the model)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), *args)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    x = rng.normal(size=leaf.shape).astype(np.float32) * 0.2
    return x + 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else x
  return jax.tree_util.tree_map_with_path(fill, shapes)


# ---------------------------------------------------------------------------------------------
# Shifted-window attention == full attention with the equivalent mask.
# ---------------------------------------------------------------------------------------------

def brute_force_attention(x: np.ndarray, params, heads: int, window: int, shift: int):
  """Full attention over all H*W tokens, in the image's own coordinates (no roll, no windows).

  Shifting the window grid by `shift` means the windows start at rows/columns shift - M, shift,
  shift + M, ... and are cut at the border: token (y, x) is in window row floor((y - shift) / M)
  and column floor((x - shift) / M). Two tokens may attend iff they share a window; the bias is
  the table entry of their offset (dy, dx), row-major in a (2M-1) x (2M-1) table."""
  b, h, w, c = x.shape
  hd = c // heads
  ys, xs = np.divmod(np.arange(h * w), w)
  wy, wx = (ys - shift) // window, (xs - shift) // window   # numpy // floors negatives
  allowed = (wy[:, None] == wy[None, :]) & (wx[:, None] == wx[None, :])
  dy, dx = ys[:, None] - ys[None, :], xs[:, None] - xs[None, :]
  index = np.where(allowed, (dy + window - 1) * (2 * window - 1) + (dx + window - 1), 0)
  bias = np.asarray(params["relative_position_bias_table"], np.float64)[index]  # [N, N, heads]
  tokens = x.reshape(b, h * w, c).astype(np.float64)
  qkv = tokens @ np.asarray(params["qkv"]["kernel"]) + np.asarray(params["qkv"]["bias"])
  q, k, v = (qkv[..., i * c:(i + 1) * c].reshape(b, h * w, heads, hd) for i in range(3))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd) + bias.transpose(2, 0, 1)[None]
  logits = np.where(allowed[None, None], logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, h * w, c)
  out = out @ np.asarray(params["proj"]["kernel"]) + np.asarray(params["proj"]["bias"])
  return out.reshape(b, h, w, c), allowed


@pytest.mark.parametrize("h,w,window,shift", [(8, 12, 4, 2), (6, 6, 3, 1), (8, 8, 4, 0)])
def test_shifted_window_attention_equals_masked_full_attention(h, w, window, shift):
  heads, c = 2, 8
  x = random_array((2, h, w, c))
  attn = swin.WindowAttention(heads, window, shift)
  params = random_variables(attn, x)["params"]
  assert params["relative_position_bias_table"].shape == ((2 * window - 1) ** 2, heads)
  # A bias table of order 1, so a wrong index shows clearly.
  params["relative_position_bias_table"] = random_array(((2 * window - 1) ** 2, heads), seed=1)
  out = np.asarray(jax.jit(attn.apply)({"params": params}, x))
  want, allowed = brute_force_attention(x, params, heads, window, shift)
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
  # Not vacuous: windows are a small part of the full attention, and with a shift the
  # border windows are cut (their tokens see fewer than M*M others).
  per_token = allowed.sum(1)
  assert per_token.max() == window * window
  assert (per_token.min() < window * window) == (shift > 0)


def test_shift_changes_the_output_and_every_window_mixes_only_neighbours():
  x = random_array((1, 8, 8, 8), seed=2)
  plain = swin.WindowAttention(2, 4, 0)
  params = random_variables(plain, x)
  a = jax.jit(plain.apply)(params, x)
  shifted = jax.jit(swin.WindowAttention(2, 4, 2).apply)
  b = shifted(params, x)
  assert not np.allclose(np.asarray(a), np.asarray(b), atol=1e-3)
  # A token in the shifted block depends only on the tokens of its shifted window: changing the
  # opposite corner (which the roll brings into the same window) leaves the top-left alone.
  x2 = x.copy()
  x2[0, 6:, 6:] += 5.0
  b2 = shifted(params, x2)
  np.testing.assert_allclose(np.asarray(b2)[0, :2, :2], np.asarray(b)[0, :2, :2], atol=1e-6)
  assert not np.allclose(np.asarray(b2)[0, 6:, 6:], np.asarray(b)[0, 6:, 6:], atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Relative position bias index, shift mask, window partition, per-stage windows.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("window", [1, 2, 3, 7])
def test_relative_position_index(window):
  index = swin.relative_position_index(window)
  t = window * window
  assert index.shape == (t, t) and index.dtype == np.int32
  side = 2 * window - 1
  for i in range(t):
    for j in range(t):
      (yi, xi), (yj, xj) = divmod(i, window), divmod(j, window)
      assert index[i, j] == (yi - yj + window - 1) * side + (xi - xj + window - 1)
  # Every table row is used, the diagonal is the zero offset (the table's centre), and the
  # reverse offset mirrors it about the centre.
  assert set(index.reshape(-1)) == set(range(side * side))
  centre = (window - 1) * side + (window - 1)
  np.testing.assert_array_equal(np.diag(index), centre)
  np.testing.assert_array_equal(index + index.T, 2 * centre)


def test_shifted_window_mask_regions():
  mask = swin.shifted_window_mask(8, 8, 4, 2)
  assert mask.shape == (4, 16, 16) and mask.dtype == bool
  assert mask[0].all()                      # top-left window: no wrapped tokens
  np.testing.assert_array_equal(mask[1].sum(1), 8)   # top-right: 2 regions of 4x2
  np.testing.assert_array_equal(mask[2].sum(1), 8)   # bottom-left: 2 regions of 2x4
  np.testing.assert_array_equal(mask[3].sum(1), 4)   # bottom-right: 4 regions of 2x2
  for m in mask:
    np.testing.assert_array_equal(m, m.T)
    assert m.diagonal().all()


def test_window_partition_roundtrip_and_layout():
  x = random_array((2, 6, 9, 5))
  windows = np.asarray(swin.window_partition(jnp.asarray(x), 3))
  assert windows.shape == (2, 6, 9, 5)
  # Window (row 1, col 2) is index 1 * 3 + 2; its tokens are row-major.
  np.testing.assert_array_equal(windows[:, 5], x[:, 3:6, 6:9].reshape(2, 9, 5))
  np.testing.assert_array_equal(np.asarray(swin.window_merge(jnp.asarray(windows), 6, 9)), x)


def test_stage_window_rule():
  assert swin.stage_window(56, 7) == (7, 3)
  assert swin.stage_window(7, 7) == (7, 0)   # Swin-B at 224, last stage: one window, no shift
  assert swin.stage_window(6, 6) == (6, 0)   # SimMIM at 192, window 6, last stage
  assert swin.stage_window(2, 4) == (2, 0)   # smaller than the window: window = resolution
  assert swin.stage_window(8, 4) == (4, 2)
  swin.check_geometry(192, 4, 6, 4)
  swin.check_geometry(224, 4, 7, 4)
  with pytest.raises(ValueError, match=r"window 7 does not tile stage 0 \(48x48.*\[1, 2, 3, 4, 6"):
    swin.check_geometry(192, 4, 7, 4)
  with pytest.raises(ValueError, match="image_size 200 must be divisible by Swin's total "
                                       "stride 32"):
    swin.check_geometry(200, 4, 7, 4)
  with pytest.raises(ValueError, match=r"unknown Swin variant 'XL'.*\['B', 'L', 'Mu', 'S', 'T'\]"):
    swin.parse_variant("XL")


# ---------------------------------------------------------------------------------------------
# Variants: shapes and parameter counts, with eval_shape (no allocation).
# ---------------------------------------------------------------------------------------------

# Published parameter counts of the ImageNet-1k classifiers (Liu et al. 2021, table 1: 28M, 50M,
# 88M, 197M; exact values of the released models), which add a 1000-way head to the encoder.
PUBLISHED = {"T": 28_288_354, "S": 49_606_258, "B": 87_768_224, "L": 196_532_476}


@pytest.mark.parametrize("variant", list(PUBLISHED))
def test_variant_shapes_and_param_counts(variant):
  size = swin.SIZES[variant]
  model = swin.Swin(size.embed_dim, size.depths, size.heads, patch=4, window=7)
  images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  (out, aux), variables = jax.eval_shape(model.init_with_output, jax.random.key(0), images)
  c = size.embed_dim
  assert out.shape == (2, 49, 8 * c)
  assert aux["gap"].shape == (2, 8 * c)
  for i, res in enumerate((56, 28, 14, 7)):
    assert aux[f"stage_{i}"].shape == (2, res * res, c * 2 ** i)
  head = 8 * c * 1000 + 1000
  assert num_params(variables["params"]) + head == PUBLISHED[variant]
  # Window 7 everywhere: the 7x7 last stage is one window (table 13^2 rows).
  last = variables["params"][f"stage_3_block_1"]["attn"]["relative_position_bias_table"]
  assert last.shape == (169, size.heads[3])


def test_small_stages_use_the_resolution_as_window():
  """Swin-T at 32 px with window 4: stage resolutions 8, 4, 2, 1, so windows 4, 4, 2, 1; only
  stage 0 (8x8, 4 windows) shifts; bias tables shrink with the window, as in Swin's code."""
  size = swin.SIZES["T"]
  model = swin.Swin(size.embed_dim, size.depths, size.heads, patch=4, window=4)
  variables = jax.eval_shape(model.init, jax.random.key(0),
                             jax.ShapeDtypeStruct((1, 32, 32, 1), jnp.float32))
  rows = {i: variables["params"][f"stage_{i}_block_1"]["attn"]["relative_position_bias_table"]
          .shape[0] for i in range(4)}
  assert rows == {0: 49, 1: 49, 2: 9, 3: 1}
  assert [swin.stage_window(r, 4)[1] for r in swin.stage_resolutions(32, 4, 4)] == [2, 0, 0, 0]


# ---------------------------------------------------------------------------------------------
# Mask token.
# ---------------------------------------------------------------------------------------------

def test_mask_token_replaces_masked_patches_before_the_first_stage():
  size = swin.SIZES["Mu"]
  model = swin.Swin(size.embed_dim, size.depths, size.heads, patch=4, window=4)
  images = random_array((2, 32, 32, 3), seed=3)
  mask = np.zeros((2, 64), np.float32)
  mask[0, [0, 5, 9, 63]] = 1
  mask[1, 10:30] = 1
  # The same images with the pixels inside masked patches changed: the encoder must not see them.
  noise = random_array((2, 8, 4, 8, 4, 3), seed=4) * 10 * mask.reshape(2, 8, 1, 8, 1, 1)
  changed = images + noise.reshape(2, 32, 32, 3)

  variables = random_variables(model, images, mask)

  @jax.jit
  def run(variables, images, changed, mask):
    both = model.apply(variables, jnp.concatenate([images, changed]), jnp.tile(mask, (2, 1)))
    return both, model.apply(variables, images)

  (out, aux), (plain_out, plain_aux) = jax.tree.map(np.asarray,
                                                    run(variables, images, changed, mask))
  token = variables["params"]["mask_token"]
  m = mask.astype(bool)
  assert token.shape == (1, 1, size.embed_dim)
  embed = aux["embed"][:2]
  np.testing.assert_array_equal(embed[m], np.broadcast_to(token[0], (m.sum(), size.embed_dim)))
  np.testing.assert_array_equal(embed[~m], plain_aux["embed"][~m])
  # The output does not depend on the pixels of masked patches at all, but does on the mask.
  np.testing.assert_array_equal(out[2:], out[:2])
  assert not np.allclose(out[:2], plain_out, atol=1e-3)
  assert plain_out.shape == (2, 16, 2 * size.embed_dim)
