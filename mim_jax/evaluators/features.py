"""Encoder features of a whole (small) dataset, computed in sharded batches on the mesh.

Every evaluator names the feature it reads with a spec string (`config.eval.<evaluator>.feature`):

  'cls', 'gap'            the encoder's final, normed output: its cls token, or the mean of its
                          patch tokens (aux['cls'], aux['gap']);
  '<pool>@<layer>'        the same pooling of an intermediate [B, T, D] in the model's aux, e.g.
                          'gap@block_5' (block 5's pre-norm output [B, 1+N, D]) or 'gap@stage_2'
                          (Swin). A negative index counts from the end: 'cls@block_-1' is the
                          last block before the final norm, 'gap@block_-2' the one before it;
  'pixels'                the flattened input images: the baseline that needs no model;
  'logits', 'pre_logits'  a classifier's outputs (methods/finetune.py's aux), e.g. for top-1.

In a model whose aux has 'cls' (ViT, CRATE, ...), intermediates carry the cls token at index 0
and 'gap' averages the other tokens; in one without (Swin), 'gap' averages every token and
'cls' is an error.
"""

import re
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax import sharding

PIXELS = "pixels"
POOLS = ("cls", "gap")
CLASSIFIER = ("logits", "pre_logits")
_LAYER = re.compile(r"^(\w+?)_(-?\d+)$")   # 'block_5', 'block_-1', 'stage_2'
_NAME = re.compile(r"^[A-Za-z]\w*?(_-\d+)?$")


def parse(spec: str) -> tuple[str, str | None]:
  """'gap@block_5' -> ('gap', 'block_5'); 'cls' -> ('cls', None). Raises ValueError on a
  malformed spec (the layer itself is checked against the model's aux when traced)."""
  pool, _, layer = spec.partition("@")
  if spec in (PIXELS,) + CLASSIFIER or (pool in POOLS and (not spec.count("@")
                                                           or _NAME.match(layer))):
    return pool, layer or None
  raise ValueError(f"bad feature {spec!r}: expected 'cls', 'gap', '<cls|gap>@<layer>' (e.g. "
                   f"'gap@block_5', 'cls@block_-1'), {PIXELS!r} or one of {CLASSIFIER}")


def resolve_layer(layer: str, aux: dict) -> str:
  """'block_-1' -> the last 'block_i' key of aux; other names are checked to exist."""
  m = _LAYER.match(layer)
  if m and int(m.group(2)) < 0:
    count = sum(1 for k in aux if re.fullmatch(rf"{m.group(1)}_\d+", k))
    index = count + int(m.group(2))
    layer = f"{m.group(1)}_{index}" if index >= 0 else layer
  if layer not in aux or getattr(aux[layer], "ndim", 0) != 3:
    layers = sorted(k for k, v in aux.items() if getattr(v, "ndim", 0) == 3)
    raise ValueError(f"no [B, T, D] intermediate {layer!r} in the model's aux; it has {layers}")
  return layer


def pool(aux: dict[str, jax.Array], spec: str) -> jax.Array:
  """The [B, D] feature `spec` from a model's aux dict (see the module docstring)."""
  pooling, layer = parse(spec)
  if spec == PIXELS:
    raise ValueError("'pixels' is the images themselves, not an encoder feature")
  if layer is None:
    if pooling not in aux:
      raise ValueError(f"the model's aux has no {pooling!r}; it has {sorted(aux)}")
    return aux[pooling]
  tokens = aux[resolve_layer(layer, aux)]
  if "cls" in aux:  # the cls token is token 0 of every intermediate
    return tokens[:, 0] if pooling == "cls" else tokens[:, 1:].mean(axis=1)
  if pooling == "cls":
    raise ValueError(f"{spec!r}: this model has no cls token; use 'gap@{layer}'")
  return tokens.mean(axis=1)


def pixels(images: np.ndarray) -> np.ndarray:
  """[N, H, W, C] -> [N, H*W*C] float32: raw pixels as features."""
  return images.reshape(len(images), -1).astype(np.float32)


class FeatureExtractor:
  """Runs `model.features` once per batch and returns every requested feature spec.
  Compiled once, reused for any params (pretrained, random init, every periodic eval)."""

  def __init__(self, model: nn.Module, specs: Sequence[str], mesh: jax.sharding.Mesh,
               batch_size: int):
    self.specs = tuple(specs)
    for spec in self.specs:
      if parse(spec)[0] == PIXELS:
        raise ValueError("'pixels' needs no extractor: use features.pixels(images)")
    self.batch_size = max(mesh.size, batch_size - batch_size % mesh.size)

    def fn(params, images):
      aux = model.apply({"params": params}, images, method=model.features)
      return {spec: pool(aux, spec).astype(jnp.float32) for spec in self.specs}

    self._batch_sharding = sharding.batch_sharding(mesh)
    self._fn: Callable = jax.jit(fn, in_shardings=(None, self._batch_sharding),
                                 out_shardings=sharding.replicated(mesh))

  def __call__(self, params, images: np.ndarray) -> dict[str, np.ndarray]:
    """[N, H, W, C] -> {spec: [N, D] float32}. Every process passes the same images; the last
    batch is padded so a single compiled shape serves the whole dataset."""
    out = {spec: [] for spec in self.specs}
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      pad = np.zeros((self.batch_size - len(chunk),) + chunk.shape[1:], chunk.dtype)
      host = np.concatenate([chunk, pad])
      # Every process holds the whole batch and contributes the rows its devices own.
      batch = jax.make_array_from_callback(host.shape, self._batch_sharding, lambda i: host[i])
      batch = jax.device_get(self._fn(params, batch))
      for spec in self.specs:
        out[spec].append(batch[spec][:len(chunk)])
    return {spec: np.concatenate(v) for spec, v in out.items()}
