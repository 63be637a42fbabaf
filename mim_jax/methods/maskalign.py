"""MaskAlign (Xue et al. 2023, "Stare at What You See: Masked Image Modeling without
Reconstruction", CVPR 2023): masked modeling without reconstruction. The student's features of
the visible patches are aligned to a frozen teacher's features of the intact image.

  student    the ViT encoder on the cls token and the visible patches only (30% of them); no
             decoder and no mask tokens: nothing is computed for the masked patches;
  teacher    a frozen ViT on the whole image: any encoder mim_jax loads (`method.teacher`: a
             workdir, an MAE .pth or an exported .npz; `method.teacher_variant`: its size). Its
             parameters are the subtree 'frozen_teacher': the trainer reads them before
             compiling (`frozen_encoders` below), the optimizer never updates them
             (optim.skip_frozen), checkpoints keep them, and its forward runs inside the same
             jitted step under stop_gradient;
  alignment  Dynamic Alignment: for each of the teacher's last K blocks (`method.align_layers`),
             an adapter mixes the student's block outputs with learnable weights and maps the
             mix to the teacher's width; its target is that teacher block's output, normalised
             per token and taken at the cls token and the visible patches;
  mask       the teacher's cls attention guides it (mask.name 'attention',
             masking.attention_mask, fed by methods/teacher_attention.py, which MAE, CRATE-MAE
             and SimMIM share through `mask.teacher`); any other generator works too.

Facts from the paper and its official code (OpenDriveLab/maskalign: models_pretrain.py, and the
README's ViT-B recipe), re-implemented here:
  - Student features: every block's output before the final norm, cls token included. Teacher
    features: every block's output (hidden_states[1:] of the Hugging Face model), each
    normalised per token without affine parameters (--target_norm whiten: F.layer_norm, eps
    1e-5), then gathered at the student's tokens, cls first.
  - Mixing (--fusion_type linear): a learnable [depth x depth] matrix initialised to I + 0.01
    over the student's layers, then one linear head per teacher layer (--head_type linear;
    xavier-uniform, zero bias, as the code's _init_weights). The code needs equal depths; here
    the mixing row of each aligned teacher layer starts at 0.01, plus 1 at the student layer
    as far from the top, which is the identity's row when the depths are equal. The mixing
    weights take no weight decay (main_pretrain.py: skip_list=["distill_weights"]): each row is
    its adapter's own 1-D parameter, and optim.decay_mask never decays those.
  - Loss (--loss_type smoothl1, --loss_weights top5): 2 x smooth-L1 (beta 1, mean over tokens
    and channels) per aligned layer, on the teacher's last K = 5 layers only, weighted 1/K.
  - Mask (--mask_type attention, --mask_ratio 0.7): the teacher's last-block cls attention over
    the patches, averaged over heads, as the weights of sampling the visible patches.
Deviations: the official teachers are CLIP-B/16, CLIP-L/14 and DINO ViT-B/16, which mim_jax
cannot load, fed the image re-normalised with their own statistics; a mim_jax teacher was
trained on this pipeline's normalisation, so it takes the student's images as they are. The
teacher's patch grid must be the student's (the official CLIP-L/14 teacher gets the image
resized to 196 px for that).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mim_jax import flops
from mim_jax import masking
from mim_jax import models
from mim_jax.methods import mae
from mim_jax.methods import teacher_attention
from mim_jax.models import layers
from mim_jax.models import vit

# The teacher's features are whitened as F.layer_norm does by default (--target_norm whiten).
_TARGET_EPS = 1e-5
# The official mixing matrix starts at I + 0.01 (models_pretrain.py, fusion_type 'linear').
_MIX_OFFSET = 0.01


def mixing_init(student_depth: int, align_layers: int, layer: int) -> tuple[float, ...]:
  """Initial mixing weights over the student's blocks for the `layer`-th (0-based) of the
  teacher's last `align_layers` blocks: 0.01 everywhere, plus 1 at the student block as far
  from the top (I + 0.01's row when the depths are equal)."""
  top = student_depth - align_layers + layer
  return tuple(_MIX_OFFSET + (i == top) for i in range(student_depth))


def whiten(x: jax.Array) -> jax.Array:
  """Each token [..., D] normalised to zero mean and unit variance, in float32."""
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(x.var(-1, keepdims=True) + _TARGET_EPS)


def smooth_l1(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Mean smooth-L1 with beta 1 (torch's F.smooth_l1_loss default)."""
  diff = jnp.abs(pred.astype(jnp.float32) - target)
  return jnp.where(diff < 1.0, 0.5 * diff ** 2, diff - 0.5).mean()


class Adapter(nn.Module):
  """One aligned teacher layer's Dynamic Alignment adapter: a learnable mix of the student's
  block outputs ('layer_weights', one per block), then a linear map to the teacher's width."""
  initial_weights: tuple[float, ...]
  width: int
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden: jax.Array) -> jax.Array:
    """hidden [S, B, T, D], the student's S block outputs -> [B, T, width]."""
    weights = self.param("layer_weights", lambda _, dtype: jnp.asarray(self.initial_weights,
                                                                        dtype),
                         self.param_dtype)
    mixed = jnp.einsum("s,sbtd->btd", weights.astype(self.dtype), hidden)
    return layers.dense(self.width, "proj", self.dtype, self.param_dtype)(mixed)


class MaskAlign(nn.Module):
  """MaskAlign on a ViT student and a frozen ViT teacher. Randomness: the 'mask' rng stream
  (and 'dropout' for the student's drop path)."""
  encoder: vit.ViT
  frozen_teacher: vit.ViT
  image_size: int
  align_layers: int = 5
  mask_spec: masking.MaskSpec = masking.MaskSpec("attention", 0.7)

  @property
  def grid(self) -> tuple[int, int]:
    side = self.image_size // self.encoder.patch
    return (side, side)

  def setup(self):
    enc = self.encoder
    self.adapters = [
        Adapter(mixing_init(enc.depth, self.align_layers, j), self.frozen_teacher.width,
                enc.dtype, enc.param_dtype, name=f"adapter_{j}")
        for j in range(self.align_layers)]

  def teacher(self, images: jax.Array) -> tuple[list[jax.Array], jax.Array]:
    """The frozen teacher on the whole images, under stop_gradient: its block outputs
    [B, 1+N, Dt], and its last block's cls attention over the patches [B, N]."""
    aux, attention = teacher_attention.forward(self.frozen_teacher, images)
    return [aux[f"block_{i}"] for i in range(self.frozen_teacher.depth)], attention

  def draw_mask(self, images: jax.Array) -> masking.Mask:
    """The configured mask, the attention mask fed the teacher on the whole images (what a
    step spends making masks: mim_jax/bench.py times it)."""
    _, attention = self.teacher(images)
    return teacher_attention.draw(self.make_rng("mask"), attention, self.grid, self.mask_spec)

  def __call__(self, image: jax.Array, *, train: bool = True
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (loss, metrics) on a batch of images [B, H, W, C]. `attention_kept` is the share
    of the teacher's cls attention on the visible patches (70% masked at random: 0.3)."""
    teacher_hidden, attention = self.teacher(image)
    mask = teacher_attention.draw(self.make_rng("mask"), attention, self.grid, self.mask_spec)
    _, aux = self.encoder(image, mask.ids_keep, train=train)
    student = jnp.stack([aux[f"block_{i}"] for i in range(self.encoder.depth)])
    # The student's tokens: cls, then the visible patches in ids_keep's order (token i + 1 is
    # patch i).
    b = image.shape[0]
    tokens = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), mask.ids_keep + 1], axis=1)
    aligned = teacher_hidden[-self.align_layers:]
    losses = [
        2.0 * smooth_l1(adapter(student),
                        whiten(jnp.take_along_axis(target, tokens[..., None], axis=1)))
        for adapter, target in zip(self.adapters, aligned)]
    loss = jnp.mean(jnp.stack(losses))
    kept = jnp.take_along_axis(attention, mask.ids_keep, axis=1).sum(1) / attention.sum(1)
    return loss, {"loss": loss, "loss_last_layer": losses[-1], "attention_kept": kept.mean()}

  def features(self, image: jax.Array) -> dict[str, jax.Array]:
    """The student's features of the full, unmasked image (for probes and k-NN)."""
    _, aux = self.encoder(image)
    return aux


inputs = mae.inputs  # Images only.


def teacher_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config whose encoder is the teacher: the student's, at `method.teacher_variant`."""
  return teacher_attention.teacher_config(config, config.method.teacher_variant)


def frozen_encoders(config: ml_collections.ConfigDict
                    ) -> dict[str, tuple[str, ml_collections.ConfigDict, str]]:
  """The encoder the trainer loads into params['frozen_teacher'] (methods/__init__.py): its
  source, the config that builds it, and what names it in an error."""
  return {teacher_attention.SUBTREE: (config.method.teacher, teacher_config(config),
                                      "the teacher (method.teacher)")}


def validate(config: ml_collections.ConfigDict) -> None:
  m = config.method
  grid = models.patch_grid(config, method="MaskAlign (the student sees only the visible "
                           "patches)", supported=("vit",))
  if not m.teacher:
    raise ValueError("method.teacher is empty: name the frozen teacher, a mim_jax workdir, an "
                     "MAE .pth or an exported .npz")
  if config.mask.teacher:
    raise ValueError(f"mask.teacher {config.mask.teacher!r} is for MAE, CRATE-MAE and SimMIM: "
                     f"MaskAlign's attention mask reads its own teacher, method.teacher; set "
                     f"mask.teacher=''")
  teacher_attention.check_teacher_variant(config, m.teacher_variant, "method.teacher_variant")
  teacher, _ = vit.parse_variant(m.teacher_variant)
  student, _ = vit.parse_variant(config.model.variant)
  depth = min(student.depth, teacher.depth)
  if not 1 <= m.align_layers <= depth:
    raise ValueError(f"method.align_layers {m.align_layers} must be in 1 .. {depth} (the "
                     f"student has {student.depth} blocks, the teacher {teacher.depth})")
  if not 0.0 <= m.drop_path < 1.0:
    raise ValueError(f"method.drop_path must be in [0, 1), got {m.drop_path}")
  masking.validate(config.mask, grid, supplies=(teacher_attention.ATTENTION,))


def build(config: ml_collections.ConfigDict) -> MaskAlign:
  m = config.method
  return MaskAlign(encoder=models.build_encoder(config).clone(drop_path=m.drop_path),
                   frozen_teacher=models.build_encoder(teacher_config(config)),
                   image_size=config.image_size, align_layers=m.align_layers,
                   mask_spec=masking.MaskSpec.from_config(config.mask))


def train_flops_per_example(config: ml_collections.ConfigDict) -> int:
  """Analytic training FLOPs of one image. Trained, so 3x forward: the student's patch
  embedding of every patch and its blocks on cls + the visible patches, and the K adapters
  (mixing and linear map) on those tokens. Forward only, 1x: the teacher on cls + every patch,
  and the q/k projection of its last block again for the cls attention."""
  student, patch = vit.parse_variant(config.model.variant)
  teacher, _ = vit.parse_variant(config.method.teacher_variant)
  k = config.method.align_layers
  side = config.image_size // patch
  tokens = 1 + masking.num_kept(config.mask, (side, side))
  adapters = k * (flops.dense(tokens, student.depth, student.width)
                  + flops.dense(tokens, student.width, teacher.width))
  trained = (flops.dense(side * side, patch * patch * config.data.channels, student.width)
             + adapters
             + flops.transformer(tokens, student.width, student.depth, student.mlp_dim))
  frozen = teacher_attention.forward_flops(config, config.method.teacher_variant)
  return flops.TRAIN_MULTIPLIER * trained + frozen
