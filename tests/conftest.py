"""Test setup and the helpers several test files share (`from conftest import Trainer, ...`).

Every in-process test sees 8 fake CPU devices: the flag must be set before jax is imported, so
it is set first, above the imports.

Compilation dominates the suite's time on CPU, and many tests compile the same programs again:
a new jit of the same step in another fixture, or a `python -m mim_jax.main` subprocess per run.
So the session has a persistent XLA compilation cache, which the subprocesses inherit through
the environment. It starts empty in a fresh directory each session (removed at the end), so a
run never meets entries from other code; entries are keyed by the compiled program, the compile
options, the XLA flags and the jax version, so a hit is the executable a compile would produce.
Every compile is cached (min time 0), not only those over jax's default 1 s. Measured on 2 busy
cores, tests/test_train.py (whose runs already shared a cache of the >1 s compiles) took 109-128 s
(mean 118) without this and 90-117 s (mean 102) with it, in four back-to-back pairs. Set
JAX_COMPILATION_CACHE_DIR to choose the directory (it is then kept), or
JAX_ENABLE_COMPILATION_CACHE=false to compile everything.
"""

import os
import shutil
import tempfile

_DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES_FLAG}".strip()
# XLA's CPU backend at optimisation level 0: the tests' programs are tiny, so compiling them is
# most of the suite's time and running them little. Measured on the w2v-BERT test's programs:
# init, the one-device and the 8-device train step compile in 15.7 s instead of 26.1 s, and a
# step runs in 40 ms instead of 25; the whole suite took 418 s instead of 593 s on 2 cores. The
# level is the backend's (LLVM's) code generation: every tolerance in the suite holds at both
# levels. Benchmarks and real runs keep the default. Subprocesses inherit it. Set XLA_FLAGS with
# its own --xla_backend_optimization_level to override.
_OPT_FLAG = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] = f"{os.environ['XLA_FLAGS']} {_OPT_FLAG}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_SESSION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _SESSION_CACHE = tempfile.mkdtemp(prefix="mim_jax_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


# pylint: disable=g-import-not-at-top,wrong-import-position
import math
import pathlib
import subprocess
import sys

import jax
import ml_collections
import numpy as np

from mim_jax import flops
from mim_jax import methods
from mim_jax import optim
from mim_jax import sharding
from mim_jax import train
from mim_jax import tree_paths

REPO = pathlib.Path(__file__).resolve().parents[1]
# The micro MAE: a Mu/4 ViT (2 blocks of width 64) and a 1x32 decoder on 16-px digits, batch 16.
# It trains in seconds on a CPU; the trainer, notebook and weights tests all run it.
MICRO_MAE = "variant=Mu/4,decoder=1x32,image_size=16,batch_size=16,data=digits"


# ---------------------------------------------------------------------------------------------
# Configs, arrays and parameter trees.
# ---------------------------------------------------------------------------------------------

def set_peak_lr(config: ml_collections.ConfigDict, lr: float) -> ml_collections.ConfigDict:
  """No warmup and a peak lr of `lr` from step 0, so a step visibly moves every parameter (a
  paper's recipe gives lr 0 at step 0, a no-op update to compare)."""
  config.optim.warmup_steps = 0
  config.optim.base_lr = lr * config.optim.lr_batch_base / config.batch_size
  return config


def no_evals(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Switches off every end-of-training evaluation and the reconstruction PNG."""
  for value in config.eval.values():
    if isinstance(value, ml_collections.ConfigDict) and "enabled" in value:
      value.enabled = False
  config.eval.reconstruction_png = False
  return config


def random_images(shape, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def num_params(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def abstract_params(config: ml_collections.ConfigDict):
  """The parameter tree of the config's method, traced only (jax.eval_shape: nothing is
  allocated)."""
  model = methods.build(config)
  return jax.eval_shape(lambda r: methods.init_params(model, config, r), jax.random.key(0))


def traced_matmul_flops(config: ml_collections.ConfigDict, batch: int = 2) -> tuple[int, int]:
  """Matmul FLOPs of the method's loss and of its gradient on a batch of `batch` examples,
  counted one by one in the traced programs (flops.jaxpr_matmul_flops); nothing is compiled."""
  model = methods.build(config)
  inputs = {name: jax.ShapeDtypeStruct((batch,) + spec.shape, spec.dtype)
            for name, spec in methods.inputs(config).items()}
  rng = jax.random.key(0)
  params = abstract_params(config)
  loss = lambda p, b, r: model.apply({"params": p}, **b, rngs={"mask": r})[0]
  forward = flops.jaxpr_matmul_flops(jax.make_jaxpr(loss)(params, inputs, rng))
  gradient = flops.jaxpr_matmul_flops(jax.make_jaxpr(jax.grad(loss))(params, inputs, rng))
  return forward, gradient


# ---------------------------------------------------------------------------------------------
# Real train steps on a mesh, and comparing their results across meshes.
# ---------------------------------------------------------------------------------------------

def mesh_of(devices) -> jax.sharding.Mesh:
  return jax.make_mesh((len(devices),), (sharding.AXIS,), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def to_host(tree):
  # np.array copies. On CPU, np.asarray and jax.device_get return zero-copy views that pin the
  # device buffer, and jit then silently skips donating it.
  return jax.tree.map(np.array, tree)


class Trainer:
  """The trainer's own state creation and jitted step (train.create_state, make_train_step) on
  `mesh`. The state is born sharded from `init_rng`, or, given `initial_state` (host arrays,
  e.g. another Trainer's), placed from it, which saves compiling init for this mesh."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
               init_rng: jax.Array, initial_state=None):
    self.mesh = mesh
    model, tx = methods.build(config), optim.build(config)
    if initial_state is None:
      self.state, _, self.shardings = train.create_state(model, tx, config, mesh, init_rng)
      initial_state = to_host(self.state)
    else:
      _, self.shardings = train.abstract_state(model, tx, config, mesh, init_rng)
      self.state = jax.device_put(initial_state, self.shardings)
    self.initial_state = initial_state
    self._step = train.make_train_step(model, tx, self.shardings, mesh)

  def step(self, batch: dict[str, np.ndarray], rng: jax.Array) -> dict[str, np.ndarray]:
    """One train step on `batch` (the method's inputs, e.g. {'image': ...}), split over the
    mesh; returns its metrics on the host."""
    batch = jax.device_put(batch, sharding.batch_sharding(self.mesh))
    self.state, metrics = self._step(self.state, batch, rng)
    return to_host(metrics)

  def run(self, batches, rng: jax.Array) -> list[dict[str, np.ndarray]]:
    return [self.step(images, rng) for images in batches]


def drop_key_bias(tree):
  """Removes the key third of every fused qkv bias.

  Softmax is shift-invariant and q.(k + b) = q.k + q.b adds the same logit to every key of a
  query, so the key bias has an exactly zero gradient: what autodiff returns is rounding noise
  (measured 1e-10, against 1e-3 to 1e-1 for the query and value biases), which Adam turns into
  an update of lr * noise / (|noise| + eps) whose sign depends on summation order. Comparing it
  across device counts compares noise, so it is left out."""
  def drop(name, x):
    if name.endswith("attn/qkv/bias"):
      d = x.shape[-1] // 3
      return np.concatenate([x[..., :d], x[..., 2 * d:]], -1)
    return x
  return tree_paths.map_with_names(drop, tree)


def assert_trees_close(got, want, rtol, atol, max_outliers=0.0, outlier_atol=0.0):
  """Every leaf within rtol/atol, except at most a `max_outliers` fraction of all elements,
  which must still be within `outlier_atol`. Key biases are left out (`drop_key_bias`).
  tests/test_sharding.py explains the outliers and measures the tolerances."""
  got, want = drop_key_bias(got), drop_key_bias(want)
  outliers, total = 0, 0
  for (name, g), w in zip(tree_paths.flatten(got).items(), jax.tree.leaves(want)):
    assert g.shape == w.shape and g.dtype == w.dtype, name
    np.testing.assert_allclose(g, w, rtol=0, atol=max(atol, outlier_atol), err_msg=name)
    outliers += int((np.abs(g - w) > atol + rtol * np.abs(w)).sum())
    total += g.size
  assert outliers <= max_outliers * total, f"{outliers} of {total} elements out of tolerance"


# ---------------------------------------------------------------------------------------------
# Speech methods: batches and the 8-device check every one of them runs.
# ---------------------------------------------------------------------------------------------

def speech_batches(config: ml_collections.ConfigDict, count: int) -> list[dict[str, np.ndarray]]:
  """The first `count` training batches of a speech config, without their labels."""
  from mim_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  iterator = pipeline.train_iterator(config, process_index=0, process_count=1)
  return [{k: v for k, v in next(iterator).items() if k != "label"} for _ in range(count)]


def train_checking_8_devices(config: ml_collections.ConfigDict, batches, rng: jax.Array,
                             lr: float, max_outliers: float = 1e-4,
                             outlier_lr_share: float = 0.1) -> list[dict[str, np.ndarray]]:
  """Trains on `batches` on one device and returns its metrics; the first 2 steps also run on 8
  fake devices, which must match. One run does both because compiling the step is most of a
  speech test's time: the one-device step then compiles once.

  Tolerances as in tests/test_sharding.py, in units of the peak `lr`: parameters agree within
  lr / 1000, except that Adam's first updates, lr * g / (|g| + eps), follow the summation-order
  noise of gradients within ~eps of zero, so 1 element in 10,000 (`max_outliers`) may be off
  by up to 10% of the lr (`outlier_lr_share`). The Conformer's relative-position projections
  have many such elements (measured 14% of them, up to 6% of the lr): the low-frequency
  sinusoids barely change over the utterance, so their columns add nearly the same logit to
  every key, which softmax ignores, as it does the key bias. They are held to the outlier bound
  only. A method may need more outliers or a larger bound (at most 2: Adam's first update is
  +-lr, so noise can at worst flip its sign); each says what it measured."""
  one = Trainer(config, mesh_of(jax.devices()[:1]), jax.random.key(0))
  eight = Trainer(config, mesh_of(jax.devices()), jax.random.key(0),
                  initial_state=one.initial_state)
  metrics = one.run(batches[:2], rng)
  for m1, m8 in zip(metrics, eight.run(batches[:2], rng)):
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)

  def split(state):  # (the positional projections, the rest), as flat dicts
    flat = tree_paths.flatten(to_host(state.params))
    pos = {k: v for k, v in flat.items() if k.endswith("attn/pos/kernel")}
    return pos, {k: v for k, v in flat.items() if k not in pos}
  (pos_8, rest_8), (pos_1, rest_1) = split(eight.state), split(one.state)
  assert pos_8, "no relative-position projections: not a Conformer?"
  assert_trees_close(rest_8, rest_1, 1e-5, lr / 1e3, max_outliers=max_outliers,
                     outlier_atol=outlier_lr_share * lr)
  assert_trees_close(pos_8, pos_1, 1e-4, outlier_lr_share * lr)
  return metrics + one.run(batches[2:], rng)


# ---------------------------------------------------------------------------------------------
# Subprocesses.
# ---------------------------------------------------------------------------------------------

def subprocess_env(devices: int = 1) -> dict[str, str]:
  """This process's environment for a child process on CPU with `devices` fake devices (the 8
  set above are replaced: a child compiles for what it runs on)."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if "xla_force_host_platform_device_count" not in f]
  if devices > 1:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  env["XLA_FLAGS"] = " ".join(flags)
  env["JAX_PLATFORMS"] = "cpu"
  # Measured once per worker and handed down: each trainer would spend ~2.5 s measuring it.
  env.setdefault(flops.PEAK_ENV, repr(flops.matmul_peak()))
  return env


def run_module(module: str, *flags: str, devices: int = 1,
               timeout: float = 120) -> subprocess.CompletedProcess:
  """`python -m <module> <flags>` from the repo root, in `subprocess_env(devices)`; stdout and
  stderr are captured and a failure is returned, not raised."""
  return subprocess.run([sys.executable, "-m", module, *flags], cwd=REPO,
                        env=subprocess_env(devices), capture_output=True, text=True,
                        timeout=timeout, check=False)


def pytest_unconfigure(config) -> None:
  """Removes the session's compilation cache (not one JAX_COMPILATION_CACHE_DIR chose)."""
  del config
  if _SESSION_CACHE is not None:
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
