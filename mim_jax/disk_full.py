"""A checkpoint save that fails for want of disk space, told in one line: where, how much one
checkpoint needs, and which checkpoint is kept.

Orbax writes arrays through tensorstore, whose full-disk error reaches Python as a ValueError
(wrapped again by orbax's async save) carrying the errno only in its text; measured with
tensorstore 0.1.86 on a full tmpfs:
  RESOURCE_EXHAUSTED: Error writing "params.w/0" in OCDBT database at local file "...": ...
  Failed to write 209757 bytes to file 4: No space left on device [os_error_code='28']
Orbax's own JSON files fail with a plain OSError instead. Either way the step being written is
left as `<step>.orbax-checkpoint-tmp`, which orbax never restores: the committed steps stay
intact. That leftover is removed, so the space it took counts towards what the user frees.
"""

import contextlib
import errno
import math
import os
import re
import shutil
from typing import Any, Iterator

import jax
from absl import logging

from mim_jax import errors

_FULL = (errno.ENOSPC, errno.EDQUOT)
_TENSORSTORE_ERRNO = re.compile(r"\[os_error_code='?(\d+)'?\]")
# Orbax writes a step to `<step>.orbax-checkpoint-tmp[-<suffix>]` and renames it to `<step>`.
_UNFINISHED = re.compile(r"^\d+\.orbax-checkpoint-tmp")


def full_disk_errno(error: BaseException, directory: str) -> int | None:
  """ENOSPC or EDQUOT when that is what `error` or one of its causes reports for a file under
  `directory` (an OSError's text holds its filename, tensorstore's the path), else None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    code = error.errno if isinstance(error, OSError) else None
    if match := _TENSORSTORE_ERRNO.search(str(error)):
      code = int(match.group(1))
    if code in _FULL and directory in str(error):
      return code
    error = error.__cause__ or error.__context__
  return None


def state_bytes(state: Any) -> int:
  """The bytes of the arrays in `state` (arrays or ShapeDtypeStructs): about what one checkpoint
  takes on disk, orbax's compression saving little on trained weights."""
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))


def _size(num_bytes: float) -> str:
  """'1.4 MB': three significant digits, in the unit that keeps them below 1000."""
  for unit in ("B", "KB", "MB", "GB"):
    if num_bytes < 999.5:  # what rounds to 1000 reads better as 1 of the next unit
      return f"{num_bytes:.3g} {unit}"
    num_bytes /= 1000
  return f"{num_bytes:.3g} TB"


def _clean_up(directory: str) -> int | None:
  """Removes unfinished step directories; returns the newest committed step, or None."""
  names = os.listdir(directory) if os.path.isdir(directory) else []
  if jax.process_index() == 0:  # the process that writes step directories
    for name in names:
      if _UNFINISHED.match(name):
        logging.warning("removing the unfinished checkpoint %s", os.path.join(directory, name))
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
  return max((int(name) for name in names if name.isdigit()), default=None)


@contextlib.contextmanager
def reported(directory: str, checkpoint_bytes: int) -> Iterator[None]:
  """Turns a full disk met in the block by a checkpoint being saved in `directory` (each of
  about `checkpoint_bytes`) into an errors.DiskFullError with a one-line message; other errors,
  other files' full disk among them (errors.describe has a line for those), pass unchanged. Call
  it around the saves and the wait for them, so that an async save's failure is met in it too."""
  try:
    yield
  except Exception as error:  # pylint: disable=broad-except
    code = full_disk_errno(error, directory)
    if code is None:
      raise
    last = _clean_up(directory)
    kept = (f"the last good checkpoint, step {last}, is kept; free that much space and rerun the "
            f"same command to resume from it" if last is not None else
            "no checkpoint was saved; free that much space and rerun the same command")
    raise errors.DiskFullError(
        f"cannot save a checkpoint in {directory}: {errors.DISK[code]}; one checkpoint needs "
        f"about {_size(checkpoint_bytes)} ({checkpoint_bytes} bytes); {kept}") from error
