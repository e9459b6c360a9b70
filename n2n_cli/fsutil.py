"""Small file-system helpers with no heavy imports (the CLI uses them before loading torch).

Temporary files and directories that n2n writes beside an output are named
``.<OUT name, shortened>.<8 random hex>.n2n-<kind>`` (kind: ``tmp``, ``stage`` or ``old``) and
are locked (``flock``) by the process that owns them for as long as it lives. A later run
removes those that nobody holds a lock on: what a SIGKILL (or a power cut) left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import re
import secrets
import shutil
import stat
from pathlib import Path
from typing import Iterator

log = logging.getLogger("n2n_cli")

TEMP_KINDS = ("tmp", "stage", "old")
# also matches the names of n2n versions that used tempfile.mkstemp (8 characters of [a-z0-9_])
_TEMP_RE = re.compile(r"^\..+\.[a-z0-9_]{8}\.n2n-(?:tmp|stage|old)$", re.DOTALL)
_NAME_PART_MAX = 100  # bytes of OUT's name kept in a temporary name (NAME_MAX is 255)


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


# --------------------------------------------------------------------------- reading


_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def require_regular_file(path: str | os.PathLike, what: str = "file", error: type | None = None) -> Path:
    """Raise ``error`` (default UserError, exit 2) unless ``path`` is, or links to, a regular
    file: a FIFO would hang a reader, ``/dev/zero`` would eat memory, a symlink loop cannot be
    opened. ``what`` names the file in the message (e.g. "checkpoint")."""
    from .errors import UserError

    error = error or UserError
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise error("no such file", where=str(path)) from None
        if e.errno == errno.ELOOP:
            raise error("cannot be opened: a symlink loop (too many levels of symbolic links)", where=str(path),
                        hint="Point the link at the real file.") from None
        raise error(f"cannot be read ({e.strerror})", where=str(path)) from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a plain file")
        raise error(f"not a regular file ({kind}); n2n reads a {what} only from a regular file", where=str(path))
    return path


# --------------------------------------------------------------------------- temporary names and locks


def temp_name(out_name: str, kind: str) -> str:
    """A fresh temporary name for ``out_name`` within NAME_MAX (255 bytes), whatever its length."""
    if kind not in TEMP_KINDS:
        raise ValueError(kind)
    raw = os.fsencode(out_name)
    if len(raw) > _NAME_PART_MAX:  # keep a readable head and a digest of the whole name
        digest = hashlib.sha256(raw).hexdigest()[:8]
        raw = raw[:_NAME_PART_MAX - 9].decode("utf-8", "ignore").encode() + b"~" + digest.encode()
    return "." + os.fsdecode(raw) + "." + secrets.token_hex(4) + ".n2n-" + kind


def is_temp_name(name: str) -> bool:
    return bool(_TEMP_RE.match(name))


@contextlib.contextmanager
def temp_beside(out: Path, kind: str = "tmp", directory: bool = False, *, where: str | None = None) -> Iterator[Path]:
    """Create a temporary file (or directory) beside ``out`` and hold an exclusive lock on it
    while the block runs; on leaving, whatever is still at that name is removed (on success
    the caller has renamed it into place). ``where`` names the path in errors (default ``out``)."""
    from .errors import OutputError

    parent = Path(os.path.dirname(os.path.abspath(out)))
    for _ in range(100):
        tmp = parent / temp_name(Path(out).name, kind)
        try:
            if directory:
                os.mkdir(tmp, 0o700)
                fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            else:
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            break
        except FileExistsError:
            continue
        except OSError as e:
            raise OutputError(f"cannot create a {'directory' if directory else 'file'} beside it ({e.strerror})",
                              where=where or str(out)) from None
    else:  # pragma: no cover - 100 collisions of 32 random bits
        raise OutputError("cannot find a free temporary name beside it", where=where or str(out))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fresh: nobody else can hold it
        yield tmp
    finally:
        try:
            remove_path(tmp)
        finally:
            os.close(fd)


def remove_path(path: Path) -> None:
    """Remove a file, symlink or directory tree; what cannot be removed is left."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


def remove_stale_temps(directory: Path) -> list[Path]:
    """Remove n2n temporary files and directories in ``directory`` that no running process
    holds a lock on (left by a SIGKILL or a crash); log and return them. Entries of other users,
    symlinks and anything n2n cannot lock are left alone."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in sorted(names):
        if not is_temp_name(name):
            continue
        path = Path(directory) / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue  # gone, a symlink, or not ours to read
        try:
            st = os.fstat(fd)
            if st.st_uid != os.getuid() or not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live n2n owns it
            try:
                now = os.lstat(path)
            except OSError:
                continue
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                continue
            if name.endswith(".n2n-old") and _restore_old(path, name):
                continue
            size = _tree_size(path) if stat.S_ISDIR(st.st_mode) else st.st_size
            remove_path(path)
            if not os.path.lexists(path):
                removed.append(path)
                log.warning("removed %s (%s), left by an n2n run that was killed; no running n2n owned it",
                            path, human_bytes(size))
        finally:
            os.close(fd)
    return removed


def _restore_old(holder: Path, name: str) -> bool:
    """A killed run may have left the previous output in ``holder/old`` (between the two renames
    of a replace where the system cannot swap atomically): put it back if its place is free."""
    old = holder / "old"
    target = holder.parent / name[1:-len(".12345678.n2n-old")]
    if not os.path.lexists(old) or os.path.lexists(target):
        return False
    try:
        rename_noreplace(old, target)
    except OSError:
        return False
    with contextlib.suppress(OSError):
        os.rmdir(holder)
    log.warning("restored %s from %s, where an n2n run that was killed had moved it", target, holder)
    return True


def _tree_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


# --------------------------------------------------------------------------- renames

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_renameat2_fn = None


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2(2). True if done; False where the C library, kernel or file system lacks
    it; raises OSError for real failures (EEXIST, ENOENT, ...)."""
    global _renameat2_fn
    if _renameat2_fn is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2_fn = fn
        except (OSError, AttributeError):
            _renameat2_fn = False
    if _renameat2_fn is False:
        return False
    if _renameat2_fn(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(e, os.strerror(e), str(dst))


_sync_file_range_fn = None
SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``nbytes`` at ``offset`` of ``fd`` to disk now, without
    waiting (Linux sync_file_range(2), SYNC_FILE_RANGE_WRITE): the disk works while the rest is
    produced, and the final fsync, which still makes the file durable, has less left to wait for.
    A no-op where the call is missing or refused: it changes when bytes reach the disk, never which."""
    global _sync_file_range_fn
    if _sync_file_range_fn is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).sync_file_range
            fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _sync_file_range_fn = fn
        except (OSError, AttributeError):
            _sync_file_range_fn = False
    if _sync_file_range_fn is not False and nbytes > 0:
        _sync_file_range_fn(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (FileExistsError), atomically where the
    system has renameat2(RENAME_NOREPLACE), else by link-then-unlink for files."""
    if _renameat2(src, dst, RENAME_NOREPLACE):
        return
    if not stat.S_ISDIR(os.lstat(src).st_mode):
        try:
            os.link(src, dst, follow_symlinks=False)  # fails with EEXIST, atomically
        except FileExistsError:
            raise
        except OSError:
            pass  # no hard links here (e.g. FAT): the checked rename below
        else:
            os.unlink(src)
            return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (renameat2 RENAME_EXCHANGE); False where unsupported."""
    return _renameat2(a, b, RENAME_EXCHANGE)


# --------------------------------------------------------------------------- space and small writes


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def check_free_space(out: Path, needed: int) -> None:
    """OutputError (exit 2) if the file system that will hold ``out`` has less than ``needed``
    bytes free for this user. An existing ``out`` counts as used: it is replaced only at the end."""
    from .errors import OutputError

    parent = Path(os.path.dirname(os.path.abspath(out)))
    try:
        free = free_bytes(parent)
    except OSError:
        return  # no answer (some network file systems): the write itself will tell
    if needed > free:
        raise OutputError(f"not enough free space: the output needs {human_bytes(needed)} ({needed:,} bytes) and "
                          f"{parent} has {human_bytes(free)} free", where=str(out),
                          hint="Free some space, or write OUT on another file system.")


def atomic_write_text(path: Path, text: str, *, where: str | None = None) -> None:
    """Write ``text`` to ``path`` through a locked temporary file and a rename: ``path`` is
    either left as it was or replaced whole. OutputError naming ``where`` (default ``path``)."""
    from .errors import OutputError

    path = Path(path)
    with temp_beside(path, "tmp", where=where) as tmp:
        try:
            with open(tmp, "wb") as f:
                f.write(text.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~current_umask())
            os.replace(tmp, path)
        except OSError as e:
            raise OutputError(f"cannot write ({e.strerror})", where=where or str(path)) from None
