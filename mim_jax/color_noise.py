"""Coloured noise over the patch grid: ColorMAE's mask scores (Hinojosa et al. 2024, "ColorMAE:
Exploring data-independent masking strategies in Masked AutoEncoders", sec. 3).

ColorMAE filters white noise W with Gaussian blurs G_s and keeps the patches where the filtered
noise is highest (masking.py turns these fields into masks):
  red    (low-pass)   G_s * W
  blue   (high-pass)  W - G_s * W
  green  (band-pass)  G_s1 * W - G_s2 * W,  s1 < s2
  purple (band-stop)  W - (G_s1 * W - G_s2 * W)

The authors ship precomputed 2-D patterns, randomly cropped and flipped per image; here each
field is drawn on the device inside the jitted step instead: white noise on a canvas wider than
the grid by 3 of the widest blur's standard deviations on every side, filtered by multiplying its
2-D FFT by the filter's frequency response (a Gaussian blur of std s patches has the response
exp(-2 pi^2 s^2 |f|^2), f in cycles per patch), and the grid cut from the middle, where the
FFT's circular wrap-around does not reach. Same statistics as a crop of a large pattern, no
file to download, and a fresh field for every image of every step.
"""

import math

import jax
import jax.numpy as jnp

COLORS = ("red", "blue", "green", "purple")


def gaussian_response(sigma: float, shape: tuple[int, int]) -> jax.Array:
  """The frequency response [H, W] of a Gaussian blur of std `sigma` (in grid cells) on a
  canvas of `shape`, laid out as jnp.fft.fft2's frequencies."""
  fy = jnp.fft.fftfreq(shape[0])[:, None]
  fx = jnp.fft.fftfreq(shape[1])[None, :]
  return jnp.exp(-2.0 * math.pi ** 2 * sigma ** 2 * (fy ** 2 + fx ** 2))


def response(color: str, sigmas: tuple[float, ...], shape: tuple[int, int]) -> jax.Array:
  """The colour's filter (module docstring) as a frequency response on a canvas of `shape`.
  `sigmas` is (s,) for red and blue, (s1, s2) with s1 < s2 for green and purple."""
  if color in ("red", "blue"):
    low = gaussian_response(sigmas[0], shape)
    return low if color == "red" else 1.0 - low
  band = gaussian_response(sigmas[0], shape) - gaussian_response(sigmas[1], shape)
  return band if color == "green" else 1.0 - band


def check(color: str, sigmas: tuple[float, ...]) -> None:
  """Raises ValueError naming the bad value: an unknown colour, or widths that are not what
  the colour takes."""
  if color not in COLORS:
    raise ValueError(f"unknown noise colour {color!r}; valid: {list(COLORS)}")
  count = 1 if color in ("red", "blue") else 2
  if (len(sigmas) != count or any(s <= 0 for s in sigmas)
      or (count == 2 and not sigmas[0] < sigmas[1])):
    want = "(s,) with s > 0" if count == 1 else "(s1, s2) with 0 < s1 < s2"
    raise ValueError(f"mask.{color}_noise.sigmas {tuple(sigmas)}: the {color} filter takes {want}, "
                     f"in patches")


def field(rng: jax.Array, batch: int, grid: tuple[int, int], color: str,
          sigmas: tuple[float, ...]) -> jax.Array:
  """`batch` fields [batch, H, W] of `color` noise over the patch grid (module docstring)."""
  check(color, sigmas)
  pad = math.ceil(3 * max(sigmas))
  canvas = (grid[0] + 2 * pad, grid[1] + 2 * pad)
  white = jax.random.normal(rng, (batch,) + canvas)
  filtered = jnp.fft.ifft2(jnp.fft.fft2(white) * response(color, sigmas, canvas)).real
  return filtered[:, pad:pad + grid[0], pad:pad + grid[1]]
