"""The training loop's progress bookkeeping: each step's metrics read one step late, checked,
and logged every `log_every` steps with throughput, MFU and ETA.

Reading late means the host never waits for the step it just dispatched: when step N's metrics
are fetched, step N + 1 is already queued on the device. The fetch of step N returns once step N
has finished, so the time of that fetch is when step N completed. Throughput over a log window
is then exact: (steps completed between two logged fetches) / (time between them), minus any
time spent in `paused()` (evaluations). The first window also holds compilation, so the first
logged step reports no rate.

The share of a window the loop spent getting batches (`waiting_for_input()` around
`next(iterator)` and placing the batch on the devices) is logged as input_wait_share, timed on
the host, so it adds no device sync. Dispatch is asynchronous: while the host waits for the
next batch, the devices may still be running the previous step, so this bounds from above the
share of time the devices starve for input. Near 0, input is not what limits training.
"""

import contextlib
import time
from typing import Any, Callable, Iterator

import jax
from absl import logging


def fetch(metrics: Any) -> dict[str, float]:
  """Device scalars -> Python floats (blocks until they are computed)."""
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


class Progress:
  """Push each step's (device) metrics; `flush()` after the loop logs the last step.

  check(step, values): called on every step's fetched metrics (e.g. the non-finite check).
  write(step, values): called on logged steps with the metrics plus 'lr', 'images_per_sec',
    'mfu' and 'input_wait_share' (e.g. MetricWriter.write); the first logged step has no
    window, and reports 0 for the last three.
  lr_fn(step): the learning rate of (0-based) step `step`.
  clock: seconds, monotonic; tests pass a fake one.
  """

  def __init__(self, *, start: int, total_steps: int, log_every: int, batch_size: int,
               flops_per_example: float, peak_flops: float, lr_fn: Callable[[int], Any],
               check: Callable[[int, dict], None], write: Callable[[int, dict], None],
               clock: Callable[[], float] = time.perf_counter):
    self._start, self._total, self._every = start, total_steps, log_every
    self._batch, self._flops, self._peak = batch_size, flops_per_example, peak_flops
    self._lr_fn, self._check, self._write, self._clock = lr_fn, check, write, clock
    self._pending: tuple[int, Any] | None = None
    self._window: tuple[int, float] | None = None  # (step, time) of the last logged fetch
    self._paused = 0.0                             # seconds paused since then
    self._waited = 0.0                             # seconds waiting for input since then
    self.last: dict[str, float] = {}               # the last logged values

  def push(self, step: int, metrics: Any) -> None:
    """Records step `step`'s metrics and reads the previous step's."""
    if self._pending is not None:
      self._read(*self._pending, force=False)
    self._pending = (step, metrics)

  def flush(self) -> None:
    """Reads and logs the last pushed step (the final or preempted one), so a resumed run's
    metrics continue it without a gap."""
    if self._pending is not None:
      self._read(*self._pending, force=True)
      self._pending = None

  def paused(self) -> contextlib.AbstractContextManager[None]:
    """Time inside does not count against throughput (evaluations)."""
    return self._timed("_paused")

  def waiting_for_input(self) -> contextlib.AbstractContextManager[None]:
    """Time inside counts as waiting for input (input_wait_share)."""
    return self._timed("_waited")

  @contextlib.contextmanager
  def _timed(self, total: str) -> Iterator[None]:
    """Adds the time spent inside to the attribute `total`."""
    begin = self._clock()
    try:
      yield
    finally:
      setattr(self, total, getattr(self, total) + self._clock() - begin)

  def _read(self, step: int, metrics: Any, force: bool) -> None:
    values = fetch(metrics)
    now = self._clock()
    self._check(step, values)
    if not (force or step % self._every == 0 or step == self._start + 1):
      return
    steps_per_sec = wait_share = 0.0
    if self._window is not None:
      window_step, window_time = self._window
      elapsed = now - window_time - self._paused
      if elapsed > 0:
        steps_per_sec = (step - window_step) / elapsed
        wait_share = min(1.0, self._waited / elapsed)
    rate = steps_per_sec * self._batch
    values.update(lr=float(self._lr_fn(step - 1)), images_per_sec=rate,
                  mfu=rate * self._flops / self._peak, input_wait_share=wait_share)
    eta = (self._total - step) / steps_per_sec if steps_per_sec else 0.0
    logging.info("step %d/%d  loss %.4f  lr %.3g  %.1f img/s  MFU %.2f  input wait %.1f%%  "
                 "ETA %s", step, self._total, values["loss"], values["lr"], rate, values["mfu"],
                 100 * wait_share, time.strftime("%H:%M:%S", time.gmtime(eta)))
    self._write(step, values)
    self.last = values
    self._window, self._paused, self._waited = (step, now), 0.0, 0.0
