"""MAE's lightweight decoder (He et al. 2021, sec. 3): embed the visible latents, put a shared
learned mask token at every masked position, add fixed sin-cos position embeddings, run a narrow
transformer and predict each patch's pixels."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mim_jax.models import layers


def insert_mask_tokens(x: jax.Array, mask_token: jax.Array, ids_restore: jax.Array) -> jax.Array:
  """[B, 1+k, D] (cls, then the visible tokens in shuffled order) -> [B, 1+N, D] in patch order,
  with `mask_token` [1, 1, D] at every masked position."""
  b, n = ids_restore.shape
  visible = x[:, 1:]
  fill = jnp.broadcast_to(mask_token, (b, n - visible.shape[1], x.shape[-1]))
  # Visible tokens first, then mask tokens: this is the shuffled order, so one gather with
  # ids_restore puts every token back at its patch position.
  x_full = jnp.take_along_axis(jnp.concatenate([visible, fill], 1), ids_restore[..., None], 1)
  return jnp.concatenate([x[:, :1], x_full], 1)


class MAEDecoder(nn.Module):
  """Maps encoder output [B, 1+k, D] and ids_restore [B, N] to patch predictions [B, N, out_dim].
  With ids_restore None the encoder saw every position ([B, 1+N, D], in patch order, masked
  patches as mask tokens): no mask token is inserted here."""
  width: int
  depth: int
  heads: int
  mlp_dim: int
  grid: tuple[int, int]
  out_dim: int
  exact_gelu: bool = True
  remat: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, latent: jax.Array, ids_restore: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    dense = lambda features, name: nn.Dense(
        features, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(), name=name)
    x = dense(self.width, "embed")(latent)
    if ids_restore is not None:
      mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, self.width),
                              self.param_dtype)
      x = insert_mask_tokens(x, mask_token.astype(self.dtype), ids_restore)
    x = x + jnp.asarray(layers.sincos_posemb_2d(self.grid, self.width, with_cls=True),
                        self.dtype)[None]
    x, aux = layers.Stack(self.depth, self.heads, self.mlp_dim, self.exact_gelu, self.remat,
                          self.dtype, self.param_dtype, self.attention_impl, name="blocks")(x)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="norm")(x)
    return dense(self.out_dim, "pred")(x)[:, 1:], aux
