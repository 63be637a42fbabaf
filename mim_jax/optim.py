"""The optimizer from the config: AdamW with linear warmup then cosine decay, a weight-decay mask
and optional global-norm clipping."""

import re

import jax
import ml_collections
import optax

# Parameters that take no weight decay (MAE follows the common practice of not decaying norms,
# biases, position embeddings and tokens): anything of rank <= 1, plus these names.
_NO_DECAY = re.compile(r"(^|/)(cls|mask_token|pos_embedding)$")


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
