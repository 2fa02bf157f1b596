"""Progress that reads well in a terminal and in a log file.

On a terminal, `Progress` is a tqdm bar. Otherwise (output redirected to a file, CI, nohup) tqdm would
print nothing, so it writes one timed line every `every_s` seconds and a last one at `close()`:

    train: 120/2000 steps (6.0%) | 2,345 tokens/s | elapsed 51s | ETA 13m22s | loss 3.2140

    with Progress(total=2000, desc="train", unit="steps", initial=step) as bar:
        bar.update(1, tokens=4096, loss=3.214)   # tokens feed the rate; other keywords are shown

MEMORYFORMER_PROGRESS_EVERY (seconds, default 30) sets the line interval; 0 writes a line per update.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Any


def _format_seconds(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.4f}"
    return str(value)


def _default_every() -> float:
    try:
        return max(0.0, float(os.environ.get("MEMORYFORMER_PROGRESS_EVERY", "30")))
    except ValueError:
        return 30.0


class Progress:
    """A tqdm bar on a terminal, timed lines elsewhere; `enabled=False` shows nothing."""

    def __init__(self, total: int | None, desc: str, *, unit: str = "it", initial: int = 0,
                 enabled: bool = True, every_s: float | None = None, file: IO[str] | None = None,
                 terminal: bool | None = None) -> None:
        self.total, self.desc, self.unit, self.count = total, desc, unit, initial
        self.file = file if file is not None else sys.stderr
        self.every_s = _default_every() if every_s is None else every_s
        self.enabled = enabled
        self.fields: dict[str, Any] = {}
        self._start = self._last_line = time.monotonic()
        self._initial, self._tokens = initial, 0
        is_tty = terminal if terminal is not None else bool(getattr(self.file, "isatty", lambda: False)())
        self._bar = None
        if enabled and is_tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                             file=self.file, leave=False)

    def update(self, n: int = 1, *, tokens: int = 0, **fields: Any) -> None:
        """Advance by n units; `tokens` adds to the tokens/s rate; other keywords are shown as-is."""
        self.count += n
        self._tokens += tokens
        self.fields.update(fields)
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            if fields:
                self._bar.set_postfix({k: _format_value(v) for k, v in self.fields.items()}, refresh=False)
            return
        now = time.monotonic()
        if now - self._last_line >= self.every_s:
            self._last_line = now
            self.write(self.line())

    def line(self) -> str:
        """The current status as one line (what a log shows)."""
        elapsed = time.monotonic() - self._start
        done = self.count - self._initial
        parts = [f"{self.desc}: {self.count}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"]
        if self.total:
            parts[0] += f" ({100.0 * self.count / self.total:.1f}%)"
        if self._tokens and elapsed > 0:
            parts.append(f"{self._tokens / elapsed:,.0f} tokens/s")
        parts.append(f"elapsed {_format_seconds(elapsed)}")
        if self.total and done > 0 and self.count < self.total:
            parts.append(f"ETA {_format_seconds(elapsed / done * (self.total - self.count))}")
        parts += [f"{k} {_format_value(v)}" for k, v in self.fields.items()]
        return " | ".join(parts)

    def write(self, message: str) -> None:
        """Print a message without breaking the bar."""
        if self._bar is not None:
            self._bar.write(message, file=self.file)
        else:
            print(message, file=self.file, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self.count > self._initial:
            self.write(self.line())
        self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
