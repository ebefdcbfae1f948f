"""Fault handling the trainer leans on: graceful interrupts and non-finite updates.

SIGINT / SIGTERM do not kill the run mid-step: the handler only records the signal;
the trainer finishes the current step, saves a checkpoint and exits with 128 + signum.
A second SIGINT while waiting raises KeyboardInterrupt at once (the user insists).
"""

from __future__ import annotations

import math
import signal
import threading
import warnings


class TrainingInterrupted(SystemExit):
    """Raised after a checkpoint was saved in response to SIGINT/SIGTERM.

    Its exit code is 128 + signum (the shell convention: 130 for SIGINT, 143 for SIGTERM),
    so an uncaught one ends the process with that status; str() is the message saying how
    to resume. (A SystemExit whose code is a string would exit with status 1.)"""

    def __init__(self, message: str, signum: int | None = None) -> None:
        super().__init__(128 + signum if signum else 1)
        self.message, self.signum = message, signum

    def __str__(self) -> str:
        return self.message


class NonFiniteUpdateError(RuntimeError):
    """Too many consecutive updates had a non-finite loss or gradient."""


class InterruptGuard:
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"\n[gspo] received {signal.Signals(signum).name}: finishing the current step, "
            "then saving a checkpoint (press Ctrl-C again to abort without saving)",
            flush=True,
        )

    def __enter__(self) -> "InterruptGuard":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


class SkipCounter:
    """Counts skipped (non-finite) updates; raises after `limit` in a row."""

    def __init__(self, limit: int, total: int = 0, in_a_row: int = 0) -> None:
        self.limit, self.total, self.in_a_row = limit, total, in_a_row

    def record(self, grad_norm: float, where: str) -> bool:
        """True if the update may go ahead; False (and a warning) if it must be skipped."""
        if math.isfinite(grad_norm):
            self.in_a_row = 0
            return True
        self.total += 1
        self.in_a_row += 1
        warnings.warn(
            f"non-finite loss or gradient (grad norm {grad_norm}) at {where}: update skipped "
            f"({self.in_a_row} in a row, limit {self.limit})",
            RuntimeWarning,
            stacklevel=2,
        )
        return False

    @property
    def exhausted(self) -> bool:
        return self.in_a_row >= self.limit

    def state_dict(self) -> dict:
        return {"total": self.total, "in_a_row": self.in_a_row}
