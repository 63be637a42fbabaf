"""A frozen ViT teacher's cls attention, the scores of the `attention` mask (masking.attention_mask;
MaskAlign, Xue et al. 2023, "Stare at What You See: Masked Image Modeling without
Reconstruction"): one place for the teacher's forward, its config, its checks and its FLOPs.

MaskAlign distils from its teacher (`method.teacher`) and guides its mask with it. MAE, CRATE-MAE
and SimMIM take a teacher for the mask alone (`mask.teacher`, with `mask.name='attention'`).
Either way the teacher is any ViT encoder mim_jax loads (a workdir, an MAE .pth or an exported
.npz: mim_jax/pretrained.py), held as the parameter subtree 'frozen_teacher': the trainer reads
it before anything compiles (`frozen_encoders`), the optimizer never updates it
(optim.skip_frozen), it is sharded by the student's rules, and its forward runs inside the
jitted step under stop_gradient. Its patch grid must be the student's: the attention weighs the
student's patches.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mim_jax import flops
from mim_jax import layer_layout
from mim_jax import masking
from mim_jax import models
from mim_jax.models import layers
from mim_jax.models import vit

ATTENTION = "attention"  # The mask generator the teacher feeds (masking.GENERATORS).
SUBTREE = "frozen_teacher"  # Its parameters' top-level subtree (optim.is_frozen).
# What names the mask's teacher in errors (train._labelled prefixes its source's).
MASK_TEACHER_LABEL = "the mask's teacher (mask.teacher)"


def cls_attention(teacher: vit.ViT, block_input: jax.Array) -> jax.Array:
  """The cls token's attention over the patches in the teacher's last block, averaged over
  heads: [B, N] (MaskAlign's official attentions[-1][:, :, 0, 1:].mean(1)). The model returns
  block outputs, not attention weights, so the cls row is recomputed from the last block's input
  [B, 1+N, D] with that block's own norm and q/k projection (the parameters of `teacher`, a
  bound module that has run)."""
  block = layer_layout.block_params(teacher.variables["params"]["blocks"], teacher.depth - 1)
  norm = nn.LayerNorm(epsilon=1e-6, dtype=teacher.dtype, param_dtype=teacher.param_dtype,
                      parent=None)  # layers.layer_norm's, which Block uses
  qkv = layers.QKV(teacher.dtype, teacher.param_dtype, parent=None)
  q, k, _ = qkv.apply({"params": block["attn"]["qkv"]},
                      norm.apply({"params": block["norm1"]}, block_input))
  b, n, d = k.shape
  head_dim = d // teacher.heads
  # Scaled as layers.dot_product_attention scales q.
  q = q[:, 0].reshape(b, teacher.heads, head_dim) * jnp.asarray(head_dim ** -0.5, q.dtype)
  logits = jnp.einsum("bhd,bkhd->bhk", q, k.reshape(b, n, teacher.heads, head_dim),
                      preferred_element_type=jnp.float32)
  return jax.nn.softmax(logits, axis=-1).mean(axis=1)[:, 1:]


def forward(teacher: vit.ViT, images: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
  """The frozen teacher on the whole images, under stop_gradient: its aux (block outputs
  'block_i' [B, 1+N, D]) and its last block's cls attention over the patches [B, N]."""
  _, aux = teacher(images)
  attention = cls_attention(teacher, aux[f"block_{teacher.depth - 2}"])
  return jax.lax.stop_gradient((aux, attention))


def draw(rng: jax.Array, attention: jax.Array, grid: tuple[int, int],
         spec: masking.MaskSpec) -> masking.Mask:
  """The mask `spec` names over the patch grid, for as many images as `attention` [B, N] rows;
  the `attention` generator is fed the teacher's attention, any other draws as it always does."""
  if spec.name == ATTENTION:
    return masking.attention_mask(rng, attention.shape[0], grid, spec.ratio,
                                  attention=attention, **dict(spec.knobs))
  return masking.draw(rng, attention.shape[0], grid, spec)


# ---------------------------------------------------------------------------------------------
# Config: the teacher's encoder, its checks, the trainer's hook, FLOPs.
# ---------------------------------------------------------------------------------------------

def teacher_config(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """The config whose encoder is the teacher: a ViT of `variant` at the student's image size.
  A ViT student lends its model section (the teacher differs in size only); another student
  (CRATE, Swin) gets MAE's ViT: exact GELU, fixed sin-cos position table, its dtypes."""
  teacher = config.copy_and_resolve_references()
  if config.model.name != "vit":
    teacher.model = ml_collections.ConfigDict({
        "name": "vit", "exact_gelu": True, "posemb": "sincos", "patch_init": "xavier",
        "remat": "none", "scan_layers": False, "dtype": config.model.dtype,
        "param_dtype": config.model.param_dtype, "attention_impl": "auto"})
  teacher.model.variant = variant
  return teacher


def check_teacher_variant(config: ml_collections.ConfigDict, variant: str, field: str) -> None:
  """Raises ValueError, naming `field`, unless `variant` is a ViT whose patch grid at the
  config's image size is the student's (a student that is not a ViT must name its teacher's)."""
  patch = models.build_encoder(config).patch
  if not variant:
    raise ValueError(f"{field} is empty and the {config.model.name} student "
                     f"{config.model.variant!r} is no ViT to lend its own: name the teacher's "
                     f"ViT <size>/<patch>, e.g. 'Ti/{patch}'")
  try:
    _, teacher_patch = vit.parse_variant(variant)
  except ValueError as error:
    raise ValueError(f"{field}: {error}") from None
  if teacher_patch != patch:
    raise ValueError(f"{field} {variant!r} has patch {teacher_patch}, the student "
                     f"{config.model.variant!r} patch {patch}: the teacher's tokens must be the "
                     f"student's patches; use a teacher with patch {patch}")


def mask_teacher_variant(config: ml_collections.ConfigDict) -> str:
  """`mask.teacher_variant`, or the student's variant when that is empty and the student a ViT."""
  variant = config.mask.teacher_variant
  return variant or (config.model.variant if config.model.name == "vit" else "")


def uses_mask_teacher(config: ml_collections.ConfigDict) -> bool:
  """Whether a MAE, CRATE-MAE or SimMIM config draws the attention mask from `mask.teacher`."""
  return config.mask.name == ATTENTION and bool(config.mask.teacher)


def validate_mask_teacher(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Checks `mask.teacher` and `mask.teacher_variant` of a MAE, CRATE-MAE or SimMIM config and
  returns the scored masks (masking.SCORED) the teacher feeds, for masking.validate. A teacher
  with another mask would be loaded for nothing: refused. (Whether its source exists and fits is
  checked when the trainer reads it, before anything compiles.)"""
  if not config.mask.teacher:
    return ()
  if config.mask.name != ATTENTION:
    raise ValueError(f"mask.teacher {config.mask.teacher!r} guides only mask.name="
                     f"{ATTENTION!r}, not {config.mask.name!r}: set mask.name={ATTENTION!r} "
                     f"or mask.teacher=''")
  check_teacher_variant(config, mask_teacher_variant(config), "mask.teacher_variant")
  return (ATTENTION,)


def mask_teacher(config: ml_collections.ConfigDict) -> vit.ViT | None:
  """The frozen teacher module of a MAE, CRATE-MAE or SimMIM config (None without one)."""
  if not uses_mask_teacher(config):
    return None
  return models.build_encoder(teacher_config(config, mask_teacher_variant(config)))


def frozen_encoders(config: ml_collections.ConfigDict
                    ) -> dict[str, tuple[str, ml_collections.ConfigDict, str]]:
  """The mask's teacher that the trainer loads into params['frozen_teacher']
  (methods/__init__.py): MAE's, CRATE-MAE's and SimMIM's `frozen_encoders`."""
  if not uses_mask_teacher(config):
    return {}
  return {SUBTREE: (config.mask.teacher,
                    teacher_config(config, mask_teacher_variant(config)), MASK_TEACHER_LABEL)}


def forward_flops(config: ml_collections.ConfigDict, variant: str) -> int:
  """Forward FLOPs of the teacher `variant` on one image: patch embedding, its blocks on the cls
  token and every patch, and the q/k projection of its last block again for the cls row."""
  teacher, patch = vit.parse_variant(variant)
  n = (config.image_size // patch) ** 2
  embed = flops.dense(n, patch * patch * config.data.channels, teacher.width)
  cls_row = flops.dense(1 + n, teacher.width, 3 * teacher.width) + 2 * (1 + n) * teacher.width
  return embed + cls_row + flops.transformer(1 + n, teacher.width, teacher.depth,
                                             teacher.mlp_dim)


def mask_flops(config: ml_collections.ConfigDict) -> int:
  """What the mask's teacher adds to one example's training FLOPs: its forward, no gradient."""
  return forward_flops(config, mask_teacher_variant(config)) if uses_mask_teacher(config) else 0
