"""The optimizer from the config: AdamW with linear warmup then cosine decay, a weight-decay mask
and optional global-norm clipping."""

import re

import jax
import ml_collections
import optax

# Parameters that take no weight decay (MAE follows the common practice of not decaying norms,
# biases, position embeddings and tokens): anything of rank <= 1, plus these names.
# Swin's relative position bias tables are excluded too, as in Swin's and SimMIM's code.
_NO_DECAY = re.compile(r"(^|/)(cls|mask_token|pos_embedding|relative_position_bias_table)$")


def learning_rate(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Peak lr = base_lr * batch_size / lr_batch_base (the linear scaling rule, Goyal et al. 2017)."""
  o = config.optim
  peak = o.base_lr * config.batch_size / o.lr_batch_base
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=o.warmup_steps,
      decay_steps=max(config.total_steps, o.warmup_steps + 1), end_value=o.min_lr)


def decay_mask(params) -> object:
  """True for the parameters that get weight decay."""
  def decays(path, leaf) -> bool:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    return leaf.ndim > 1 and not _NO_DECAY.search(name)
  return jax.tree_util.tree_map_with_path(decays, params)


def build(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  o = config.optim
  tx = optax.adamw(learning_rate(config), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                   mask=decay_mask)
  if o.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
  return tx


# Layer-wise learning-rate decay (BEiT, Bao et al. 2021; MAE fine-tuning, He et al. 2021,
# sec. A.1): the embeddings get the smallest lr, each block a little more, the head the full lr.
_LAYER_0 = re.compile(r"(^|/)(patch_embed|cls|mask_token|pos_embedding)(/|$)")
_BLOCK = re.compile(r"(^|/)block_(\d+)/")


def layer_id(name: str, depth: int) -> int:
  """A ViT parameter's layer for lr decay: 0 for the patch embedding and the cls / mask tokens,
  i + 1 for block_i, depth + 1 for what follows the blocks (final norm, fc_norm, head)."""
  if _LAYER_0.search(name):
    return 0
  match = _BLOCK.search(name)
  return int(match.group(2)) + 1 if match else depth + 1


def layer_decay_scales(params, depth: int, decay: float) -> object:
  """The lr multiplier of every parameter: decay ** (depth + 1 - layer_id)."""
  def scale(path, leaf) -> float:
    del leaf
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    return decay ** (depth + 1 - layer_id(name, depth))
  return jax.tree_util.tree_map_with_path(scale, params)


def scale_by_layer_decay(depth: int, decay: float) -> optax.GradientTransformation:
  """Multiplies each parameter's update by its `layer_decay_scales` factor. Chained after AdamW
  it scales the whole step, weight decay included, as a per-layer learning rate does."""
  def scale(updates, params):
    del params
    scales = layer_decay_scales(updates, depth, decay)
    return jax.tree.map(lambda u, s: u * s, updates, scales)  # s is a Python float: weakly typed
  return optax.stateless(scale)
