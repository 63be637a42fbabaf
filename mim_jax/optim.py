"""The optimizer from the config: AdamW with linear warmup then cosine decay, a weight-decay mask,
optional global-norm clipping and optional layer-wise lr decay (`optim.layer_decay` < 1).
Parameters named `frozen_*` are a method's fixed buffers (BEST-RQ's random projection and
codebook; MaskAlign's teacher, the subtree 'frozen_teacher'): saved in checkpoints with the
rest, never updated, and given no optimizer state."""

import functools
import re
from typing import Sequence

import jax
import ml_collections
import numpy as np
import optax

from mim_jax import layer_layout
from mim_jax import tree_paths

# Parameters that never take weight decay: anything of rank <= 1 (biases, norm scales: every
# reference's param groups skip 1-D parameters), learned position tables (the no_weight_decay()
# of timm's ViT, which MAE fine-tunes, and of SimMIM's ViT; MAE pretrains with a fixed sin-cos
# buffer) and Swin's relative position bias tables (Swin's and SimMIM's
# no_weight_decay_keywords()). Whether the learned tokens decay is the config's choice
# (`optim.no_decay_tokens`), as the references differ.
_NO_DECAY = re.compile(r"(^|/)(pos_embedding|relative_position_bias_table)$")
TOKENS = ("cls", "mask_token")
_FROZEN = re.compile(r"(^|/)frozen_")


def learning_rate(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Peak lr = base_lr * batch_size / lr_batch_base (the linear scaling rule, Goyal et al. 2017)."""
  o = config.optim
  peak = o.base_lr * config.batch_size / o.lr_batch_base
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=o.warmup_steps,
      decay_steps=max(config.total_steps, o.warmup_steps + 1), end_value=o.min_lr)


def decay_mask(params, no_decay_tokens: Sequence[str] = ()) -> object:
  """True for the parameters that get weight decay. The learned tokens named in
  `no_decay_tokens` (of TOKENS) take none."""
  def decays(path, leaf) -> bool:
    name = tree_paths.name(path)
    # The rank of one layer's slice, for a scanned loop's stacked [depth, ...] leaves.
    rank = leaf.ndim - layer_layout.is_stacked(name)
    return (rank > 1 and not _NO_DECAY.search(name)
            and name.rsplit("/", 1)[-1] not in no_decay_tokens)
  return jax.tree_util.tree_map_with_path(decays, params)


def is_frozen(name: str) -> bool:
  """Whether the parameter `name` ('a/b/frozen_codebook') is a frozen buffer."""
  return bool(_FROZEN.search(name))


def skip_frozen(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` for the trainable parameters; zero updates and no state for the frozen ones. A model
  without frozen parameters gets `tx` itself, so its optimizer state keeps its layout (and
  checkpoints written before frozen parameters existed still restore)."""
  labels = lambda params: tree_paths.map_with_names(
      lambda name, _: "frozen" if is_frozen(name) else "train", params)
  split = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  pick = lambda params: split if any(map(is_frozen, tree_paths.flatten(params))) else tx
  return optax.GradientTransformation(
      lambda params: pick(params).init(params),
      lambda updates, state, params=None: pick(updates).update(updates, state, params))


def build(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  o = config.optim
  mask = functools.partial(decay_mask, no_decay_tokens=tuple(o.no_decay_tokens))
  tx = optax.adamw(learning_rate(config), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                   mask=mask)
  if o.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
  if o.layer_decay < 1:
    tx = optax.chain(tx, scale_by_layer_decay(o.layer_decay))
  return skip_frozen(tx)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError on optimizer settings that cannot train (a negative lr ascends the loss
  instead of descending it, without any other sign of trouble)."""
  o = config.optim
  for field in ("base_lr", "min_lr", "weight_decay", "warmup_steps", "grad_clip_norm"):
    if o[field] < 0:
      raise ValueError(f"optim.{field} must be >= 0, got {o[field]}")
  if o.lr_batch_base <= 0:
    raise ValueError(f"optim.lr_batch_base must be positive, got {o.lr_batch_base}")
  if not 0 < o.layer_decay <= 1:
    raise ValueError(f"optim.layer_decay must be in (0, 1] (1 = off), got {o.layer_decay}")
  unknown = set(o.no_decay_tokens) - set(TOKENS)
  if unknown:
    raise ValueError(f"optim.no_decay_tokens names unknown tokens {sorted(unknown)}; valid: "
                     f"{list(TOKENS)}")


# Layer-wise learning-rate decay (BEiT, Bao et al. 2021; MAE fine-tuning, He et al. 2021,
# sec. A.1): the encoder's embeddings get the smallest lr, each block a little more, and what
# follows the encoder's blocks (its final norm, a head, a decoder) the full lr.
_LAYER_0 = re.compile(r"^encoder/(.*/)?(patch_embed|cls|mask_token|pos_embedding)(/|$)")
_BLOCK = re.compile(r"^encoder/(.*/)?block_(\d+)/")
_STACKED = re.compile(rf"^encoder/(.*/)?{layer_layout.STACKED}/")


def encoder_depth(names: list[str]) -> int:
  """The number of blocks of the encoder ('encoder/.../block_i/...') among parameter names."""
  blocks = [int(m.group(2)) for m in map(_BLOCK.search, names) if m]
  return max(blocks) + 1 if blocks else 0


def layer_id(name: str, depth: int) -> int:
  """A parameter's layer for lr decay: 0 for the encoder's patch embedding, cls / mask tokens
  and position table, i + 1 for its block_i, depth + 1 for everything else (the encoder's final
  norm, fc_norm, the head)."""
  if _LAYER_0.search(name):
    return 0
  match = _BLOCK.search(name)
  return int(match.group(2)) + 1 if match else depth + 1


def layer_decay_scales(params, decay: float) -> object:
  """The lr multiplier of every parameter: decay ** (depth + 1 - layer_id), depth being the
  encoder's (read from the parameter names). The encoder's scanned blocks, stored stacked
  (mim_jax/layer_layout.py), get one multiplier per layer: a [depth, 1, ...] array that broadcasts
  over each layer's slice, the unrolled blocks' factors."""
  flat = tree_paths.flatten(params)
  stacked = {name: leaf.shape[0] for name, leaf in flat.items() if _STACKED.search(name)}
  depth = max([encoder_depth(list(flat)), *stacked.values()])

  def factor(name: str) -> float:
    return decay ** (depth + 1 - layer_id(name, depth))

  def scale(name: str, leaf) -> float | np.ndarray:
    if name in stacked:  # Row i is the unrolled run's block_i, and decays as it does.
      rows = [name.replace(f"/{layer_layout.STACKED}/", f"/block_{i}/", 1)
              for i in range(stacked[name])]
      return np.asarray([factor(row) for row in rows]).reshape((-1,) + (1,) * (leaf.ndim - 1))
    return factor(name)

  return tree_paths.map_with_names(scale, params)


def scale_by_layer_decay(decay: float) -> optax.GradientTransformation:
  """Multiplies each parameter's update by its `layer_decay_scales` factor. Chained after AdamW
  it scales the whole step, weight decay included, as a per-layer learning rate does."""
  def times(u, s):
    # A Python float is weakly typed, and an array of factors is cast: u keeps its dtype.
    return u * (s.astype(u.dtype) if isinstance(s, np.ndarray) else s)

  def scale(updates, params):
    del params
    return jax.tree.map(times, updates, layer_decay_scales(updates, decay))
  return optax.stateless(scale)
