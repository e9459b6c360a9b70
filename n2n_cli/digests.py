"""SHA-256 digests of input files, possibly computed ahead of need.

A grow records the teacher's digest in the student's lineage, so every real run hashes its whole
input (2.2 GB: 1.3 s of CPU at 1B). The command line starts that hashing in a thread
(:func:`prefetch`) before it imports torch, a second of single-threaded work that leaves the
other core idle; the library's :func:`file_sha256` then takes the digest computed ahead when the
file is still the one that was hashed (same device, inode, size, modification and change times
before and after hashing), and hashes the file itself otherwise. Imports nothing heavy.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

# bytes read and hashed per call: both calls release the GIL, so a big block keeps the thread off
# the GIL that torch's import holds (with 1 MiB reads the hashing thread waited for the GIL twice
# a MiB and barely ran during the import). Read, not mapped: a file truncated while it is hashed
# must be an error, not a SIGBUS that ends the process.
BLOCK = 32 << 20


class _Ahead:
    """A digest being computed by the prefetch thread: ``done`` is set when it has finished
    (``digest`` None: it failed or the file changed while it was read)."""

    def __init__(self):
        self.done = threading.Event()
        self.identity: tuple | None = None
        self.digest: str | None = None


_lock = threading.Lock()
_ahead: dict[str, _Ahead] = {}  # real path -> its digest computed ahead


def _identity(path: str | os.PathLike) -> tuple:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(min(BLOCK, max(1, os.fstat(f.fileno()).st_size)))
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of the file at ``path``: the one computed ahead if the file has not
    changed since (waiting for it if it is being computed), else computed now."""
    with _lock:
        ahead = _ahead.get(os.path.realpath(path))
    if ahead is not None:
        ahead.done.wait()
        if ahead.digest is not None and ahead.identity == _identity(path):
            return ahead.digest
    return _sha256(path)


def prefetch(paths: list[Path]) -> threading.Thread | None:
    """Hash ``paths`` one after the other in a daemon thread (a process that ends early does not
    wait for it); files already prefetched are skipped. Errors are left for :func:`file_sha256`
    to meet again (and report) when the library asks."""
    todo = []
    with _lock:
        for p in paths:
            key = os.path.realpath(p)
            if key not in _ahead:
                _ahead[key] = _Ahead()
                todo.append((p, _ahead[key]))
    if not todo:
        return None

    def work():
        for p, ahead in todo:
            try:
                before = _identity(p)
                digest = _sha256(p)
                if _identity(p) == before:
                    ahead.identity, ahead.digest = before, digest
            except Exception:  # noqa: BLE001 - whatever it is, the library meets it again when it asks
                pass
            finally:
                ahead.done.set()

    thread = threading.Thread(target=work, name="n2n-sha256-ahead", daemon=True)
    thread.start()
    return thread


def model_files(src: str | os.PathLike) -> list[Path]:
    """The files whose digests a grow of ``src`` will ask for, as far as they can be told without
    reading the model: a checkpoint file itself; for a Hugging Face directory, config.json, the
    safetensors index and the shards it names (inside the directory), or model.safetensors.
    Regular files only; whatever this misses is hashed when it is asked for. Raises nothing: what
    is wrong with the model (a name too long, a missing file) is the library's to report."""
    src = Path(src)
    if _is_file(src):
        return [src]
    if not _is_file(src / "config.json"):
        return []
    files = [src / "config.json"]
    index = src / "model.safetensors.index.json"
    if _is_file(index):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return files  # the library reports what is wrong with it
        root = os.path.realpath(src)
        files.append(index)
        files += [src / s for s in sorted(x for x in shards if isinstance(x, str) and "\0" not in x)
                  if os.path.dirname(os.path.realpath(src / s)) == root]
    else:
        files.append(src / "model.safetensors")
    return [f for f in files if _is_file(f)]


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long, a NUL in it
        return False
