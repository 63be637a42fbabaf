"""Where metrics go: `metrics.jsonl` (one JSON object per logged step) and TensorBoard event
files in the workdir. Only process 0 writes; the others get a writer that does nothing.

On resume, rows past the restored step are dropped from metrics.jsonl (and purged from
TensorBoard's view), so both read as one uninterrupted run.
"""

import json
import os

import jax
from tensorboardX import SummaryWriter


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
