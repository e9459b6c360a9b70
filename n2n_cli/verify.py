"""Verification: do teacher and student compute the same function on seeded probe inputs?

Pass iff max|teacher - student| <= atol + rtol * max|teacher| (never a signed sum, which
cancels). Both run in eval mode (batchnorm uses running statistics, dropout is off).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from .errors import UserError, VerificationFailed
from .limits import MAX_PROBE_BYTES
from .model import ModelDescription, forward
from .transforms import generator

#: default (atol, rtol) by the checkpoint's floating dtype: the student's weights are rounded
#: to that dtype after an exact float64 transform, so half precision needs looser bounds.
DEFAULT_TOLERANCES = {
    torch.float64: (1e-5, 1e-4),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-3, 1e-2),
    torch.bfloat16: (1e-2, 5e-2),
}


def default_tolerances(dtypes) -> tuple[float, float]:
    worst = (1e-5, 1e-4)
    for d in dtypes:
        tol = DEFAULT_TOLERANCES.get(d)
        if tol and tol[1] > worst[1]:
            worst = tol
    return worst


VERIFY_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}


def compute_dtype(dtypes, requested: str | None = None) -> torch.dtype:
    """float32 (float64 for float64 checkpoints) unless ``requested``: a half-precision
    verification halves the memory a big model needs, with half-precision tolerances."""
    if requested is not None:
        if requested not in VERIFY_DTYPES:
            raise UserError(f"--verify-dtype: unknown dtype '{requested}'", hint=f"Use one of: {', '.join(VERIFY_DTYPES)}.")
        return VERIFY_DTYPES[requested]
    return torch.float64 if torch.float64 in set(dtypes) else torch.float32


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device: unknown device '{device}'", hint="Use auto, cpu, cuda, cuda:N or mps.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available on this machine", hint="Use --device cpu.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA devices")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError(f"--device {device}: MPS is not available on this machine", hint="Use --device cpu.")
    elif dev.type != "cpu":
        raise UserError(f"--device: unsupported device '{device}'", hint="Use auto, cpu, cuda, cuda:N or mps.")
    return dev


@dataclass
class Comparison:
    passed: bool
    probes: int
    seed: int
    atol: float
    rtol: float
    max_abs_error: float
    max_rel_error: float
    max_abs_teacher: float
    argmax_agreement: float | None
    device: str
    dtype: str

    def to_dict(self) -> dict:
        return asdict(self)


def probe_inputs(desc: ModelDescription, probes: int, seed: int) -> torch.Tensor:
    size = probes * math.prod(desc.input_shape) * 8
    if size > MAX_PROBE_BYTES:
        raise UserError(f"--probes {probes}: the probe inputs alone would take {size / 2**30:.1f} GiB "
                        f"({probes} x {list(desc.input_shape)} in float64)",
                        hint=f"Use at most {MAX_PROBE_BYTES // (math.prod(desc.input_shape) * 8)} probes.")
    return torch.randn((probes, *desc.input_shape), generator=generator(seed, "probes"), dtype=torch.float64)


@contextlib.contextmanager
def full_precision():
    """Turn off TensorFloat-32 while verifying: on Ampere and newer GPUs cuDNN convolutions use
    TF32 by default (10-bit mantissa), which alone would exceed float32 tolerances."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def run(desc: ModelDescription, get: Callable[[str], torch.Tensor], x: torch.Tensor, device: torch.device,
        dtype: torch.dtype) -> torch.Tensor:
    def fetch(key: str) -> torch.Tensor:
        t = get(key)
        return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

    with torch.no_grad(), full_precision():
        return forward(desc, fetch, x.to(device=device, dtype=dtype)).to("cpu", torch.float64)


def compare_outputs(teacher: torch.Tensor, student: torch.Tensor, *, atol: float, rtol: float, probes: int,
                    seed: int, device: torch.device, dtype: torch.dtype) -> Comparison:
    if teacher.shape != student.shape:
        raise UserError(f"teacher and student outputs differ in shape: {list(teacher.shape[1:])} vs "
                        f"{list(student.shape[1:])}; they are not the same function")
    diff = (teacher - student).abs()
    teacher_finite = bool(torch.isfinite(teacher).all())
    finite = teacher_finite and bool(torch.isfinite(student).all())
    max_abs = float(diff.max()) if finite else float("inf")
    ref = float(teacher.abs().max()) if teacher_finite else float("inf")
    rel = max_abs / ref if ref > 0 else (0.0 if max_abs == 0 else float("inf"))
    passed = finite and max_abs <= atol + rtol * ref
    agree = None
    if teacher.dim() == 2 and teacher.shape[1] > 1:
        agree = float((teacher.argmax(1) == student.argmax(1)).to(torch.float64).mean())
    return Comparison(passed, probes, seed, atol, rtol, max_abs, rel, ref, agree, str(device),
                      str(dtype).removeprefix("torch."))


#: what separates where a divergence was found from by how much, in a ``first_divergence`` message
DIVERGENCE_AMOUNT = ": max abs error "


def verification_facts(v: dict) -> dict:
    """What goes into a written checkpoint's metadata: deterministic facts only (what was checked,
    passed or not, probes, seed, tolerances, dtype, device), never float measurements, whose last
    digits depend on the thread count: the same inputs and seed give the same bytes. The measured
    errors are in the JSON report and on stdout."""
    measured = {"max_abs_error", "max_rel_error", "max_abs_teacher", "argmax_agreement", "cosine_max_abs_error",
                "stream_max_rel_error"}

    def facts(d: dict) -> dict:
        return {k: fact(k, x) for k, x in d.items() if k not in measured}

    def fact(k, x):
        if k == "first_divergence" and isinstance(x, str):
            return x.split(DIVERGENCE_AMOUNT)[0]  # where, not by how much
        return facts(x) if isinstance(x, dict) else x
    return facts(v)


def verification_failed(c: dict, where, report: dict, *, grown: bool,
                         user_tol: str | None = None) -> VerificationFailed:
    """The one message for a failed comparison (``c`` is a ``Comparison.to_dict()``)."""
    what = "the grown network" if grown else "the student"
    if c["dtype"] in ("bfloat16", "float16"):
        hint = (f"Verification ran in {c['dtype']}, whose rounding alone can exceed these tolerances: use "
                "--verify-dtype float32, or looser --atol/--rtol." + (f" (The tolerance is yours: {user_tol}.)"
                                                                      if user_tol else ""))
    elif user_tol:
        hint = (f"The tolerance is yours ({user_tol}) and is tighter than this comparison's rounding: loosen it, "
                "or drop it for the defaults by dtype. This is not a bug in n2n.")
    else:
        hint = "This is a bug in n2n or a numerically extreme checkpoint; please report it with --report." if grown \
            else None
    if c["max_abs_teacher"] == float("inf"):
        how = "the teacher's own outputs are not finite (NaN or Inf) on the probes"
    elif c["max_abs_error"] == float("inf"):
        how = f"{what}'s outputs are not finite (NaN or Inf) where the teacher's are"
    else:
        how = (f"max abs error {c['max_abs_error']:.3g} > atol {c['atol']:g} + rtol {c['rtol']:g} * max|teacher| "
               f"{c['max_abs_teacher']:.3g}")
    return VerificationFailed(
        f"{what} does not compute the teacher's function: {how}"
        + ("; nothing was written" if grown else "")
        + (f" ({c['first_divergence']})" if c.get("first_divergence") else ""), where=str(where), report=report,
        hint=hint)


def verification_settings(spec, header, plan, *, probes, atol, rtol, verify_dtype=None):
    """(probes, atol, rtol, who set the tolerances). Default tolerances follow the dtype the
    comparison runs in and the dtypes of the tensors whose computation rounds (a division, a
    scale, noise), not the coarsest dtype in the checkpoint: one bfloat16 bias that is only
    copied does not loosen the check of float32 weights."""
    from .certify import rounding_dtypes  # the plan's tensors whose computation rounds

    dtypes = [d for d, _ in header.values()]
    d_atol, d_rtol = default_tolerances([compute_dtype(dtypes, verify_dtype), *rounding_dtypes(plan)])
    user = user_tolerance(atol, rtol) or user_tolerance(spec.verify.atol, spec.verify.rtol, spec=True)
    return (probes or spec.verify.probes,
            atol if atol is not None else (spec.verify.atol if spec.verify.atol is not None else d_atol),
            rtol if rtol is not None else (spec.verify.rtol if spec.verify.rtol is not None else d_rtol), user)


def user_tolerance(atol, rtol, spec: bool = False) -> str | None:
    """How the user set the tolerances, in their words (``--atol 0 --rtol 0``), or None."""
    given = [(n, v) for n, v in (("atol", atol), ("rtol", rtol)) if v is not None]
    if not given:
        return None
    if spec:
        return "the spec's verify: " + ", ".join(f"{n}: {v:g}" for n, v in given)
    return " ".join(f"--{n} {v:g}" for n, v in given)
