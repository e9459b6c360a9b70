"""The user's own model code: import it, build the nn.Module, load a checkpoint into it strictly.

``--model-code FILE.py:NAME`` or ``package.module:NAME``: NAME is an ``nn.Module`` class or a
factory returning one, called with ``model_args`` as keyword arguments. Importing the code
runs it (like ``python FILE.py``); checkpoints themselves are still read without unpickling code.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import sys
import traceback
from pathlib import Path

import torch

from .errors import CheckpointError, UserError


class ModelCodeError(UserError):
    """--model-code cannot be imported, names nothing, or does not build an nn.Module."""


def _split(ref: str) -> tuple[str, str]:
    if ":" not in ref or not ref.rsplit(":", 1)[1]:
        raise ModelCodeError(f"--model-code '{ref}': expected FILE.py:NAME or package.module:NAME",
                             hint="e.g. --model-code mymodels/resnet.py:resnet18")
    where, name = ref.rsplit(":", 1)
    return where, name


def _error_line(e: BaseException, origin: str | None = None) -> str:
    """The Python error as one line, located in the user's file where possible."""
    if isinstance(e, SyntaxError):
        return f"{e.filename}:{e.lineno}: SyntaxError: {e.msg}" + (f": {e.text.strip()}" if e.text else "")
    frames = traceback.extract_tb(e.__traceback__)
    mine = [f for f in frames if origin and Path(f.filename).resolve() == Path(origin).resolve()] or \
        [f for f in frames if "importlib" not in f.filename and "n2n_cli" not in f.filename]
    at = f"{mine[-1].filename}:{mine[-1].lineno}: " if mine else ""
    return f"{at}{type(e).__name__}: {e}"


def import_target(ref: str):
    """The object NAME in FILE.py or package.module (importing runs the user's code)."""
    where, name = _split(ref)
    path = Path(where)
    origin = None
    if where.endswith(".py") or path.is_file():
        if not path.is_file():
            raise ModelCodeError(f"--model-code '{ref}': no such file '{where}'")
        origin = str(path.resolve())
        modname = "n2n_user_" + hashlib.sha256(origin.encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(modname, origin)
        module = importlib.util.module_from_spec(spec)
        sys.modules[modname] = module
        sys.path.insert(0, str(path.resolve().parent))  # sibling imports of the user's file
        try:
            spec.loader.exec_module(module)
        except BaseException as e:
            sys.modules.pop(modname, None)
            if isinstance(e, KeyboardInterrupt):
                raise
            raise ModelCodeError(f"--model-code '{ref}': importing '{where}' failed: {_error_line(e, origin)}") from None
        finally:
            sys.path.remove(str(path.resolve().parent))
    else:
        try:
            module = importlib.import_module(where)
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            raise ModelCodeError(f"--model-code '{ref}': importing module '{where}' failed: {_error_line(e)}",
                                 hint="Is the package on PYTHONPATH (or installed)?") from None
    obj = module
    for part in name.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3)
            raise ModelCodeError(f"--model-code '{ref}': '{where}' has no '{name}'",
                                 hint=f"Did you mean: {', '.join(close)}?" if close else
                                 f"Names defined there: {', '.join(names[:20]) or 'none'}.")
        obj = getattr(obj, part)
    return obj


def build_model(ref: str, model_args: dict | None = None) -> torch.nn.Module:
    """Build the user's module from ``ref`` (class or factory) with ``model_args``, in eval mode."""
    target = import_target(ref)
    if not callable(target):
        raise ModelCodeError(f"--model-code '{ref}': '{_split(ref)[1]}' is a {type(target).__name__}, not a class "
                             "or a function returning an nn.Module")
    try:
        model = target(**(model_args or {}))
    except Exception as e:
        raise ModelCodeError(f"--model-code '{ref}': calling it with model_args {model_args or {}} failed: "
                             f"{_error_line(e)}") from None
    if not isinstance(model, torch.nn.Module):
        raise ModelCodeError(f"--model-code '{ref}': it returned a {type(model).__name__}, not a torch.nn.Module",
                             hint="NAME must be an nn.Module class or a factory that returns an nn.Module.")
    return model.eval()


def load_strict(model: torch.nn.Module, get, keys, shape, *, where: str) -> None:
    """Load the checkpoint (``get(key)``, ``keys``, ``shape(key)``) into ``model``, strictly.
    Every missing, unexpected and mis-shaped key is listed at once."""
    expected = model.state_dict()
    keys = list(keys)
    have = set(keys)
    problems = []
    for k, t in expected.items():
        if k not in have:
            problems.append(f"missing tensor '{k}' (the model expects shape {list(t.shape)})")
        elif tuple(shape(k)) != tuple(t.shape):
            problems.append(f"tensor '{k}' has shape {list(shape(k))}, the model expects {list(t.shape)}")
    for k in keys:
        if k not in expected:
            problems.append(f"unexpected tensor '{k}' (shape {list(shape(k))}) not in the model")
    if problems:
        hint = "Check --model-code and model_args (sizes such as width or num_classes)."
        if keys and all(k.startswith("module.") for k in keys) and not any(k.startswith("module.") for k in expected):
            hint = ("Every key starts with 'module.' (saved from a DataParallel/DistributedDataParallel wrapper): "
                    "save model.module.state_dict() instead, or strip the prefix.")
        raise CheckpointError(f"the checkpoint does not load into the model built by --model-code ({len(problems)} "
                              f"problem{'s' * (len(problems) > 1)})", where=where, problems=problems, hint=hint)
    with torch.no_grad():
        sd = {}
        for k, t in expected.items():
            v = get(k)
            sd[k] = v.to(t.dtype) if v.is_floating_point() and t.is_floating_point() else v
        model.load_state_dict(sd, strict=True)
