"""Where metrics go: `metrics.jsonl` (one JSON object per logged step) and TensorBoard event
files in the workdir. Only process 0 writes; the others get a writer that does nothing.

On resume, rows past the restored step are dropped from metrics.jsonl (and purged from
TensorBoard's view), so both read as one uninterrupted run.
"""

import contextlib
import json
import os
import sys

import jax


@contextlib.contextmanager
def _torch_hidden():
  """tensorboardX's writer imports torch at import time, only to accept torch tensors as values;
  with torch installed (for the official-weights parity) that adds 1.5 s to every run's start.
  We log Python floats, so torch is hidden for that one import and is importable again after."""
  if "torch" in sys.modules:
    yield
    return
  sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX allows
  try:
    yield
  finally:
    del sys.modules["torch"]


with _torch_hidden():
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top


class MetricWriter:

  def __init__(self, workdir: str, *, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._truncate_after(resume_step)
    self._jsonl = open(self.path, "a", encoding="utf-8")
    # purge_step makes TensorBoard discard events a killed run wrote past the resumed step.
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                             purge_step=resume_step + 1 if resume_step else None)

  def _truncate_after(self, step: int) -> None:
    if not os.path.exists(self.path):
      return
    with open(self.path, encoding="utf-8") as f:
      rows = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(rows)
    os.replace(tmp, self.path)

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    self._jsonl.flush()
    for name, value in metrics.items():
      self._tb.add_scalar(name, value, step)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
