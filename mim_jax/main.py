"""Command-line entry point.

  python -m mim_jax.main --config=configs/mae_vit.py:runlocal --workdir=/tmp/mae
  python -m mim_jax.main --mode=eval --config=configs/mae_vit.py:runlocal --workdir=/tmp/mae

--mode picks what runs: train (mim_jax/train.py, the default: pretraining or fine-tuning, as
the config's method says; 'pretrain' and 'finetune' are aliases) or eval (the evaluators on the
newest checkpoint in --workdir or on config.eval.init_from: mim_jax/evaluate.py).

The config is locked (a mistyped override fails) and validated before anything compiles. A
known error (a bad config value, path or checkpoint, a full disk, a diverged run) prints one
line `error: ...` and exits non-zero; --verbose shows its traceback (mim_jax/errors.py). On a
multi-process launch (a TPU pod, or SLURM/GPU hosts), JAX's distributed runtime is initialised
first: set MIM_JAX_DISTRIBUTED=1 or pass --distributed, and jax.distributed.initialize() reads
the coordinator and process ids from the cluster environment; or pass --coordinator_address,
--num_processes and --process_id explicitly (several processes on one machine).

Ctrl-C saves a checkpoint at the next step and exits 130; SIGTERM does the same and exits 0
(mim_jax/preemption.py).
"""

import json
import logging as std_logging
import os
import sys

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mim_jax import config_validation
from mim_jax import errors
from mim_jax import evaluate
from mim_jax import preemption
from mim_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. "
                                          "configs/mae_vit.py:runlocal.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics; "
                               "rerunning in the same workdir resumes.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", os.environ.get("MIM_JAX_DISTRIBUTED") == "1",
                                 "Call jax.distributed.initialize() (multi-process runs).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, with "
                                   "--num_processes and --process_id, where JAX cannot detect "
                                   "them (e.g. several processes on one machine).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "pretrain", "finetune", "eval"],
                          "train (or its aliases pretrain, finetune): train the config's method "
                          "(and resume) in --workdir; eval: run the evaluators on saved params.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the traceback of known errors too (a bad "
                             "config, path or checkpoint; a full disk), which otherwise print "
                             "one line 'error: ...'. MIM_JAX_VERBOSE=1 does the same.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(std_logging.Filter):
  """Drops INFO lines from orbax, which logs every checkpoint phase, so progress stays readable."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


@errors.reporting
def main(argv: list[str]) -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if not errors.verbose(sys.argv):
    errors.quiet_background_errors(logging.get_absl_handler())
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _DISTRIBUTED.value or _COORDINATOR.value:
    # CPU devices need an explicit cross-process collective implementation; accelerators
    # ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  config = _CONFIG.value
  config_validation.validate(config)
  logging.info("config:\n%s", config)
  if _MODE.value == "eval":
    results = evaluate.run(config, _WORKDIR.value)
  else:
    try:
      results = train.train_and_evaluate(config, _WORKDIR.value)
    except preemption.Interrupted:  # stopped by Ctrl-C, everything saved; the log says so
      sys.exit(preemption.CTRL_C_EXIT)
  if jax.process_index() == 0:
    print("final: " + json.dumps(results, sort_keys=True))


if __name__ == "__main__":
  jax.config.config_with_absl()
  app.run(main, flags_parser=errors.parse_flags)
