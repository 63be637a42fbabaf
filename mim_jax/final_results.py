"""`<workdir>/results.json`: what a finished run reports (its last logged metrics and the final
evaluations), written once at its end by process 0.

It marks the run as finished: rerunning the same command in the same workdir returns these
results instead of evaluating again and appending the final evaluations to metrics.jsonl a
second time. Raising `total_steps` continues the run, since the file names its last step.
"""

import json
import os


def path(workdir: str) -> str:
  return os.path.join(workdir, "results.json")


def read(workdir: str, total_steps: int) -> dict[str, float] | None:
  """The results of a run that finished at `total_steps`, or None."""
  try:
    with open(path(workdir), encoding="utf-8") as f:
      saved = json.load(f)
  except FileNotFoundError:
    return None
  if saved.get("step") != total_steps:
    return None
  return saved["results"]


def write(workdir: str, step: int, results: dict[str, float]) -> None:
  """Writes atomically (a temporary file renamed), so a crash never leaves half a file."""
  # Imported here: `python -m mim_jax.tools.plot` reads results without jax, whose import would
  # be half of that tool's start.
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return
  tmp = path(workdir) + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump({"step": step, "results": results}, f, indent=1, sort_keys=True)
  os.replace(tmp, path(workdir))
