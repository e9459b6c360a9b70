"""Small file-system helpers with no heavy imports (the CLI uses them before loading torch)."""

from __future__ import annotations

import os
from pathlib import Path


def check_parent_dir(out: Path) -> None:
    """The directory that will hold ``out`` exists and is writable (OutputError otherwise)."""
    from .errors import OutputError

    parent = Path(os.path.abspath(out)).parent
    if not parent.is_dir():
        raise OutputError(f"directory {parent} does not exist", where=str(out))
    if not dir_writable(parent):
        raise OutputError(f"directory {parent} is not writable", where=str(out))


def dir_writable(path: Path) -> bool:
    return os.access(path, os.W_OK | os.X_OK)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
