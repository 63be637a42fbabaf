"""Telling a damaged checkpoint from a bug, and setting a damaged one aside.

Orbax commits a step atomically, so a crash mid-save never leaves a half-written step. A step can
still be damaged afterwards: a file cut short by an interrupted copy of the workdir or a failing
disk, a file or directory deleted by hand. Restoring one fails deep inside orbax, tensorstore or
grain, with an error that often names no file. `describe` recognises those failures and says
which file is at fault; anything it does not recognise is left to propagate as the bug it may
be. `move_aside` moves a damaged step out of orbax's sight, never deleting it, so the user can
still inspect it.
"""

import json
import os
import re
from typing import Iterator

# Tensorstore's status codes for a file that is cut short, corrupt or gone (e.g. OUT_OF_RANGE:
# "Requested byte range ... is not valid for value of size ...").
_STORE_CODES = ("DATA_LOSS:", "OUT_OF_RANGE:", "FAILED_PRECONDITION:", "NOT_FOUND:")
# Orbax's composite handler, when an item's directory (state/, data/, signature/) is gone.
_MISSING_ITEM = re.compile(r'Item "(\w+)" was not found in the checkpoint')
# Grain and orbax, when a file of an item is gone (a ValueError or a FileNotFoundError).
_MISSING_FILE = re.compile(r"File (\S+) (?:does not exist|not found)")
# The files of a step that orbax and grain write as JSON (metadata, the iterator position).
_JSON_NAMES = ("_CHECKPOINT_METADATA", "_METADATA", "metadata")


def _chain(error: BaseException) -> Iterator[BaseException]:
  """`error` and its causes: orbax wraps tensorstore's error in a bare Exception."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def _unparsable_json(step_dir: str) -> list[str]:
  bad = []
  for root, _, files in os.walk(step_dir):
    for name in files:
      if name.endswith(".json") or name in _JSON_NAMES:
        path = os.path.join(root, name)
        try:
          with open(path, encoding="utf-8") as f:
            json.load(f)
        except (ValueError, OSError):
          bad.append(path)
  return sorted(bad)


def describe(error: BaseException, step_dir: str) -> str | None:
  """Why restoring `step_dir` failed with `error`, naming the damaged file or directory, when
  the error is one a damaged step gives; None for any other error."""
  inside = os.path.join(step_dir, "")  # .../checkpoints/6/, which .../checkpoints/60 is not
  for cause in _chain(error):
    message = str(cause).split("\n")[0]
    item = _MISSING_ITEM.search(message)
    if isinstance(cause, KeyError) and item:
      return f"{os.path.join(step_dir, item.group(1))} is missing"
    missing = _MISSING_FILE.search(message)
    if missing and missing.group(1).startswith(inside):
      return f"{missing.group(1)} is missing"
    if isinstance(cause, json.JSONDecodeError):
      bad = _unparsable_json(step_dir)
      if bad:
        return f"not valid JSON (empty or cut short): {', '.join(bad)} ({cause})"
    if message.startswith(_STORE_CODES) and inside in message:
      # Names the step's array store, the array and what is wrong; the store's spec follows.
      return message.split(" [tensorstore_spec=")[0]
  return None


def move_aside(step_dir: str) -> str:
  """Moves `step_dir` (<workdir>/checkpoints/<step>) to <workdir>/checkpoints_damaged/<step>,
  where orbax never looks for steps, with a suffix .1, .2, ... when that is taken. Returns the
  new path."""
  checkpoints, name = os.path.split(os.path.normpath(step_dir))
  aside = f"{checkpoints}_damaged"
  os.makedirs(aside, exist_ok=True)
  target, n = os.path.join(aside, name), 0
  while os.path.exists(target):
    n += 1
    target = os.path.join(aside, f"{name}.{n}")
  os.rename(step_dir, target)
  return target
