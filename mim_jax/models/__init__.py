"""Encoders, picked by `config.model.name`. Each returns `(output, aux)`, aux holding named
intermediates ('block_i', pooled features) that evaluators read.

An encoder file defines `build(config) -> flax module`; register it in `_BUILDERS`.
"""

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from mim_jax.models import crate
from mim_jax.models import swin
from mim_jax.models import vit

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ATTENTION_IMPLS = ("auto", "xla", "cudnn")

_BUILDERS: dict[str, Callable[[ml_collections.ConfigDict], nn.Module]] = {
    "crate": crate.build,
    "swin": swin.build,
    "vit": vit.build,
}


def names() -> list[str]:
  return sorted(_BUILDERS)


def dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f"unknown dtype {name!r}; valid: {sorted(DTYPES)}")
  return DTYPES[name]


def attention_impl(name: str) -> str | None:
  """Config value -> `jax.nn.dot_product_attention` implementation (None lets JAX choose)."""
  if name not in ATTENTION_IMPLS:
    raise ValueError(f"unknown attention_impl {name!r}; valid: {ATTENTION_IMPLS}")
  return None if name == "auto" else name


def build_encoder(config: ml_collections.ConfigDict) -> nn.Module:
  if config.model.name not in _BUILDERS:
    raise ValueError(f"unknown model {config.model.name!r}; valid: {names()}")
  return _BUILDERS[config.model.name](config)
