"""Preemption: SIGTERM/SIGUSR1 ask the run to finish its step, checkpoint, and exit.

Exit codes of scripts/train.py (documented in the README):

- ``EXIT_OK`` (0): finished all epochs (or the run was already complete).
- ``EXIT_NON_FINITE`` (3): the loss went NaN/inf (fp16: too many skipped steps in a row); the
  last good checkpoint is kept and nothing after the bad step is written.
- ``EXIT_PREEMPTED`` (143, 128 + SIGTERM as schedulers expect): stopped by a signal after writing
  ``last.pt``; relaunching with the same run_name (``resume=auto``) continues from the next batch.
- 1: any other error (Hydra prints config errors such as an override typo this way).
"""

from __future__ import annotations

import signal
from collections.abc import Iterable
from types import FrameType
from typing import Any

__all__ = ["EXIT_OK", "EXIT_NON_FINITE", "EXIT_PREEMPTED", "PreemptionGuard"]

EXIT_OK = 0
EXIT_NON_FINITE = 3
EXIT_PREEMPTED = 143


class PreemptionGuard:
    """Turns the given signals into a flag the training loop polls once per optimizer step.

    The handler only records the signal (nothing else is safe inside a handler); the loop agrees
    on it across ranks, so all ranks stop after the same step; repeated signals (torchrun
    signals the survivors when one rank exits) do not cut the checkpoint short. The trainer
    holds the guard only while training: before that (setup, rendezvous) a signal kills the
    process as usual, there being nothing to save. SIGINT (Ctrl-C) is left alone.

    Handlers installed before (such as submitit's requeue handler for SIGUSR1) are remembered:
    :meth:`chain` calls the one for the received signal after the checkpoint is written, so the
    job can still be requeued.
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM, signal.SIGUSR1)) -> None:
        self.signals = tuple(signals)
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    def __enter__(self) -> PreemptionGuard:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def chain(self) -> None:
        """Run the handler that was installed before ours for the received signal, if any."""
        if self.signum is None:
            return
        previous = self._previous.get(self.signum)
        if callable(previous) and previous not in (signal.default_int_handler,):
            previous(self.signum, None)
