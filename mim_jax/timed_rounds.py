"""Timed rounds of a benchmark's step on request, so several processes can be timed in turn.

A benchmark started with --serve (`python -m mim_jax.bench`, `python -m benchmarks.torch_mae`)
prints its usual JSON line, then reads one number of steps per line from stdin, runs them and
answers each with one JSON line, {"steps": n, "step_s": seconds per step}, until stdin closes.
`python -m benchmarks.compare` drives such processes round after round, each already compiled
and warm, so a drift in the machine's speed (a noisy neighbour, memory reclaim) slows every
contender of a round alike and their ratio holds: timed one after the other instead, minutes
apart, the same two programs' ratio ranged from 0.72 to 1.02 on the 2-core CPU this was
written on.

It lives at the bottom floor (it imports nothing of mim_jax), so the PyTorch peer can use it.
"""

import json
import sys
import time
from typing import Callable, TextIO


def serve(run_steps: Callable[[int], object], stdin: TextIO = sys.stdin,
          stdout: TextIO = sys.stdout) -> None:
  """Answers each line `n` of `stdin` with the time per step of `run_steps(n)`, which must
  return once its n steps have finished (what it returns is ignored). Returns when stdin closes; ValueError on a line that
  is not a positive integer."""
  for line in stdin:
    try:
      steps = int(line)
    except ValueError:
      steps = 0
    if steps < 1:
      raise ValueError(f"expected a positive number of steps per line on stdin, got "
                       f"{line.strip()!r}")
    start = time.perf_counter()
    run_steps(steps)
    seconds = time.perf_counter() - start
    print(json.dumps({"steps": steps, "step_s": seconds / steps}), file=stdout, flush=True)
