"""Progress lines on stdout: a header that names the columns and their units, then a line per logged step that
ends with the time since the start and an estimate of the time left (the mean time per step so far, times the
steps left: a resumed run counts from its resume)."""

from __future__ import annotations

import time


def clock(seconds: float) -> str:
    """``m:ss``, or ``h:mm:ss`` past an hour."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    def __init__(self, what: str, first: int, last: int, columns: str, enabled: bool = True):
        """``what``: the phase (``"RL"``); steps ``first``..``last``; ``columns``: what each field of a line is,
        with its unit."""
        self.first, self.last, self.enabled = first, last, enabled
        self.start = time.monotonic()
        if enabled:
            print(f"{what}: steps {first}-{last}; {columns}; then time elapsed and an estimate of the time left",
                  flush=True)

    def line(self, step: int, fields: str) -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.start
        done = step - self.first + 1
        left = elapsed / done * (self.last - step) if done > 0 else 0.0
        print(f"{fields}  {clock(elapsed)} elapsed, ~{clock(left)} left", flush=True)
