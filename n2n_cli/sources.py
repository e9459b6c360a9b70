"""Open a teacher checkpoint and check it against its model before any work: the model
description it is read with (given, or carried in its metadata), every missing, unexpected or
mis-shaped tensor at once (with the DDP ``module.`` hint), non-finite weights, and a Hugging Face
directory with its architecture. Used by grow, verify, inspect and validate alike."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable

import torch

from . import hf_io
from .checkpoints import TensorSource
from .errors import CheckpointError, ModelError
from .hf import arch_from_config, check_hf_checkpoint
from .model import ModelDescription
from .spec import parse_model_description
from .transforms import all_finite

META_MODEL = "n2n_model"
Progress = Callable[[str, int, int], None]  # (phase, done, total)


def model_from_metadata(source: TensorSource) -> ModelDescription | None:
    raw = source.metadata.get(META_MODEL)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise CheckpointError(f"its '{META_MODEL}' metadata must be a JSON object (a model description), "
                                  f"not {type(data).__name__}", where=str(source.path))
        return parse_model_description(data, where=f"{source.path} (metadata '{META_MODEL}')")
    except json.JSONDecodeError as e:
        raise CheckpointError(f"its '{META_MODEL}' metadata is not valid JSON ({e})", where=str(source.path)) from None
    except RecursionError:
        raise CheckpointError(f"its '{META_MODEL}' metadata is nested too deeply to be a model description",
                              where=str(source.path)) from None


def resolve_model(source: TensorSource, *candidates: ModelDescription | None, flag: str = "--model",
                  spec_too: bool = True) -> ModelDescription:
    """The first given description, else the one the checkpoint carries. ``flag`` is the option
    that would give it (``--model`` for a teacher, ``--student-model`` for ``verify``'s student)."""
    for desc in candidates:
        if desc is not None:
            return desc
    desc = model_from_metadata(source)
    if desc is None:
        raise ModelError("no model description for this checkpoint", where=str(source.path),
                         hint=f"Pass {flag} FILE.yaml{' (or set model: in the spec)' if spec_too else ''}; "
                              "checkpoints written by n2n carry their own.")
    return desc


def check_checkpoint(source: TensorSource, desc: ModelDescription) -> dict[str, tuple[torch.dtype, tuple]]:
    """Compare the checkpoint with the description; report every missing, unexpected or
    mis-shaped tensor at once. Returns the header {key: (dtype, shape)}."""
    expected = desc.layout().tensors
    keys = set(source.keys())
    problems = []
    for key, info in expected.items():
        if key not in keys:
            problems.append(f"missing tensor '{key}' (expected shape {list(info.shape)})")
        elif source.shape(key) != info.shape:
            problems.append(f"tensor '{key}' has shape {list(source.shape(key))}, the description implies "
                            f"{list(info.shape)}")
        elif info.floating != source.dtype(key).is_floating_point:
            problems.append(f"tensor '{key}' has dtype {str(source.dtype(key)).removeprefix('torch.')}, "
                            f"expected a {'floating point' if info.floating else 'integer'} tensor")
    for key in sorted(keys - set(expected)):
        problems.append(f"unexpected tensor '{key}' (shape {list(source.shape(key))}) not in the description")
    if problems and keys:
        prefix, extra = common_prefix(set(expected), keys)
        if prefix is not None:
            if extra:  # e.g. DistributedDataParallel saves 'module.conv1.weight' for 'conv1.weight'
                what = (f"every tensor name in the checkpoint starts with '{prefix}'"
                        + (" (the model was saved wrapped in DistributedDataParallel/DataParallel)"
                           if prefix == "module." else ""))
                load = (f"from safetensors.torch import load_file, save_file; sd = load_file('{source.path}')"
                        if source.path.suffix == ".safetensors" else
                        f"import torch; from safetensors.torch import save_file; sd = torch.load('{source.path}', "
                        "weights_only=True)")
                fix = (f"Strip it: python -c \"{load}; save_file({{k.removeprefix('{prefix}'): v.contiguous() for "
                       f"k, v in sd.items()}}, 'fixed.safetensors')\" (or save model.module.state_dict()).")
            else:
                what = f"the description's layer names start with '{prefix}' but the checkpoint's tensor names do not"
                fix = f"Remove '{prefix}' from the layer names in the description."
            raise CheckpointError(f"the checkpoint does not match the model description: {what}",
                                  where=str(source.path), hint=fix)
    if problems:
        raise CheckpointError(f"the checkpoint does not match the model description ({len(problems)} "
                              f"problem{'s' * (len(problems) > 1)})", where=str(source.path), problems=problems,
                              hint="Fix the description (layer names, sizes, bias, input_shape) or pass the right --model.")
    return {k: (source.dtype(k), source.shape(k)) for k in expected}


def common_prefix(expected: set[str], found: set[str]) -> tuple[str | None, bool]:
    """A prefix p with {p + k for k in expected} == found (extra=True) or the reverse (False)."""
    for have, want, extra in ((found, expected, True), (expected, found, False)):
        if len(have) != len(want) or not want:
            continue
        anchor = min(want)
        for key in have:
            if key.endswith(anchor) and len(key) > len(anchor):
                p = key[:-len(anchor)]
                if {p + k for k in want} == have:
                    return p, extra
    return None, False


def check_finite(source: TensorSource, keys, progress: Progress | None = None) -> None:
    bad = []
    keys = list(keys)
    for n, key in enumerate(keys):
        t = source.get(key)
        if not all_finite(t):  # one aminmax pass; count only when bad
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            bad.append(f"'{key}': {nan} NaN, {inf} Inf")
        if progress:
            progress("checking weights", n + 1, len(keys))
    if bad:
        raise CheckpointError("refusing: the checkpoint has non-finite weights, which growth would copy and "
                              "verification cannot compare", where=str(source.path), problems=bad,
                              hint="Fix or retrain the checkpoint first.")




@contextlib.contextmanager
def open_hf(src: str | Path):
    src = Path(src)
    with hf_io.open_hf_dir(src) as source:
        arch = arch_from_config(source.config, set(source.keys()), where=str(src / "config.json"))
        yield source, arch, check_hf_checkpoint(source, arch)
