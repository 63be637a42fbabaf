"""The signal handlers of mim_jax/preemption.py, with real signals sent to this process.
tests/test_train.py runs them end to end in `python -m mim_jax.main` runs."""

import os
import signal

import pytest

from mim_jax import preemption


@pytest.fixture
def python_ctrl_c():
  """Python's own Ctrl-C handler (KeyboardInterrupt), whatever the test runner installed."""
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  yield
  signal.signal(signal.SIGINT, previous)


def test_ctrl_c_asks_for_a_checkpoint_and_a_second_one_exits_at_once(python_ctrl_c):
  sigterm = signal.getsignal(signal.SIGTERM)
  with preemption.Watcher() as watcher:
    assert not watcher.reached(1)
    os.kill(os.getpid(), signal.SIGINT)  # the handler runs before os.kill returns here
    assert watcher.reached(2) and watcher.cause == "by Ctrl-C"
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  assert signal.getsignal(signal.SIGTERM) is sigterm
  with pytest.raises(preemption.Interrupted):
    watcher.raise_if_interrupted()


def test_a_signal_after_training_stops_the_final_evals(python_ctrl_c):
  with preemption.Watcher() as watcher:
    watcher.training_done(7)
    os.kill(os.getpid(), signal.SIGTERM)  # outside the evals: noted, nothing raised
    with pytest.raises(preemption.EvalsStopped):
      with watcher.final_evals():  # a signal received before them: they do not start
        pytest.fail("the final evals ran")
  watcher.raise_if_interrupted()  # SIGTERM: a clean exit

  with preemption.Watcher() as watcher:
    watcher.training_done(7)
    with pytest.raises(preemption.EvalsStopped):
      with watcher.final_evals():
        os.kill(os.getpid(), signal.SIGINT)  # raises in the block, at once
        pytest.fail("the final evals went on")
  with pytest.raises(preemption.Interrupted):
    watcher.raise_if_interrupted()

  with preemption.Watcher() as watcher:
    watcher.training_done(7)
    with pytest.raises(preemption.EvalsStopped):
      with watcher.final_evals():
        try:
          os.kill(os.getpid(), signal.SIGTERM)
        except preemption.EvalsStopped:
          pass  # lost on its way, as in a callback that swallows exceptions: raised on leaving
