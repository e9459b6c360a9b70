"""Read a safetensors header without torch: for header-only work (``n2n inspect`` of a plain
checkpoint) that should answer in a fraction of a second, not after torch's import."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from .errors import CheckpointError
from .fsutil import require_regular_file

#: safetensors dtype codes -> torch's names (``str(torch.float32).removeprefix("torch.")``)
ST_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
            "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
MAX_HEADER = 100 * 2**20  # safetensors' own limit


def read_header(path: str | Path) -> tuple[dict[str, dict], dict[str, str]]:
    """``({key: {"dtype": "float32", "shape": [...]}} sorted by key, metadata)`` of a safetensors
    file; CheckpointError for anything that is not one (as ``checkpoints.open_checkpoint`` says)."""
    path = require_regular_file(path, "checkpoint", CheckpointError)
    bad = CheckpointError("not a readable safetensors file (the header is not valid)", where=str(path),
                          hint="The file is truncated or corrupt; re-export it (safetensors.torch.save_file).")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or n > path.stat().st_size - 8:
                raise bad
            header = json.loads(f.read(n))
    except (OSError, ValueError, RecursionError):
        raise bad from None
    if not isinstance(header, dict):
        raise bad
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for key in sorted(header):
        info = header[key]
        if not isinstance(info, dict) or not isinstance(info.get("shape"), list):
            raise bad
        if info.get("dtype") not in ST_NAMES:
            raise CheckpointError(f"tensor '{key}' has dtype {info.get('dtype')}, which n2n does not support",
                                  where=str(path))
        tensors[key] = {"dtype": ST_NAMES[info["dtype"]], "shape": list(info["shape"])}
    return tensors, {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}


def inspect_plain(path: str | Path) -> dict | None:
    """``n2n inspect``'s report for a safetensors file that carries no n2n metadata (so there is no
    description to show): its tensors, from the header alone. None when n2n metadata is present
    (the full inspection reads it)."""
    tensors, metadata = read_header(path)
    if any(k.startswith("n2n_") for k in metadata):
        return None
    return {"checkpoint": str(path), "tensors": [{"key": k, **t} for k, t in tensors.items()],
            "n2n_version": None, "model": None}
