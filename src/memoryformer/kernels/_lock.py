"""An exclusive lock around the kernel build: `fcntl.flock` on a file that records the holder's pid.

The operating system releases a flock when its holder dies (even by `kill -9`), so a lock left by a
dead process is simply taken over; there is no stale state to detect. Waiting on a live holder is
bounded and says so once on stderr; SIGINT and SIGTERM interrupt the wait even where a Python handler
(e.g. the training loop's checkpoint-and-stop handler) would otherwise only record them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; builds there are not serialised across processes
    fcntl = None  # type: ignore[assignment]


class LockTimeout(TimeoutError):
    """A live process kept the build lock for longer than the allowed wait."""


class LockWaitInterrupted(RuntimeError):
    """SIGINT or SIGTERM arrived while waiting for the build lock."""


def holder_pid(path: Path) -> int | None:
    """The pid recorded in the lock file by its last holder, or None."""
    try:
        return int(path.read_text().strip() or "x")
    except (OSError, ValueError):
        return None


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _record_pid(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """While active (main thread only), SIGINT/SIGTERM raise LockWaitInterrupted after running the
    Python handler already installed, so that handler still sees the signal. Default handlers are
    left alone: they already end the wait (KeyboardInterrupt, or the process ends)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Callable] = {}

    def interrupt(signum: int, frame) -> None:
        previous[signum](signum, frame)
        raise LockWaitInterrupted(f"interrupted by {signal.Signals(signum).name}")

    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if callable(handler) and handler is not signal.default_int_handler:
            previous[sig] = handler
            signal.signal(sig, interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait(fd: int, path: Path, timeout: float, what: str, poll: float) -> None:
    """Block until the lock is ours: at most `timeout` seconds, one message on stderr."""
    pid = holder_pid(path)
    holder = f"process {pid}" if pid is not None else "another process"
    deadline = time.monotonic() + timeout
    with _signals_interrupt():  # before the message: a signal sent on seeing it must interrupt
        print(f"memoryformer: waiting up to {timeout:.0f} s for {holder}, which is {what} "
              "(MEMORYFORMER_KERNELS_WAIT sets the limit)", file=sys.stderr, flush=True)
        while not _try_lock(fd):
            left = deadline - time.monotonic()
            if left <= 0:
                raise LockTimeout(f"waited {timeout:.0f} s for {holder}, which holds {path} ({what})")
            time.sleep(min(poll, left))


@contextlib.contextmanager
def exclusive(path: Path, timeout: float, what: str, poll: float = 0.1) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing) inside the block.

    Args:
        path: the lock file; it keeps the holder's pid for the waiting message.
        timeout: seconds to wait for a live holder before raising LockTimeout.
        what: what the holder is doing, for the message ("building the C++ kernels in DIR").
    """
    if fcntl is None:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd):
            _wait(fd, path, timeout, what, poll)
        _record_pid(fd)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock
