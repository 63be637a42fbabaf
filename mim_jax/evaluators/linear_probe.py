"""Linear probe: a linear classifier trained on frozen, cached features (MAE's protocol).

MAE (He et al. 2021, appendix A.2 and table 10) puts a BatchNorm without affine parameters
(eps 1e-6) between the frozen features and the linear head: it normalises the features and can
be folded into the head afterwards, so the probe stays linear. The head trains with LARS (You et
al. 2017), base lr 0.1 x batch / 256, momentum 0.9, no weight decay, batch 16384, 90 epochs with
10 of linear warmup, then cosine decay. Regularisation is off (no mixup, drop path or weight
decay), as the paper finds it hurts probing. That recipe is `config.eval.linear_probe` for
ImageNet; small datasets use a small batch and SGD with momentum (see configs/common.py).

Here the features are computed once (features.FeatureExtractor) and the whole training run is
one jitted program over the cached arrays, sharded by rows over the mesh: the encoder is not in
the loop. So, unlike the paper, there is no RandomResizedCrop: features come from the eval
transform. The BatchNorm normalises with each batch's statistics while training and with their
running averages at test time, as PyTorch's does. The run is deterministic: the shuffling and
the head's initialisation come from `cfg.seed`.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mim_jax import sharding

BN_EPS = 1e-6        # MAE's BatchNorm1d(affine=False, eps=1e-6).
BN_MOMENTUM = 0.9    # running = 0.9 running + 0.1 batch (PyTorch's BatchNorm momentum 0.1).
HEAD_INIT_STD = 0.01  # A small random head: LARS scales steps by the weight norm, so not zeros.
OPTIMIZERS = ("lars", "sgd")


@dataclasses.dataclass(frozen=True)
class Recipe:
  """The static settings of one probe run (hashable: one compiled program per recipe)."""
  num_examples: int
  num_classes: int
  batch_size: int
  epochs: int
  warmup_epochs: int
  optimizer: str
  peak_lr: float
  momentum: float
  weight_decay: float
  rows: jax.sharding.NamedSharding

  @property
  def steps_per_epoch(self) -> int:
    return self.num_examples // self.batch_size  # drop the last partial batch of each epoch


def recipe(cfg: ml_collections.ConfigDict, num_examples: int, num_classes: int,
           mesh: jax.sharding.Mesh) -> Recipe:
  """The run `cfg` describes on `num_examples` training features; the batch is capped at the
  dataset and rounded down to a multiple of the devices."""
  if cfg.optimizer not in OPTIMIZERS:
    raise ValueError(f"linear_probe.optimizer must be one of {OPTIMIZERS}, got {cfg.optimizer!r}")
  batch = min(cfg.batch_size, num_examples)
  batch -= batch % mesh.size
  if batch <= 0:
    raise ValueError(f"{num_examples} training examples are too few for {mesh.size} devices")
  return Recipe(num_examples, num_classes, batch, cfg.epochs, cfg.warmup_epochs, cfg.optimizer,
                cfg.base_lr * batch / cfg.lr_batch_base, cfg.momentum, cfg.weight_decay,
                sharding.batch_sharding(mesh))


def optimizer(r: Recipe) -> optax.GradientTransformation:
  """LARS or SGD with momentum, on a warmup + cosine schedule. As in MAE's LARS, the bias gets
  neither weight decay nor the trust ratio (only parameters with ndim > 1 do)."""
  steps = r.epochs * r.steps_per_epoch
  lr = optax.warmup_cosine_decay_schedule(0.0, r.peak_lr, r.warmup_epochs * r.steps_per_epoch,
                                          max(steps, 1), 0.0)
  matrices = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  if r.optimizer == "lars":
    return optax.lars(lr, weight_decay=r.weight_decay, weight_decay_mask=matrices,
                      trust_ratio_mask=matrices, momentum=r.momentum)
  return optax.chain(optax.add_decayed_weights(r.weight_decay, matrices),
                     optax.sgd(lr, momentum=r.momentum))


def normalise(x: jax.Array, stats: dict[str, jax.Array]) -> jax.Array:
  """The BatchNorm without affine parameters."""
  return (x - stats["mean"]) * jax.lax.rsqrt(stats["var"] + BN_EPS)


@functools.partial(jax.jit, static_argnames="r")
def _fit(x: jax.Array, y: jax.Array, key: jax.Array, r: Recipe):
  """Trains the head. x [>= num_examples, D] (rows past num_examples are padding).
  Returns ({'w', 'b'}, BatchNorm running stats, mean training loss per epoch)."""
  dim = x.shape[1]
  init_key, shuffle_key = jax.random.split(key)
  params = {"w": HEAD_INIT_STD * jax.random.truncated_normal(init_key, -2.0, 2.0,
                                                             (dim, r.num_classes)),
            "b": jnp.zeros((r.num_classes,))}
  stats = {"mean": jnp.zeros((dim,)), "var": jnp.ones((dim,))}
  tx = optimizer(r)

  def step(carry, idx):
    params, opt_state, stats = carry
    xb = jax.lax.with_sharding_constraint(x[idx], r.rows)
    batch_stats = {"mean": xb.mean(0), "var": xb.var(0)}
    xn = normalise(xb, batch_stats)
    loss, grads = jax.value_and_grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        xn @ p["w"] + p["b"], y[idx]).mean())(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    n = r.batch_size  # running variance is the unbiased estimate, as in PyTorch
    batch_stats["var"] = batch_stats["var"] * n / max(n - 1, 1)
    stats = jax.tree.map(lambda s, b: BN_MOMENTUM * s + (1 - BN_MOMENTUM) * b, stats, batch_stats)
    return (params, opt_state, stats), loss

  def epoch(carry, e):
    perm = jax.random.permutation(jax.random.fold_in(shuffle_key, e), r.num_examples)
    batches = perm[:r.steps_per_epoch * r.batch_size].reshape(r.steps_per_epoch, r.batch_size)
    carry, losses = jax.lax.scan(step, carry, batches)
    return carry, losses.mean()

  (params, _, stats), losses = jax.lax.scan(epoch, (params, tx.init(params), stats),
                                            jnp.arange(r.epochs))
  return jax.lax.with_sharding_constraint((params, stats, losses), _replicated(r.rows))


@functools.partial(jax.jit, static_argnames="rows")
def _predict(params: dict, stats: dict, x: jax.Array, rows: jax.sharding.NamedSharding
             ) -> jax.Array:
  pred = jnp.argmax(normalise(x, stats) @ params["w"] + params["b"], axis=-1)
  return jax.lax.with_sharding_constraint(pred, _replicated(rows))


def _replicated(rows: jax.sharding.NamedSharding) -> jax.sharding.NamedSharding:
  """Outputs every process can read."""
  return jax.sharding.NamedSharding(rows.mesh, jax.sharding.PartitionSpec())


def _rows_on_mesh(x: np.ndarray, rows: jax.sharding.NamedSharding) -> jax.Array:
  """x, padded to a multiple of the devices, as a global array sharded by rows."""
  devices = rows.mesh.size
  x = np.concatenate([x, np.zeros((-len(x) % devices,) + x.shape[1:], x.dtype)])
  return jax.make_array_from_callback(x.shape, rows, lambda i: x[i])


def fit(cfg: ml_collections.ConfigDict, train_x: np.ndarray, train_y: np.ndarray,
        num_classes: int, mesh: jax.sharding.Mesh) -> tuple[dict, dict, np.ndarray]:
  """Trains a probe on cached features. Returns (head, BatchNorm stats, loss per epoch)."""
  r = recipe(cfg, len(train_x), num_classes, mesh)
  x = _rows_on_mesh(np.asarray(train_x, np.float32), r.rows)
  y = _rows_on_mesh(np.asarray(train_y, np.int32), r.rows)
  params, stats, losses = _fit(x, y, jax.random.key(cfg.seed), r)
  return params, stats, np.asarray(losses)


def predict(params: dict, stats: dict, x: np.ndarray, mesh: jax.sharding.Mesh) -> np.ndarray:
  """Class predictions [N] of a trained probe."""
  rows = sharding.batch_sharding(mesh)
  pred = _predict(params, stats, _rows_on_mesh(np.asarray(x, np.float32), rows), rows)
  return np.asarray(jax.device_get(pred))[:len(x)]


def evaluate(cfg: ml_collections.ConfigDict, train: tuple[np.ndarray, np.ndarray],
             test: tuple[np.ndarray, np.ndarray], num_classes: int,
             mesh: jax.sharding.Mesh) -> dict[str, float]:
  """{'linear_probe': top-1 accuracy on test} of a probe trained on train."""
  params, stats, _ = fit(cfg, *train, num_classes, mesh)
  return {"linear_probe": float((predict(params, stats, test[0], mesh) == test[1]).mean())}
