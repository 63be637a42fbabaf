"""Masked position prediction, MP3 (Zhai et al. 2022, "Position Prediction as an Effective
Pretraining Strategy").

The encoder is a ViT with no position embedding, so it only knows what each patch looks like.
Each output token is classified among all N patch positions by a linear head, with
cross-entropy. Done with every patch attending to every other, the task is solved from low-level
cues along patch borders, so MP3 draws a random subset of "context" patches (the masking family:
`masking.GENERATORS`, ratio 0.75 by default) and, in every attention layer, lets the queries of
all patches attend to keys and values of the context patches only. A non-context patch is then
never seen by any other token: it must be placed from the context alone. Attention costs
N x k instead of N x N, and the key/value projections run on the k context tokens only.

The cls token (kept so the parameter tree is exactly `vit.ViT(posemb='none')`'s, which a
fine-tuning run then extends with position embeddings) is always part of the context and has no
position target. For probes, `features` runs the same encoder with full attention.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mim_jax import flops
from mim_jax import masking
from mim_jax import models
from mim_jax.models import layers
from mim_jax.models import vit


class ContextQKV(nn.Module):
  """The fused qkv projection of `layers.Attention`, with the same parameters ('kernel' [d, 3d],
  'bias' [3d], initialised like nn.Dense(3d)), applied as two matmuls: queries from every token
  `x` [B, N, d], keys and values from the context tokens `context` [B, k, d] only."""
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    d = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.xavier_uniform(), (d, 3 * d),
                        self.param_dtype).astype(self.dtype)
    bias = self.param("bias", nn.initializers.zeros, (3 * d,), self.param_dtype).astype(self.dtype)
    q = x.astype(self.dtype) @ kernel[:, :d] + bias[:d]
    kv = context.astype(self.dtype) @ kernel[:, d:] + bias[d:]
    return q, kv[..., :d], kv[..., d:]


class ContextAttention(nn.Module):
  """Multi-head attention whose keys and values come from the tokens `kv_ids` [B, k] only
  (all tokens when None); every token is a query. Parameters as `layers.Attention`."""
  heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, kv_ids: jax.Array | None = None) -> jax.Array:
    b, n, d = x.shape
    if d % self.heads:
      raise ValueError(f"width {d} is not divisible by heads {self.heads}")
    context = x if kv_ids is None else jnp.take_along_axis(x, kv_ids[..., None], axis=1)
    q, k, v = ContextQKV(self.dtype, self.param_dtype, name="qkv")(x, context)
    split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, d // self.heads)
    out = jax.nn.dot_product_attention(split(q), split(k), split(v),
                                       implementation=self.implementation)
    return nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=nn.initializers.xavier_uniform(), name="proj")(out.reshape(b, n, d))


class ContextBlock(nn.Module):
  """`layers.Block` (pre-norm, same parameter names) with key/value-restricted attention."""
  heads: int
  mlp_dim: int
  exact_gelu: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, kv_ids: jax.Array | None = None) -> jax.Array:
    norm = lambda name: nn.LayerNorm(epsilon=1e-6, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)
    x = x + ContextAttention(self.heads, self.dtype, self.param_dtype, self.attention_impl,
                             name="attn")(norm("norm1")(x), kv_ids)
    x = x + layers.Mlp(self.mlp_dim, self.exact_gelu, self.dtype, self.param_dtype,
                       name="mlp")(norm("norm2")(x))
    return x


class ContextStack(nn.Module):
  """`layers.Stack` of ContextBlocks: every block restricts keys/values to the same `kv_ids`."""
  depth: int
  heads: int
  mlp_dim: int
  exact_gelu: bool = True
  remat: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, kv_ids: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    block_cls = nn.remat(ContextBlock) if self.remat else ContextBlock
    aux = {}
    for i in range(self.depth):
      x = block_cls(self.heads, self.mlp_dim, self.exact_gelu, self.dtype, self.param_dtype,
                    self.attention_impl, name=f"block_{i}")(x, kv_ids)
      aux[f"block_{i}"] = x
    return x, aux


class ContextViT(nn.Module):
  """ViT without position embeddings whose attention can be restricted to context patches.

  With `context_ids=None` it is `vit.ViT(posemb='none')`: same parameter tree, same init, same
  outputs. With `context_ids` [B, k] (patch indices in 0..N-1), every layer's keys and values
  come from those patches and the cls token. Returns (tokens after the final norm [B, 1+N, D],
  aux with 'block_i', 'cls' and 'gap' as in vit.ViT).
  """
  width: int
  depth: int
  heads: int
  mlp_dim: int
  patch: int
  exact_gelu: bool = True
  remat: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, images: jax.Array, context_ids: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    b = images.shape[0]
    x = layers.PatchEmbed(self.patch, self.width, self.dtype, self.param_dtype,
                          name="patch_embed")(images)
    cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, self.width), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.width)), x], 1)
    kv_ids = None
    if context_ids is not None:  # Token 0 is cls, so patch i is token i + 1.
      kv_ids = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), context_ids.astype(jnp.int32) + 1], 1)
    x, aux = ContextStack(self.depth, self.heads, self.mlp_dim, self.exact_gelu, self.remat,
                          self.dtype, self.param_dtype, self.attention_impl,
                          name="blocks")(x, kv_ids)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="norm")(x)
    aux["cls"] = x[:, 0]
    aux["gap"] = x[:, 1:].mean(axis=1)
    return x, aux


class PositionPrediction(nn.Module):
  """MP3 on a ContextViT. Randomness (the context draw) comes from the 'mask' rng stream."""
  encoder: ContextViT
  image_size: int
  mask_ratio: float = 0.75
  mask_fn: str = "random"

  @property
  def grid(self) -> tuple[int, int]:
    side = self.image_size // self.encoder.patch
    return (side, side)

  @property
  def num_positions(self) -> int:
    return self.grid[0] * self.grid[1]

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = True
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (loss, metrics): the mean cross-entropy of every patch's position, and the
    top-1 position accuracy over all patches, the context patches and the hidden ones."""
    del train  # No dropout; kept for the method interface.
    mask = masking.get(self.mask_fn)(self.make_rng("mask"), images.shape[0], self.grid,
                                     self.mask_ratio)
    tokens, _ = self.encoder(images, mask.ids_keep)
    logits = nn.Dense(self.num_positions, dtype=self.encoder.dtype,
                      param_dtype=self.encoder.param_dtype, name="head")(tokens[:, 1:])
    logits = logits.astype(jnp.float32)
    labels = jnp.broadcast_to(jnp.arange(self.num_positions), logits.shape[:2])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    correct = (logits.argmax(-1) == labels).astype(jnp.float32)
    hidden = mask.mask  # 1 = not in the context
    return loss, {
        "loss": loss,
        "position_accuracy": correct.mean(),
        "position_accuracy_context": (correct * (1 - hidden)).sum() / (1 - hidden).sum(),
        "position_accuracy_hidden": (correct * hidden).sum() / hidden.sum(),
    }

  def features(self, images: jax.Array) -> dict[str, jax.Array]:
    """Encoder features of the full image with full attention (for probes and k-NN)."""
    _, aux = self.encoder(images)
    return aux


# ---------------------------------------------------------------------------------------------
# Config: build, validate, FLOPs.
# ---------------------------------------------------------------------------------------------

def build(config: ml_collections.ConfigDict) -> PositionPrediction:
  m = config.model
  size, patch = vit.parse_variant(m.variant)
  encoder = ContextViT(size.width, size.depth, size.heads, size.mlp_dim, patch,
                       exact_gelu=m.exact_gelu, remat=m.remat, dtype=models.dtype(m.dtype),
                       param_dtype=models.dtype(m.param_dtype),
                       attention_impl=models.attention_impl(m.attention_impl))
  return PositionPrediction(encoder, image_size=config.image_size,
                            mask_ratio=config.method.mask_ratio, mask_fn=config.method.mask)


def validate(config: ml_collections.ConfigDict) -> None:
  if config.model.name != "vit":
    raise ValueError(f"position prediction runs a ViT without position embeddings, which needs "
                     f"model.name 'vit', got {config.model.name!r}")
  size, patch = vit.parse_variant(config.model.variant)
  if config.image_size % patch:
    raise ValueError(f"image_size {config.image_size} is not divisible by the patch size "
                     f"{patch} of variant {config.model.variant!r}")
  if size.width % size.heads:
    raise ValueError(f"width {size.width} is not divisible by heads {size.heads}")
  masking.num_visible((config.image_size // patch) ** 2, config.method.mask_ratio)
  masking.get(config.method.mask)


def context_transformer(tokens: int, context: int, width: int, depth: int, mlp_dim: int) -> int:
  """Forward FLOPs of `depth` ContextBlocks: queries, output projection and MLP on all `tokens`,
  keys and values on the `context` tokens, q k^T and the weighted sum of v over tokens x context.
  With context == tokens it is `flops.transformer`."""
  per_block = (flops.dense(tokens, width, width) + flops.dense(context, width, 2 * width)
               + flops.dense(tokens, width, width) + 2 * flops.dense(tokens, width, mlp_dim)
               + 2 * 2 * tokens * context * width)
  return depth * per_block


def train_flops_per_example(config: ml_collections.ConfigDict) -> int:
  """Analytic training FLOPs of one image: patch embedding, the encoder on the cls token plus
  every patch with keys/values from the cls token plus the context patches, the position head
  on every patch, times 3 for training."""
  size, patch = vit.parse_variant(config.model.variant)
  n = (config.image_size // patch) ** 2
  context = 1 + masking.num_visible(n, config.method.mask_ratio)
  forward = (flops.dense(n, patch * patch * config.data.channels, size.width)
             + context_transformer(n + 1, context, size.width, size.depth, size.mlp_dim)
             + flops.dense(n, size.width, n))
  return flops.TRAIN_MULTIPLIER * forward
