"""Fine-tuning as a method: an encoder plus MAE's classification head, trained end to end on
labelled images with label smoothing and Mixup / CutMix (`configs/finetune_vit.py`).

The recipe is MAE's end-to-end fine-tuning (He et al. 2021, sec. A.1, table 9). Everything else
a fine-tuning run needs is generic and lives elsewhere: the pretrained encoder is
`config.init_from` (the trainer, mim_jax/init_from.py), layer-wise lr decay is
`config.optim.layer_decay` (mim_jax/optim.py), and top-1 on the eval split is the `top1`
evaluator (mim_jax/evaluators/top1.py), which reads the 'logits' of `features`.

The head follows MAE's fine-tuning (its released code's global pooling): the patch tokens of the
last block are averaged, normalised by a LayerNorm of their own (`fc_norm`), and fed to a linear
layer initialised with a tiny std (2e-5), so the pretrained features are not disturbed by a
random head at the start. The encoder's final norm is then unused, so the encoder is built
without it (`vit.ViT(final_norm=False)`), and a pretrained final norm is dropped when loading.
`pool='cls'` instead reads the cls token after the encoder's final norm, MAE's other option.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mim_jax import flops
from mim_jax import mixup
from mim_jax import models
from mim_jax.methods import mae
from mim_jax.models import vit

POOLS = ("gap", "cls")


class FineTune(nn.Module):
  """encoder -> pooled feature -> logits, and the classification loss.
  Params: {'encoder', 'fc_norm' (gap only), 'head'}. Mixup/CutMix draw from the 'mask' rng
  stream, drop path from 'dropout'."""
  encoder: nn.Module
  num_classes: int
  pool: str = "gap"
  head_init_std: float = 2e-5
  label_smoothing: float = 0.1
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  mix_switch_prob: float = 0.5
  mix_prob: float = 1.0

  @nn.compact
  def logits(self, images: jax.Array, *, train: bool = False
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (float32 logits [B, num_classes], aux); aux adds 'pre_logits' and 'logits' to the
    encoder's. `train` turns on the encoder's drop path ('dropout' rng)."""
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

  def __call__(self, image: jax.Array, label: jax.Array, *, train: bool = True
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Softmax cross-entropy against label-smoothed targets, mixed with Mixup/CutMix when
    training. Returns (loss, metrics)."""
    targets = optax.smooth_labels(jax.nn.one_hot(label, self.num_classes), self.label_smoothing)
    lam = jnp.ones((), jnp.float32)
    if train:
      image, targets, lam = mixup.mix(
          self.make_rng("mask"), image, targets, mixup_alpha=self.mixup_alpha,
          cutmix_alpha=self.cutmix_alpha, switch_prob=self.mix_switch_prob, prob=self.mix_prob)
    logits, _ = self.logits(image, train=train)
    loss = optax.softmax_cross_entropy(logits, targets).mean()
    return loss, {"mix_lambda": lam}

  def features(self, image: jax.Array) -> dict[str, jax.Array]:
    """Evaluation-mode aux (for the evaluators: 'logits', 'pre_logits', the encoder's)."""
    return self.logits(image)[1]


def inputs(config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
  """Images [S, S, C] float32 and their class labels [] int32."""
  return {**mae.inputs(config), "label": jax.ShapeDtypeStruct((), jnp.int32)}


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError on a fine-tuning config that cannot run."""
  m = config.method
  models.patch_grid(config, method="fine-tuning", supported=("vit",))
  if m.pool not in POOLS:
    raise ValueError(f"method.pool must be one of {POOLS}, got {m.pool!r}")
  checks = {"drop_path": 0 <= m.drop_path < 1, "label_smoothing": 0 <= m.label_smoothing < 1,
            "mixup_alpha": m.mixup_alpha >= 0, "cutmix_alpha": m.cutmix_alpha >= 0,
            "mix_prob": 0 <= m.mix_prob <= 1, "mix_switch_prob": 0 <= m.mix_switch_prob <= 1}
  bad = [name for name, ok in checks.items() if not ok]
  if bad:
    raise ValueError("invalid method." + ", method.".join(
        f"{name}={m[name]!r}" for name in bad) + " (drop_path in [0, 1), label_smoothing in "
        "[0, 1), alphas >= 0, probabilities in [0, 1])")
  if config.data.num_classes < 2:
    raise ValueError(f"data.num_classes must be at least 2, got {config.data.num_classes}")


def build(config: ml_collections.ConfigDict) -> FineTune:
  """The encoder of `config.model` with the method's drop path and pooling, plus the head."""
  m = config.method
  encoder = models.build_encoder(config).clone(drop_path=m.drop_path,
                                               final_norm=m.pool == "cls")
  return FineTune(encoder, config.data.num_classes, m.pool, m.head_init_std, m.label_smoothing,
                  m.mixup_alpha, m.cutmix_alpha, m.mix_switch_prob, m.mix_prob)


def train_flops_per_example(config: ml_collections.ConfigDict) -> int:
  """Analytic training FLOPs of one image: patch embedding, the encoder on the cls token and
  every patch, the linear head, times 3 for training."""
  size, patch = vit.parse_variant(config.model.variant)
  n = (config.image_size // patch) ** 2
  forward = (flops.dense(n, patch * patch * config.data.channels, size.width)
             + flops.transformer(n + 1, size.width, size.depth, size.mlp_dim)
             + flops.dense(1, size.width, config.data.num_classes))
  return flops.TRAIN_MULTIPLIER * forward
