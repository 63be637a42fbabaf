"""The one trainer: mesh, input, init, sharded jitted step, checkpoints, metrics, final evals.

Every method plugs in through the config (pretraining objectives and fine-tuning alike); nothing
here knows about MAE or about images. A method declares the arrays it consumes
(`methods.inputs`), and the trainer builds the init inputs and batch shardings from that. The
same code runs on one CPU, a multi-GPU host or a TPU pod: the step is a single `jax.jit` over a
global mesh, and each process feeds its own shard of the batch.
"""

import contextlib
import inspect
from typing import Any, Callable, Iterator

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from mim_jax import checkpoint
from mim_jax import compile_options
from mim_jax import disk_full
from mim_jax import final_results
from mim_jax import flops
from mim_jax import init_from
from mim_jax import methods
from mim_jax import optim
from mim_jax import preemption
from mim_jax import pretrained
from mim_jax import sharding
from mim_jax import workdir_lock
from mim_jax.data import pipeline
from mim_jax.evaluators import final
from mim_jax.evaluators import suite
from mim_jax.metric_writer import MetricWriter
from mim_jax.progress import Progress
from mim_jax.progress import fetch


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

def make_init_fn(model: nn.Module, tx: optax.GradientTransformation,
                 config: ml_collections.ConfigDict) -> Callable[[jax.Array], TrainState]:
  def init(rng: jax.Array) -> TrainState:
    params = methods.init_params(model, config, rng)
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  return init


def param_initializer(model: nn.Module, config: ml_collections.ConfigDict,
                      param_shardings: Any) -> Callable[[jax.Array], Any]:
  """The method's random init, jitted, each leaf born in its sharding. A run makes one and calls
  it twice: for its state, and for the final evaluations' random-init baseline, which so costs
  no second compile (5 CPU-s for a Ti encoder, a tenth of a CPU runlocal's evaluations)."""
  return jax.jit(lambda rng: methods.init_params(model, config, rng),
                 out_shardings=param_shardings,
                 compiler_options=compile_options.for_platform())


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


def read_frozen(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The method's frozen encoders (methods.frozen_encoders: a distillation teacher) as host
  trees by parameter subtree, each read from its source and checked against the encoder its
  config builds. A missing or mismatched source raises, naming the config field that gave it."""
  trees = {}
  for subtree, (source, encoder_config, label) in methods.frozen_encoders(config).items():
    with _labelled(label):
      trees[subtree] = pretrained.load_encoder_params(source, encoder_config)
  return trees


@contextlib.contextmanager
def _labelled(label: str) -> Iterator[None]:
  """Re-raises a bad source's FileNotFoundError or ValueError prefixed with `label`, the config
  field that named it."""
  try:
    yield
  except (FileNotFoundError, ValueError) as error:
    raise type(error)(f"{label}: {error}") from error


def create_state(model: nn.Module, tx: optax.GradientTransformation,
                 config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rng: jax.Array,
                 init_params: Callable[[jax.Array], Any] | None = None
                 ) -> tuple[TrainState, Any, Any]:
  """Parameters are born sharded: eval_shape, then shardings, then a jitted init placing each
  leaf straight into its sharding, so no host ever holds a full copy of an FSDP model.
  `init_params` is that init (`param_initializer`), if the caller keeps it for another use;
  the optimizer state is then initialised from its output, in a second jitted call.
  With `config.init_from`, the pretrained parameters then replace the random ones
  (mim_jax/init_from.py). A method's frozen encoders (`read_frozen`) are read before anything
  compiles, so a bad source fails at once, and replace their subtrees last.
  Returns (state, abstract state with shardings, shardings)."""
  frozen = read_frozen(config)
  abstract, shardings = abstract_state(model, tx, config, mesh, rng)
  init_params = init_params or param_initializer(model, config, shardings.params)
  params = init_params(rng)
  step, opt_state = jax.jit(lambda p: (jnp.zeros((), jnp.int32), tx.init(p)),
                            out_shardings=(shardings.step, shardings.opt_state))(params)
  state = TrainState(step, params, opt_state)
  if config.init_from:
    state = state.replace(params=init_from.load(state.params, config, shardings.params))
  if frozen:
    placed = jax.device_put(frozen, {name: shardings.params[name] for name in frozen})
    state = state.replace(params={**state.params, **placed})
  return state, abstract, shardings


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, state_shardings: Any,
                    mesh: jax.sharding.Mesh):
  """The jitted step for any method: `batch` is a dict of the method's input arrays, each split
  over the data axis; the method returns (loss, metrics); then gradients, the optimizer update
  and scalar metrics. The state is donated so its buffers are reused in place. Randomness is
  fold_in(rng, step), so a resumed run draws the same masks without saving any rng state."""

  # A method whose loss depends on training progress (an annealed temperature, a ramp) takes
  # the step as a keyword argument `step` (int32 scalar, 0 at the first update).
  takes_step = "step" in inspect.signature(type(model).__call__).parameters

  def loss_fn(params, batch: dict[str, jax.Array], step_rng: jax.Array, step: jax.Array):
    progress = {"step": step} if takes_step else {}
    return model.apply({"params": params}, **batch, **progress, train=True,
                       rngs={"mask": step_rng, "dropout": jax.random.fold_in(step_rng, 1)})

  def step_fn(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array):
    step_rng = jax.random.fold_in(rng, state.step)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch,
                                                                       step_rng, state.step)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
    return TrainState(state.step + 1, params, opt_state), metrics

  repl = sharding.replicated(mesh)
  return jax.jit(step_fn, in_shardings=(state_shardings, sharding.batch_sharding(mesh), repl),
                 out_shardings=(state_shardings, repl), donate_argnums=0,
                 compiler_options=compile_options.for_platform(mesh.devices.flat[0].platform))


def device_batch(host_batch: dict[str, Any], inputs: dict[str, jax.ShapeDtypeStruct],
                 batch_sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
  """This process's rows of the arrays the method consumes -> global arrays on the mesh.
  Raises ValueError when the data lacks an input or gives it another per-example shape."""
  out = {}
  for name, spec in inputs.items():
    if name not in host_batch:
      raise ValueError(f"the method consumes {name!r}, which the data does not give (it gives "
                       f"{sorted(host_batch)}); check data.name and method.name")
    array = host_batch[name]
    if tuple(array.shape[1:]) != spec.shape:
      raise ValueError(f"the method expects {name!r} of per-example shape {spec.shape}, the "
                       f"data gives {tuple(array.shape[1:])}")
    out[name] = jax.make_array_from_process_local_data(batch_sharding,
                                                       np.asarray(array, spec.dtype))
  return out


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
  checkpoint or None). The state is the newest intact checkpoint (damaged newer ones are set
  aside), restored into `abstract`'s shardings (and checked against the model before anything
  is compiled; `iterator` moves to its saved position), or, in a fresh workdir, `create()`."""
  ckpt = checkpoint.Checkpointer(workdir, keep=config.checkpoint.keep,
                                 async_save=config.checkpoint.async_save)
  restored = ckpt.restore_newest(abstract, iterator)
  if restored is None:
    return ckpt, create(), None
  state, last_saved = restored
  logging.info("resumed from step %d in %s", last_saved, ckpt.directory)
  return ckpt, state, last_saved


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (resuming from the newest checkpoint in workdir), then runs the final evals.
  Returns the last logged metrics and the eval results (also written to workdir/results.json;
  rerunning a finished run returns them without training or evaluating again). Process 0 holds
  the workdir's lock throughout: a second run on the same workdir is refused, naming this one.
  SIGTERM or Ctrl-C stops it at the next step with a checkpoint, or stops the final evals
  (mim_jax/preemption.py); after a Ctrl-C it raises preemption.Interrupted once all is saved."""
  init_from.check(config, workdir)  # before anything is written: a typo leaves no workdir
  if pretrained.latest_checkpoint_step(workdir) is None:  # a resumed run has them in its state
    for source, _, label in methods.frozen_encoders(config).values():
      with _labelled(label):
        pretrained.check_source(source)
  # The handlers come first, so a signal during start-up or compilation is not lost either.
  with preemption.Watcher() as watcher:
    if jax.process_index() != 0:
      results = _train_and_evaluate(config, workdir, watcher)
    else:
      with workdir_lock.hold(workdir, log=logging.warning):
        results = _train_and_evaluate(config, workdir, watcher)
  watcher.raise_if_interrupted()
  return results


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        watcher: preemption.Watcher) -> dict[str, float]:
  # Mesh and input.
  mesh = sharding.make_mesh()
  iterator = pipeline.train_iterator(config)
  batch_sharding = sharding.batch_sharding(mesh)

  # Model and optimizer.
  model = methods.build(config)
  inputs = methods.inputs(config)
  tx = optim.build(config)
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  abstract, state_shardings = abstract_state(model, tx, config, mesh, init_rng)
  num_params = sum(x.size for x in jax.tree.leaves(abstract.params))
  logging.info("model %s/%s: %.2fM parameters on %d devices (%d processes)",
               config.method.name, config.model.variant, num_params / 1e6, jax.device_count(),
               jax.process_count())

  if config.optim.warmup_steps > config.total_steps:
    logging.warning("optim.warmup_steps %d is more than total_steps %d: the learning rate "
                    "never reaches its peak; lower --config.optim.warmup_steps",
                    config.optim.warmup_steps, config.total_steps)

  # State: the newest checkpoint, or a fresh (possibly pretrained) one.
  init_params = param_initializer(model, config, state_shardings.params)
  ckpt, state, last_saved = restore_or_create(
      config, workdir, abstract, iterator,
      lambda: create_state(model, tx, config, mesh, init_rng, init_params)[0])
  start = step = int(state.step)
  if start > config.total_steps:
    ckpt.close()
    raise ValueError(f"{workdir} holds a checkpoint at step {start}, past total_steps "
                     f"{config.total_steps}: raise --config.total_steps above {start} to train "
                     f"on, or pass a new --workdir")
  finished = final_results.read(workdir, config.total_steps)
  if finished is not None:
    ckpt.close()
    logging.info("this run finished already (step %d); its results are in %s", start,
                 final_results.path(workdir))
    return finished

  # Step, evaluators, metrics.
  train_step = make_train_step(model, tx, state_shardings, mesh)
  eval_suite = suite.Suite(config, model, mesh)  # the evaluators config.eval enables
  writer = MetricWriter(workdir, resume_step=start)
  progress = Progress(
      start=start, total_steps=config.total_steps, log_every=config.log_every_steps,
      batch_size=config.batch_size, flops_per_example=methods.train_flops_per_example(config),
      peak_flops=flops.matmul_peak(jnp.dtype(config.model.dtype)) * jax.device_count(),
      lr_fn=optim.learning_rate(config), write=writer.write,
      check=lambda s, values: check_finite(s, values, last_saved, ckpt))

  # The loop. Any exit from it, an error included, lets in-flight saves commit first. A save
  # that fails for a full disk ends the run with one line: the space needed, the step kept.
  with disk_full.reported(ckpt.directory, disk_full.state_bytes(abstract)):
    try:
      while step < config.total_steps:
        with progress.waiting_for_input():  # host time only: no device sync (progress.py)
          batch = device_batch(next(iterator), inputs, batch_sharding)
        state, metrics = train_step(state, batch, train_rng)
        step += 1
        progress.push(step, metrics)  # reads the previous step's metrics, logs on log steps

        preempted = watcher.reached(step)
        if step % config.checkpoint.every_steps == 0 or step == config.total_steps or preempted:
          check_savable(step, fetch(metrics), state.params, last_saved, ckpt)
          ckpt.save(step, state, iterator)
          last_saved = step
        if eval_suite.due(step) and not preempted:  # periodic evals: config.eval.every_steps
          check_finite(step, fetch(metrics), last_saved, ckpt)  # never evaluate a broken state
          with progress.paused():  # not counted against the throughput
            writer.write(step, eval_suite.run(state.params, config.eval.run_name))
        if preempted:
          logging.warning("stopped %s at step %d; rerun the same command to resume", watcher.cause,
                          step)
          break
      watcher.training_done(step)
      progress.flush()  # the last step is always logged, so a resumed run continues it
    finally:
      try:
        ckpt.wait()
      finally:
        ckpt.close()

  results = dict(progress.last)
  if step >= config.total_steps:
    try:
      with watcher.final_evals():
        logging.info("training done (step %d); running the final evaluations", step)
        evals = final.run(config, workdir, model, state.params, eval_suite, init_params,
                          init_rng)
    except preemption.EvalsStopped:
      # No results.json: a rerun of the same command finds the checkpoint at total_steps
      # and runs the final evals alone.
      logging.warning("final evaluations stopped %s; rerun the same command, or --mode=eval, "
                      "to run them", watcher.cause)
    else:
      if evals:
        writer.write(step, evals)
      results.update(evals)
      final_results.write(workdir, step, results)
  writer.close()
  return results
