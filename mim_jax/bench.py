r"""Throughput and MFU of the real train step, on a fixed synthetic batch already on the device.

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
(`config.mask`), mask_ms and mask_share: the configured generator drawing the batch's masks
alone, jitted and timed the same way, and its share of step_ms (an upper bound on what the
masks cost inside the step, where XLA may overlap them with other work).
"""

import json
import resource
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
from absl import app
from absl import flags
from ml_collections import config_flags

from mim_jax import config_validation
from mim_jax import errors
from mim_jax import flops
from mim_jax import masking
from mim_jax import methods
from mim_jax import models
from mim_jax import optim
from mim_jax import sharding
from mim_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. "
                                          "configs/mae_vit.py:variant=Ti/4.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed steps after compilation; the first few "
                               "still grow the heap (see page_faults_per_step).")
flags.mark_flags_as_required(["config"])


def _xla_flops(compiled: jax.stages.Compiled) -> float:
  """FLOPs of one call of `compiled` on one device, as XLA counts them (0 if unavailable)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older JAX: one dict per module
  return float((cost or {}).get("flops", 0.0))


def mask_ms(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> float | None:
  """Milliseconds to draw one batch's masks with the configured generator (a fresh key each
  time, as every step has), or None for a config without an image mask."""
  if "mask" not in config or "ratio" not in config.mask or "image_size" not in config:
    return None
  spec = masking.MaskSpec.from_config(config.mask)
  side = config.image_size // models.build_encoder(config).patch
  draw = jax.jit(lambda rng: masking.draw(rng, config.batch_size, (side, side), spec).mask,
                 out_shardings=sharding.batch_sharding(mesh))
  keys = [jax.random.key(i) for i in range(_WARMUP.value + _STEPS.value)]
  for key in keys[:_WARMUP.value]:
    draw(key).block_until_ready()
  start = time.perf_counter()
  out = [draw(key) for key in keys[_WARMUP.value:]]
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


@errors.reporting
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  config_validation.validate(config)

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

  for _ in range(_WARMUP.value):
    state, metrics = compiled(state, batch, train_rng)
  jax.block_until_ready((state, metrics))
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    state, metrics = compiled(state, batch, train_rng)
  jax.block_until_ready((state, metrics))
  step_s = (time.perf_counter() - start) / _STEPS.value
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

  devices = jax.device_count()
  images_per_sec = config.batch_size / step_s
  flops_per_image = methods.train_flops_per_example(config)
  peak = flops.matmul_peak(jnp.dtype(config.model.dtype)) * devices
  achieved = images_per_sec * flops_per_image
  config_arg = next((a.partition(":")[2] for a in sys.argv if a.startswith("--config=")), "")
  audio = ({"utterance_seconds_per_sec": round(images_per_sec * config.data.clip_seconds, 2)}
           if config.data.get("modality", "image") == "audio" else {})
  masks = mask_ms(config, mesh)
  masks = ({} if masks is None else
           {"mask_ms": round(masks, 3), "mask_share": round(masks / (1e3 * step_s), 4)})
  print(json.dumps({
      "config": config_arg,
      "overrides": [a for a in sys.argv[1:] if a.startswith("--config.")],
      "devices": devices, "platform": jax.devices()[0].platform,
      "images_per_sec": round(images_per_sec, 2), **audio, "step_ms": round(1e3 * step_s, 2),
      "compile_s": round(compile_s, 2), "loss": float(metrics["loss"]),
      "train_flops_per_image": flops_per_image,
      "xla_flops_per_image": _xla_flops(compiled) * devices / config.batch_size,
      "achieved_flops_per_sec": achieved, "peak_flops_per_sec": peak,
      "mfu": round(achieved / peak, 4),
      "page_faults_per_step": faults // _STEPS.value, **masks,
  }))


if __name__ == "__main__":
  jax.config.config_with_absl()
  app.run(main, flags_parser=errors.parse_flags)
