"""Encoders, picked by `config.model.name`. Each returns `(output, aux)`."""

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from mim_jax.models import vit

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ATTENTION_IMPLS = ("auto", "xla", "cudnn")


def names() -> list[str]:
  return ["vit"]


def dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f"unknown dtype {name!r}; valid: {sorted(DTYPES)}")
  return DTYPES[name]


def build_encoder(config: ml_collections.ConfigDict) -> nn.Module:
  m = config.model
  if m.name != "vit":
    raise ValueError(f"unknown model {m.name!r}; valid: {names()}")
  if m.attention_impl not in ATTENTION_IMPLS:
    raise ValueError(f"unknown attention_impl {m.attention_impl!r}; valid: {ATTENTION_IMPLS}")
  size, patch = vit.parse_variant(m.variant)
  return vit.ViT(size.width, size.depth, size.heads, size.mlp_dim, patch,
                 exact_gelu=m.exact_gelu, remat=m.remat, dtype=dtype(m.dtype),
                 param_dtype=dtype(m.param_dtype),
                 attention_impl=None if m.attention_impl == "auto" else m.attention_impl)
