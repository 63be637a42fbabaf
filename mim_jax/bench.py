r"""Throughput and MFU of the real train step, on a fixed synthetic batch already on the device;
with --mode=data, throughput of the input pipeline alone.

  python -m mim_jax.bench \
      --config=configs/mae_vit.py:variant=Ti/4,decoder=4x128,image_size=32,batch_size=128 \
      [--config.model.exact_gelu=False] [--steps=20] [--warmup=5]
  python -m mim_jax.bench --config=configs/bestrq_conformer.py:runlocal

The mesh, model, optimizer, state and jitted step are the trainer's own (train.create_state,
train.make_train_step, state donated), so the number is what training gets minus the input
pipeline. On CPU, set GLIBC_TUNABLES as `make bench` does (the Makefile says why), or the
step pays glibc's page faults (page_faults_per_step). Prints one JSON line: the config argument
and overrides, devices, images_per_sec (examples per second; for audio also
utterance_seconds_per_sec, seconds of audio per second), step_ms, compile_s (lower + compile),
train_flops_per_image (analytic, from the architecture), achieved_flops_per_sec,
peak_flops_per_sec (flops.matmul_peak on the same backend and compute dtype, times the device
count), mfu, xla_flops_per_image (compiled.cost_analysis(), a cross-check: XLA counts per
device, scaled here by the device count), page_faults_per_step (host minor faults, which
the Makefile's GLIBC_TUNABLES remove on CPU), and for a config with an image mask
(`config.mask`), mask_ms and mask_share: making the batch's masks alone, jitted and timed the
same way, and its share of step_ms (an upper bound on what the masks cost inside the step,
where XLA may overlap them with other work). That is the configured generator's draw, and for a
mask the model scores (masking.SCORED) the method's own draw_mask on the batch: HPM's loss
predictor over the whole image, or the teacher's forward, then the argsort.

`--profile=DIR` then runs a few more steps under `jax.profiler.trace(DIR)` (TensorBoard's
profile plugin or xprof reads it) and writes the compiled step's HLO text next to it:
`python -m benchmarks.trace_breakdown --profile=DIR` sums the trace's time by kind of op.

`--serve` then keeps the compiled step and times more of it on request, one count of steps per
line of stdin, one JSON line back each (mim_jax/timed_rounds.py): `python -m benchmarks.compare`
(what `make bench` runs) alternates rounds of this and of the PyTorch peer that way.

`--mode=data` times the input pipeline instead, with no model: this host's train iterator
(mim_jax/data/pipeline.py: source, shuffle, MAE's augmentation, batching) for the config's image
size and per-host batch, on each of digits, a folder of JPEGs written for the run
(`--jpeg_files` files of `--jpeg_side` px) and synthetic images, with data.num_workers 0 and 2
(`--data_sources`, `--data_workers`). One JSON line each: examples_per_sec (per host), batch_ms,
first_batch_s (opening the source and the first batch, workers' start included) after which
`--warmup` batches are untimed and at least `--steps` timed, over at least `--data_seconds`.
"""

import json
import os
import resource
import sys
import tempfile
import time
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
from PIL import Image

from mim_jax import config_validation
from mim_jax import errors
from mim_jax import flops
from mim_jax import masking
from mim_jax import methods
from mim_jax import models
from mim_jax import optim
from mim_jax import sharding
from mim_jax import timed_rounds
from mim_jax import train
from mim_jax.data import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. "
                                          "configs/mae_vit.py:variant=Ti/4.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps (data mode: batches).")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed steps after compilation; the first few "
                               "still grow the heap (see page_faults_per_step). Data mode: "
                               "untimed batches after the first.")
_MODE = flags.DEFINE_enum("mode", "step", ["step", "data"], "step: the train step on a fixed "
                          "batch; data: the input pipeline alone.")
_PROFILE = flags.DEFINE_string("profile", "", "step mode: write a jax.profiler trace of "
                               "PROFILE_STEPS more steps to this directory.")
_SERVE = flags.DEFINE_bool("serve", False, "step mode: after the JSON line, time more steps "
                           "on request, one count per line of stdin (mim_jax/timed_rounds.py; "
                           "benchmarks/compare.py drives it).")
_DATA_SOURCES = flags.DEFINE_list("data_sources", "digits,folder,synthetic", "data mode: "
                                  "sources to time; 'folder' is the JPEG folder written here.")
_DATA_WORKERS = flags.DEFINE_list("data_workers", "0,2", "data mode: data.num_workers values.")
_JPEG_FILES = flags.DEFINE_integer("jpeg_files", 512, "data mode: JPEGs in the folder source.")
_JPEG_SIDE = flags.DEFINE_integer("jpeg_side", 256, "data mode: their side in pixels.")
_DATA_SECONDS = flags.DEFINE_float("data_seconds", 3.0, "data mode: the least time each "
                                   "configuration is timed for.")
flags.mark_flags_as_required(["config"])

# Enough steps for a trace to show the steady state, few enough to keep it small to load.
PROFILE_STEPS = 3
HLO_FILE = "train_step.hlo.txt"
DATA_SOURCES = ("digits", "folder", "synthetic")


def _xla_flops(compiled: jax.stages.Compiled) -> float:
  """FLOPs of one call of `compiled` on one device, as XLA counts them (0 if unavailable)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older JAX: one dict per module
  return float((cost or {}).get("flops", 0.0))


def mask_ms(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, model: nn.Module,
            params: Any, batch: dict[str, jax.Array]) -> float | None:
  """Milliseconds to make one batch's masks (a fresh key each time, as every step has), or None
  for a config without an image mask: the configured generator's draw, or for a model-scored
  mask (masking.SCORED) `model.draw_mask` on the batch's images with `params`, which runs the
  scoring pass too."""
  if "mask" not in config or "ratio" not in config.mask or "image_size" not in config:
    return None
  if config.mask.name in masking.SCORED:
    scored = lambda p, rng: model.apply({"params": p}, batch["image"], method="draw_mask",
                                        rngs={"mask": rng}).mask
    draw = jax.jit(scored, out_shardings=sharding.batch_sharding(mesh))
  else:
    spec = masking.MaskSpec.from_config(config.mask)
    side = config.image_size // models.build_encoder(config).patch
    draw = jax.jit(lambda _, rng: masking.draw(rng, config.batch_size, (side, side), spec).mask,
                   out_shardings=sharding.batch_sharding(mesh))
  keys = [jax.random.key(i) for i in range(_WARMUP.value + _STEPS.value)]
  for key in keys[:_WARMUP.value]:
    draw(params, key).block_until_ready()
  start = time.perf_counter()
  out = [draw(params, key) for key in keys[_WARMUP.value:]]
  jax.block_until_ready(out)
  return 1e3 * (time.perf_counter() - start) / _STEPS.value


def synthetic_batch(config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
  """A fixed global batch of the method's inputs: standard normal floats (images, audio),
  True for booleans (padding masks: every position valid), for an integer `<x>_len` the full
  length of input `<x>` (no padding), zeros for other integers (labels)."""
  inputs = methods.inputs(config)
  batch = {}
  for name, spec in inputs.items():
    shape = (config.batch_size,) + spec.shape
    padded = name.removesuffix("_len")
    if jnp.issubdtype(spec.dtype, jnp.floating):
      batch[name] = jax.random.normal(jax.random.key(1), shape, spec.dtype)
    elif name.endswith("_len") and padded in inputs:
      batch[name] = jnp.full(shape, inputs[padded].shape[0], spec.dtype)
    else:
      batch[name] = jnp.full(shape, spec.dtype == jnp.bool_, spec.dtype)
  return batch


def step_bench(config: ml_collections.ConfigDict
               ) -> tuple[dict[str, float], Callable[[int], None]]:
  """The figures of the train step (see the module docstring), and a function that runs more
  steps of it, returning once they have finished (what --serve times)."""
  mesh = sharding.make_mesh()
  model = methods.build(config)
  tx = optim.build(config)
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  state, _, state_shardings = train.create_state(model, tx, config, mesh, init_rng)
  train_step = train.make_train_step(model, tx, state_shardings, mesh)
  batch = jax.device_put(synthetic_batch(config), sharding.batch_sharding(mesh))

  start = time.perf_counter()
  compiled = train_step.lower(state, batch, train_rng).compile()
  compile_s = time.perf_counter() - start

  metrics = None

  def run_steps(steps: int) -> None:
    nonlocal state, metrics
    for _ in range(steps):
      state, metrics = compiled(state, batch, train_rng)
    jax.block_until_ready((state, metrics))

  run_steps(_WARMUP.value)
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  start = time.perf_counter()
  run_steps(_STEPS.value)
  step_s = (time.perf_counter() - start) / _STEPS.value
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

  if _PROFILE.value:  # after the timed steps, so tracing does not slow what is reported
    with jax.profiler.trace(_PROFILE.value):
      run_steps(PROFILE_STEPS)
    # The optimised program, whose instruction names the trace's events carry (with the jax
    # op and module path of each as metadata): what a breakdown of the trace reads.
    with open(os.path.join(_PROFILE.value, HLO_FILE), "w", encoding="utf-8") as f:
      f.write(compiled.as_text())
    logging.info("wrote a trace of %d steps and %s to %s", PROFILE_STEPS, HLO_FILE,
                 _PROFILE.value)

  devices = jax.device_count()
  images_per_sec = config.batch_size / step_s
  flops_per_image = methods.train_flops_per_example(config)
  peak = flops.matmul_peak(jnp.dtype(config.model.dtype)) * devices
  achieved = images_per_sec * flops_per_image
  audio = ({"utterance_seconds_per_sec": round(images_per_sec * config.data.clip_seconds, 2)}
           if config.data.get("modality", "image") == "audio" else {})
  masks = mask_ms(config, mesh, model, state.params, batch)
  masks = ({} if masks is None else
           {"mask_ms": round(masks, 3), "mask_share": round(masks / (1e3 * step_s), 4)})
  return {
      "devices": devices, "platform": jax.devices()[0].platform,
      "images_per_sec": round(images_per_sec, 2), **audio, "step_ms": round(1e3 * step_s, 2),
      "compile_s": round(compile_s, 2), "loss": float(metrics["loss"]),
      "train_flops_per_image": flops_per_image,
      "xla_flops_per_image": _xla_flops(compiled) * devices / config.batch_size,
      "achieved_flops_per_sec": achieved, "peak_flops_per_sec": peak,
      "mfu": round(achieved / peak, 4),
      "page_faults_per_step": faults // _STEPS.value, **masks,
  }, run_steps


# ---------------------------------------------------------------------------------------------
# --mode=data: the input pipeline alone.
# ---------------------------------------------------------------------------------------------

def write_jpegs(directory: str, count: int, side: int) -> None:
  """`count` RGB JPEGs of side x side px (quality 90): smooth random colour fields plus fine
  noise, which compress and decode more like photos than flat or white-noise images do."""
  rng = np.random.default_rng(0)
  for i in range(count):
    coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((side, side), Image.Resampling.BICUBIC), np.int16)
    image = np.clip(smooth + rng.integers(-8, 9, smooth.shape), 0, 255).astype(np.uint8)
    Image.fromarray(image).save(os.path.join(directory, f"{i:05d}.jpg"), quality=90)


def time_input(config: ml_collections.ConfigDict) -> dict[str, float]:
  """Times this host's train iterator for `config`: the first batch (opening the source and
  starting any workers), `--warmup` untimed batches, then at least `--steps` timed ones over
  at least `--data_seconds`. grain's reader threads work ahead of the consumer, so a short
  window would time batches made before it began rather than the pipeline's rate."""
  start = time.perf_counter()
  iterator = pipeline.train_iterator(config)
  try:
    next(iterator)
    first_batch_s = time.perf_counter() - start
    for _ in range(_WARMUP.value):
      next(iterator)
    start, batches = time.perf_counter(), 0
    while batches < _STEPS.value or time.perf_counter() - start < _DATA_SECONDS.value:
      next(iterator)
      batches += 1
    batch_s = (time.perf_counter() - start) / batches
  finally:
    iterator.close()  # stops the workers before the next configuration runs
  host_batch = config.batch_size // jax.process_count()
  return {"host_batch": host_batch, "examples_per_sec": round(host_batch / batch_s, 1),
          # 0.1 ms resolution: a small source's first batch now comes in a few milliseconds.
          "batch_ms": round(1e3 * batch_s, 2), "first_batch_s": round(first_batch_s, 4)}


def data_bench(config: ml_collections.ConfigDict) -> Iterator[dict[str, Any]]:
  """One row per source in --data_sources and num_workers in --data_workers, each as soon as
  it is measured."""
  if bad := [name for name in _DATA_SOURCES.value if name not in DATA_SOURCES]:
    raise ValueError(f"--data_sources: unknown {bad}; valid: {', '.join(DATA_SOURCES)}")
  try:
    workers = [int(w) for w in _DATA_WORKERS.value]
  except ValueError:
    raise ValueError(f"--data_workers={','.join(_DATA_WORKERS.value)}: expected integers >= 0, "
                     f"e.g. 0,2") from None
  if "image_size" not in config or min(workers, default=0) < 0:
    raise ValueError(f"--mode=data times image pipelines with num_workers >= 0; got a config "
                     f"without image_size or --data_workers={workers}")
  with tempfile.TemporaryDirectory(prefix="mim_jax_bench_jpegs_") as folder:
    if "folder" in _DATA_SOURCES.value:
      write_jpegs(folder, _JPEG_FILES.value, _JPEG_SIDE.value)
    for source in _DATA_SOURCES.value:
      for num_workers in workers:
        run = config.copy_and_resolve_references()
        run.data.name = f"folder:{folder}" if source == "folder" else source
        run.data.num_workers = num_workers
        yield {"source": source, "num_workers": num_workers, **time_input(run)}


@errors.reporting
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  config_validation.validate(config)
  run = {"config": next((a.partition(":")[2] for a in sys.argv if a.startswith("--config=")), ""),
         "overrides": [a for a in sys.argv[1:] if a.startswith("--config.")]}
  if _MODE.value == "data":
    if _SERVE.value:
      raise ValueError("--serve times rounds of the train step; it does not apply to "
                       "--mode=data")
    for row in data_bench(config):
      print(json.dumps({**run, **row}), flush=True)
    return
  row, run_steps = step_bench(config)
  print(json.dumps({**run, **row}), flush=True)
  if _SERVE.value:
    timed_rounds.serve(run_steps)


if __name__ == "__main__":
  jax.config.config_with_absl()
  app.run(main, flags_parser=errors.parse_flags)
