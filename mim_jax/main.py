"""Command-line entry point.

  python -m mim_jax.main --config=configs/mae_vit.py:runlocal --workdir=/tmp/mae

The config is locked (a mistyped override fails) and validated before anything compiles. On a
multi-process launch (a TPU pod, or SLURM/GPU hosts), JAX's distributed runtime is initialised
first: set MIM_JAX_DISTRIBUTED=1 or pass --distributed; jax.distributed.initialize() then reads
the coordinator and process ids from the cluster environment.
"""

import os

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mim_jax import config_validation
from mim_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. "
                                          "configs/mae_vit.py:runlocal.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics; "
                               "rerunning in the same workdir resumes.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", os.environ.get("MIM_JAX_DISTRIBUTED") == "1",
                                 "Call jax.distributed.initialize() (multi-process runs).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  config = _CONFIG.value
  config_validation.validate(config)
  logging.info("config:\n%s", config)
  train.train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
  jax.config.config_with_absl()
  app.run(main)
