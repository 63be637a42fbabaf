"""Pretraining objectives, one file each, picked by `config.method.name`.

A method file defines three functions:
  build(config) -> flax module whose `__call__(images, train=...)` returns `(loss, metrics)`,
      drawing its randomness from the 'mask' (and 'dropout') rng streams. It also offers
      `features(images) -> aux` for evaluators and, where it reconstructs pixels,
      `reconstruct(images) -> dict of images` for the PNG grid;
  train_flops_per_example(config) -> int, the analytic training FLOPs of one example;
  validate(config) -> None, raising ValueError on a config the method cannot run.
The trainer knows nothing else about a method.
"""

from types import ModuleType

import flax.linen as nn
import ml_collections

from mim_jax.methods import cae
from mim_jax.methods import crate_mae
from mim_jax.methods import mae
from mim_jax.methods import position
from mim_jax.methods import simmim

_METHODS: dict[str, ModuleType] = {
    "cae": cae,
    "crate_mae": crate_mae,
    "mae": mae,
    "position": position,
    "simmim": simmim,
}


def names() -> list[str]:
  return sorted(_METHODS)


def get(name: str) -> ModuleType:
  if name not in _METHODS:
    raise ValueError(f"unknown method {name!r}; valid: {names()}")
  return _METHODS[name]


def build(config: ml_collections.ConfigDict) -> nn.Module:
  return get(config.method.name).build(config)


def train_flops_per_example(config: ml_collections.ConfigDict) -> int:
  """Analytic training FLOPs per example, counted from the architecture."""
  return get(config.method.name).train_flops_per_example(config)


def validate(config: ml_collections.ConfigDict) -> None:
  get(config.method.name).validate(config)
