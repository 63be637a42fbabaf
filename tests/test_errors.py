"""One clear line per known error (mim_jax/errors.py): its rules, and the tools' command lines
(more of python -m mim_jax.main's cases run in tests/test_train.py, mim_jax.tools.plot's in
tests/test_plot.py)."""

import errno
import io
import logging
import sys
import types

import pytest

from conftest import MICRO_MAE
from conftest import run_module
from mim_jax import checkpoint
from mim_jax import errors
from mim_jax import pretrained
from mim_jax import train


def test_known_errors_are_one_line_and_unknown_ones_are_not_described():
  assert errors.describe(ValueError("image_size 18 is not divisible")) == (
      "image_size 18 is not divisible")
  assert errors.describe(checkpoint.CheckpointMismatchError("x holds a checkpoint")) == (
      "x holds a checkpoint")
  assert errors.describe(train.NonFiniteLossError("non-finite {'loss': nan}")).startswith(
      "non-finite")
  missing = FileNotFoundError(errno.ENOENT, "No such file or directory", "/nope")
  assert "/nope" in errors.describe(missing)
  assert errors.describe(RuntimeError("a bug")) is None  # keeps its traceback
  assert errors.describe(KeyError("k")) is None


@pytest.mark.parametrize("code, why", [(errno.ENOSPC, "the disk is full"),
                                       (errno.EROFS, "the file system is read-only")])
def test_disk_errors_name_the_path_and_what_to_do(code, why):
  message = errors.describe(OSError(code, "os text", "/work/run/checkpoints/200"))
  assert message == (f"cannot write /work/run/checkpoints/200: {why}; free some space or pass "
                     f"another --workdir (checkpoints already saved are kept)")


def test_reporting_exits_with_one_line(capsys, monkeypatch):
  monkeypatch.setattr("sys.argv", ["main"])
  monkeypatch.delenv("MIM_JAX_VERBOSE", raising=False)

  @errors.reporting
  def main(argv):
    del argv
    raise ValueError("optim.base_lr must be >= 0, got -1.0\nsecond line")

  with pytest.raises(SystemExit) as exit_info:
    main([])
  assert exit_info.value.code == 1
  assert capsys.readouterr().err == "error: optim.base_lr must be >= 0, got -1.0\n"

  @errors.reporting
  def buggy(argv):
    del argv
    raise RuntimeError("unforeseen")

  with pytest.raises(RuntimeError, match="unforeseen"):
    buggy([])


def test_a_failed_saves_echoes_leave_the_error_line_alone(monkeypatch):
  """What orbax, asyncio and tensorstore print around a failed save, as seen on a full disk."""
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  handler = logging.StreamHandler(io.StringIO())
  errors.quiet_background_errors(handler)

  def log(name, pathname, msg):
    try:
      raise ValueError("RESOURCE_EXHAUSTED: ... No space left on device")
    except ValueError:
      record = logging.LogRecord(name, logging.ERROR, pathname, 1, msg, None, sys.exc_info())
    handler.handle(record)

  log("absl", "/site-packages/orbax/checkpoint/_src/futures/future.py", "thread failed")
  log("asyncio", "/asyncio/base_events.py", "Task exception was never retrieved\nfuture: ..")
  log("absl", "/work/main/mim_jax/train.py", "ours")
  lines = handler.stream.getvalue().splitlines()
  assert lines[0] == "thread failed" and lines[1] == "ours", lines
  assert lines[2] == "Traceback (most recent call last):"  # kept: not orbax's
  assert "never retrieved" not in handler.stream.getvalue()

  closed = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
  other = types.SimpleNamespace(exc_value=RuntimeError("a bug"))
  sys.unraisablehook(closed)
  sys.unraisablehook(other)
  assert seen == [other]


def test_pretrained_sources_are_checked_before_anything_is_written(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"'/nope' does not exist: pass a mim_jax workdir"):
    pretrained.check_source("/nope")
  with pytest.raises(FileNotFoundError, match=r"has no committed checkpoint under"):
    pretrained.check_source(str(tmp_path))
  (tmp_path / "weights.bin").write_bytes(b"")
  with pytest.raises(ValueError, match=r"expected a mim_jax workdir, an MAE .pth or an exported"):
    pretrained.check_source(str(tmp_path / "weights.bin"))
  (tmp_path / "mae.pth").write_bytes(b"")
  pretrained.check_source(str(tmp_path / "mae.pth"))  # exists, and the kind is known


@pytest.mark.parametrize("module, flags, expected", [
    ("mim_jax.tools.export", ["--config=configs/mae_vit.py:variant=Mu/4",
                              "--source=/nonexistent/mae.pth", "--out=/tmp/unused.npz"],
     "error: pretrained source '/nonexistent/mae.pth' does not exist"),
    ("mim_jax.tools.kmeans", ["--config=configs/mae_vit.py:variant=Mu/4"],
     "error: the config has no data.targets section"),
    ("mim_jax.main", ["--config=configs/nope.py", "--workdir=/tmp/unused"],
     "error: config file 'configs/nope.py' does not exist"),
    ("mim_jax.main", [f"--config=configs/mae_vit.py:{MICRO_MAE}", "--config.optim.bogus=1",
                      "--workdir=/tmp/unused"],
     "error: --config.optim.bogus: the config has no field 'bogus'"),
    ("mim_jax.main", [f"--config=configs/mae_vit.py:{MICRO_MAE}", f"--workdir={__file__}"],
     f"error: cannot make the directory {__file__}: a file of that name exists"),
    ("mim_jax.main", [f"--config=configs/mae_vit.py:{MICRO_MAE}", "--workdir=/tmp/unused",
                      "extra"], "error: unexpected arguments: ['extra']"),
    ("mim_jax.bench", ["--config=configs/mae_vit.py:variant=Mu/4,image_size=big"],
     "error: config argument image_size='big' must be an integer"),
])
def test_tools_report_known_errors_in_one_line(module, flags, expected):
  result = run_module(module, *flags)
  assert result.returncode in (1, 2) and "Traceback" not in result.stderr, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1].startswith(expected), result.stderr[-2000:]
