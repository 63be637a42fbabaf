"""Reconstruction grid PNG: one column per image, rows original / masked / reconstruction."""

import flax.linen as nn
import jax
import numpy as np
from PIL import Image


def denormalise(images: np.ndarray, mean, std) -> np.ndarray:
  """Normalised float [N, H, W, C] -> uint8, undoing the input normalisation."""
  x = images * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
  return (np.clip(x, 0.0, 1.0) * 255).round().astype(np.uint8)


def grid_image(rows: list[np.ndarray], scale: int, pad: int = 2) -> Image.Image:
  """Tiles rows of uint8 images [N, H, W, C] into one picture, upscaled by `scale`."""
  n, h, w, c = rows[0].shape
  canvas = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, c), 255, np.uint8)
  for r, row in enumerate(rows):
    for i, img in enumerate(row):
      y, x = pad + r * (h + pad), pad + i * (w + pad)
      canvas[y:y + h, x:x + w] = img
  picture = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
  return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


def write_png(path: str, model: nn.Module, params, images: np.ndarray, mean, std,
              rng: jax.Array) -> str:
  """Reconstructs `images` with a fresh mask and writes the grid to `path`."""
  out = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.reconstruct,
                                         rngs={"mask": rng}))(params, images)
  rows = [images, np.asarray(out["masked"]), np.asarray(out["pasted"])]
  rows = [denormalise(np.asarray(r), mean, std) for r in rows]
  scale = max(1, 128 // images.shape[1])  # tiny images (digits) are blown up to be visible
  grid_image(rows, scale).save(path)
  return path
