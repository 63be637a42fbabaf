"""Encoder features of a whole (small) dataset, computed in sharded batches on the mesh."""

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax import sharding


class FeatureExtractor:
  """Runs `model.features` and returns aux[feature]. Compiled once, reused for any params."""

  def __init__(self, model: nn.Module, feature: str, mesh: jax.sharding.Mesh, batch_size: int):
    self.batch_size = max(mesh.size, batch_size - batch_size % mesh.size)
    self._fn: Callable = jax.jit(
        lambda p, x: model.apply({"params": p}, x, method=model.features)[feature],
        in_shardings=(None, sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh))

  def __call__(self, params, images: np.ndarray) -> np.ndarray:
    """[N, H, W, C] -> [N, D] float32. Every process passes the same images; the last batch is
    padded so a single compiled shape serves the whole dataset."""
    out = []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      pad = np.zeros((self.batch_size - len(chunk),) + chunk.shape[1:], chunk.dtype)
      out.append(np.asarray(self._fn(params, jnp.asarray(np.concatenate([chunk, pad]))))
                 [:len(chunk)])
    return np.concatenate(out).astype(np.float32)
