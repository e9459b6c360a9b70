"""Small file-system helpers with no heavy imports (the CLI uses them before loading torch)."""

from __future__ import annotations

import os
from pathlib import Path


def dir_writable(path: Path) -> bool:
    return os.access(path, os.W_OK | os.X_OK)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
