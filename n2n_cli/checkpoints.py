"""Reading and writing checkpoint files, tensor by tensor. Knows files, not growth."""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import pickle
import struct
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors import safe_open

from . import fsutil, outputs
from .digests import file_sha256
from .errors import CheckpointError, OutputError
from .fsutil import current_umask

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

DTYPE_TO_ST = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
ST_TO_DTYPE = {v: k for k, v in DTYPE_TO_ST.items()}


CHUNK = 64 << 20  # bytes read at a time when a raw span is copied through user space
MAP_BYTES = 64 << 20  # bytes of a file mapped at a time to read them in place


class RawSpan:
    """A tensor's bytes in a file, copied to the output as they are (no decoding): ``copy_to``
    copies in the kernel (``copy_file_range``) where it can, else through a buffer."""

    def __init__(self, fd: int, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...], where: str):
        self.fd, self.offset, self.nbytes, self.dtype, self.shape, self.where = fd, offset, nbytes, dtype, shape, where

    def chunks(self, buf: torch.Tensor) -> Iterator[torch.Tensor]:
        """The bytes, ``len(buf)`` (a uint8 tensor, reused) at a time, as views of ``buf``."""
        item = max(1, torch.empty((), dtype=self.dtype).element_size())
        step = len(buf) // item * item
        view = memoryview(buf.numpy())
        done = 0
        while done < self.nbytes:
            n = min(step, self.nbytes - done)
            self.read_into(view[:n], done)
            yield buf[:n]
            done += n

    def read_into(self, view: memoryview, at: int) -> None:
        """Fill ``view`` with the span's bytes from ``at`` (relative to its start), with ``pread``."""
        got = 0
        while got < len(view):
            k = os.preadv(self.fd, [view[got:]], self.offset + at + got)
            if k <= 0:
                raise CheckpointError("the file is shorter than its header says (changed while n2n ran?)",
                                      where=self.where)
            got += k

    @contextlib.contextmanager
    def mapped(self) -> Iterator[torch.Tensor]:
        """The bytes as a uint8 tensor over a read-only mapping of the file, unmapped on leaving:
        read in place from the page cache instead of copied into a buffer first (3-4x faster), and
        the pages count in RSS only while mapped."""
        if self.nbytes == 0:
            yield torch.empty(0, dtype=torch.uint8)
            return
        mapping = self._map(private=False)
        if mapping is None:
            yield self._read()
            return
        m, at = mapping
        with m:
            with warnings.catch_warnings():  # read-only on purpose: nothing writes through it
                warnings.simplefilter("ignore", UserWarning)
                t = torch.frombuffer(m, dtype=torch.uint8, count=self.nbytes, offset=at)
            try:
                yield t
            finally:
                del t  # the mapping closes only when no tensor uses it

    def tensor(self) -> torch.Tensor:
        """The tensor itself, over a private mapping of its bytes (no copy is made until something
        writes to it, and then only of the pages written: the file never changes); unmapped when
        the tensor and every view of it are freed."""
        if self.nbytes == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        mapping = self._map(private=True)
        if mapping is None:
            raw = self._read()
        else:
            m, at = mapping
            raw = torch.frombuffer(m, dtype=torch.uint8, count=self.nbytes, offset=at)  # holds the mapping
        return raw.view(self.dtype).reshape(self.shape)

    def _map(self, private: bool) -> tuple[mmap.mmap, int] | None:
        """A mapping of the file from the page boundary before the span, and the span's offset in
        it; private: copy-on-write, else read-only. None where the file system cannot map files
        (FUSE with direct_io): the caller reads instead. A file shorter than the span (truncated
        since its header was read) is a CheckpointError here rather than a SIGBUS on access."""
        if os.fstat(self.fd).st_size < self.offset + self.nbytes:
            raise CheckpointError("the file is shorter than its header says (changed while n2n ran?)",
                                  where=self.where)
        start = self.offset - self.offset % mmap.ALLOCATIONGRANULARITY
        flags, prot = (mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE) if private else \
            (mmap.MAP_SHARED, mmap.PROT_READ)
        try:
            return mmap.mmap(self.fd, self.offset - start + self.nbytes, flags=flags, prot=prot,
                             offset=start), self.offset - start
        except OSError:
            return None

    def _read(self) -> torch.Tensor:
        """The bytes read into a fresh uint8 tensor (``pread``)."""
        out = torch.empty(self.nbytes, dtype=torch.uint8)
        self.read_into(memoryview(out.numpy()), 0)
        return out

    def windows(self, size: int | None = None) -> list["RawSpan"]:
        """The span as consecutive spans of at most ``size`` bytes (default ``MAP_BYTES``; a
        multiple of 8, so that no element is cut)."""
        size = size or MAP_BYTES
        return [RawSpan(self.fd, self.offset + at, min(size, self.nbytes - at), self.dtype, (), self.where)
                for at in range(0, self.nbytes, size)] or [self]

    def all_finite(self) -> bool:
        """No NaN or Inf in the span, checked in place a window at a time."""
        from .transforms import all_finite

        if not self.dtype.is_floating_point:
            return True
        for w in self.windows():
            with w.mapped() as raw:
                if not all_finite(raw.view(self.dtype)):
                    return False
        return True

    def copy_to(self, out, buf: torch.Tensor) -> None:
        """Append the bytes to ``out``, an unbuffered file open for writing."""
        out_fd = out.fileno()
        done = 0
        try:
            while done < self.nbytes:
                n = os.copy_file_range(self.fd, out_fd, min(self.nbytes - done, 1 << 30), self.offset + done)
                if n <= 0:
                    break
                done += n
        except OSError:  # no kernel copy between these files (old kernel, other file systems): through a buffer
            pass
        if done < self.nbytes:
            rest = RawSpan(self.fd, self.offset + done, self.nbytes - done, torch.uint8, (), self.where)
            for c in rest.chunks(buf):
                write_all(out, memoryview(c.numpy()))


WRITE_CHUNK = 1 << 20  # bytes per write call: measured here, 1 MiB calls write 5-10x faster than 46 MB ones


def write_all(f, data: memoryview) -> None:
    """``f.write`` (an unbuffered file) until all of ``data`` is written, ``WRITE_CHUNK`` bytes per call."""
    done = 0
    while done < len(data):
        done += f.write(data[done:done + WRITE_CHUNK])


class TensorSource:
    """Read-only access to a checkpoint's tensors without loading them all at once."""

    path: Path
    metadata: dict[str, str]

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def sha256(self) -> str:
        return file_sha256(self.path)


class SafetensorsSource(TensorSource):
    def __init__(self, path: Path):
        self.path = path
        try:
            self._f = safe_open(str(path), framework="pt", device="cpu")
            self._keys = list(self._f.keys())
            self.metadata = dict(self._f.metadata() or {})
            self._slices = {k: self._f.get_slice(k) for k in self._keys}
            self._dtypes = {}
            for k, s in self._slices.items():
                st = s.get_dtype()
                if st not in ST_TO_DTYPE:
                    raise CheckpointError(f"tensor '{k}' has dtype {st}, which n2n does not support",
                                          where=str(path))
                self._dtypes[k] = ST_TO_DTYPE[st]
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own SafetensorError and OSError
            raise CheckpointError(
                f"not a readable safetensors file ({e})", where=str(path),
                hint="The file is truncated or corrupt; re-export it (safetensors.torch.save_file).",
            ) from None

    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, key):
        return tuple(self._slices[key].get_shape())

    def dtype(self, key):
        return self._dtypes[key]

    def get(self, key):
        try:
            return self._f.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"cannot read tensor '{key}' ({e})", where=str(self.path)) from None


class StateDictSource(TensorSource):
    """A pickled state dict, loaded with ``torch.load(weights_only=True)``: never runs code."""

    def __init__(self, path: Path):
        self.path = path
        self.metadata = {}
        try:
            with warnings.catch_warnings():  # torch's note on pickle protocols says nothing to a user
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                try:
                    obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as e:
                    if "mmap" not in str(e):
                        raise
                    obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()
            detail = next((ln.strip() for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[0] if first else "")
            raise CheckpointError(
                "refusing to load: this pickle needs arbitrary code to unpickle, and unpickling "
                f"untrusted code can run anything ({detail})", where=str(path),
                hint="Save a plain state dict instead (torch.save(model.state_dict(), path)) or convert it "
                     "to .safetensors with code you trust.",
            ) from None
        except Exception as e:
            raise CheckpointError(f"not a readable PyTorch checkpoint ({type(e).__name__}: {e})",
                                  where=str(path)) from None
        self._tensors = _unwrap_state_dict(obj, path)

    def keys(self):
        return list(self._tensors)

    def shape(self, key):
        return tuple(self._tensors[key].shape)

    def dtype(self, key):
        return self._tensors[key].dtype

    def get(self, key):
        return self._tensors[key]


def _unwrap_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    def is_sd(o):
        return isinstance(o, dict) and o and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in o.items())

    if is_sd(obj):
        return dict(obj)
    if isinstance(obj, dict):
        for k in ("state_dict", "model", "model_state_dict"):
            if is_sd(obj.get(k)):
                return dict(obj[k])
    raise CheckpointError(
        f"expected a state dict (a mapping of names to tensors) but found {type(obj).__name__}",
        where=str(path), hint="Save model.state_dict(), or a dict with a 'state_dict' entry.")


def open_checkpoint(path: str | os.PathLike) -> TensorSource:
    path = Path(path)
    if path.is_dir():
        raise CheckpointError("is a directory, not a checkpoint file", where=str(path))
    fsutil.require_regular_file(path, "checkpoint", CheckpointError)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return SafetensorsSource(path)
    if suffix in PICKLE_SUFFIXES:
        return StateDictSource(path)
    raise CheckpointError(
        f"unknown checkpoint type '{suffix}'", where=str(path),
        hint="Use .safetensors, or a PyTorch state dict saved as .pt, .pth, .bin or .ckpt.")


# --------------------------------------------------------------------------- writing


def check_output_path(out: str | os.PathLike, sources: Iterable[str | os.PathLike], force: bool) -> Path:
    out = Path(out)
    outputs.check_out_name(out)
    if out.suffix.lower() != ".safetensors":
        raise OutputError("the output must be a .safetensors file", where=str(out),
                          hint="Name it e.g. student.safetensors.")
    for src in sources:
        src = Path(src)
        if os.path.realpath(out) == os.path.realpath(src) or (out.exists() and src.exists() and os.path.samefile(out, src)):
            raise OutputError("the output is the input checkpoint; n2n never writes over its input",
                              where=str(out), hint="Choose another output path.")
    if out.is_dir():
        raise OutputError("is a directory", where=str(out))
    if os.path.lexists(out):
        if not force:
            raise OutputError("already exists", where=str(out), hint="Pass --force to replace it.")
        outputs.check_replaceable_file(out)
    fsutil.check_parent_dir(out)
    return out


@contextlib.contextmanager
def atomic_output(out: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a locked temporary path beside ``out``; move it into place only if the block
    succeeds. Whatever happens inside (an error, Ctrl-C, SIGTERM), no partial file is left.

    Without ``force`` an ``out`` that exists by then (another job wrote it meanwhile) is never
    replaced: OutputError. With ``force`` it is replaced only if it is a safetensors checkpoint.
    """
    with fsutil.temp_beside(out, "tmp") as tmp_path:
        yield tmp_path
        os.chmod(tmp_path, 0o644 & ~current_umask())
        place_file(tmp_path, out, force=force)


def place_file(tmp: Path, out: Path, *, force: bool,
               replaceable: Callable[[Path], None] = outputs.check_replaceable_file) -> None:
    """Rename ``tmp`` to ``out``: without ``force`` never over an existing ``out``; with it, only
    over a file that ``replaceable`` accepts (it raises OutputError otherwise)."""
    try:
        if force and os.path.lexists(out):
            replaceable(out)
            os.replace(tmp, out)
        else:
            fsutil.rename_noreplace(tmp, out)
    except FileExistsError:
        raise OutputError("appeared while n2n was running (another job or a user wrote it); it was not replaced",
                          where=str(out), hint="Pass --force to replace it, or choose another output path.") from None
    except OSError as e:
        raise OutputError(f"cannot move the new file into place ({e.strerror})", where=str(out)) from None


WRITEBACK_BYTES = 64 << 20  # start writing to disk every 64 MiB produced (the final fsync waits less)


def write_safetensors(path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                      produce: Callable[[str], torch.Tensor], metadata: dict[str, str],
                      on_tensor: Callable[[str], None] | None = None, name: str | None = None) -> None:
    """Write a safetensors file streaming: the header first (all shapes are known from the
    plan), then each tensor as ``produce(key)`` returns it, so only one tensor is in memory.

    Deterministic: the same entries, tensors and metadata give the same bytes. ``name`` is
    the path to name in errors (the final output, when ``path`` is a temporary file).
    """
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for key, dtype, shape in entries:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": DTYPE_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors does
    buf = None
    flushed = 0  # bytes whose write-back to disk was started (fsutil.start_writeback)
    try:
        with open(path, "wb", buffering=0) as f:
            write_all(f, memoryview(struct.pack("<Q", len(raw)) + raw))
            for key, dtype, shape in entries:
                t = produce(key)
                if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                    raise AssertionError(f"{key}: planned {dtype} {tuple(shape)}, produced {t.dtype} {tuple(t.shape)}")
                if isinstance(t, RawSpan):  # bytes that pass through unchanged
                    buf = torch.empty(CHUNK, dtype=torch.uint8) if buf is None else buf
                    t.copy_to(f, buf)
                else:
                    write_all(f, memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
                del t
                written = f.tell()
                if written - flushed >= WRITEBACK_BYTES:
                    fsutil.start_writeback(f.fileno(), flushed, written - flushed)
                    flushed = written
                if on_tensor:
                    on_tensor(key)
            os.fsync(f.fileno())
    except OSError as e:
        raise OutputError(f"cannot write ({e.strerror})", where=name or str(path)) from None
