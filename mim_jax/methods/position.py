"""Masked position prediction, MP3 (Zhai et al. 2022, "Position Prediction as an Effective
Pretraining Strategy").

The encoder is a ViT with no position embedding, so it only knows what each patch looks like.
Each output token is classified among all N patch positions by a linear head, with
cross-entropy. Done with every patch attending to every other, the task is solved from low-level
cues along patch borders, so MP3 draws a random subset of "context" patches (the masking family:
`config.mask`, uniform with ratio 0.75 by default) and, in every attention layer, lets the queries of
all patches attend to keys and values of the context patches only. A non-context patch is then
never seen by any other token: it must be placed from the context alone. Attention costs
N x k instead of N x N, and the key/value projections run on the k context tokens only.

The encoder is the shared `vit.ViT(posemb='none')` called with `context_ids`, so a pretrained
MP3 encoder is a plain ViT that a fine-tuning run extends with position embeddings. Its cls token
is always part of the context and has no position target. For probes, `features` runs the same
encoder with full attention.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mim_jax import flops
from mim_jax import masking
from mim_jax import models
from mim_jax.methods import mae
from mim_jax.models import layers
from mim_jax.models import vit


class PositionPrediction(nn.Module):
  """MP3 on a ViT without position embeddings. Randomness (the context draw) comes from the
  'mask' rng stream; `train` switches the encoder's drop path (if any) on."""
  encoder: vit.ViT
  image_size: int
  mask_spec: masking.MaskSpec = masking.MaskSpec("random", 0.75)

  @property
  def grid(self) -> tuple[int, int]:
    side = self.image_size // self.encoder.patch
    return (side, side)

  @property
  def num_positions(self) -> int:
    return self.grid[0] * self.grid[1]

  @nn.compact
  def __call__(self, image: jax.Array, *, train: bool = True
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (loss, metrics): the mean cross-entropy of every patch's position, and the
    top-1 position accuracy over all patches, the context patches and the hidden ones."""
    mask = masking.draw(self.make_rng("mask"), image.shape[0], self.grid, self.mask_spec)
    tokens, _ = self.encoder(image, context_ids=mask.ids_keep, train=train)
    logits = layers.Dense(self.num_positions, dtype=self.encoder.dtype,
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

  def features(self, image: jax.Array) -> dict[str, jax.Array]:
    """Encoder features of the full image with full attention (for probes and k-NN)."""
    _, aux = self.encoder(image)
    return aux


# ---------------------------------------------------------------------------------------------
# Config: build, validate, FLOPs.
# ---------------------------------------------------------------------------------------------

def build(config: ml_collections.ConfigDict) -> PositionPrediction:
  return PositionPrediction(models.build_encoder(config), image_size=config.image_size,
                            mask_spec=masking.MaskSpec.from_config(config.mask))


inputs = mae.inputs  # Images only.


def validate(config: ml_collections.ConfigDict) -> None:
  grid = models.patch_grid(config, method="position prediction", supported=("vit",))
  if config.model.posemb != "none":
    raise ValueError(f"position prediction needs an encoder without position embeddings "
                     f"(model.posemb 'none'), got {config.model.posemb!r}")
  size, _ = vit.parse_variant(config.model.variant)
  if size.width % size.heads:
    raise ValueError(f"width {size.width} is not divisible by heads {size.heads}")
  masking.validate(config.mask, grid)


def train_flops_per_example(config: ml_collections.ConfigDict) -> int:
  """Analytic training FLOPs of one image: patch embedding, the encoder on the cls token plus
  every patch with keys/values from the cls token plus the context patches, the position head
  on every patch, times 3 for training."""
  size, patch = vit.parse_variant(config.model.variant)
  side = config.image_size // patch
  n = side * side
  context = 1 + masking.num_kept(config.mask, (side, side))
  forward = (flops.dense(n, patch * patch * config.data.channels, size.width)
             + flops.transformer(n + 1, size.width, size.depth, size.mlp_dim, context)
             + flops.dense(n, size.width, n))
  return flops.TRAIN_MULTIPLIER * forward
