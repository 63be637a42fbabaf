"""Encoder features of a whole (small) dataset, computed in sharded batches on the mesh."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax import sharding


def extract(model: nn.Module, params, images: np.ndarray, feature: str,
            mesh: jax.sharding.Mesh, batch_size: int) -> np.ndarray:
  """Runs `model.features` over `images` [N, H, W, C] and returns aux[feature] as [N, D].

  Every process passes the same images; the last batch is padded to keep one compiled shape.
  """
  batch_size = max(mesh.size, batch_size - batch_size % mesh.size)
  fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.features)[feature],
               in_shardings=(None, sharding.batch_sharding(mesh)),
               out_shardings=sharding.replicated(mesh))
  out = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk),) + chunk.shape[1:],
                                             chunk.dtype)])
    out.append(np.asarray(fn(params, jnp.asarray(padded)))[:len(chunk)])
  return np.concatenate(out).astype(np.float32)
