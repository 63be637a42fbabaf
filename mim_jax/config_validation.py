"""Checks a config before anything is built or compiled, so a typo fails in a second with a
message naming the bad value and what would be valid, not after minutes of compilation."""

import jax
import ml_collections

from mim_jax import methods
from mim_jax import models
from mim_jax import optim
from mim_jax.models import layer_loop
from mim_jax.data import pipeline
from mim_jax.data import sources
from mim_jax.evaluators import suite


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError on the first invalid field."""
  models.dtype(config.model.dtype)
  models.dtype(config.model.param_dtype)
  layer_loop.policy_name(config.model.remat)
  models.build_encoder(config)  # unknown model, variant, attention_impl
  methods.validate(config)  # unknown method, and what the method itself needs
  optim.validate(config)
  suite.validate(config)  # the evaluators' feature specs and settings (config.eval)
  devices = jax.device_count()
  if config.batch_size <= 0 or config.batch_size % devices:
    raise ValueError(f"batch_size {config.batch_size} must be a positive multiple of the "
                     f"number of devices ({devices})")
  sources.check_name(config.data.name)
  if config.data.on_corrupt not in ("skip", "error"):
    raise ValueError(f"data.on_corrupt must be 'skip' or 'error', got {config.data.on_corrupt!r}")
  pipeline.check_channels(config)
  for field in ("total_steps", "log_every_steps"):
    if config[field] <= 0:
      raise ValueError(f"{field} must be positive, got {config[field]}")
  if config.checkpoint.every_steps <= 0 or config.checkpoint.keep <= 0:
    raise ValueError("checkpoint.every_steps and checkpoint.keep must be positive, got "
                     f"{config.checkpoint.every_steps} and {config.checkpoint.keep}")
