"""One run per workdir: a second run is refused at once, naming the holder; a lock left by a
dead process is taken over; a finished or failed run leaves the workdir free."""

import json
import subprocess
import sys

import pytest

from configs import mae_vit
from conftest import MICRO_MAE
from conftest import REPO
from mim_jax import train
from mim_jax import workdir_lock

HOLD = ("import sys, time; from mim_jax import workdir_lock\n"
        "with workdir_lock.hold(sys.argv[1]):\n"
        "  print('held', flush=True); time.sleep(60)\n")


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
  workdir = str(tmp_path / "run")
  holder = subprocess.Popen([sys.executable, "-c", HOLD, workdir], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    config = mae_vit.get_config(MICRO_MAE)
    with pytest.raises(workdir_lock.WorkdirBusyError,
                       match=rf"in use by another run \(pid {holder.pid} on .*\); wait for it"):
      train.train_and_evaluate(config, workdir)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before writing anything
  finally:
    holder.kill()
    holder.wait()
  # The kernel released the killed holder's flock: the workdir is free, and the record the
  # dead holder left is reported as taken over.
  messages = []
  with workdir_lock.hold(workdir, log=messages.append):
    record = json.loads((tmp_path / "run" / "lock").read_text())
  assert messages == [f"taking over {workdir}/lock from pid {holder.pid}, which is no longer "
                      f"running"]
  assert record["pid"] != holder.pid
  assert (tmp_path / "run" / "lock").read_text() == ""  # released cleanly: no holder left


def test_an_exception_releases_the_lock(tmp_path):
  with pytest.raises(RuntimeError):
    with workdir_lock.hold(str(tmp_path)):
      raise RuntimeError("boom")
  messages = []
  with workdir_lock.hold(str(tmp_path), log=messages.append):
    pass
  assert not messages
