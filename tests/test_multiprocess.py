"""Two processes on localhost form one 4-device mesh (gloo collectives on CPU), the way a
multi-host GPU or TPU run does: each process reads its own slice of every global batch, the step
is one jit over the global mesh, and only process 0 writes metrics. The proof that this is the
same training as one process on 4 devices of the same config and seed: the same losses step by
step and the same final parameters, across a stop and a resume of the 2-process run. That needs
the same global batches (mim_jax/data/pipeline.py) and the same masks (fold_in(rng, step) in
the one jitted step) at every step, and the resume to restore both the state and each process's
data position."""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import portpicker

from configs import mae_vit
from conftest import MICRO_MAE
from conftest import REPO
from conftest import assert_trees_close
from conftest import subprocess_env
from mim_jax import pretrained
from mim_jax import tree_paths
from mim_jax.data import pipeline

# A constant lr from step 1 (no warmup; a cosine from the peak to itself), so the run stopped at
# total_steps=3 and its resume to 6 follow the 6-step reference's schedule exactly, and every
# step moves every trained parameter by about the lr.
LR = 1e-3
CONFIG = mae_vit.get_config(MICRO_MAE)
BASE_LR = LR * CONFIG.optim.lr_batch_base / CONFIG.batch_size
STEPS = 6
FLAGS = (f"--config=configs/mae_vit.py:{MICRO_MAE}", "--config.log_every_steps=1",
         "--config.checkpoint.every_steps=3", "--config.optim.warmup_steps=0",
         f"--config.optim.base_lr={BASE_LR}", f"--config.optim.min_lr={LR}",
         "--config.eval.linear_probe.enabled=False", "--config.eval.reconstruction_png=False")

# Tolerances, as in tests/test_sharding.py: both runs reduce the loss and gradients over the
# same 4 devices, but the 2-process run sums across processes with gloo, which may add the
# partial sums in another order than XLA's in-process all-reduce. The loss then differs in the
# last bits (fp32: rtol 1e-5), and Adam's update lr * g / (|g| + eps) follows that noise only
# for gradients within ~eps of zero: 1 element in 10,000 may be off by up to 10% of the lr, all
# others agree within lr / 1000. A different batch, mask or data order moves the loss by far
# more than 1e-5 and most parameters by ~lr. Measured: losses within 2.2e-7 relative (2 ulps),
# parameters within 3.2e-8, key biases aside (up to 1.2e-4: conftest.drop_key_bias says why).
RTOL = 1e-5


def launch(workdir, steps: int, processes: int, devices: int) -> list[subprocess.Popen]:
  """Starts `processes` trainers of FLAGS for `steps` steps in `workdir`, each with `devices`
  fake CPU devices; several processes form one mesh through a coordinator on localhost."""
  port = portpicker.pick_unused_port()
  distributed = lambda i: ([f"--coordinator_address=127.0.0.1:{port}",
                            f"--num_processes={processes}", f"--process_id={i}"]
                           if processes > 1 else [])
  return [subprocess.Popen([sys.executable, "-m", "mim_jax.main", *FLAGS, f"--workdir={workdir}",
                            f"--config.total_steps={steps}", *distributed(i)],
                           cwd=REPO, env=subprocess_env(devices=devices), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
          for i in range(processes)]


def finish(procs: list[subprocess.Popen]) -> str:
  """Waits for the processes, checks that each succeeded, and returns process 0's log."""
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  return outputs[0][1]


def losses(workdir) -> dict[int, float]:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  steps = [r["step"] for r in rows]
  # One row per step: a second writer (process 1) or a resume that re-logged steps would repeat
  # some.
  assert steps == list(range(1, STEPS + 1)), steps
  return {r["step"]: r["loss"] for r in rows}


def test_two_processes_match_one_process_across_a_resume(tmp_path):
  single, multi = tmp_path / "one_process", tmp_path / "two_processes"
  reference = launch(single, STEPS, processes=1, devices=4)  # runs alongside the 2-process legs
  legs = []
  try:
    legs = launch(multi, 3, processes=2, devices=2)  # stops at its checkpoint at step 3
    assert "on 4 devices (2 processes)" in finish(legs)
    at_3 = pretrained.load_params(str(multi), CONFIG)
    legs = launch(multi, STEPS, processes=2, devices=2)
    log = finish(legs)
    assert "resumed from step 3" in log and "on 4 devices (2 processes)" in log
    assert "on 4 devices (1 processes)" in finish(reference)
  finally:  # a failed leg leaves no trainer running
    for p in legs + reference:
      p.kill()

  want, got = losses(single), losses(multi)
  np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=RTOL)
  assert len(set(want.values())) == STEPS  # every step's batch and mask differ
  assert sorted(os.listdir(multi / "checkpoints")) == ["3", "6"]
  # The grain iterator position is saved per process: each read its slice of 6 global batches.
  data = multi / "checkpoints" / "6" / "data"
  names = ["process_0-of-2.json", "process_1-of-2.json"]
  assert sorted(f for f in os.listdir(data) if f.endswith(".json")) == names
  assert [json.loads((data / n).read_text())["next_index"] for n in names] == [STEPS, STEPS]

  params_1, params_2 = (pretrained.load_params(str(w), CONFIG) for w in (single, multi))
  assert_trees_close(params_2, params_1, RTOL, LR / 1e3, max_outliers=1e-4,
                     outlier_atol=LR / 10)
  # Not vacuous: steps 4-6 (the resumed leg) moved every parameter by more than the lr.
  flat_3 = tree_paths.flatten(at_3)
  moved = {name: np.abs(x - flat_3[name]).max()
           for name, x in tree_paths.flatten(params_2).items()}
  assert min(moved.values()) > LR, moved


@pytest.mark.parametrize("processes", [2, 4])
def test_process_slices_make_the_one_process_batches(processes):
  """The data half of the proof, in-process and at once: the processes' slices of each global
  batch, concatenated in process order (as jax.make_array_from_process_local_data places them),
  are one process's batch, augmentation included."""
  take = lambda i, n: list(itertools.islice(
      pipeline.train_iterator(CONFIG, process_index=i, process_count=n), 3))
  slices = [take(i, processes) for i in range(processes)]
  for step, whole in enumerate(take(0, 1)):
    for key, value in whole.items():
      np.testing.assert_array_equal(np.concatenate([s[step][key] for s in slices]), value,
                                    err_msg=f"batch {step}, {key!r}")
