"""Pretraining objectives, one file each, picked by `config.method.name`.

A method is a flax module whose `__call__(images, train=...)` returns `(loss, metrics)` and that
draws its own randomness from the 'mask' (and 'dropout') rng streams. It also offers
`features(images) -> aux` for evaluators and `reconstruct(images) -> dict of images` for grids.
The trainer knows nothing else about it.
"""

import ml_collections
import flax.linen as nn

from mim_jax import models
from mim_jax.methods import mae

# name -> (build(config, encoder) -> module, train_flops_per_example(config) -> int)
_METHODS = {
    "mae": (mae.build, mae.train_flops_per_example),
}


def names() -> list[str]:
  return sorted(_METHODS)


def _get(config: ml_collections.ConfigDict):
  if config.method.name not in _METHODS:
    raise ValueError(f"unknown method {config.method.name!r}; valid: {names()}")
  return _METHODS[config.method.name]


def build(config: ml_collections.ConfigDict) -> nn.Module:
  """The method module for `config`, around the encoder `config.model` names."""
  return _get(config)[0](config, models.build_encoder(config))


def train_flops_per_example(config: ml_collections.ConfigDict) -> int:
  """Analytic training FLOPs per example, counted from the architecture."""
  return _get(config)[1](config)
