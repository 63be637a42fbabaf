"""Stopping a run on request: SIGTERM (a preemption) or Ctrl-C (SIGINT) while it trains saves a
checkpoint at the next step boundary and stops; either signal during the final evaluations stops
them, the final checkpoint being saved already.

The handlers only set a flag, which the trainer reads between steps. Python's default Ctrl-C
handler raises KeyboardInterrupt wherever the main thread happens to be, and JAX runs Python
callbacks (its garbage-collection hook among them) that swallow it: one Ctrl-C was seen lost
that way ("KeyboardInterrupt ignored in _xla_gc_callback"), and the run trained on to its end.
A second Ctrl-C goes to the handler that was there before (Python's: KeyboardInterrupt), for
whoever will not wait for the save. A SIGTERM stop exits 0, as a preempted job should; a Ctrl-C
stop raises `Interrupted` once everything is saved, which main turns into exit status 130, what
a shell reports for a Ctrl-C.

On several processes JAX's coordination service delivers the preemption notice, and every
process agrees on the same step to stop at; no handler is installed there.
"""

import contextlib
import signal
from typing import Iterator

import jax
from absl import logging

CTRL_C_EXIT = 128 + signal.SIGINT
_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C"}


class Interrupted(Exception):
  """Ctrl-C stopped the run; what was trained is saved."""


class EvalsStopped(BaseException):
  """A signal stopped the final evaluations. Raised by the handler, wherever the main thread
  is; a BaseException, like KeyboardInterrupt, so that no `except Exception` on its way (JAX
  guards its compilation-cache writes with one) mistakes it for a failure of its own."""


class Watcher:
  """Installs the handlers for its `with` block, then puts the previous ones back."""

  def __init__(self):
    self.received: int | None = None  # the first signal received
    self._trained_to: int | None = None  # set once training is over
    self._in_evals = False
    self._previous = {}

  def __enter__(self) -> "Watcher":
    if jax.process_count() == 1:
      self._previous = {s: signal.signal(s, self._on_signal) for s in _NAMES}
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

  @property
  def cause(self) -> str:
    """How the trainer's stop message names the reason: 'for preemption' or 'by Ctrl-C'."""
    return "by Ctrl-C" if self.received == signal.SIGINT else "for preemption"

  def _on_signal(self, signum, frame) -> None:
    del frame
    first = self.received is None
    if first or signum == signal.SIGINT:  # a Ctrl-C, even after a SIGTERM, exits 130
      self.received = signum
    if signum == signal.SIGINT:
      # The next Ctrl-C gets the previous handler: it exits at once, without the save.
      signal.signal(signal.SIGINT, self._previous[signal.SIGINT])
    if self._trained_to is None:
      again = ("; press Ctrl-C again to exit at once, keeping the last saved checkpoint"
               if signum == signal.SIGINT else "")
      logging.warning("%s received: saving a checkpoint at the next step and stopping%s.",
                      _NAMES[signum], again)
    elif first:
      logging.warning("%s received after training: the final evaluations stop; the "
                      "checkpoint of step %d is saved.", _NAMES[signum], self._trained_to)
    if self._in_evals:
      self._in_evals = False  # raised once: a second signal must not break the clean-up
      raise EvalsStopped()

  def reached(self, step: int) -> bool:
    """Whether to save and stop at `step`."""
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return multihost_utils.reached_preemption_sync_point(step)
    return self.received is not None

  def training_done(self, step: int) -> None:
    """From now on a signal stops the final evaluations instead of asking for a checkpoint."""
    self._trained_to = step

  @contextlib.contextmanager
  def final_evals(self) -> Iterator[None]:
    """The block of the final evaluations: a signal received before or during it raises
    EvalsStopped, in the block or on entering it; or on leaving it, when the handler's raise
    was lost on its way (in a callback that swallows exceptions)."""
    if self.received is not None:
      raise EvalsStopped()
    self._in_evals = True
    try:
      yield
    finally:
      self._in_evals = False
    if self.received is not None:
      raise EvalsStopped()

  def raise_if_interrupted(self) -> None:
    """Raises Interrupted after a Ctrl-C; call it once the run has saved and closed all."""
    if self.received == signal.SIGINT:
      raise Interrupted()
