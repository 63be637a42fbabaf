"""Vision Transformer encoder (Dosovitskiy et al. 2021) with fixed 2D sin-cos position embeddings
and a cls token, as used by MAE. It can encode only a subset of patches (`ids_keep`), which is
where MAE's speed comes from: the encoder never sees mask tokens. It can also restrict every
layer's keys and values to a subset of patches (`context_ids`, MP3's context)."""

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mim_jax.models import layer_loop
from mim_jax.models import layers


@dataclasses.dataclass(frozen=True)
class VitSize:
  width: int
  depth: int
  heads: int
  mlp_dim: int


# Widths/depths/heads from ViT (Dosovitskiy et al. 2021, table 1) and DeiT (Ti, S).
SIZES = {
    "Mu": VitSize(64, 2, 2, 256),  # Micro: not from a paper; for tests and CPU smoke runs.
    "Ti": VitSize(192, 12, 3, 768),
    "S": VitSize(384, 12, 6, 1536),
    "B": VitSize(768, 12, 12, 3072),
    "L": VitSize(1024, 24, 16, 4096),
    "H": VitSize(1280, 32, 16, 5120),
}


def parse_variant(variant: str) -> tuple[VitSize, int]:
  """'B/16' -> (SIZES['B'], 16). Raises ValueError naming the valid forms."""
  match = re.fullmatch(r"(\w+)/(\d+)", variant)
  if not match or match.group(1) not in SIZES:
    raise ValueError(f"unknown ViT variant {variant!r}: expected <size>/<patch> with size in "
                     f"{sorted(SIZES)} and an integer patch, e.g. 'B/16' or 'Ti/4'")
  return SIZES[match.group(1)], int(match.group(2))


class ViT(nn.Module):
  """ViT encoder. Returns (tokens, after the final norm unless final_norm=False; aux).

  Two ways to hide patches, for the two families of masked modeling:
    ids_keep [B, k]: encode only these patches (MAE); the others are dropped.
    token_mask [B, N] (1 = masked): every patch is encoded, masked ones replaced by a learned
      mask token before the position embedding is added (SimMIM, CRATE-MAE).
  context_ids [B, k] (patch indices, into the kept patches when ids_keep is given): every
    token is a query, but every layer's keys and values come from these patches and the cls
    token only (MP3); the k/v projections then run on those 1+k tokens.
  Position embeddings (`posemb`), added to the patches only (MAE gives cls none):
    'sincos': fixed 2D sin-cos (MAE's pretraining), not a parameter;
    'learned': a parameter 'pos_embedding' [1, N, D] initialised to the sin-cos table (MAE's
      fine-tuning learns its position embeddings from the pretrained ones); it is tied to the
      patch grid, and mim_jax/pretrained.py resamples it for another resolution;
    'none': no position embeddings (position prediction needs that).

  aux holds every block's output ('block_i'), 'cls' (the normed cls token) and 'gap' (the mean of
  the normed patch tokens), the two features linear probes and fine-tuning read.

  Fine-tuning options (methods/finetune.py sets them; the defaults are pretraining's encoder):
    drop_path: stochastic-depth rate of the last block (layers.Stack), applied only when called
      with train=True; it draws from the 'dropout' rng and adds no parameters.
    final_norm=False leaves out the final LayerNorm (and its parameters): MAE's fine-tuning with
      global average pooling normalises the pooled feature instead (its fc_norm). Then 'cls' and
      'gap' in aux are read from the un-normed last block.
  Memory and compile time (layers.Stack): `remat` names a layer_loop.REMAT_POLICIES policy
  (True / False: 'full' / 'none'); scan_layers=True runs the blocks as one scan, their
  parameters stored stacked (the same values; mim_jax/layer_layout.py converts layouts).
  """
  width: int
  depth: int
  heads: int
  mlp_dim: int
  patch: int
  exact_gelu: bool = True
  remat: bool | str = "none"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str | None = None
  posemb: str = "sincos"
  drop_path: float = 0.0
  final_norm: bool = True
  patch_init: layers.PatchInit = layers.xavier_patch_init  # MAE's; layers.PATCH_INITS.
  scan_layers: bool = False

  @nn.compact
  def __call__(self, images: jax.Array, ids_keep: jax.Array | None = None,
               token_mask: jax.Array | None = None, *, context_ids: jax.Array | None = None,
               train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    b, h, w, _ = images.shape
    x = layers.PatchEmbed(self.patch, self.width, self.dtype, self.param_dtype, self.patch_init,
                          name="patch_embed")(images)
    x = layers.embed_tokens(self, x, (h // self.patch, w // self.patch), self.posemb, ids_keep,
                            token_mask)
    kv_ids = None
    if context_ids is not None:  # Token 0 is cls, always in the context; patch i is token i+1.
      kv_ids = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), context_ids.astype(jnp.int32) + 1],
                               axis=1)
    x, aux = layers.Stack(self.depth, self.heads, self.mlp_dim, self.exact_gelu, self.remat,
                          self.dtype, self.param_dtype, self.attention_impl,
                          self.drop_path if train else 0.0, self.scan_layers,
                          name="blocks")(x, kv_ids)
    if self.final_norm:
      x = layers.layer_norm("norm", self.dtype, self.param_dtype)(x)
    aux["cls"] = x[:, 0]
    aux["gap"] = x[:, 1:].mean(axis=1)
    return x, aux


def build(config: ml_collections.ConfigDict) -> ViT:
  m = config.model
  size, patch = parse_variant(m.variant)
  return ViT(size.width, size.depth, size.heads, size.mlp_dim, patch,
             exact_gelu=m.exact_gelu, remat=layer_loop.policy_name(m.remat),
             dtype=layers.dtype(m.dtype), param_dtype=layers.dtype(m.param_dtype),
             attention_impl=layers.attention_impl(m.attention_impl), posemb=m.posemb,
             patch_init=layers.patch_init(m.patch_init), scan_layers=m.scan_layers)
