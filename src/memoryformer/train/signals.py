"""Stop signals: SIGINT / SIGTERM end a run at a step boundary, never in the middle of a write.

While `StopSignals` is active the first signal only records itself; the loop finishes the step,
writes a checkpoint and stops (exit 130 for SIGINT, 143 for SIGTERM). A second SIGINT outside a
write stops at once (KeyboardInterrupt) and leaves the last checkpoint as it was. Inside `held()`
(every checkpoint, weights and log rewrite) every signal is only recorded: the write completes,
then the run stops.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """While active, SIGINT and SIGTERM set `signum`; `held()` defers even a second SIGINT."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.count = 0
        self._holding = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.count += 1
        first = self.signum is None
        if first:
            self.signum = signum
        if self._holding:
            if not first:
                _note("memoryformer: a write is in progress; the run stops as soon as it is complete\n")
            return
        if not first and signum == signal.SIGINT:
            raise KeyboardInterrupt

    @contextmanager
    def held(self) -> Iterator[None]:
        """Record signals without acting on them until the block is done (a write in progress)."""
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1

    @property
    def stopping(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def _note(text: str) -> None:
    """Write to stderr from a signal handler (os.write: print could re-enter a stream being written)."""
    try:
        os.write(2, text.encode())
    except OSError:
        pass


def exit_code(signal_name: str | None) -> int:
    """The shell's exit code for a run stopped by this signal (128 + number; 1 if unknown)."""
    signum = getattr(signal, signal_name, None) if signal_name and signal_name.startswith("SIG") else None
    return 128 + int(signum) if signum is not None else 1
