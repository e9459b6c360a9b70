"""Phase timings for the report, and plain progress lines for logs (stderr that is not a TTY)."""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


class PhaseClock:
    """``mark(name)`` records the seconds since the previous mark (or creation) under ``name``;
    ``seconds`` is the dict for the JSON report (``{"check": 1.2, "plan": 0.1, ...}``)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self._last, 3)
        self._last = now


#: a phase still running prints where it is after this many seconds without a line
PERIOD = 30.0


def line_progress(stream: TextIO | None = None, prefix: str = "n2n: ",
                  clock: Callable[[], float] = time.perf_counter) -> Callable[[str, int, int], None]:
    """A progress callback ``(phase, done, total)`` that prints one plain line when a phase starts,
    one when it ends (with its duration) and, in between, one every ``PERIOD`` seconds or more
    (at the next update) with how far it is, so a log shows what a long run is doing (verifying
    a 7B model blockwise takes minutes)."""
    started: dict[str, float] = {}
    last: dict[str, float] = {}
    finished: set[str] = set()

    def update(phase: str, done: int, total: int) -> None:
        out = stream or sys.stderr
        now = clock()
        if phase not in started:
            started[phase] = last[phase] = now
            print(f"{prefix}{phase} ({total})...", file=out, flush=True)
        if done >= total:
            if phase not in finished:
                finished.add(phase)
                print(f"{prefix}{phase}: done in {now - started[phase]:.1f} s", file=out, flush=True)
        elif now - last[phase] >= PERIOD:
            last[phase] = now
            print(f"{prefix}{phase}: {done}/{total} after {now - started[phase]:.0f} s", file=out, flush=True)

    return update
