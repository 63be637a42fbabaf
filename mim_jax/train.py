"""The one trainer: mesh, input, init, sharded jitted step, checkpoints, metrics, final evals.

Every method and model plugs in through the config; nothing here knows about MAE. The same code
runs on one CPU, a multi-GPU host or a TPU pod: the step is a single `jax.jit` over a global mesh,
and each process feeds its own shard of the batch.
"""

import signal
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from mim_jax import checkpoint
from mim_jax import flops
from mim_jax import methods
from mim_jax import optim
from mim_jax import sharding
from mim_jax.data import pipeline
from mim_jax.evaluators import suite
from mim_jax.metric_writer import MetricWriter


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or Inf; the last good checkpoint is kept."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


# ---------------------------------------------------------------------------------------------
# Model, optimizer and sharded state.
# ---------------------------------------------------------------------------------------------

def input_shape(config: ml_collections.ConfigDict, batch: int) -> tuple[int, int, int, int]:
  return (batch, config.image_size, config.image_size, config.data.channels)


def make_init_fn(model: nn.Module, tx: optax.GradientTransformation,
                 config: ml_collections.ConfigDict):
  def init(rng: jax.Array) -> TrainState:
    params_rng, mask_rng = jax.random.split(rng)
    images = jnp.zeros(input_shape(config, 1), jnp.float32)
    params = model.init({"params": params_rng, "mask": mask_rng}, images)["params"]
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  return init


def abstract_state(model: nn.Module, tx: optax.GradientTransformation,
                   config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rng: jax.Array
                   ) -> tuple[Any, Any]:
  """The train state's shapes, dtypes and shardings, without allocating anything.
  Returns (tree of ShapeDtypeStruct with shardings, tree of shardings)."""
  abstract = jax.eval_shape(make_init_fn(model, tx, config), rng)
  shardings = sharding.state_shardings(abstract, mesh, config)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return abstract, shardings


def create_state(model: nn.Module, tx: optax.GradientTransformation,
                 config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rng: jax.Array
                 ) -> tuple[TrainState, Any, Any]:
  """Parameters are born sharded: eval_shape, then shardings, then a jitted init placing each
  leaf straight into its sharding, so no host ever holds a full copy of an FSDP model.
  Returns (state, abstract state with shardings, shardings)."""
  abstract, shardings = abstract_state(model, tx, config, mesh, rng)
  state = jax.jit(make_init_fn(model, tx, config), out_shardings=shardings)(rng)
  return state, abstract, shardings


def make_step(loss_fn, tx: optax.GradientTransformation, state_shardings: Any,
              mesh: jax.sharding.Mesh):
  """A jitted step for any `loss_fn(params, batch, rng) -> (loss, metrics)`: loss and
  gradients, optimizer update, scalar metrics. `batch` is an array or a dict of arrays, each
  split over the data axis. The state is donated so its buffers are reused in place.
  Randomness is fold_in(rng, step), so a resumed run draws the same masks without saving any
  rng state. (Pretraining and fine-tuning, mim_jax/finetune.py, share it.)"""

  def step_fn(state: TrainState, batch: Any, rng: jax.Array):
    step_rng = jax.random.fold_in(rng, state.step)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch,
                                                                       step_rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
    return TrainState(state.step + 1, params, opt_state), metrics

  repl = sharding.replicated(mesh)
  return jax.jit(step_fn, in_shardings=(state_shardings, sharding.batch_sharding(mesh), repl),
                 out_shardings=(state_shardings, repl), donate_argnums=0)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, state_shardings: Any,
                    mesh: jax.sharding.Mesh):
  """The pretraining step: the method's (loss, metrics) on a batch of images."""

  def loss_fn(params, images: jax.Array, step_rng: jax.Array):
    return model.apply({"params": params}, images, train=True,
                       rngs={"mask": step_rng, "dropout": jax.random.fold_in(step_rng, 1)})

  return make_step(loss_fn, tx, state_shardings, mesh)


# ---------------------------------------------------------------------------------------------
# Preemption: SIGTERM asks for a checkpoint at the next step boundary.
# ---------------------------------------------------------------------------------------------

class PreemptionWatcher:
  """On one process a SIGTERM handler sets a flag. On several, JAX's coordination service
  delivers the preemption notice and every process agrees on the same step to stop at."""

  def __init__(self):
    self._flag = False
    if jax.process_count() == 1:
      signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint at the next step and stopping.")
    self._flag = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return multihost_utils.reached_preemption_sync_point(step)
    return self._flag


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------

@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def check_finite(step: int, metrics: dict[str, float], last_saved: int | None,
                 ckpt: checkpoint.Checkpointer) -> None:
  """Raises NonFiniteLossError naming the non-finite metrics and the checkpoint that is kept."""
  bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
  if bad:
    # An async save of the last good state may still be in flight: let it commit before the
    # error ends the process, or the checkpoint named below would be lost.
    ckpt.wait()
    kept = (f"the last good checkpoint (step {last_saved}) is kept in {ckpt.directory}"
            if last_saved else "no checkpoint was written")
    raise NonFiniteLossError(f"non-finite {bad} at step {step}; stopping: {kept}. Lower the "
                             f"learning rate or enable optim.grad_clip_norm.")


def check_savable(step: int, metrics: dict[str, float], params: Any, last_saved: int | None,
                  ckpt: checkpoint.Checkpointer) -> None:
  """Never save a broken state: raises (see check_finite) on a non-finite loss, or on a finite
  loss whose update made the params non-finite."""
  check_finite(step, metrics, last_saved, ckpt)
  if not _all_finite(params):
    check_finite(step, {"params after the update": float("nan")}, last_saved, ckpt)


def restore_or_create(config: ml_collections.ConfigDict, workdir: str, abstract: TrainState,
                      iterator: Any, create: Callable[[], TrainState]
                      ) -> tuple[checkpoint.Checkpointer, TrainState, int | None]:
  """Opens workdir's checkpoints and returns (checkpointer, state, step of the restored
  checkpoint or None). The state is the newest checkpoint, restored into `abstract`'s shardings
  (and checked against the model before anything is compiled; `iterator` moves to its saved
  position), or, in a fresh workdir, `create()`."""
  ckpt = checkpoint.Checkpointer(workdir, keep=config.checkpoint.keep,
                                 async_save=config.checkpoint.async_save)
  last_saved = ckpt.latest_step()
  if last_saved is None:
    return ckpt, create(), None
  state = ckpt.restore(last_saved, abstract, iterator)
  logging.info("resumed from step %d in %s", last_saved, ckpt.directory)
  return ckpt, state, last_saved


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (resuming from the newest checkpoint in workdir), then runs the final evals.
  Returns the last logged metrics and the eval results."""
  # Installed first, so a preemption during start-up or compilation is not lost either.
  preemption = PreemptionWatcher()

  # Mesh and input.
  mesh = sharding.make_mesh()
  iterator = pipeline.train_iterator(config)

  # Model and optimizer.
  model = methods.build(config)
  tx = optim.build(config)
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  abstract, state_shardings = abstract_state(model, tx, config, mesh, init_rng)
  num_params = sum(x.size for x in jax.tree.leaves(abstract.params))
  logging.info("model %s/%s: %.2fM parameters on %d devices (%d processes)",
               config.method.name, config.model.variant, num_params / 1e6, jax.device_count(),
               jax.process_count())

  ckpt, state, last_saved = restore_or_create(
      config, workdir, abstract, iterator,
      lambda: create_state(model, tx, config, mesh, init_rng)[0])
  start = int(state.step)

  train_step = make_train_step(model, tx, state_shardings, mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  lr_fn = optim.learning_rate(config)
  flops_per_image = methods.train_flops_per_example(config)
  peak = flops.matmul_peak(jnp.dtype(config.model.dtype)) * jax.device_count()
  writer = MetricWriter(workdir, resume_step=start)
  eval_suite = suite.Suite(config, model, mesh)  # the evaluators config.eval enables

  def fetch(step_metrics) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(step_metrics).items()}

  # Metrics are read one step late, so the host never waits on the device mid-loop.
  pending: tuple[int, Any] | None = None
  last = {}
  window_start, window_steps = time.perf_counter(), 0

  def check_and_log(logged_step: int, step_metrics, steps_done: int, force: bool) -> None:
    """Checks one step's metrics, and logs them on log steps (and when `force`).
    `steps_done`: steps completed since the last log, for the throughput."""
    nonlocal last, window_start, window_steps
    values = fetch(step_metrics)
    check_finite(logged_step, values, last_saved, ckpt)
    if not (force or logged_step % config.log_every_steps == 0 or logged_step == start + 1):
      return
    elapsed = time.perf_counter() - window_start
    # The first window includes compilation, so its rate would mislead.
    rate = config.batch_size * steps_done / elapsed if logged_step > start + 1 else 0.0
    values.update(lr=float(lr_fn(logged_step - 1)), images_per_sec=rate,
                  mfu=rate * flops_per_image / peak)
    eta = (config.total_steps - logged_step) * config.batch_size / rate if rate else 0.0
    logging.info("step %d/%d  loss %.4f  lr %.3g  %.1f img/s  MFU %.2f  ETA %s",
                 logged_step, config.total_steps, values["loss"], values["lr"], rate,
                 values["mfu"], time.strftime("%H:%M:%S", time.gmtime(eta)))
    writer.write(logged_step, values)
    last = values
    window_start, window_steps = time.perf_counter(), window_steps - steps_done

  # Any exit from the loop, an error included, lets in-flight saves commit first.
  try:
    step = start
    while step < config.total_steps:
      batch = next(iterator)
      images = jax.make_array_from_process_local_data(batch_sharding, batch["image"])
      state, metrics = train_step(state, images, train_rng)
      step += 1
      window_steps += 1

      if pending is not None:
        # The step just dispatched is still running: it counts towards the next window.
        check_and_log(*pending, steps_done=window_steps - 1, force=False)
      pending = (step, metrics)

      preempted = preemption.reached(step)
      if step % config.checkpoint.every_steps == 0 or step == config.total_steps or preempted:
        check_savable(step, fetch(metrics), state.params, last_saved, ckpt)
        ckpt.save(step, state, iterator)
        last_saved = step
      if eval_suite.due(step) and not preempted:  # periodic evals: config.eval.every_steps
        check_finite(step, fetch(metrics), last_saved, ckpt)  # never evaluate a broken state
        eval_start = time.perf_counter()
        writer.write(step, eval_suite.run(state.params, "pretrained"))
        window_start += time.perf_counter() - eval_start  # not counted against img/s
      if preempted:
        logging.warning("stopped for preemption at step %d; rerun the same command to resume",
                        step)
        break

    if pending is not None:
      # The last step (final or preempted) is always logged, so a resumed run's metrics.jsonl
      # continues it without a gap.
      check_and_log(*pending, steps_done=window_steps, force=True)
  finally:
    ckpt.wait()
    ckpt.close()
  results = dict(last)
  if step >= config.total_steps:
    from mim_jax.evaluators import final  # pylint: disable=g-import-not-at-top
    results.update(final.run(config, workdir, model, state.params, eval_suite,
                             make_init_fn(model, tx, config), init_rng))
    evals = {k: v for k, v in results.items() if k not in last}
    if evals:
      writer.write(step, evals)
  writer.close()
  return results
