"""Linear probe: a linear classifier on frozen features.

As in MAE's linear probing (He et al. 2021, sec. A.2), features are normalised with training-set
statistics (a BatchNorm without affine parameters) before the linear layer. The classifier is
trained full-batch with AdamW and a small weight decay; for the small datasets this runs on, that
converges in a few hundred steps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax


def fit_and_score(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                  test_y: np.ndarray, num_classes: int, *, steps: int = 500,
                  lr: float = 1e-2, weight_decay: float = 1e-4) -> float:
  """Trains on (train_x, train_y) and returns top-1 accuracy on (test_x, test_y)."""
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
  params = {"w": jnp.zeros((train_x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}
  tx = optax.adamw(lr, weight_decay=weight_decay)
  x, y = jnp.asarray(train_x), jnp.asarray(train_y)

  def loss_fn(p):
    logits = x @ p["w"] + p["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def train(p):
    def step(carry, _):
      p, opt_state = carry
      grads = jax.grad(loss_fn)(p)
      updates, opt_state = tx.update(grads, opt_state, p)
      return (optax.apply_updates(p, updates), opt_state), None
    return jax.lax.scan(step, (p, tx.init(p)), None, length=steps)[0][0]

  params = train(params)
  pred = np.asarray(jnp.asarray(test_x) @ params["w"] + params["b"]).argmax(-1)
  return float((pred == test_y).mean())
