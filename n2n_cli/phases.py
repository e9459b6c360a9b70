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


def line_progress(stream: TextIO | None = None, prefix: str = "n2n: ") -> Callable[[str, int, int], None]:
    """A progress callback ``(phase, done, total)`` that prints one plain line when a phase starts
    and one when it ends (with its duration), so a log shows what a long run is doing."""
    started: dict[str, float] = {}
    finished: set[str] = set()

    def update(phase: str, done: int, total: int) -> None:
        out = stream or sys.stderr
        if phase not in started:
            started[phase] = time.perf_counter()
            print(f"{prefix}{phase} ({total})...", file=out, flush=True)
        if done >= total and phase not in finished:
            finished.add(phase)
            print(f"{prefix}{phase}: done in {time.perf_counter() - started[phase]:.1f} s", file=out, flush=True)

    return update
