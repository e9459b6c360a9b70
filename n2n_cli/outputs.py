"""What n2n may write over, and where a report may go. No heavy imports.

``--force`` replaces only what n2n itself would write: a safetensors checkpoint (file output),
or a model directory (directory output): one whose metadata says n2n wrote it, or one that
holds nothing but model files. Anything else is refused with a list of what is there.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path
from typing import Iterable

from . import fsutil
from .errors import OutputError, UserError

# Names ending in one of these hold weights in some format.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json", ".pt", ".pth", ".ckpt", ".h5", ".msgpack",
                   ".gguf", ".onnx", ".ot", ".tflite")
N2N_FILES = ("n2n_spec.yaml", "n2n_verification.json")
# What save_pretrained / a tokenizer / the Hub / the Trainer put in a model directory, besides weights.
MODEL_FILES = frozenset({
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model", "preprocessor_config.json", "processor_config.json", "chat_template.jinja",
    "chat_template.json", "README.md", ".gitattributes", "trainer_state.json", "adapter_config.json",
    *N2N_FILES,
})
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def safetensors_header(path: Path) -> dict | None:
    """The JSON header of a safetensors file, or None if ``path`` is not a regular file whose
    header parses and whose data section has exactly the size the header gives."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size < 8:
            return None
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(_MAX_HEADER, st.st_size - 8):
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return None
    if not isinstance(header, dict):
        return None
    try:
        end = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"], default=0)
    except (TypeError, KeyError, IndexError):
        return None
    return header if end == st.st_size - 8 - n else None


def check_replaceable_file(out: Path) -> None:
    """``--force`` may replace ``out`` only if it is a safetensors checkpoint (OutputError otherwise)."""
    if safetensors_header(out) is None:
        raise OutputError("exists and is not a safetensors checkpoint; --force replaces only a checkpoint",
                          where=str(out), hint="Move it away or choose another output path.")


def written_by_n2n(directory: Path) -> bool:
    """Does the directory's metadata say n2n wrote it: an n2n file beside weights whose
    safetensors metadata carries ``n2n_version``?"""
    if not any((directory / n).is_file() for n in N2N_FILES):
        return False
    weights = directory / "model.safetensors"
    if not weights.is_file():
        try:
            wm = json.loads((directory / "model.safetensors.index.json").read_text("utf-8"))["weight_map"]
            weights = directory / sorted(wm.values())[0]
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
            return False
        if weights.parent != directory:
            return False
    header = safetensors_header(weights)
    meta = header.get("__metadata__") if header else None
    return isinstance(meta, dict) and "n2n_version" in meta


def foreign_entries(directory: Path) -> list[str]:
    """What in ``directory`` is not a model directory's: subdirectories, special files, and
    files that are neither model files nor (in a directory n2n wrote) files n2n copied."""
    by_n2n = written_by_n2n(directory)
    foreign = []
    for name in sorted(os.listdir(directory)):
        path = directory / name
        if path.is_dir():
            foreign.append(name + "/")
        elif not path.is_file():
            foreign.append(name)
        elif not (name in MODEL_FILES or name.lower().endswith(WEIGHT_SUFFIXES)
                  or (by_n2n and not name.startswith("."))):
            foreign.append(name)
    return foreign


def check_replaceable_dir(out: Path) -> None:
    """``--force`` may replace the directory ``out`` only if it is a model directory (see the
    module docstring); OutputError naming what else it holds."""
    try:
        foreign = foreign_entries(out)
    except OSError as e:
        raise OutputError(f"cannot list it ({e.strerror}); --force replaces only a model directory",
                          where=str(out)) from None
    if foreign:
        shown = ", ".join(foreign[:10]) + (f" and {len(foreign) - 10} more" if len(foreign) > 10 else "")
        raise OutputError(f"--force replaces only a model directory, and this one also holds {shown}",
                          where=str(out), hint="Move those away, or choose another output directory.")


def check_out_name(out: Path) -> None:
    """OUT must name something to create: not '.', '..' or '/'."""
    if Path(out).name in ("", ".", ".."):
        raise OutputError("OUT must name a new file or directory, not '.', '..' or '/'", where=str(out),
                          hint="Give a name, e.g. ./grown.")


def check_report_path(report: Path, protected: Iterable[Path], flag: str = "--report", what: str = "the report") -> None:
    """``--report`` (or another side output, ``flag``) must not be, or be inside, any path the
    command reads or writes."""
    real = os.path.realpath(report)
    for p in protected:
        other = os.path.realpath(p)
        same = real == other
        if not same and os.path.exists(report) and os.path.exists(p):
            try:
                same = os.path.samefile(report, p)
            except OSError:
                pass
        if same or real.startswith(other.rstrip("/") + "/"):
            raise UserError(f"{what} would be written {'over' if same else 'inside'} {p}, which this command "
                            "reads or writes", where=f"{flag} {report}", hint=f"Write {what} somewhere else.")


def before_writing(out: Path, needed: int) -> None:
    """Just before writing: remove stale n2n temporaries beside ``out`` (logged), then check
    that ``needed`` bytes fit."""
    fsutil.remove_stale_temps(Path(os.path.dirname(os.path.abspath(out))))
    fsutil.check_free_space(out, needed)
