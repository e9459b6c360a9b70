"""Bounds on what a user can ask for, in one light module (the CLI reads them before torch loads).

They keep absurd values (``.inf``, 10**15 units, 10**8 probes, 10**9 layers) from reaching shape
arithmetic or allocation; a real plan is also bounded by the free disk space (``outputs``).
"""

MAX_WIDTH = 2**24  # units, channels or a transformer dimension after widening
MAX_FACTOR = 1024.0  # a widening factor
MAX_PROBES = 65536  # probe inputs of a verification
MAX_PROBE_BYTES = 2**30  # and their total size, in float64
MAX_LAYERS = 10_000  # transformer blocks after deepening: more than any published model
MAX_PLANNED_BYTES = 2**44  # 16 TiB of output: refused before any tensor is read
