"""A damaged checkpoint: the run logs why, sets the step aside and resumes from the newest
intact one, exactly as if nothing had happened; with no intact step it refuses in one line and
touches nothing.

One real run of the trainer (in-process, on the 8 fake devices) writes real orbax checkpoints;
each test damages a copy of its workdir the ways a failing disk, an interrupted copy or a user
does, and reruns it in-process. The method is tests/test_toy_method.py's: the trainer,
checkpoints and data iterator are the same for every method, and its tiny model compiles,
trains and restores in a fraction of the micro MAE's time.
"""

import json
import logging
import pathlib
import re
import shutil

import pytest

from mim_jax import checkpoint
from mim_jax import checkpoint_damage
from mim_jax import errors
from mim_jax import flops
from mim_jax import train
from test_toy_method import losses, register_toy, toy_config
from test_train import committed_steps, snapshot

STEPS = 8


def make_config():
  config = toy_config(STEPS)
  config.checkpoint.every_steps, config.checkpoint.keep = 2, 4
  return config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> pathlib.Path:
  """An uninterrupted run of STEPS steps, with checkpoints at steps 2, 4, 6 and 8."""
  with pytest.MonkeyPatch.context() as patch:
    register_toy(patch)
    # The peak FLOP/s is measured by timing matmuls for ~2 s per run, and only scales the MFU
    # these tests never read.
    patch.setattr(flops, "matmul_peak", lambda dtype: 1e12)
    workdir = tmp_path_factory.mktemp("finished")
    train.train_and_evaluate(make_config(), str(workdir))
    assert committed_steps(workdir) == [2, 4, 6, 8]
    yield workdir


def interrupted_copy(finished_run: pathlib.Path, workdir: pathlib.Path) -> pathlib.Path:
  """The finished run as if it had died right after its last save, before its final results."""
  shutil.copytree(finished_run, workdir)
  (workdir / "results.json").unlink()
  return workdir


def truncate_array_files(step: pathlib.Path) -> None:
  """Cuts in half every file of the step's array store (OCDBT keeps the bytes this process
  wrote in state/ocdbt.process_0/d/). All of them: some hold only index nodes that a later
  commit to the store superseded, which a restore never reads."""
  for path in (step / "state" / "ocdbt.process_0" / "d").iterdir():
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def data_file(step: pathlib.Path) -> pathlib.Path:
  return step / "data" / "process_0-of-1.json"  # the grain iterator's position


def damage_warnings(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if " is damaged: " in r.getMessage()]


def test_damaged_steps_are_set_aside_and_the_run_resumes_exactly(finished_run, tmp_path,
                                                                 caplog):
  workdir = interrupted_copy(finished_run, tmp_path / "run")
  steps = workdir / "checkpoints"
  truncate_array_files(steps / "8")
  shutil.rmtree(steps / "6" / "state")
  data_file(steps / "4").write_text("")
  # An earlier incident already set a step 8 aside: the new one must not replace it.
  (workdir / "checkpoints_damaged" / "8").mkdir(parents=True)

  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(make_config(), str(workdir))

  warnings = damage_warnings(caplog)
  assert len(warnings) == 3, warnings
  # Tensorstore's error for the first cut file read: a byte range past its end (OUT_OF_RANGE),
  # or an index node it cannot decode.
  assert re.match(rf'checkpoint step 8 is damaged: (OUT_OF_RANGE|DATA_LOSS|FAILED_PRECONDITION): '
                  rf'Error reading .* in OCDBT database at local file '
                  rf'"{re.escape(str(steps / "8" / "state"))}/"', warnings[0]), warnings
  assert warnings[1:] == [
      f"checkpoint step 6 is damaged: {steps / '6' / 'state'} is missing",
      f"checkpoint step 4 is damaged: not valid JSON (empty or cut short): "
      f"{data_file(steps / '4')} (Expecting value: line 1 column 1 (char 0))"]

  # Moved aside, never deleted, where orbax does not look for steps.
  aside = workdir / "checkpoints_damaged"
  assert sorted(p.name for p in aside.iterdir()) == ["4", "6", "8", "8.1"]
  assert data_file(aside / "4").read_text() == ""
  assert not (aside / "6" / "state").exists() and (aside / "6" / "data").is_dir()
  assert (aside / "8.1" / "state").is_dir()

  # Resumed from step 2: steps 3-8 were trained and saved again, as in the uninterrupted run.
  assert committed_steps(workdir) == [2, 4, 6, 8]
  assert sorted(losses(workdir)) == list(range(1, STEPS + 1))
  assert losses(workdir) == losses(finished_run)


def test_no_intact_step_is_refused_in_one_line_and_nothing_moves(finished_run, tmp_path,
                                                                 caplog):
  workdir = interrupted_copy(finished_run, tmp_path / "run")
  steps = workdir / "checkpoints"
  data_file(steps / "8").unlink()
  (steps / "6" / "signature" / "metadata").unlink()
  shutil.rmtree(steps / "4" / "data")
  data_file(steps / "2").write_text("{")
  before = snapshot(workdir)

  with caplog.at_level(logging.WARNING), pytest.raises(
      checkpoint.NoIntactCheckpointError) as raised:
    train.train_and_evaluate(make_config(), str(workdir))
  assert errors.describe(raised.value) == (
      f"every checkpoint in {steps} is damaged (the warnings above say why); nothing was moved "
      f"or deleted: restore them from a backup, or pass another --workdir to start afresh")
  assert damage_warnings(caplog) == [
      f"checkpoint step 8 is damaged: {data_file(steps / '8')} is missing",
      f"checkpoint step 6 is damaged: {steps / '6' / 'signature' / 'metadata'} is missing",
      f"checkpoint step 4 is damaged: {steps / '4' / 'data'} is missing",
      f"checkpoint step 2 is damaged: not valid JSON (empty or cut short): "
      f"{data_file(steps / '2')} (Expecting property name enclosed in double quotes: line 1 "
      f"column 2 (char 1))"]
  assert snapshot(workdir) == before
  assert not (workdir / "checkpoints_damaged").exists()


@pytest.mark.parametrize("error", [KeyError("params"), ValueError("OUT_OF_RANGE: elsewhere"),
                                   ValueError("File /elsewhere/metadata does not exist."),
                                   json.JSONDecodeError("Expecting value", "", 0)])
def test_errors_that_are_not_damage_to_the_step_are_not_taken_for_it(error, tmp_path):
  # The trainer re-raises these instead of moving a good checkpoint aside: they name no file
  # of the step, or (the JSON error) no file of the step fails to parse.
  assert checkpoint_damage.describe(error, str(tmp_path / "checkpoints" / "6")) is None
