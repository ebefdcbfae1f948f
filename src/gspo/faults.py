"""Fault handling the trainer leans on: graceful interrupts and non-finite updates.

SIGINT, SIGTERM, SIGHUP (the terminal closed) and SIGUSR1 (Slurm's `--signal`, before its time limit) do not
kill the run mid-step: the handler only records the signal; the trainer finishes the current step, saves a
checkpoint and exits with 128 + signum. A second one while the step is still running (stuck in a reward, say)
raises ForcedStop at once: the trainer saves the state of the last finished step (one process) and exits the
same way, so a scheduler's SIGTERM-then-SIGKILL still leaves a checkpoint.
"""

from __future__ import annotations

import math
import signal
import threading
import time
import warnings
from typing import Any, Callable


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


class ForcedStop(KeyboardInterrupt):
    """A second stop signal while a step runs: stop now (a KeyboardInterrupt, so no reward wrapper swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class InterruptGuard:
    NAMES = ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1")  # Ctrl-C, schedulers, a closed terminal, Slurm's --signal
    SIGNALS = tuple(getattr(signal, name) for name in NAMES if hasattr(signal, name))

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise ForcedStop(signum)
        self.signum = signum
        print(
            f"\n[gspo] received {signal.Signals(signum).name}: finishing the current step, then saving a checkpoint "
            "(send it again to stop now, saving the last finished step)",
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

    def record(self, grad_norm: float, where: str, source: Callable[[], str] | None = None) -> bool:
        """True if the update may go ahead; False (and a warning naming the `source()` that was not finite:
        rewards, advantages, loss or gradient) if it must be skipped."""
        if math.isfinite(grad_norm):
            self.in_a_row = 0
            return True
        self.total += 1
        self.in_a_row += 1
        what = f"non-finite {source()}" if source is not None else "non-finite loss or gradient"
        warnings.warn(
            f"{what} (grad norm {grad_norm}) at {where}: update skipped ({self.in_a_row} in a row, limit {self.limit})",
            RuntimeWarning,
            stacklevel=2,
        )
        return False

    @property
    def exhausted(self) -> bool:
        return self.in_a_row >= self.limit

    def state_dict(self) -> dict:
        return {"total": self.total, "in_a_row": self.in_a_row}


# ----------------------------------------------------------------------------------
# Calls with a time limit (reward functions, math-verify): on any thread
# ----------------------------------------------------------------------------------
NEVER_SWALLOWED = (KeyboardInterrupt, SystemExit, GeneratorExit)  # stop the program, never a "wrong answer"


class CallTimeout(BaseException):
    """Raised into a call by its SIGALRM timer (a BaseException, so `except Exception` in the call cannot eat it)."""


def run_with_timeout(fn: Callable[[], Any], timeout_s: float) -> tuple[str, Any]:
    """fn() with a time limit: ("ok", value), ("timeout", None) or ("raised", exception). On the main thread a
    SIGALRM timer interrupts fn (a caller's timer is restored afterwards); elsewhere, where signals cannot be set,
    fn runs in a daemon thread that is abandoned at the limit (it finishes in the background). Neither can cut a
    single long step inside C code short: both wait for the interpreter lock."""
    status, value = _run_with_alarm(fn, timeout_s)
    return _run_in_thread(fn, timeout_s) if status == "unsupported" else (status, value)


def _run_with_alarm(fn: Callable[[], Any], timeout_s: float) -> tuple[str, Any]:
    """Run fn on the main thread under a SIGALRM timer: ("ok", value), ("timeout", None), ("raised", exc), or
    ("unsupported", None) when signals cannot be set here. A timer of the caller's is restored afterwards
    (less the time spent here). If fn swallows the alarm's exception and returns, that is still a timeout."""
    fired = False

    def on_alarm(signum, frame):
        nonlocal fired
        fired = True
        raise CallTimeout()

    try:
        old_handler = signal.signal(signal.SIGALRM, on_alarm)
    except ValueError:
        return "unsupported", None
    start = time.monotonic()
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        try:
            value = fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        result: tuple[str, Any] = ("timeout", None) if fired else ("ok", value)
    except CallTimeout:
        result = ("timeout", None)
    except (KeyboardInterrupt, GeneratorExit):
        raise
    except BaseException as e:  # noqa: BLE001  math-verify's TimeoutException, sys.exit's SystemExit: the caller's
        result = ("timeout", None) if fired else ("raised", e)
    finally:
        signal.signal(signal.SIGALRM, old_handler if old_handler is not None else signal.SIG_DFL)
        if old_delay > 0:
            remaining = max(old_delay - (time.monotonic() - start), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, remaining, old_interval)
    return result


def _run_in_thread(fn: Callable[[], Any], timeout_s: float) -> tuple[str, Any]:
    """Run fn in a daemon thread joined for timeout_s: ("ok", value), ("timeout", None) (the thread is
    abandoned, and finishes in the background), or ("raised", exc)."""
    box: list = []

    def target():
        try:
            box.append(("ok", fn()))
        except BaseException as e:  # noqa: BLE001  reported to the caller, whatever it is
            box.append(("raised", e))

    thread = threading.Thread(target=target, name="gspo-timed-call", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return box[0] if box else ("timeout", None)
