"""Hugging Face model directories: read one as a TensorSource, write one atomically.

Knows files, not growth. A model directory holds ``config.json`` and its weights as
``model.safetensors``, as shards listed in ``model.safetensors.index.json``, or (read only)
as ``pytorch_model.bin`` / shards listed in ``pytorch_model.bin.index.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import struct
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import torch
from safetensors import safe_open

from . import fsutil, outputs
from .checkpoints import ST_TO_DTYPE, RawSpan, StateDictSource, TensorSource, file_sha256, write_safetensors
from .fsutil import current_umask
from .errors import CheckpointError, OutputError, UserError

CONFIG = "config.json"
SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_WEIGHTS, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
WEIGHT_CANDIDATES = (SAFE_WEIGHTS, SAFE_INDEX, BIN_WEIGHTS, BIN_INDEX)  # transformers' order
# Files never copied from the source directory: they hold the *old* weights in some format.
WEIGHT_SUFFIXES = outputs.WEIGHT_SUFFIXES

Entry = tuple[str, torch.dtype, tuple[int, ...]]


class HFDirSource(TensorSource):
    """A Hugging Face model directory, read tensor by tensor.

    Opening validates everything up front: ``config.json``, the index (if any), that every
    shard exists inside the directory and holds the keys the index puts there. Tensor data is
    read only by :meth:`get`; safetensors shards are opened lazily on first use and kept open
    until :meth:`close`. Safetensors data is read with explicit ``pread`` calls into a fresh
    buffer, never through a memory mapping: pages of a mapping that the process has touched count
    in its resident memory until it is unmapped (a 7B model would be resident whole by the time it
    has been copied), whereas a read buffer is freed with its tensor; the page cache serves both
    alike. Pickled shards are loaded with ``torch.load(weights_only=True)``
    (memory-mapped) through :class:`StateDictSource`. The index is authoritative: tensors in a
    shard that the index does not list are ignored.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError("not a directory", where=str(self.path),
                                  hint="Pass a Hugging Face model directory (config.json plus weights).")
        self.config: dict[str, Any] = _read_config(self.path)
        self.metadata: dict[str, str] = {}
        self.index_file: str | None = None
        self._where: dict[str, str] = {}  # key -> shard file name (relative to path)
        self._info: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._open: dict[str, Any] = {}  # shard name -> file descriptor (int) or StateDictSource
        self._span: dict[str, tuple[int, int]] = {}  # key -> (file offset, bytes) of its data
        self._stored: dict[str, str] = {}  # key -> the name the file stores it under, where renamed
        found = next((n for n in WEIGHT_CANDIDATES if os.path.lexists(self.path / n)), None)
        if found is not None:
            fsutil.require_regular_file(self.path / found, "weights file", CheckpointError)
        if found is None:
            raise CheckpointError("no weights file", where=str(self.path),
                                  problems=[f"looked for {n}" for n in WEIGHT_CANDIDATES],
                                  hint="Save the model with save_pretrained(), or copy its weights here.")
        pickled = found.startswith("pytorch_model")
        wanted: dict[str, list[str] | None] = {found: None}
        if found.endswith(".index.json"):
            self.index_file, self._where, wanted = found, _read_index(self.path, found), {}
            for key, shard in self._where.items():
                wanted.setdefault(shard, []).append(key)  # type: ignore[union-attr]
        problems = [p for i, shard in enumerate(sorted(wanted))
                    for p in self._scan(shard, wanted[shard], pickled, first=i == 0)]
        if problems:
            raise CheckpointError("the index lists tensors that are not in their shard",
                                  where=str(self.path / found), problems=problems,
                                  hint="The index does not match its shards; re-save the model.")

    def _scan(self, shard: str, keys: list[str] | None, pickled: bool, first: bool) -> list[str]:
        """Record shape and dtype of ``keys`` (None: all) in ``shard``; return the missing ones."""
        file = self.path / shard
        if pickled:
            sd = self._open[shard] = StateDictSource(file)
            info = {k: (sd.shape(k), sd.dtype(k)) for k in sd.keys()}
        else:
            try:
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    if first:
                        self.metadata = dict(f.metadata() or {})
                    slices = {k: f.get_slice(k) for k in f.keys()}
                    raw = {k: (tuple(sl.get_shape()), sl.get_dtype()) for k, sl in slices.items()}
            except Exception as e:  # safetensors raises SafetensorError and OSError
                raise CheckpointError(f"not a readable safetensors file ({e})", where=str(file),
                                      hint="The file is truncated or corrupt; re-download or re-save it.") from None
            bad = [f"'{k}' has dtype {st}" for k, (_, st) in raw.items()
                   if st not in ST_TO_DTYPE and (keys is None or k in keys)]
            if bad:
                raise CheckpointError("tensors of a dtype n2n does not support", where=str(file), problems=bad)
            info = {k: (shape, ST_TO_DTYPE.get(st)) for k, (shape, st) in raw.items()}
            spans = _data_spans(file)  # safe_open has validated the header and the offsets
        for k in info if keys is None else keys:
            if k in info:
                self._where[k], self._info[k] = shard, info[k]  # type: ignore[assignment]
                if not pickled:
                    self._span[k] = spans[k]
        return [f"'{k}' is not in {shard}" for k in keys or [] if k not in info]

    def keys(self) -> list[str]:
        return list(self._where)

    def rename(self, names: dict[str, str]) -> None:
        """Serve the tensors stored under old names (values) under new ones (keys) from now on."""
        for new, old in names.items():
            if old not in self._where:
                continue  # renamed already
            self._where[new], self._info[new] = self._where.pop(old), self._info.pop(old)
            self._stored[new] = self._stored.pop(old, old)
            if old in self._span:
                self._span[new] = self._span.pop(old)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._info[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return self._info[key][1]

    def get(self, key: str) -> torch.Tensor:
        shard = self._where[key]
        handle = self._open.get(shard)
        if isinstance(handle, StateDictSource):
            return handle.get(self._stored.get(key, key))
        try:
            return self.raw(key).tensor()  # in place: the file's pages, copied only where written to
        except OSError as e:
            raise CheckpointError(f"cannot read tensor '{key}' ({e.strerror or e})",
                                  where=str(self.path / shard)) from None
        except CheckpointError as e:
            raise CheckpointError(f"cannot read tensor '{key}' ({e.message})", where=e.where) from None

    def raw(self, key: str) -> RawSpan | None:
        """Where ``key``'s bytes lie in its safetensors file (None for a pickled shard)."""
        shard = self._where[key]
        if key not in self._span:
            return None
        offset, n = self._span[key]
        shape, dtype = self._info[key]
        return RawSpan(self._fd(shard), offset, n, dtype, shape, str(self.path / shard))

    def _fd(self, shard: str) -> int:
        fd = self._open.get(shard)
        if fd is None:
            try:
                fd = self._open[shard] = os.open(self.path / shard, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError as e:
                raise CheckpointError(f"cannot open ({e.strerror})", where=str(self.path / shard)) from None
        return fd

    def close(self) -> None:
        for shard, handle in list(self._open.items()):
            if isinstance(handle, int):
                os.close(handle)
                del self._open[shard]

    def weight_files(self) -> list[str]:
        """The files holding tensor data (not the index), sorted, relative to :attr:`path`."""
        return sorted(set(self._where.values()))

    def sha256(self) -> str:
        """A stable digest of the model: the SHA-256 of a ``sha256sum``-style manifest, one line
        ``"<sha256 of file>  <name>\\n"`` per file, over ``config.json``, the index (if any) and
        every weight file, sorted by name. Equals ``sha256sum $(ls config.json <weights>) | sha256sum``
        in the C locale. Other files (tokenizer, README) do not count.
        """
        names = sorted([CONFIG, *([self.index_file] if self.index_file else []), *self.weight_files()])
        manifest = "".join(f"{file_sha256(self.path / n)}  {n}\n" for n in names)
        return hashlib.sha256(manifest.encode("utf-8")).hexdigest()


def _data_spans(file: Path) -> dict[str, tuple[int, int]]:
    """``key -> (absolute file offset, byte count)`` of every tensor in a safetensors file, from
    its header (8-byte little-endian length, JSON, then the data section)."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    start = 8 + n
    return {k: (start + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0])
            for k, v in header.items() if k != "__metadata__"}


def open_hf_dir(path: str | os.PathLike) -> HFDirSource:
    """Open a Hugging Face model directory (see :class:`HFDirSource`)."""
    return HFDirSource(path)


def _read_json(file: Path, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(file.read_text(encoding="utf-8"))
    except RecursionError:
        raise CheckpointError(f"{what} is not valid JSON (nested too deeply)", where=str(file),
                              hint="The file is corrupt; re-download or re-save it.") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{what} is not valid JSON ({e})", where=str(file),
                              hint="The file is truncated or corrupt; re-download or re-save it.") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {what} ({e.strerror})", where=str(file)) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} must be a JSON object, found {type(obj).__name__}", where=str(file),
                              hint="The file is truncated or corrupt; re-download or re-save it.")
    return obj


def _read_config(root: Path) -> dict[str, Any]:
    if not os.path.lexists(root / CONFIG):
        raise CheckpointError("no config.json: not a Hugging Face model directory", where=str(root),
                              hint="Save the model with save_pretrained(), which writes config.json.")
    fsutil.require_regular_file(root / CONFIG, "config.json", CheckpointError)
    return _read_json(root / CONFIG, "config.json")


def _read_index(root: Path, name: str) -> dict[str, str]:
    """The index's ``weight_map``, after checking every shard name stays inside ``root`` and exists."""
    file = root / name
    wm = _read_json(file, "the index").get("weight_map")
    if not isinstance(wm, dict) or not wm or not all(isinstance(k, str) and isinstance(v, str) and v
                                                     for k, v in wm.items()):
        raise CheckpointError("the index has no 'weight_map' (a non-empty mapping of tensor names to shard files)",
                              where=str(file), hint="Re-save the model with save_pretrained().")
    shards = sorted(set(wm.values()))
    # the *name* must stay inside the directory; a shard that is itself a symlink is fine (the
    # Hugging Face cache links every snapshot file to ../../blobs/)
    escaping = [s for s in shards if PurePosixPath(s).is_absolute() or ".." in PurePosixPath(s).parts]
    if escaping:
        raise CheckpointError("the index names shard files outside the model directory; refusing to read them",
                              where=str(file), problems=[f"'{s}' -> {os.path.normpath(root / s)}" for s in escaping],
                              hint="Shard names must be plain file names inside the directory.")
    missing = [s for s in shards if not os.path.lexists(root / s)]
    if missing:
        raise CheckpointError(f"{len(missing)} shard file(s) listed in the index are missing", where=str(file),
                              problems=[f"missing {s}" for s in missing],
                              hint="Download or copy every shard into the directory.")
    for s in shards:
        fsutil.require_regular_file(root / s, "shard", CheckpointError)
    return dict(wm)


# --------------------------------------------------------------------------- writing


def dtype_disagreement(config: dict, header: dict) -> str | None:
    """A warning when config.json's dtype (``dtype``, as transformers 5 writes it, or
    ``torch_dtype``) is not the dtype most of the weights are stored in (``header``: name ->
    (dtype, shape)): transformers' ``dtype="auto"`` loads the weights in the declared one. None
    when they agree or the config declares none (or "auto")."""
    field = "dtype" if isinstance(config.get("dtype"), str) else "torch_dtype"
    declared = config.get(field)
    declared_t = getattr(torch, declared, None) if isinstance(declared, str) else None
    if not isinstance(declared_t, torch.dtype) or not declared_t.is_floating_point:
        return None
    sizes: dict[torch.dtype, int] = {}
    for dtype, shape in header.values():
        if dtype.is_floating_point:
            sizes[dtype] = sizes.get(dtype, 0) + math.prod(shape)
    stored = max(sizes, key=sizes.get) if sizes else declared_t
    if stored == declared_t:
        return None
    name = str(stored).removeprefix("torch.")
    overflow = declared_t == torch.float16 and stored in (torch.bfloat16, torch.float32)
    return (f"config.json declares {field} {declared} but most weights are stored as {name}: transformers' "
            f"dtype=\"auto\" loads them as {declared}"
            + (" (values beyond float16's range, about 65504, become inf)" if overflow else "")
            + f"; n2n copies {field} to the output as it is")


def parse_size(text: str | int) -> int:
    """A size in bytes, as transformers' ``convert_file_size_to_int`` reads it: a plain integer,
    or an integer with a unit: KiB/MiB/GiB/TiB (powers of 2) or KB/MB/GB/TB (powers of 10). As in
    transformers, a decimal unit ending in a lower-case ``b`` counts bits ("8Mb" = 10**6 bytes).
    """
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return text
    m = re.fullmatch(r"\s*(\d+)\s*(?:([KMGT])(i?)(B))?\s*", str(text), re.IGNORECASE)
    if not m or int(m.group(1)) <= 0:
        raise UserError(f"--max-shard-size: '{text}' is not a size",
                        hint="Use a positive integer of bytes or one with a unit, e.g. 5GB, 500MB, 2GiB.")
    n, unit, binary, b = int(m.group(1)), m.group(2), m.group(3), m.group(4)
    if not unit:
        return n
    power = "KMGT".index(unit.upper()) + 1
    if binary:
        return n * 2 ** (10 * power)
    return n * 10 ** (3 * power) // (8 if b == "b" else 1)


def nbytes(entry: Entry) -> int:
    """Bytes that one ``(key, dtype, shape)`` entry takes in a safetensors file."""
    return math.prod(entry[2]) * torch.empty((), dtype=entry[1]).element_size()


def planned_bytes(entries: list[Entry], src_dir: Path | None = None) -> int:
    """About how many bytes writing ``entries`` takes: the tensor data, a generous allowance for
    headers and metadata, and (for a directory) the files copied from ``src_dir``."""
    total = sum(map(nbytes, entries)) + 256 * len(entries) + 64 * 1024
    if src_dir is not None:
        total += sum(os.path.getsize(Path(src_dir) / f) for f in copied_files(Path(src_dir)))
        total += os.path.getsize(Path(src_dir) / CONFIG) * 2
    return total


def plan_shards(entries: list[Entry], max_shard_size: int) -> list[list[Entry]]:
    """Split ``entries`` in order: a new shard starts when the next tensor would exceed the
    limit; a tensor bigger than the limit ends up alone in its shard. Always at least one shard."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        n = nbytes(e)
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    return shards


def copied_files(src_dir: Path) -> list[str]:
    """The files :func:`write_hf_dir` copies from ``src_dir``, sorted: every regular file (or
    symlink to one, as in the HF cache) directly in ``src_dir``, except ``config.json`` (rewritten),
    hidden files, and weights (names ending in one of ``WEIGHT_SUFFIXES``). Subdirectories are
    never copied (they may hold old weights in other formats, e.g. ``original/``, ``onnx/``)."""
    return sorted(p.name for p in src_dir.iterdir()
                  if p.is_file() and p.name != CONFIG and not p.name.startswith(".")
                  and not p.name.lower().endswith(WEIGHT_SUFFIXES))


def write_hf_dir(out_dir: str | os.PathLike, entries: list[Entry], produce: Callable[[str], torch.Tensor], *,
                 config: dict[str, Any], metadata: dict[str, str], src_dir: Path | None, max_shard_size: int,
                 extra_files: dict[str, str] | None = None,
                 on_tensor: Callable[[str], None] | None = None, replace: bool = True,
                 name: str | os.PathLike | None = None) -> list[str]:
    """Write a Hugging Face model directory atomically and return its weight file names.

    Everything is written into a temporary directory beside ``out_dir`` and renamed into place
    only on success; on any exception (Ctrl-C included) it is removed. With ``replace`` an existing
    ``out_dir`` is replaced at that final rename if it is a model directory (call
    :func:`check_output_dir` first); without, an ``out_dir`` that exists is never touched
    (OutputError). Errors name ``name`` (default ``out_dir``): the final output when ``out_dir``
    is a staging path. Contents: ``config.json``
    (sorted keys, as transformers writes it), the :func:`copied_files` of ``src_dir``,
    ``extra_files`` (name -> text; they win over copied files), and the tensors, streamed with
    ``produce(key)``: one ``model.safetensors`` if they fit in ``max_shard_size`` bytes, else
    :func:`plan_shards` shards ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json``. Every shard carries ``metadata`` (``"format": "pt"`` is
    added if absent). Deterministic: the same inputs give byte-identical files.
    """
    out = Path(out_dir)
    shown = Path(name) if name is not None else out
    if max_shard_size <= 0:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size}")
    keys = [k for k, _, _ in entries]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate tensor names in entries")
    meta = {**metadata, "format": metadata.get("format", "pt")}
    if meta["format"] != "pt":
        raise ValueError(f"shard metadata must have format 'pt', got {meta['format']!r}")
    extra = dict(sorted((extra_files or {}).items()))
    for name in extra:
        if name in ("", CONFIG) or "/" in name or name.startswith(".") or name.lower().endswith(WEIGHT_SUFFIXES):
            raise ValueError(f"extra file name {name!r} is not a plain non-weight file name")
    copies = copied_files(Path(src_dir)) if src_dir is not None else []
    shards = plan_shards(entries, max_shard_size)
    n = len(shards)
    files = [SAFE_WEIGHTS] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    with fsutil.temp_beside(out, "tmp", directory=True, where=str(shown)) as tmp:
        write_text(tmp / CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n", shown)
        for file in copies:
            try:
                shutil.copyfile(Path(src_dir) / file, tmp / file)  # type: ignore[arg-type]
            except OSError as e:
                raise OutputError(f"cannot copy {file} from {src_dir} ({e.strerror})", where=str(shown)) from None
        for file, text in extra.items():
            write_text(tmp / file, text, shown)
        for file, shard in zip(files, shards):
            write_safetensors(tmp / file, shard, produce, meta, on_tensor=on_tensor, name=str(shown / file))
        if n > 1:
            index = {"metadata": {"total_size": sum(map(nbytes, entries))},
                     "weight_map": {e[0]: file for file, shard in zip(files, shards) for e in shard}}
            write_text(tmp / SAFE_INDEX, json.dumps(index, indent=2, sort_keys=True) + "\n", shown)
        os.chmod(tmp, 0o777 & ~current_umask())
        move_into_place(tmp, out, replace=replace, name=shown)
    return files


PENDING_SHA256 = "?" * 64  # stands for a SHA-256 hex digest not known yet (same length)


def patch_headers(directory: Path, placeholder: str, value: str, out: Path) -> None:
    """Replace ``placeholder`` by ``value`` (the same length, so no offset moves) in the header of
    every ``*.safetensors`` file of ``directory``, in place, synced. Each header must hold the
    placeholder exactly once (a value found only once the data is written: the teacher's digest)."""
    old, new = placeholder.encode(), value.encode()
    if len(old) != len(new):
        raise ValueError("the value must have the placeholder's length")
    for file in sorted(directory.glob("*.safetensors")):
        try:
            fd = os.open(file, os.O_RDWR)
            try:
                (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
                raw = os.pread(fd, n, 8)
                if raw.count(old) != 1:
                    raise ValueError(f"{file.name}: the placeholder occurs {raw.count(old)} times in the header")
                os.pwrite(fd, new, 8 + raw.index(old))
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise OutputError(f"cannot write {file.name} ({e.strerror})", where=str(out)) from None


def write_text(path: Path, text: str, out: Path) -> None:
    """Write ``text`` to ``path`` (inside a directory being built for ``out``), synced."""
    try:
        with open(path, "wb") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OutputError(f"cannot write {path.name} ({e.strerror})", where=str(out)) from None


def move_into_place(tmp: Path, out: Path, *, replace: bool = True, name: str | os.PathLike | None = None) -> None:
    """Rename the directory ``tmp`` to ``out``. An ``out`` that exists is never replaced without
    ``replace`` (OutputError: it appeared while n2n ran); with ``replace`` it must be a model
    directory (:func:`outputs.check_replaceable_dir`) and is swapped in one atomic exchange where
    the system has one (else moved aside first), then deleted. Errors name ``name`` (default ``out``)."""
    shown = str(name if name is not None else out)
    try:
        if not (replace and os.path.lexists(out)):
            try:
                fsutil.rename_noreplace(tmp, out)
            except FileExistsError:
                raise OutputError("appeared while n2n was running (another job or a user wrote it); it was not "
                                  "replaced", where=shown,
                                  hint="Pass --force to replace it, or choose another output path.") from None
            return
        if not os.path.isdir(out):
            raise OutputError("exists and is not a directory", where=shown, hint="Choose another output path.")
        outputs.check_replaceable_dir(out)
        if fsutil.exchange(tmp, out):  # now tmp holds the old output
            fsutil.remove_path(tmp)
            return
        with fsutil.temp_beside(out, "old", directory=True, where=shown) as holder:
            os.rename(out, holder / "old")
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(holder / "old", out)
                raise
    except OSError as e:
        raise OutputError(f"cannot move the new directory into place ({e.strerror})", where=shown) from None


def check_output_dir(out_dir: str | os.PathLike, src_dir: str | os.PathLike | None, force: bool) -> Path:
    """Check that ``out_dir`` may be written by :func:`write_hf_dir`; return it as a Path.

    Refuses an ``out_dir`` that is, is inside, or contains ``src_dir``; that exists without
    ``force`` (or is not a directory); whose parent is missing or not writable.
    """
    out = Path(out_dir)
    outputs.check_out_name(out)
    real = Path(os.path.realpath(out))
    if src_dir is not None:
        src = Path(os.path.realpath(src_dir))
        for bad, what in ((real == src, "is the input directory"),
                          (src in real.parents, "is inside the input directory"),
                          (real in src.parents, "contains the input directory")):
            if bad:
                raise OutputError(f"the output {what} ({src_dir}); n2n never writes over its input",
                                  where=str(out), hint="Choose an output directory outside the input.")
    if os.path.lexists(out):
        if not out.is_dir():
            raise OutputError("exists and is not a directory", where=str(out), hint="Choose another output path.")
        if not force:
            raise OutputError("already exists", where=str(out), hint="Pass --force to replace it.")
        outputs.check_replaceable_dir(out)
    fsutil.check_parent_dir(out)
    return out
