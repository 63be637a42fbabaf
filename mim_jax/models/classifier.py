"""An image classifier for fine-tuning: a pretrained-style encoder plus MAE's classification head.

It lives with the models, not the methods: it is a model in DESIGN's sense (pure, returns
`(logits, aux)`), with no loss inside, while a method file is a pretraining objective that
returns a loss from images alone. The fine-tuning trainer (mim_jax/finetune.py) adds the
labels, Mixup/CutMix and the loss.

The head follows MAE's fine-tuning (He et al. 2021, sec. A.1, and its released code's global
pooling): the patch tokens of the last block are averaged, normalised by a LayerNorm of their
own (`fc_norm`), and fed to a linear layer initialised with a tiny std (2e-5), so the
pretrained features are not disturbed by a random head at the start. The encoder's final norm
is then unused, so the encoder is built without it (`vit.ViT(final_norm=False)`), and a
pretrained final norm is dropped when loading (finetune.py). `pool='cls'` instead reads the cls
token after the encoder's final norm, MAE's other option.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mim_jax import models

POOLS = ("gap", "cls")


class Classifier(nn.Module):
  """encoder -> pooled feature -> logits. Params: {'encoder', 'fc_norm' (gap only), 'head'}."""
  encoder: nn.Module
  num_classes: int
  pool: str = "gap"
  head_init_std: float = 2e-5

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (float32 logits [B, num_classes], aux); aux adds 'pre_logits' and 'logits' to the
    encoder's. `train` turns on the encoder's drop path ('dropout' rng)."""
    if self.pool not in POOLS:
      raise ValueError(f"unknown pool {self.pool!r}; valid: {POOLS}")
    tokens, aux = self.encoder(images, train=train)
    if self.pool == "gap":
      feature = nn.LayerNorm(epsilon=1e-6, name="fc_norm")(
          tokens[:, 1:].astype(jnp.float32).mean(axis=1))
    else:
      feature = tokens[:, 0].astype(jnp.float32)
    # The head computes in float32 whatever the encoder's dtype: it is tiny, and the logits feed
    # a softmax. Truncated at 2 std (MAE: trunc_normal_, std 2e-5), bias zero.
    logits = nn.Dense(self.num_classes,
                      kernel_init=nn.initializers.truncated_normal(self.head_init_std),
                      name="head")(feature)
    return logits, {**aux, "pre_logits": feature, "logits": logits}

  def features(self, images: jax.Array) -> dict[str, jax.Array]:
    """Evaluation-mode aux (for FeatureExtractor: 'logits', 'pre_logits', the encoder's)."""
    return self(images)[1]


def build(config: ml_collections.ConfigDict) -> Classifier:
  """The encoder of `config.model` with config.finetune's drop path and pooling, plus the head."""
  f = config.finetune
  if f.pool not in POOLS:
    raise ValueError(f"finetune.pool must be one of {POOLS}, got {f.pool!r}")
  encoder = models.build_encoder(config)
  if not all(hasattr(encoder, field) for field in ("drop_path", "final_norm")):
    raise ValueError(f"fine-tuning needs an encoder with drop_path and final_norm options "
                     f"(model.name 'vit'), got model.name {config.model.name!r}")
  encoder = encoder.clone(drop_path=f.drop_path, final_norm=f.pool == "cls")
  return Classifier(encoder, config.data.num_classes, f.pool, f.head_init_std)
