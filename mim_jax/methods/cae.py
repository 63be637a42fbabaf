"""Context Autoencoder (Chen et al. 2022, "Context Autoencoder for Self-Supervised
Representation Learning", arXiv:2202.03026).

Four parts, each with one job:
  encoder     the ViT, on the visible patches only (as in MAE);
  regressor   cross-attention blocks: learned mask queries at the masked positions attend to the
              visible latents and predict the latents of the masked patches;
  alignment   MSE between those predictions and the encoder's own latents of the masked patches
              (the encoder run on the masked patches alone, under stop_gradient);
  decoder     self-attention blocks over the predicted latents only (no visible tokens), then a
              linear head to the masked patches' targets.
Loss = reconstruction + align_weight * alignment, with align_weight 2 (the paper's lambda; the
official scripts' --align_loss_weight 2).

Facts taken from the paper and its public code (Atten4Vis/CAE), re-implemented here:
  - Regressor block: queries = the mask queries (a shared learned token) with the masked
    positions' embeddings added; keys = the visible latents concatenated with the current
    queries, with their position embeddings added; values = the same concatenation without
    position embeddings. Each of the three inputs has its own LayerNorm (the keys' without a
    bias: it would shift every key by one vector, which softmax ignores). Then the block goes
    x = q + g1 * CrossAttn(...), x = LN(x), x = x + g2 * MLP(x) (a norm before the MLP's
    residual branch *and* its skip, as the reference code does), with layer-scale g init 0.1.
    A final LayerNorm gives the predicted latents. The visible latents are never updated.
  - The cls token is dropped from the encoder output before regression and alignment.
  - Decoder: predicted latents + masked positions' sin-cos embeddings, pre-norm blocks with
    layer scale 0.1, a LayerNorm and a linear head.
  - Regressor/decoder width equals the encoder width in the paper (768 for ViT-B); when it
    differs (small models here), a linear projection + LayerNorm maps encoder latents, visible
    and target alike, to it (as the reference code allows).

Deviation: the paper's targets are DALL-E tokenizer ids (cross-entropy over 8192 codes). That
tokenizer cannot be downloaded here, so the decoder regresses per-patch normalised pixels of the
masked patches (MAE's norm_pix_loss) with MSE. The shared ViT has no layer scale (the paper's
encoder uses 0.1). Drop path (`method.drop_path`, 0.1 in CAE's scripts) applies to the encoder,
the alignment target's pass, the regressor and the decoder, each rising linearly over its
blocks.
"""

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mim_jax import flops
from mim_jax import masking
from mim_jax import models
from mim_jax.methods import mae
from mim_jax.models import layer_loop
from mim_jax.models import layers
from mim_jax.models import vit


class CrossAttention(nn.Module):
  """Multi-head attention of queries [B, n, D] over keys and values [B, m, D], with separate q,
  k, v projections. No key bias (it would add the same logit to every key of a query, so
  softmax ignores it; the CAE code leaves it out too)."""
  heads: int
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(self, queries: jax.Array, keys: jax.Array, values: jax.Array) -> jax.Array:
    b, n, d = queries.shape
    m = keys.shape[1]
    if d % self.heads:
      raise ValueError(f"width {d} is not divisible by heads {self.heads}")
    hd = d // self.heads
    dense = functools.partial(layers.dense, dtype=self.dtype, param_dtype=self.param_dtype)
    q = dense(d, "q")(queries).reshape(b, n, self.heads, hd)
    k = dense(d, "k", use_bias=False)(keys).reshape(b, m, self.heads, hd)
    v = dense(d, "v")(values).reshape(b, m, self.heads, hd)
    out = layers.dot_product_attention(q, k, v, implementation=self.implementation)
    return dense(d, "proj")(out.reshape(b, n, d))


class RegressorBlock(nn.Module):
  """One block of CAE's latent contextual regressor (see the module docstring)."""
  heads: int
  mlp_dim: int
  layer_scale: float = 0.1
  exact_gelu: bool = True
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  attention_impl: str | None = None
  drop_path: float = 0.0  # Stochastic depth of both residual branches ('dropout' rng).

  @nn.compact
  def __call__(self, queries: jax.Array, visible: jax.Array, pos_queries: jax.Array,
               pos_visible: jax.Array) -> jax.Array:
    norm = lambda name, use_bias=True: layers.layer_norm(name, self.dtype, self.param_dtype,
                                                         use_bias=use_bias)
    context = jnp.concatenate([visible, queries], axis=1)
    pos_context = jnp.concatenate([pos_visible, pos_queries], axis=1)
    attn = CrossAttention(self.heads, self.dtype, self.param_dtype, self.attention_impl,
                          name="cross_attn")(norm("norm_q")(queries + pos_queries),
                                             norm("norm_k", False)(context + pos_context),
                                             norm("norm_v")(context))
    def branch(name: str, y: jax.Array) -> jax.Array:
      y = layers.layer_scale(self, name, self.layer_scale, y)
      if self.drop_path > 0:
        y = layers.stochastic_depth(y, self.drop_path, self.make_rng("dropout"))
      return y

    x = norm("norm2")(queries + branch("gamma_1", attn))
    mlp = layers.Mlp(self.mlp_dim, self.exact_gelu, self.dtype, self.param_dtype, name="mlp")
    return x + branch("gamma_2", mlp(x))


# The decoder's block is the shared pre-norm self-attention block with layer scale:
# x + g1 Attn(LN(x)), then x + g2 MLP(LN(x)) (parameters norm1, attn, gamma_1, norm2, mlp, gamma_2).
DecoderBlock = layers.Block


class CAE(nn.Module):
  """CAE on a ViT encoder. Randomness comes from the 'mask' rng stream."""
  encoder: vit.ViT
  width: int                 # Regressor and decoder width (the paper: the encoder's).
  heads: int
  regressor_depth: int
  decoder_depth: int
  image_size: int
  channels: int
  mask_spec: masking.MaskSpec = masking.MaskSpec("block", 0.5)
  align_weight: float = 2.0
  layer_scale: float = 0.1
  norm_pix_loss: bool = True
  drop_path: float = 0.0     # Stochastic depth of the regressor's and decoder's last blocks.

  @property
  def grid(self) -> tuple[int, int]:
    side = self.image_size // self.encoder.patch
    return (side, side)

  def draw_mask(self, batch: int) -> masking.Mask:
    return masking.draw(self.make_rng("mask"), batch, self.grid, self.mask_spec)

  def to_width(self) -> Callable[[jax.Array], jax.Array]:
    """Maps encoder latents to self.width: the identity when the widths agree, else a linear
    projection and a LayerNorm (one pair of modules: call once per `predict`)."""
    enc = self.encoder
    if self.width == enc.width:
      return lambda x: x
    dense = layers.dense(self.width, "to_width", enc.dtype, enc.param_dtype)
    norm = nn.LayerNorm(epsilon=1e-6, dtype=enc.dtype, param_dtype=enc.param_dtype,
                        name="to_width_norm")
    return lambda x: norm(dense(x))

  def latents(self, images: jax.Array, ids: jax.Array, train: bool,
              to_width: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Encoder latents of the patches `ids` [B, k] (the cls token dropped), at self.width."""
    x, _ = self.encoder(images, ids, train=train)
    return to_width(x[:, 1:])

  @nn.compact
  def predict(self, images: jax.Array, train: bool = False) -> dict:
    """Draws a mask, encodes the visible patches, regresses the masked latents and decodes.
    With `train`, every block (encoder, alignment target, regressor, decoder) drops paths.

    Returns a dict: pixels [B, M, p*p*C] predicted for the M masked patches, latent_pred and
    latent_target [B, M, width], ids_masked [B, M] (the masked patches, in the order of the
    other arrays) and mask (the masking.Mask)."""
    enc = self.encoder
    b = images.shape[0]
    mask = self.draw_mask(b)
    num_keep = mask.ids_keep.shape[1]
    # ids_restore inverts the shuffle, so its argsort is the shuffle; the masked patches follow
    # the kept ones in it.
    ids_masked = jnp.argsort(mask.ids_restore, axis=1)[:, num_keep:].astype(jnp.int32)
    to_width = self.to_width()
    visible = self.latents(images, mask.ids_keep, train, to_width)
    # The alignment target: the same encoder on the masked patches alone, with no gradient
    # (the paper's stop-gradient on the target branch). It runs in training mode, drop path
    # included, as CAE's teacher (a copy of the encoder, momentum 0) runs under no_grad in a
    # model set to train().
    latent_target = jax.lax.stop_gradient(self.latents(images, ids_masked, train, to_width))

    dtype = enc.dtype
    pos = jnp.asarray(layers.sincos_posemb_2d(self.grid, self.width), dtype)
    pos_visible, pos_masked = pos[mask.ids_keep], pos[ids_masked]
    mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, self.width),
                            enc.param_dtype)
    queries = jnp.broadcast_to(mask_token.astype(dtype), pos_masked.shape)
    kw = dict(layer_scale=self.layer_scale, exact_gelu=enc.exact_gelu, dtype=enc.dtype,
              param_dtype=enc.param_dtype, attention_impl=enc.attention_impl)
    regressor_cls = layer_loop.remat(RegressorBlock, enc.remat)
    for i, rate in enumerate(layer_loop.drop_path_rates(self.drop_path if train else 0.0,
                                             self.regressor_depth)):
      queries = regressor_cls(self.heads, 4 * self.width, drop_path=rate, **kw,
                              name=f"regressor_{i}")(queries, visible, pos_masked, pos_visible)
    norm = lambda name: nn.LayerNorm(epsilon=1e-6, dtype=enc.dtype, param_dtype=enc.param_dtype,
                                     name=name)
    latent_pred = norm("regressor_norm")(queries)

    x = latent_pred + pos_masked
    decoder_cls = layer_loop.remat(DecoderBlock, enc.remat)
    for i, rate in enumerate(layer_loop.drop_path_rates(self.drop_path if train else 0.0,
                                             self.decoder_depth)):
      x = decoder_cls(self.heads, 4 * self.width, drop_path=rate, **kw, name=f"decoder_{i}")(x)
    pixels = layers.dense(enc.patch * enc.patch * self.channels, "head", enc.dtype,
                    enc.param_dtype)(norm("decoder_norm")(x))
    return {"pixels": pixels, "latent_pred": latent_pred, "latent_target": latent_target,
            "ids_masked": ids_masked, "mask": mask}

  def __call__(self, image: jax.Array, *, train: bool = True
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (loss, metrics) on a batch of images [B, H, W, C]."""
    p = self.predict(image, train)
    target = mae.patch_targets(image, self.encoder.patch, self.norm_pix_loss)
    target = jnp.take_along_axis(target, p["ids_masked"][..., None], axis=1)
    loss_rec = jnp.mean((p["pixels"].astype(jnp.float32) - target) ** 2)
    loss_align = jnp.mean((p["latent_pred"].astype(jnp.float32)
                           - p["latent_target"].astype(jnp.float32)) ** 2)
    loss = loss_rec + self.align_weight * loss_align
    return loss, {"loss": loss, "loss_rec": loss_rec, "loss_align": loss_align}

  def features(self, image: jax.Array) -> dict[str, jax.Array]:
    """Encoder features of the full, unmasked image (for probes and k-NN)."""
    _, aux = self.encoder(image)
    return aux

  def reconstruct(self, images: jax.Array) -> dict[str, jax.Array]:
    """Images for a reconstruction grid, from a fresh mask (see `reconstruction_images`)."""
    return reconstruction_images(images, self.predict(images), self.encoder.patch,
                                 self.norm_pix_loss)


def reconstruction_images(images: jax.Array, prediction: dict, patch: int, norm_pix: bool
                          ) -> dict[str, jax.Array]:
  """The masked input, the prediction (masked patches only, the visible ones black) and the
  prediction pasted over the visible patches, from CAE.predict's output. With norm_pix the
  prediction is un-normalised with the true patch statistics, as MAE's visualisation does."""
  b, h, w, c = images.shape
  target = layers.patchify(images.astype(jnp.float32), patch)
  ids = prediction["ids_masked"]
  pred = prediction["pixels"].astype(jnp.float32)
  if norm_pix:
    masked = jnp.take_along_axis(target, ids[..., None], axis=1)
    pred = (pred * jnp.sqrt(masked.var(-1, keepdims=True, ddof=1) + 1e-6)  # as patch_targets
            + masked.mean(-1, keepdims=True))
  full = jnp.zeros_like(target).at[jnp.arange(b)[:, None], ids].set(pred)
  m = prediction["mask"].mask[..., None]
  to_image = lambda x: layers.unpatchify(x, patch, (h // patch, w // patch), c)
  return {"masked": to_image(target * (1 - m)), "prediction": to_image(full),
          "pasted": to_image(target * (1 - m) + full)}


inputs = mae.inputs  # Images only.


def validate(config: ml_collections.ConfigDict) -> None:
  m = config.method
  grid = models.patch_grid(config, method="CAE (it encodes only the visible patches)",
                           supported=("vit",))
  masking.validate(config.mask, grid)
  for field in ("regressor_depth", "decoder_depth", "width", "heads"):
    if m[field] < 1:
      raise ValueError(f"method.{field} must be positive, got {m[field]}")
  if m.width % m.heads:
    raise ValueError(f"method.width {m.width} is not divisible by method.heads {m.heads}")
  if m.width % 4:
    raise ValueError(f"method.width {m.width} must be divisible by 4 (2D sin-cos positions)")
  if not 0 <= m.drop_path < 1:
    raise ValueError(f"method.drop_path must be in [0, 1), got {m.drop_path}")
  if m.align_weight < 0:
    raise ValueError(f"method.align_weight must be >= 0, got {m.align_weight}")


def build(config: ml_collections.ConfigDict) -> CAE:
  m = config.method
  # The encoder drops paths too, at the same rate, in training only (ViT applies it when called
  # with train=True; features() for the evaluators calls it without).
  encoder = models.build_encoder(config).clone(drop_path=m.drop_path)
  return CAE(encoder=encoder, width=m.width, heads=m.heads,
             regressor_depth=m.regressor_depth, decoder_depth=m.decoder_depth,
             image_size=config.image_size, channels=config.data.channels,
             mask_spec=masking.MaskSpec.from_config(config.mask), align_weight=m.align_weight,
             layer_scale=m.layer_scale, norm_pix_loss=m.norm_pix_loss, drop_path=m.drop_path)


def regressor_flops(queries: int, context: int, width: int, depth: int, mlp_dim: int) -> int:
  """Forward FLOPs of `depth` regressor blocks: `queries` tokens attend over `context` visible
  latents plus the queries themselves. Per block: q and output projections and the MLP on the
  queries; k and v projections on context + queries; q k^T and attention-weighted v."""
  keys = context + queries
  per_block = (2 * flops.dense(queries, width, width) + 2 * flops.dense(keys, width, width)
               + 2 * flops.dense(queries, width, mlp_dim) + 2 * 2 * queries * keys * width)
  return depth * per_block


def train_flops_per_example(config: ml_collections.ConfigDict) -> int:
  """Analytic training FLOPs of one image. Trained, so 3x forward: the patch embedding of all
  patches and the encoder on cls + visible patches, the projection to the regressor width (if
  any), the regressor, the decoder and the head. Forward only, 1x: the alignment target, i.e.
  the encoder (patch embedding of all patches again, as ViT embeds before gathering) on cls +
  masked patches and its projection; stop_gradient means no backward pass through it."""
  size, patch = vit.parse_variant(config.model.variant)
  m = config.method
  side = config.image_size // patch
  n = side * side
  keep = masking.num_kept(config.mask, (side, side))
  masked = n - keep
  patch_dim = patch * patch * config.data.channels

  def encoder(tokens: int) -> int:
    project = flops.dense(tokens, size.width, m.width) if m.width != size.width else 0
    return (flops.dense(n, patch_dim, size.width)
            + flops.transformer(1 + tokens, size.width, size.depth, size.mlp_dim) + project)

  trained = (encoder(keep)
             + regressor_flops(masked, keep, m.width, m.regressor_depth, 4 * m.width)
             + flops.transformer(masked, m.width, m.decoder_depth, 4 * m.width)
             + flops.dense(masked, m.width, patch_dim))
  return flops.TRAIN_MULTIPLIER * trained + encoder(masked)
