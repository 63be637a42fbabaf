"""The trainer's progress bookkeeping (mim_jax/progress.py): late reads, log steps, the
throughput window (compilation excluded, paused time excluded), ETA, and the check on every
step. A fake clock makes every figure exact."""

import numpy as np
import pytest

from mim_jax.progress import Progress


class Clock:
  def __init__(self):
    self.now = 100.0

  def __call__(self) -> float:
    return self.now


def make(start=0, total=40, every=10, clock=None):
  checked, written = [], []
  progress = Progress(start=start, total_steps=total, log_every=every, batch_size=8,
                      flops_per_example=1e6, peak_flops=1e9, lr_fn=lambda step: 0.5 * step,
                      check=lambda step, values: checked.append((step, values["loss"])),
                      write=lambda step, values: written.append((step, values)),
                      clock=clock or Clock())
  return progress, checked, written


def metrics(step):
  return {"loss": np.float32(1.0 / step)}


def test_reads_one_step_late_checks_every_step_and_logs_log_steps():
  clock = Clock()
  progress, checked, written = make(clock=clock)
  progress.push(1, metrics(1))
  assert not checked  # step 1 is read only once step 2 is pushed
  for step in range(2, 26):
    clock.now += 1.0
    progress.push(step, metrics(step))
  assert [s for s, _ in checked] == list(range(1, 25))
  assert [s for s, _ in written] == [1, 10, 20]
  progress.flush()  # the last pushed step is always logged
  assert [s for s, _ in written] == [1, 10, 20, 25]
  assert checked[-1][0] == 25
  assert written[1][1]["loss"] == pytest.approx(0.1)
  assert written[1][1]["lr"] == pytest.approx(0.5 * 9)  # lr of step 10 is lr_fn(9)


def test_throughput_window_excludes_compilation_and_paused_time():
  """Step N's fetch happens when step N + 1 is pushed; one second per step, a quarter of it
  getting the batch; the first logged step (compilation) has no rate or input share; an
  evaluation's 30 s count in neither."""
  clock = Clock()
  progress, _, written = make(clock=clock)
  clock.now += 50.0  # compilation
  progress.push(1, metrics(1))
  for step in range(2, 22):
    with progress.waiting_for_input():
      clock.now += 0.25
    clock.now += 0.75
    if step == 15:
      with progress.paused():
        clock.now += 30.0
    progress.push(step, metrics(step))
  rows = dict(written)
  assert rows[1]["images_per_sec"] == 0.0 and rows[1]["mfu"] == 0.0
  assert rows[1]["input_wait_share"] == 0.0
  assert rows[10]["input_wait_share"] == rows[20]["input_wait_share"] == pytest.approx(0.25)
  # Steps 2..10 (9 steps) between the fetch of step 1 and of step 10: 9 seconds.
  assert rows[10]["images_per_sec"] == pytest.approx(8.0)
  assert rows[10]["mfu"] == pytest.approx(8.0 * 1e6 / 1e9)
  # Steps 11..20: 10 seconds of steps plus 30 s paused, which are excluded.
  assert rows[20]["images_per_sec"] == pytest.approx(8.0)


def test_resumed_run_logs_its_first_step_and_a_flush_with_nothing_pending_is_a_no_op():
  progress, checked, written = make(start=30, total=40)
  progress.flush()
  assert not written and not checked
  progress.push(31, metrics(31))
  progress.push(32, metrics(32))
  progress.flush()
  assert [s for s, _ in written] == [31, 32]
  assert progress.last["loss"] == pytest.approx(1 / 32)
