"""Tests of ColorMAE's coloured-noise masks (mim_jax/color_noise.py, masking.py): each colour's
masks put their power where its filter passes, the field is the filtered white noise, bad
widths are clear errors. (Every registered generator's exact count, its run
through every method and its training run on 8 fake devices: tests/test_mask_matrix.py.)"""

import jax
import numpy as np
import pytest

from configs import common
from configs import mae_vit
from conftest import MICRO_MAE
from mim_jax import color_noise
from mim_jax import config_validation
from mim_jax import masking

GRID = (14, 14)  # ViT-B/16 at 224 px, the grid ColorMAE pretrains on


def band_shares(name: str, count: int = 512) -> np.ndarray:
  """The shares of the masks' power (each mask less its mean) at low (|f| < 0.15 cycles per
  patch), middle (0.15 to 0.35) and high (> 0.35) spatial frequencies, over `count` masks."""
  spec = masking.MaskSpec.from_config(common.mask_config("random", 0.75), name)
  mask = jax.jit(lambda r: masking.draw(r, count, GRID, spec))(jax.random.key(0)).mask
  mask = np.asarray(mask).reshape((count,) + GRID)
  power = (np.abs(np.fft.fft2(mask - mask.mean(axis=(1, 2), keepdims=True))) ** 2).mean(0)
  f = np.hypot(*np.meshgrid(np.fft.fftfreq(GRID[0]), np.fft.fftfreq(GRID[1]), indexing="ij"))
  bands = [(f > 0) & (f < 0.15), (f >= 0.15) & (f < 0.35), f >= 0.35]
  return np.array([power[band].sum() for band in bands]) / power.sum()


def test_each_colour_puts_the_masks_power_where_its_filter_passes():
  """Against random (white) masks: measured low / middle / high shares 0.06 / 0.29 / 0.65 for
  random, 0.47 / 0.36 / 0.17 red, 0.03 / 0.19 / 0.78 blue, 0.06 / 0.41 / 0.54 green, 0.07 /
  0.21 / 0.73 purple (2048 masks each)."""
  (w_low, w_mid, w_high) = band_shares("random")
  red, blue, green, purple = (band_shares(f"{c}_noise") for c in color_noise.COLORS)
  assert red[0] > 4 * w_low and red[2] < 0.5 * w_high, red            # low-pass
  assert blue[2] > w_high + 0.08 and blue[0] < 0.8 * w_low, blue      # high-pass
  assert green[1] > 1.3 * w_mid and green[2] < w_high - 0.05, green   # band-pass
  assert purple[1] < 0.8 * w_mid, purple                              # band-stop


def test_the_field_is_the_filtered_white_noise_and_the_highest_patches_stay_visible():
  """The field equals white noise filtered by a direct convolution with the sampled Gaussian
  kernels (no FFT), away from the canvas edge; the visible patches are the field's highest.
  (Widths of at least a patch: a narrower sampled kernel is not a Gaussian's response.)"""
  rng, sigmas = jax.random.key(5), (1.0, 2.0)
  got = np.asarray(color_noise.field(rng, 2, GRID, "green", sigmas))
  pad = 6  # ceil(3 * 2.0)
  white = np.asarray(jax.random.normal(rng, (2, GRID[0] + 2 * pad, GRID[1] + 2 * pad)))

  def blur(x, s):
    t = np.arange(-pad, pad + 1)
    k = np.exp(-t ** 2 / (2 * s ** 2))
    k /= k.sum()
    x = np.apply_along_axis(lambda r: np.convolve(r, k, mode="same"), 1, x)
    return np.apply_along_axis(lambda r: np.convolve(r, k, mode="same"), 2, x)
  want = (blur(white, 1.0) - blur(white, 2.0))[:, pad:pad + GRID[0], pad:pad + GRID[1]]
  # The sampled kernel is cut at 3 stds and the response is the continuous Gaussian's: they
  # agree to a small share of the field's spread.
  np.testing.assert_allclose(got, want, atol=0.02 * want.std())

  spec = masking.MaskSpec("green_noise", 0.75, (("sigmas", sigmas),))
  m = masking.draw(rng, 2, GRID, spec)
  visible = np.asarray(m.mask).reshape(2, -1) == 0
  flat = got.reshape(2, -1)
  for row in range(2):
    assert flat[row][visible[row]].min() > flat[row][~visible[row]].max()


@pytest.mark.parametrize("name, sigmas, message", [
    ("green_noise", (1.5, 0.5), r"the green filter takes \(s1, s2\) with 0 < s1 < s2"),
    ("red_noise", (1.0, 2.0), r"the red filter takes \(s,\) with s > 0"),
    ("blue_noise", (0.0,), r"mask.blue_noise.sigmas \(0.0,\)"),
])
def test_bad_filter_widths_are_clear_errors(name, sigmas, message):
  config = mae_vit.get_config(MICRO_MAE)
  config.mask.name = name
  config.mask[name].sigmas = sigmas
  with pytest.raises(ValueError, match=message):
    config_validation.validate(config)
