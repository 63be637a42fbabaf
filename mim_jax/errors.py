"""One clear line per known error: what a user sees when a command fails for a reason they can
fix (a config value, a path, a checkpoint of another model, a full or read-only disk, a diverged
run), instead of a traceback with the cause on its last line.

The known errors are the types the project raises with a full message (ValueError and its
subclasses such as checkpoint.CheckpointMismatchError, FloatingPointError for a non-finite
loss) and the OS errors a path or a disk gives. Anything else is a bug or an unforeseen failure
and keeps its traceback. `--verbose` (or MIM_JAX_VERBOSE=1) shows the traceback of every error.

It lives at the bottom floor (it imports nothing of mim_jax), so any entry point may use it.
"""

import errno
import functools
import logging
import os
import sys
from typing import Callable, NoReturn

from absl import app
from absl import flags


class DiskFullError(OSError):
  """A save failed for want of space; the message says what it needs and what was kept."""


KNOWN = (ValueError, FloatingPointError, FileNotFoundError, NotADirectoryError,
         IsADirectoryError, PermissionError, DiskFullError)
DISK = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
        errno.EDQUOT: "the disk quota is exceeded"}


def verbose(argv: list[str]) -> bool:
  return "--verbose" in argv or os.environ.get("MIM_JAX_VERBOSE") == "1"


def describe(error: BaseException) -> str | None:
  """The one-line message of a known error, or None for an unknown one."""
  if isinstance(error, FileExistsError):
    return (f"cannot make the directory {error.filename}: a file of that name exists; pass a "
            f"--workdir that is a directory or does not exist yet")
  if isinstance(error, OSError) and error.errno in DISK:
    where = error.filename or "the workdir"
    return (f"cannot write {where}: {DISK[error.errno]}; free some space or pass another "
            f"--workdir (checkpoints already saved are kept)")
  if isinstance(error, KNOWN):
    return " ".join(str(error).split("\n")[0].split()) or type(error).__name__
  return None


class _BackgroundTracebacks(logging.Filter):
  """Drops the tracebacks of orbax's records and the asyncio records of unretrieved tasks."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.name == "asyncio" and "exception was never retrieved" in str(record.msg):
      return False
    if "/orbax/" in record.pathname:
      record.exc_info = record.exc_text = None
    return True


def quiet_background_errors(handler: logging.Handler) -> None:
  """Keeps the echoes of a failed checkpoint save off stderr, so that its error line ends the
  output alone: the main thread gets the error from orbax and reports it (in one line when it
  is a known one, such as a full disk), but orbax also logs it with its traceback from each of
  its background threads, asyncio logs the tasks left unretrieved as they are collected, after
  the error line, and tensorstore's writes still in flight then call back into orbax's event
  loop, closed by then, each printing "Event loop is closed" with a traceback. The messages of
  orbax's records stay, without their tracebacks."""
  handler.addFilter(_BackgroundTracebacks())
  previous = sys.unraisablehook

  def hook(unraisable) -> None:
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
      previous(unraisable)

  sys.unraisablehook = hook


def fail(message: str, code: int = 1) -> NoReturn:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def reporting(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
  """Wraps an absl main: a known error exits with one line `error: ...` and status 1."""

  @functools.wraps(main)
  def wrapped(argv: list[str]) -> None:
    try:
      main(argv)
    except app.UsageError as error:  # absl would print every flag's help above it
      fail(f"{error} (--helpshort lists the flags)", code=2)
    except Exception as error:  # pylint: disable=broad-except
      message = describe(error)
      if message is None or verbose(sys.argv):
        raise
      fail(message)

  return wrapped


def parse_flags(argv: list[str]) -> list[str]:
  """absl's `flags_parser`: a bad flag or config file (a config's own ValueError included, which
  ml_collections wraps into the flag error with its traceback as text), a missing config file
  and an override of a field the config does not have are one line, status 2."""
  for arg in argv[1:]:
    name, _, value = arg.partition("=")
    path = value.partition(":")[0]
    # ml_collections only logs a missing file at parse time and raises at first use.
    if name.lstrip("-") == "config" and path and not os.path.isfile(path) and not verbose(argv):
      fail(f"config file {path!r} does not exist (from {arg}); pass one of configs/*.py, "
           f"e.g. --config=configs/mae_vit.py:runlocal", code=2)
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as error:  # ml_collections: an override of no such field
    if verbose(argv):
      raise
    field = str(error).strip("\"'")
    overrides = [a.partition("=")[0] for a in argv if a.startswith("--config.")]
    named = [o for o in overrides if o.split(".")[-1] == field or f".{field}." in o] or overrides
    fail(f"{named[0] if named else '--config'}: the config has no field {field!r}; "
         f"--helpfull lists the config's fields as --config.<field>", code=2)
  except flags.Error as error:
    if verbose(argv):
      raise
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    causes = [line for line in lines if line.split(":")[0].endswith(("Error", "Exception"))]
    fail((causes[-1].partition(": ")[2] if causes else lines[0])
         + " (--helpshort lists the flags)", code=2)
