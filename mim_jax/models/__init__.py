"""Encoders, picked by `config.model.name`. Each returns `(output, aux)`, aux holding named
intermediates ('block_i', pooled features) that evaluators read.

An encoder file defines `build(config) -> flax module`; register it in `ENCODERS`.
"""

import flax.linen as nn
import ml_collections

from mim_jax.models import conformer
from mim_jax.models import crate
from mim_jax.models import swin
from mim_jax.models import vit
# The config-name lookups live in layers, the models' floor; callers above it use them from here.
from mim_jax.models.layers import attention_impl, dtype
from mim_jax.registry import Registry

__all__ = ["ENCODERS", "attention_impl", "build_encoder", "dtype", "names", "patch_grid"]

ENCODERS = Registry("model", {"conformer": conformer.build, "crate": crate.build,
                              "swin": swin.build, "vit": vit.build})


def names() -> list[str]:
  """The valid `config.model.name` values, sorted."""
  return ENCODERS.names()


def build_encoder(config: ml_collections.ConfigDict) -> nn.Module:
  """The encoder `config.model.name` names, built from `config`."""
  return ENCODERS[config.model.name](config)


def patch_grid(config: ml_collections.ConfigDict, *, method: str,
               supported: tuple[str, ...]) -> tuple[int, int]:
  """The patch grid of the config's encoder at `config.image_size`. Raises ValueError, naming
  `method`, when it cannot run on `config.model.name` (not in `supported`), or when the image
  does not tile into the encoder's patches."""
  if config.model.name not in supported:
    need = repr(supported[0]) if len(supported) == 1 else f"one of {supported}"
    raise ValueError(f"{method} needs model.name {need}, got {config.model.name!r}")
  patch = build_encoder(config).patch
  if config.image_size % patch:
    raise ValueError(f"image_size {config.image_size} is not divisible by the patch size "
                     f"{patch} of variant {config.model.variant!r}")
  side = config.image_size // patch
  return (side, side)
