"""Fine-tuning: an encoder plus a classification head, trained end to end on labelled images,
reporting top-1 on the eval split (`--mode=finetune`, configs/finetune_vit.py).

The recipe is MAE's end-to-end fine-tuning (He et al. 2021, sec. A.1, table 9): AdamW with
layer-wise lr decay, warmup then cosine, drop path, label smoothing, and Mixup / CutMix drawn
in the jitted step. It reuses the pretraining trainer's pieces (mim_jax/train.py): the born-
sharded state, the jitted step (`train.make_step`), checkpoints and resume, the metric writer,
preemption and the non-finite checks. Only the loss, the optimizer's layer scales, the loading
of a pretrained encoder and the top-1 evaluation are its own.
"""

import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from mim_jax import checkpoint
from mim_jax import mixup
from mim_jax import optim
from mim_jax import sharding
from mim_jax import train
from mim_jax.data import pipeline
from mim_jax.metric_writer import MetricWriter
from mim_jax.models import classifier
from mim_jax.models import vit

# Pretrained encoder parameters fine-tuning has no use for, dropped when loading (any other
# difference is an error): the final norm when pooling 'gap' (MAE replaces it by fc_norm), and
# the mask token of an encoder pretrained with mask tokens (SimMIM style).
_UNUSED_PRETRAINED = ("norm", "mask_token")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError on a fine-tuning config that cannot run (config_validation calls it)."""
  f = config.finetune
  if config.model.name != "vit":
    raise ValueError(f"fine-tuning supports model.name 'vit', got {config.model.name!r}")
  _, patch = vit.parse_variant(config.model.variant)
  if config.image_size % patch:
    raise ValueError(f"image_size {config.image_size} is not divisible by the patch size "
                     f"{patch} of variant {config.model.variant!r}")
  if f.pool not in classifier.POOLS:
    raise ValueError(f"finetune.pool must be one of {classifier.POOLS}, got {f.pool!r}")
  checks = {"drop_path": 0 <= f.drop_path < 1, "layer_decay": 0 < f.layer_decay <= 1,
            "label_smoothing": 0 <= f.label_smoothing < 1, "mixup_alpha": f.mixup_alpha >= 0,
            "cutmix_alpha": f.cutmix_alpha >= 0, "mix_prob": 0 <= f.mix_prob <= 1,
            "mix_switch_prob": 0 <= f.mix_switch_prob <= 1,
            "eval_every_steps": f.eval_every_steps >= 0}
  bad = [name for name, ok in checks.items() if not ok]
  if bad:
    raise ValueError("invalid finetune." + ", finetune.".join(
        f"{name}={f[name]!r}" for name in bad) + " (drop_path in [0, 1), layer_decay in (0, 1], "
        "label_smoothing in [0, 1), alphas >= 0, probabilities in [0, 1], eval_every_steps >= 0)")
  if config.data.num_classes < 2:
    raise ValueError(f"data.num_classes must be at least 2, got {config.data.num_classes}")


# ---------------------------------------------------------------------------------------------
# Optimizer, loss and step.
# ---------------------------------------------------------------------------------------------

def build_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """optim.build's AdamW + warmup/cosine + weight-decay mask, then the layer-wise lr decay."""
  size, _ = vit.parse_variant(config.model.variant)
  return optax.chain(optim.build(config),
                     optim.scale_by_layer_decay(size.depth, config.finetune.layer_decay))


def make_loss_fn(model: nn.Module, config: ml_collections.ConfigDict) -> Callable:
  """`loss_fn(params, batch, rng) -> (loss, metrics)`: label smoothing, Mixup/CutMix, softmax
  cross-entropy against the mixed soft targets."""
  f = config.finetune

  def loss_fn(params, batch: dict[str, jax.Array], rng: jax.Array):
    targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], config.data.num_classes),
                                  f.label_smoothing)
    images, targets, lam = mixup.mix(
        jax.random.fold_in(rng, 2), batch["image"], targets, mixup_alpha=f.mixup_alpha,
        cutmix_alpha=f.cutmix_alpha, switch_prob=f.mix_switch_prob, prob=f.mix_prob)
    logits, _ = model.apply({"params": params}, images, train=True,
                            rngs={"dropout": jax.random.fold_in(rng, 1)})
    loss = optax.softmax_cross_entropy(logits, targets).mean()
    return loss, {"mix_lambda": lam}

  return loss_fn


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, state_shardings: Any,
                    mesh: jax.sharding.Mesh, config: ml_collections.ConfigDict):
  """The jitted, state-donating step on a batch {'image', 'label'}."""
  return train.make_step(make_loss_fn(model, config), tx, state_shardings, mesh)


# ---------------------------------------------------------------------------------------------
# A pretrained encoder into the classifier.
# ---------------------------------------------------------------------------------------------

def with_encoder(state: train.TrainState, encoder_params: Any, state_shardings: Any, *,
                 source: str = "the given parameters") -> train.TrainState:
  """Returns `state` with params['encoder'] replaced by `encoder_params` (a nested dict of
  arrays, e.g. numpy), each leaf placed straight into its sharding and cast to the model's
  dtype. The optimizer state is left as is (Adam's moments start at zero either way).
  Raises checkpoint.CheckpointMismatchError listing missing, unexpected and mis-shaped names
  when the encoders differ (beyond the unused parameters of _UNUSED_PRETRAINED)."""
  current = checkpoint.param_signature(state.params["encoder"])
  given = {name: leaf for name, leaf in _flat(encoder_params).items()
           if name in current or name.split("/")[0] not in _UNUSED_PRETRAINED}
  given_signature = {name: list(np.shape(leaf)) for name, leaf in given.items()}
  if given_signature != current:
    raise checkpoint.CheckpointMismatchError(
        f"{source}: the pretrained encoder does not match the one being fine-tuned (check "
        f"model.variant and image_size): {checkpoint.describe_mismatch(given_signature, current)}")

  def place(path, leaf, leaf_sharding):
    value = np.asarray(given[sharding.path_name(path)]).astype(leaf.dtype)
    return jax.make_array_from_callback(value.shape, leaf_sharding, lambda index: value[index])

  encoder = jax.tree_util.tree_map_with_path(place, state.params["encoder"],
                                             state_shardings.params["encoder"])
  return state.replace(params={**state.params, "encoder": encoder})


def _fetch(metrics) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _flat(tree: Any) -> dict[str, Any]:
  return {sharding.path_name(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def load_pretrained(state: train.TrainState, source: str, config: ml_collections.ConfigDict,
                    state_shardings: Any) -> train.TrainState:
  """`config.finetune.init_from` -> the state with that encoder (mim_jax/pretrained.py reads
  a mim_jax workdir, an official MAE .pth or an exported .npz)."""
  from mim_jax import pretrained  # pylint: disable=g-import-not-at-top
  state = with_encoder(state, pretrained.load_encoder_params(source, config), state_shardings,
                       source=source)
  logging.info("encoder initialised from %s", source)
  return state


# ---------------------------------------------------------------------------------------------
# Evaluation: top-1 on the eval split.
# ---------------------------------------------------------------------------------------------

class Evaluator:
  """Top-1 of the classifier on `config.data.eval_split`, in sharded batches of a fixed size
  (the last one padded), so it compiles once. The split is streamed, never held whole."""

  def __init__(self, model: nn.Module, config: ml_collections.ConfigDict,
               param_shardings: Any, mesh: jax.sharding.Mesh):
    self._config = config
    self._batch = max(mesh.size, config.batch_size - config.batch_size % mesh.size)
    self._sharding = sharding.batch_sharding(mesh)
    self._predict = jax.jit(
        lambda p, x: jnp.argmax(model.apply({"params": p}, x)[0], axis=-1),
        in_shardings=(param_shardings, self._sharding),
        out_shardings=sharding.replicated(mesh))

  def __call__(self, params) -> float:
    correct, total = 0, 0
    for images, labels in pipeline.eval_batches(self._config, self._config.data.eval_split,
                                                self._batch):
      n = len(images)
      padded = np.zeros((self._batch,) + images.shape[1:], images.dtype)
      padded[:n] = images
      global_images = jax.make_array_from_callback(padded.shape, self._sharding,
                                                   lambda index: padded[index])
      predictions = np.asarray(self._predict(params, global_images))[:n]
      correct += int((predictions == labels).sum())
      total += n
    return correct / total


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Fine-tunes (resuming from the newest checkpoint in workdir, else starting from
  config.finetune.init_from or random init), then reports top-1 on the eval split.
  Returns the last logged metrics and 'finetune/top1'."""
  preemption = train.PreemptionWatcher()  # first, so no SIGTERM during start-up is lost
  validate(config)
  f = config.finetune

  # Mesh, input, model, optimizer.
  mesh = sharding.make_mesh()
  iterator = pipeline.train_iterator(config)
  model = classifier.build(config)
  tx = build_optimizer(config)
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  abstract, state_shardings = train.abstract_state(model, tx, config, mesh, init_rng)
  logging.info("fine-tuning %s: %.2fM parameters, %d classes, on %d devices (%d processes)",
               config.model.variant,
               sum(x.size for x in jax.tree.leaves(abstract.params)) / 1e6,
               config.data.num_classes, jax.device_count(), jax.process_count())

  def create() -> train.TrainState:
    """Born sharded, then (optionally) given a pretrained encoder."""
    state = train.create_state(model, tx, config, mesh, init_rng)[0]
    if f.init_from:
      return load_pretrained(state, f.init_from, config, state_shardings)
    logging.info("encoder at random init (finetune.init_from is empty)")
    return state

  ckpt, state, last_saved = train.restore_or_create(config, workdir, abstract, iterator, create)
  start = step = int(state.step)

  train_step = make_train_step(model, tx, state_shardings, mesh, config)
  evaluate = Evaluator(model, config, state_shardings.params, mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  lr_fn = optim.learning_rate(config)
  writer = MetricWriter(workdir, resume_step=start)
  last: dict[str, float] = {}
  window = [time.perf_counter(), 0]  # start time and steps of the throughput window

  def check_and_log(logged_step: int, step_metrics, force: bool) -> None:
    nonlocal last
    values = _fetch(step_metrics)
    train.check_finite(logged_step, values, last_saved, ckpt)
    if not (force or logged_step % config.log_every_steps == 0 or logged_step == start + 1):
      return
    elapsed, steps = time.perf_counter() - window[0], window[1]
    rate = config.batch_size * steps / elapsed if logged_step > start + 1 else 0.0
    values.update(lr=float(lr_fn(logged_step - 1)), images_per_sec=rate)
    eta = (config.total_steps - logged_step) * config.batch_size / rate if rate else 0.0
    logging.info("step %d/%d  loss %.4f  lr %.3g  %.1f img/s  ETA %s", logged_step,
                 config.total_steps, values["loss"], values["lr"], rate,
                 time.strftime("%H:%M:%S", time.gmtime(eta)))
    writer.write(logged_step, values)
    last = values
    window[:] = [time.perf_counter(), 0]

  # Metrics are read one step late, so the host does not wait on the device mid-loop.
  pending = None
  try:
    while step < config.total_steps:
      batch = next(iterator)
      arrays = {k: jax.make_array_from_process_local_data(batch_sharding, batch[k])
                for k in ("image", "label")}
      state, metrics = train_step(state, arrays, train_rng)
      step += 1
      if pending is not None:
        check_and_log(*pending, force=False)
      window[1] += 1
      pending = (step, metrics)

      if f.eval_every_steps and step % f.eval_every_steps == 0 and step < config.total_steps:
        eval_start = time.perf_counter()
        top1 = evaluate(state.params)
        logging.info("step %d: top-1 %.4f on %s/%s", step, top1, config.data.name,
                     config.data.eval_split)
        writer.write(step, {"finetune/top1": top1})
        window[0] += time.perf_counter() - eval_start  # not counted against img/s

      preempted = preemption.reached(step)
      if step % config.checkpoint.every_steps == 0 or step == config.total_steps or preempted:
        train.check_savable(step, _fetch(metrics), state.params, last_saved, ckpt)
        ckpt.save(step, state, iterator)
        last_saved = step
      if preempted:
        logging.warning("stopped for preemption at step %d; rerun the same command to resume",
                        step)
        break
    if pending is not None:
      check_and_log(*pending, force=True)
  finally:
    ckpt.wait()
    ckpt.close()

  results = dict(last)
  if step >= config.total_steps:
    results["finetune/top1"] = evaluate(state.params)
    logging.info("fine-tuned top-1 on %s/%s: %.4f", config.data.name, config.data.eval_split,
                 results["finetune/top1"])
    writer.write(step, {"finetune/top1": results["finetune/top1"]})
  writer.close()
  return results
