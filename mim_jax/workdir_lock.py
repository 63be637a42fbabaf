"""One run per workdir: an exclusive lock on `<workdir>/lock`, held while a run trains.

Two runs on one workdir race their checkpoint saves (or hang in orbax's step-directory
handshake). The lock is an flock, which the kernel releases when its process dies, so a lock
left by a killed run never blocks the next one; the file records the holder (pid, host, start
time) so a refused run can name it; a clean exit empties it, so a run that finds a holder
recorded in a lock it could take knows that holder died, and says so.
Only process 0 of a multi-process run locks: the others write no files of their own.
"""

import contextlib
import fcntl
import json
import os
import socket
import time
from typing import Iterator

LOCK_FILE = "lock"


class WorkdirBusyError(ValueError):
  """Another live run holds the workdir."""


def _holder(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


@contextlib.contextmanager
def hold(workdir: str, *, log=print) -> Iterator[None]:
  """Holds the workdir's lock for the `with` block. Raises WorkdirBusyError, naming the holder,
  when another live run holds it."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _holder(path)
      who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"
             if holder else "another process")
      raise WorkdirBusyError(f"{workdir} is in use by another run ({who}); wait for it to "
                             f"finish or stop it, or pass another --workdir") from None
    previous = _holder(path)
    if previous and previous.get("host") == socket.gethostname() and not _alive(
        previous.get("pid", -1)):
      log(f"taking over {path} from pid {previous['pid']}, which is no longer running")
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
    os.fsync(fd)
    try:
      yield
    finally:
      os.ftruncate(fd, 0)  # an exit, clean or by an exception, leaves no holder behind
  finally:
    os.close(fd)  # releases the flock
