"""MAE's lightweight decoder (He et al. 2021, sec. 3): embed the visible latents, put a shared
learned mask token at every masked position, add fixed sin-cos position embeddings, run a narrow
transformer and predict each patch's pixels."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mim_jax.models import layers


class MAEDecoder(nn.Module):
  """Maps encoder output [B, 1+k, D] and ids_restore [B, N] to patch predictions [B, N, out_dim].
  With ids_restore None the encoder saw every position ([B, 1+N, D], in patch order, masked
  patches as mask tokens): no mask token is inserted here. `remat` and `scan_layers` as in
  layers.Stack."""
  width: int
  depth: int
  heads: int
  mlp_dim: int
  grid: tuple[int, int]
  out_dim: int
  exact_gelu: bool = True
  remat: bool | str = "none"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str | None = None
  scan_layers: bool = False

  @nn.compact
  def __call__(self, latent: jax.Array, ids_restore: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    x = layers.dense(self.width, "embed", self.dtype, self.param_dtype)(latent)
    if ids_restore is not None:
      x = layers.insert_mask_tokens(x, layers.mask_token(self, self.width), ids_restore)
    x = x + jnp.asarray(layers.sincos_posemb_2d(self.grid, self.width, with_cls=True),
                        self.dtype)[None]
    x, aux = layers.Stack(self.depth, self.heads, self.mlp_dim, self.exact_gelu, self.remat,
                          self.dtype, self.param_dtype, self.attention_impl,
                          scan_layers=self.scan_layers, name="blocks")(x)
    x = layers.layer_norm("norm", self.dtype, self.param_dtype)(x)
    return layers.dense(self.out_dim, "pred", self.dtype, self.param_dtype)(x)[:, 1:], aux
