"""End-to-end tests of the trainer: real runs of `python -m mim_jax.main` on the embedded digits
with the micro ViT (Mu/4, a 1x32 decoder, 16 px, batch 16), reading back the files a user would
read: metrics.jsonl, TensorBoard events, orbax checkpoints, and the log on stderr.

Runs are subprocesses on 1 CPU device; they share the session's persistent XLA compilation cache
(conftest.py), so a config compiled once is not compiled again by the next run of the same
config. Checkpoints are restored in-process, onto the 8 fake devices conftest.py sets up.
"""

import hashlib
import json
import math
import pathlib
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import mae_vit
from mim_jax import checkpoint
from mim_jax import compile_options
from mim_jax import config_validation
from mim_jax import methods
from mim_jax import models
from mim_jax import optim
from mim_jax import sharding
from mim_jax import train
from mim_jax import workdir_lock
from mim_jax.data import pipeline
from conftest import MICRO_MAE, REPO, run_module, subprocess_env

ARG = MICRO_MAE
# Every run logs every step; base_lr is raised from the paper's 1.5e-4 so that 100 steps at
# batch 16 visibly train (peak lr = 1e-2 * 16 / 256 = 6.25e-4).
COMMON = {"log_every_steps": 1, "optim.warmup_steps": 5, "optim.base_lr": 1e-2,
          "eval.linear_probe.enabled": False, "eval.reconstruction_png": False}
REF_STEPS = 100
REF = {**COMMON, "total_steps": REF_STEPS, "checkpoint.every_steps": 10}
# A run stopped by a signal long before its end, saving only when stopped.
LONG_RUN = {**COMMON, "total_steps": 100_000, "checkpoint.every_steps": 100_000}
PEAK_LR = 1e-2 * 16 / 256
RUN_TIMEOUT_S = 300


# ---------------------------------------------------------------------------------------------
# Running the CLI and reading what it writes.
# ---------------------------------------------------------------------------------------------

def main_flags(workdir: pathlib.Path, overrides: dict, arg: str = ARG) -> list[str]:
  return ([f"--config=configs/mae_vit.py:{arg}", f"--workdir={workdir}"]
          + [f"--config.{k}={v}" for k, v in overrides.items()])


def run_main(workdir: pathlib.Path, overrides: dict, *, arg: str = ARG,
             devices: int = 1) -> subprocess.CompletedProcess:
  """A run of `python -m mim_jax.main` to its end. Runs share the session's compilation cache
  (conftest.py), so a config compiled once is not compiled again by the next run."""
  return run_module("mim_jax.main", *main_flags(workdir, overrides, arg), devices=devices,
                    timeout=RUN_TIMEOUT_S)


class Started:
  """A run of main.py in the background, its stderr going to a file (a pipe could fill up)."""

  def __init__(self, workdir: pathlib.Path, overrides: dict, log: pathlib.Path):
    self.workdir, self.log = workdir, log
    with open(log, "w") as f:
      self.proc = subprocess.Popen([sys.executable, "-m", "mim_jax.main",
                                    *main_flags(workdir, overrides)], cwd=REPO,
                                   env=subprocess_env(),
                                   stdout=subprocess.DEVNULL, stderr=f)

  def wait_until(self, predicate, what: str, timeout: float = RUN_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
      if self.proc.poll() is not None:
        pytest.fail(f"the run exited (rc {self.proc.returncode}) before {what}:\n{self.tail()}")
      if time.monotonic() > deadline:
        self.proc.kill()
        pytest.fail(f"timed out waiting for {what}:\n{self.tail()}")
      time.sleep(0.01)

  def finish(self, timeout: float = RUN_TIMEOUT_S) -> tuple[int, str]:
    try:
      rc = self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      raise
    return rc, self.log.read_text()

  def tail(self) -> str:
    return self.log.read_text()[-3000:]


def error_line(result: subprocess.CompletedProcess) -> str:
  """The one line a failed run ends with, checked to be alone: no traceback above it."""
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  return result.stderr.strip().splitlines()[-1]


def read_metrics(workdir: pathlib.Path) -> list[dict]:
  """The rows of metrics.jsonl; a line still being written by a running process is left out."""
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().split("\n")[:-1] if line.strip()]


def logged_steps(workdir: pathlib.Path) -> list[int]:
  return [row["step"] for row in read_metrics(workdir)]


def committed_steps(workdir: pathlib.Path) -> list[int]:
  """Steps whose checkpoint orbax finished: it writes `<step>.orbax-checkpoint-tmp*`, then
  renames it to `<step>`."""
  directory = workdir / "checkpoints"
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def read_tensorboard_scalars(logdir: pathlib.Path) -> dict[str, dict[int, float]]:
  """Scalars of the event files under logdir, parsed from the TFRecord framing: u64 length,
  u32 crc, payload (an Event proto), u32 crc."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  scalars = {}
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    data, pos = path.read_bytes(), 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


def snapshot(directory: pathlib.Path) -> dict[str, tuple[int, int, str]]:
  """Size, mtime and hash of every file, but the workdir lock (which every run takes)."""
  return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns,
                                          hashlib.sha256(p.read_bytes()).hexdigest())
          for p in sorted(directory.rglob("*"))
          if p.is_file() and p.name != workdir_lock.LOCK_FILE}


def make_config(overrides: dict, arg: str = ARG):
  config = mae_vit.get_config(arg)
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
      node = node[name]
    node[leaf] = value
  return config


def restore(workdir: pathlib.Path, step: int, overrides: dict) -> train.TrainState:
  """Restores a checkpoint the way the trainer does, onto this process's 8 devices."""
  config = make_config(overrides)
  model, tx = methods.build(config), optim.build(config)
  abstract, _ = train.abstract_state(model, tx, config, sharding.make_mesh(), jax.random.key(0))
  ckpt = checkpoint.Checkpointer(str(workdir), keep=3, async_save=False)
  try:
    return ckpt.restore(step, abstract, pipeline.train_iterator(config))
  finally:
    ckpt.close()


def test_the_random_init_baseline_is_the_states_init_compiled_once():
  """train.param_initializer is compiled once: for the state, and again called by the final
  evaluations for the random-init baseline, which must be the params the run started from."""
  config = make_config({})
  model, tx, mesh = methods.build(config), optim.build(config), sharding.make_mesh()
  _, shardings = train.abstract_state(model, tx, config, mesh, jax.random.key(0))
  init_params = train.param_initializer(model, config, shardings.params)
  state, _, _ = train.create_state(model, tx, config, mesh, jax.random.key(0), init_params)
  again = init_params(jax.random.key(0))
  assert init_params._cache_size() == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(again), jax.device_get(state.params))
  assert jax.tree.map(lambda a, b: a.sharding == b.sharding, again, state.params) == \
      jax.tree.map(lambda a: True, again)
  assert int(state.step) == 0
  assert all(not np.any(x) for x in jax.tree.leaves(state.opt_state) if x.ndim)  # Adam's moments


def test_cpu_compile_options_leave_what_xla_flags_sets_to_it(monkeypatch):
  """The trainer's jits compile at LLVM -O1 on a CPU, unless XLA_FLAGS sets the level: the
  suite's -O0 (conftest) must reach the train step, whose per-jit option would override it."""
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert compile_options.for_platform() == {"xla_backend_optimization_level": 1}
  assert compile_options.for_platform("tpu") == {}  # a CPU host planning for a TPU (dryrun)
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
  assert compile_options.for_platform() == {}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> pathlib.Path:
  """One uninterrupted run of REF_STEPS steps, shared by the tests that read it."""
  workdir = tmp_path_factory.mktemp("reference")
  result = run_main(workdir, REF)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


# ---------------------------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------------------------

def test_mae_loss_falls_and_metrics_reach_jsonl_and_tensorboard(reference_run):
  rows = read_metrics(reference_run)
  assert [row["step"] for row in rows] == list(range(1, REF_STEPS + 1))
  for row in rows:
    assert {"step", "loss", "lr", "images_per_sec", "grad_norm"} <= set(row), row
    assert all(math.isfinite(row[k]) for k in ("loss", "lr", "images_per_sec", "grad_norm")), row
  assert all(row["images_per_sec"] > 0 for row in rows[1:])
  assert all(0 <= row["input_wait_share"] <= 1 for row in rows), rows
  # Linear warmup from 0 to the scaled peak, then cosine decay.
  lrs = [row["lr"] for row in rows]
  assert lrs[0] == 0.0
  assert max(lrs) == pytest.approx(PEAK_LR, rel=1e-5)
  assert lrs[-1] < 0.01 * PEAK_LR
  # MAE's loss on normalised pixels starts near 2 at init; it must fall well below that.
  first = np.mean([row["loss"] for row in rows[:5]])
  last = np.mean([row["loss"] for row in rows[-10:]])
  assert last < 0.6 * first, (first, last)

  assert list((reference_run / "tensorboard").glob("events.out.tfevents.*"))
  scalars = read_tensorboard_scalars(reference_run / "tensorboard")
  assert scalars["loss"] == {row["step"]: pytest.approx(row["loss"], rel=1e-6) for row in rows}
  assert set(scalars["lr"]) == set(range(1, REF_STEPS + 1))
  assert committed_steps(reference_run) == [80, 90, 100]  # checkpoint.keep = 3


def test_resume_after_sigkill_is_bit_exact(reference_run, tmp_path):
  workdir = tmp_path / "b"
  run = Started(workdir, REF, tmp_path / "b1.log")

  def past_a_checkpoint() -> bool:
    steps, logged = committed_steps(workdir), logged_steps(workdir)
    return bool(steps and logged and logged[-1] > steps[0])
  run.wait_until(past_a_checkpoint, "a step past the first checkpoint")
  run.proc.send_signal(signal.SIGKILL)
  rc, _ = run.finish()
  assert rc == -signal.SIGKILL, "the run finished before it could be killed midway"
  killed_rows = logged_steps(workdir)
  assert REF_STEPS not in committed_steps(workdir)

  result = run_main(workdir, REF)
  assert result.returncode == 0, result.stderr[-3000:]
  resumed = int(re.search(r"resumed from step (\d+)", result.stderr).group(1))
  assert 10 <= resumed < REF_STEPS and resumed % 10 == 0
  assert max(killed_rows) > resumed  # The killed run logged steps that the rerun redid.

  # metrics.jsonl reads as one uninterrupted run, bit-identical to the reference.
  rows_a, rows_b = read_metrics(reference_run), read_metrics(workdir)
  assert [r["step"] for r in rows_b] == [r["step"] for r in rows_a]
  for a, b in zip(rows_a, rows_b):
    for key in ("loss", "grad_norm", "lr"):
      assert a[key] == b[key], (a["step"], key, a[key], b[key])

  state_a = restore(reference_run, REF_STEPS, REF)
  state_b = restore(workdir, REF_STEPS, REF)
  assert int(state_a.step) == int(state_b.step) == REF_STEPS
  leaves_a, leaves_b = jax.tree.leaves(state_a), jax.tree.leaves(state_b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def signalled_after_three_steps(signum: int, workdir: pathlib.Path,
                                log: pathlib.Path) -> tuple[int, str]:
  """A LONG_RUN sent `signum` once it has logged three steps: its exit status and its log."""
  run = Started(workdir, LONG_RUN, log)
  run.wait_until(lambda: len(logged_steps(workdir)) >= 3, "three logged steps")
  run.proc.send_signal(signum)
  return run.finish()


def test_sigterm_checkpoints_then_rerun_resumes(tmp_path):
  workdir = tmp_path / "preempted"
  rc, log = signalled_after_three_steps(signal.SIGTERM, workdir, tmp_path / "first.log")
  assert rc == 0, log[-3000:]
  stopped = int(re.search(r"stopped for preemption at step (\d+)", log).group(1))
  assert 3 <= stopped < 100_000
  assert committed_steps(workdir) == [stopped]
  assert logged_steps(workdir) == list(range(1, stopped + 1))

  # The same command resumes from the preemption checkpoint, and can be preempted again.
  run = Started(workdir, LONG_RUN, tmp_path / "second.log")
  run.wait_until(lambda: logged_steps(workdir)[-1] >= stopped + 3, "three steps after resuming")
  run.proc.send_signal(signal.SIGTERM)
  rc, log = run.finish()
  assert rc == 0, log[-3000:]
  assert f"resumed from step {stopped} " in log
  stopped_again = int(re.search(r"stopped for preemption at step (\d+)", log).group(1))
  assert stopped_again >= stopped + 3
  assert committed_steps(workdir) == [stopped, stopped_again]
  assert logged_steps(workdir) == list(range(1, stopped_again + 1))
  losses = [row["loss"] for row in read_metrics(workdir)]
  assert all(math.isfinite(x) for x in losses)


def test_ctrl_c_checkpoints_and_exits_130_then_a_signal_stops_the_final_evals(tmp_path):
  workdir = tmp_path / "interrupted"
  rc, log = signalled_after_three_steps(signal.SIGINT, workdir, tmp_path / "ctrl_c.log")
  assert rc == 130, log[-3000:]
  assert "Ctrl-C received: saving a checkpoint at the next step and stopping; press Ctrl-C " \
         "again to exit at once" in log
  stopped = int(re.search(r"stopped by Ctrl-C at step (\d+); rerun the same command to resume",
                          log).group(1))
  assert committed_steps(workdir) == [stopped]
  assert logged_steps(workdir) == list(range(1, stopped + 1))
  assert "Traceback" not in log and "KeyboardInterrupt" not in log

  # The same workdir with total_steps at that step has nothing left to train: the run goes
  # straight to its final evals, and a SIGTERM there stops them (exit 0), keeping the checkpoint.
  checkpoints = snapshot(workdir / "checkpoints")
  evals = {**LONG_RUN, "total_steps": stopped, "eval.knn.enabled": True,
           "eval.reconstruction_png": True}
  run = Started(workdir, evals, tmp_path / "evals.log")
  run.wait_until(lambda: "running the final evaluations" in run.log.read_text(), "final evals")
  run.proc.send_signal(signal.SIGTERM)
  rc, log = run.finish()
  assert rc == 0, log[-3000:]
  assert "SIGTERM received after training: the final evaluations stop; the checkpoint of step " \
         f"{stopped} is saved." in log
  assert "final evaluations stopped for preemption; rerun the same command, or --mode=eval, " \
         "to run them" in log
  assert "saving a checkpoint at the next step" not in log and "Traceback" not in log
  assert not (workdir / "results.json").exists()
  assert not [row for row in read_metrics(workdir) if "knn/pretrained" in row]
  assert snapshot(workdir / "checkpoints") == checkpoints


def test_workdir_of_another_model_is_refused_and_left_untouched(reference_run, tmp_path):
  workdir = tmp_path / "other_model"
  shutil.copytree(reference_run, workdir)
  before = snapshot(workdir)
  wider_decoder = ARG.replace("decoder=1x32", "decoder=1x64")
  result = run_main(workdir, REF, arg=wider_decoder)
  assert result.returncode != 0
  assert error_line(result).startswith(f"error: {workdir / 'checkpoints'} holds a checkpoint "
                                       f"(step 100) of a different model")
  assert re.search(r"shape mismatch: \S*decoder\S*: saved \[[\d, ]+\] vs model \[[\d, ]+\]",
                   result.stderr), result.stderr[-3000:]
  assert snapshot(workdir) == before


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  # The lr is normal during warmup (steps 1-3), then NaN: the cosine decay towards a min_lr
  # that overflows float32 computes inf - inf. The update of step 4 makes every parameter NaN
  # while step 4's loss, computed before that update, is still finite.
  workdir = tmp_path / "blowup"
  overrides = {**COMMON, "total_steps": 20, "optim.warmup_steps": 3, "optim.min_lr": 1e45,
               "checkpoint.every_steps": 2}
  result = run_main(workdir, overrides)
  assert result.returncode != 0
  match = re.match(r"error: non-finite .* at step (\d+); stopping: the last good "
                   r"checkpoint \(step (\d+)\) is kept", error_line(result))
  assert match, result.stderr[-3000:]
  bad_step, kept = int(match.group(1)), int(match.group(2))
  assert 0 < kept < bad_step < 20
  # The kept checkpoint was committed (not abandoned mid-save) and nothing later was saved.
  assert committed_steps(workdir)[-1:] == [kept]
  assert not [p.name for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]
  state = restore(workdir, kept, overrides)
  assert int(state.step) == kept
  for leaf in jax.tree.leaves((state.params, state.opt_state)):
    assert np.all(np.isfinite(np.asarray(leaf)))
  rows = read_metrics(workdir)
  assert rows and all(math.isfinite(row["loss"]) for row in rows)
  assert rows[-1]["step"] < bad_step


@pytest.mark.parametrize("arg, overrides, expected", [
    ("variant=Q/4", {}, [r"'Q/4'", r"\['B', 'H', 'L', 'Mu', 'S', 'Ti'\]"]),
    ("variant=Mu/4", {"model.name": "resnet"}, [r"'resnet'", re.escape(str(models.names()))]),
    ("variant=Mu/4", {"method.name": "beit"}, [r"'beit'", re.escape(str(methods.METHODS.names()))]),
    ("variant=Mu/4,data=imagenet", {}, [r"'imagenet'", r"digits, synthetic, tfds:<name>, "
                                                        r"folder:<path>"]),
    ("variant=Mu/4,data=folder:", {}, [r"'folder:'", r"folder:<path>"]),
    ("variant=Mu/4", {"mask.ratio": 0.0}, [r"mask.ratio", r"\(0, 1\)", r"0\.0"]),
    ("variant=Mu/4", {"mask.ratio": 1.0}, [r"mask.ratio", r"\(0, 1\)", r"1\.0"]),
    ("variant=Mu/4", {"mask.name": "checkerboard"}, [r"'checkerboard'", r"'random'"]),
    ("variant=Mu/4,image_size=18", {}, [r"image_size 18", r"patch size 4", r"'Mu/4'"]),
    ("variant=Mu/4,batch_size=12", {}, [r"batch_size 12", r"multiple of the number of devices "
                                                          r"\(8\)"]),
    ("variant=Mu/4,decoder=1x48", {"method.decoder_heads": 5}, [r"decoder_width 48",
                                                               r"decoder_heads 5"]),
    ("variant=Mu/4", {"model.dtype": "float8"}, [r"'float8'", r"'bfloat16'"]),
])
def test_validation_names_the_bad_value_and_the_valid_ones(arg, overrides, expected):
  assert jax.device_count() == 8  # conftest.py
  config = make_config(overrides, arg)
  with pytest.raises(ValueError) as error:
    config_validation.validate(config)
  for pattern in expected:
    assert re.search(pattern, str(error.value)), (pattern, str(error.value))


def test_validation_accepts_the_test_config():
  config_validation.validate(make_config(REF))
  config_validation.validate(mae_vit.get_config("runlocal"))
  config_validation.validate(mae_vit.get_config("variant=B/16,data=tfds:imagenet2012"))


def test_unknown_config_argument_names_the_valid_ones():
  with pytest.raises(ValueError, match=r"'bogus'.*valid: \['batch_size', 'data', 'decoder', "
                                       r"'image_size', 'runlocal', 'variant'\]"):
    mae_vit.get_config("variant=Mu/4,bogus=1")


@pytest.mark.parametrize("arg, overrides, devices, expected", [
    (f"{ARG.replace('batch_size=16', 'batch_size=12')}", {}, 8,
     [r"batch_size 12 must be a positive multiple of the number of devices \(8\)"]),
    ("runlocal,batch_size=0", {}, 1, [r"batch_size 0 must be a positive multiple"]),
    ("runlocal,image_size=big", {}, 1,
     [r"config argument image_size='big' must be an integer, e.g. image_size=16"]),
    (ARG, {"optim.base_lr": -1e-3}, 1, [r"optim.base_lr must be >= 0, got -0.001"]),
    (ARG.replace("data=digits", "data=folder:/nonexistent"), {}, 1,
     [r"/nonexistent is not an existing directory"]),
    (f"{ARG},bogus=1", {}, 1, [r"unknown config argument 'bogus'", r"'runlocal', 'variant'\]"]),
    (ARG, {"init_from": "/nonexistent/mae_run"}, 1,
     [r"pretrained source '/nonexistent/mae_run' does not exist: pass a mim_jax workdir"]),
])
def test_cli_rejects_a_bad_config_in_one_line_before_training(arg, overrides, devices, expected,
                                                              tmp_path):
  """A bad config prints one line 'error: ...' naming the value and what is valid, with no
  traceback, and exits non-zero before anything is written."""
  workdir = tmp_path / "workdir"
  result = run_main(workdir, {**COMMON, **overrides}, arg=arg, devices=devices)
  assert result.returncode != 0
  for pattern in expected:
    assert re.search(pattern, error_line(result)), (pattern, result.stderr[-3000:])
  assert not (workdir / "checkpoints").exists()


def test_verbose_shows_the_traceback(tmp_path):
  result = run_module("mim_jax.main", *main_flags(tmp_path, {**COMMON, "optim.base_lr": -1e-3}),
                      "--verbose")
  assert result.returncode != 0
  assert "Traceback" in result.stderr and "ValueError: optim.base_lr must be >= 0" in result.stderr


def test_a_workdir_past_total_steps_is_refused_and_left_untouched(reference_run, tmp_path):
  workdir = tmp_path / "past"
  shutil.copytree(reference_run, workdir)
  before = snapshot(workdir)
  result = run_main(workdir, {**REF, "total_steps": 50})
  assert result.returncode != 0
  assert re.match(r"error: .* holds a checkpoint at step 100, past total_steps 50: raise "
                  r"--config.total_steps above 100", error_line(result)), result.stderr[-3000:]
  assert snapshot(workdir) == before
