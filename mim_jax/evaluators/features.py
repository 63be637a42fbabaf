"""Encoder features of a whole (small) dataset, computed in sharded batches on the mesh.

Every evaluator names the feature it reads with a spec string (`config.eval.<evaluator>.feature`):

  'cls', 'gap'            the encoder's final, normed output: its cls token, or the mean of its
                          patch tokens (aux['cls'], aux['gap']);
  '<pool>@<layer>'        the same pooling of an intermediate [B, T, D] in the model's aux, e.g.
                          'gap@block_5' (block 5's pre-norm output [B, 1+N, D]) or 'gap@stage_2'
                          (Swin). A negative index counts from the end: 'cls@block_-1' is the
                          last block before the final norm, 'gap@block_-2' the one before it;
  'pixels'                the raw input: flattened images, or for audio the mean and standard
                          deviation of each log-mel bin over the utterance's real frames (the
                          baselines 'pixels' and 'logmel' that need no model);
  'logits', 'pre_logits'  a classifier's outputs (methods/finetune.py's aux), e.g. for top-1.

In a model whose aux has 'cls' (ViT, CRATE, ...), intermediates carry the cls token at index 0
and 'gap' averages the other tokens; in one without (Swin, Conformer), 'gap' averages every
token and 'cls' is an error. A model with padding (Conformer) puts its bool [B, T] 'valid' in
aux, and 'gap' then averages the real frames only.
"""

import re
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax import sharding
from mim_jax.data import logmel

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
  if "valid" in aux:
    return masked_mean(tokens, aux["valid"])
  return tokens.mean(axis=1)


def masked_mean(x: jax.Array, valid: jax.Array) -> jax.Array:
  """[B, T, D] averaged over the frames `valid` [B, T] marks -> [B, D]."""
  weight = valid.astype(x.dtype)[..., None]
  return (x * weight).sum(1) / jnp.maximum(weight.sum(1), 1)


def pixels(images: np.ndarray) -> np.ndarray:
  """[N, H, W, C] -> [N, H*W*C] float32: raw pixels as features."""
  return images.reshape(len(images), -1).astype(np.float32)


def logmel_stats(audio: np.ndarray, audio_len: np.ndarray, frontend: logmel.FrontEnd,
                 batch_size: int = 256) -> np.ndarray:
  """[N, L] waveforms -> [N, 2 * mels] float32: each log-mel bin's mean and standard deviation
  over the real frames, unnormalised (per-utterance normalisation would erase the mean)."""
  fe = frontend._replace(normalize="none")

  @jax.jit
  def stats(x, n):
    feats, valid = logmel.log_mel(x, n, fe)
    mean = masked_mean(feats, valid)
    var = masked_mean(jnp.square(feats - mean[:, None]), valid)
    return jnp.concatenate([mean, jnp.sqrt(var)], -1)

  return np.concatenate([np.asarray(stats(audio[i:i + batch_size], audio_len[i:i + batch_size]))
                         for i in range(0, len(audio), batch_size)])


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

    def fn(params, inputs):
      aux = model.apply({"params": params}, **inputs, method=model.features)
      return {spec: pool(aux, spec).astype(jnp.float32) for spec in self.specs}

    self._batch_sharding = sharding.batch_sharding(mesh)
    self._fn: Callable = jax.jit(fn, in_shardings=(None, self._batch_sharding),
                                 out_shardings=sharding.replicated(mesh))

  def __call__(self, params, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model's inputs, e.g. {'image': [N, H, W, C]} -> {spec: [N, D] float32}. Every
    process passes the same inputs; the last batch is padded so a single compiled shape serves
    the whole dataset."""
    out = {spec: [] for spec in self.specs}
    total = len(next(iter(inputs.values())))
    for start in range(0, total, self.batch_size):
      chunk = {k: v[start:start + self.batch_size] for k, v in inputs.items()}
      count = len(next(iter(chunk.values())))
      # Every process holds the whole batch and contributes the rows its devices own.
      batch = {k: self._place(np.concatenate(
          [v, np.zeros((self.batch_size - count,) + v.shape[1:], v.dtype)]))
          for k, v in chunk.items()}
      batch = jax.device_get(self._fn(params, batch))
      for spec in self.specs:
        out[spec].append(batch[spec][:count])
    return {spec: np.concatenate(v) for spec, v in out.items()}

  def _place(self, host: np.ndarray) -> jax.Array:
    return jax.make_array_from_callback(host.shape, self._batch_sharding, lambda i: host[i])
