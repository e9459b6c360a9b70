"""The certificate: recompute every student tensor from the teacher by the student's recorded
growth (its lineage: steps, seed, teacher sha256) and compare them exactly.

Probes see a function on a few inputs; a dead ReLU unit or a weight below the rounding of the
comparison escapes them. The certificate does not: it re-plans the recorded steps on the teacher
with the same planner as ``grow`` (``seq_plan.build_plan`` / ``hf_plan.build_hf_plan``), runs the same
``Materializer`` tensor by tensor (memory: a few tensors at a time) and requires every stored
tensor to be bitwise identical to the recomputed one. The only arithmetic that is not bitwise
reproducible everywhere is a reduction (the std that scales symmetry-breaking noise, whose last
bit may depend on the thread count), so tensors that carry noise may differ by one unit in the
last place (ulp) of their dtype; nothing else may.

The library returns a :class:`Certificate`; ``api.verify`` puts it in the report and raises
``VerificationFailed`` when it fails.
"""

from __future__ import annotations

import functools
import math

import json
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from . import __version__
from .checkpoints import TensorSource
from .errors import CheckpointError, N2NError, UserError
from .execute import Materializer
from .planner import Create, Scale, Widen
from .transforms import make_mapping

# the safetensors metadata keys n2n writes (every growth path names them from here)
META_LINEAGE = "n2n_lineage"
META_VERIFICATION = "n2n_verification"
META_VERSION = "n2n_version"

#: bits of precision (mantissa digits, with the implicit one) by floating dtype, for ulps
_DIGITS = {torch.float64: 53, torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}
_AS_INT = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
           torch.bfloat16: torch.int16}


class TeacherMismatch(CheckpointError):
    """TEACHER is not the checkpoint the student's lineage says it was grown from (exit 2)."""


# ----------------------------------------------------------------------------- lineage


def grown_lineage(previous: list[dict], teacher_sha256: str, spec, plan) -> list[dict]:
    """``previous`` (the teacher's lineage, see :func:`read_lineage`) plus this growth's entry:
    what the certificate replays (steps, seed, the teacher's digest, its description if any)."""
    before = getattr(plan, "model_before", None)  # MLP/CNN: the teacher's description, for `n2n verify`
    return [*previous, {"n2n_version": __version__, "seed": plan.seed, "teacher_sha256": teacher_sha256,
                        "steps": [e.to_dict() for e in spec.steps],
                        **({"model_before": json.loads(before.to_json())} if before is not None else {}),
                        "params_before": plan.params_before, "params_after": plan.params_after}]


def read_lineage(metadata: dict[str, str], where: str) -> list[dict] | None:
    """The student's lineage (one entry per ``grow`` run), or None when it has none.
    Malformed lineage metadata is a CheckpointError (exit 2), never a crash."""
    raw = metadata.get(META_LINEAGE)
    if raw is None:
        return None
    hint = "The checkpoint's n2n metadata was edited or damaged; re-grow it, or drop the metadata."
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:
        msg = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise CheckpointError(f"its '{META_LINEAGE}' metadata is not valid JSON ({msg})", where=where,
                              hint=hint) from None
    if not isinstance(data, list) or not data:
        raise CheckpointError(f"its '{META_LINEAGE}' metadata must be a non-empty list of growth records, not "
                              f"{_kind(data)}", where=where, hint=hint)
    for i, entry in enumerate(data):
        problems = []
        if not isinstance(entry, dict):
            problems.append(f"entry {i} is {_kind(entry)}, not an object")
        else:
            if not isinstance(entry.get("steps"), list) or not all(isinstance(s, dict) for s in entry["steps"]):
                problems.append(f"entry {i}: 'steps' must be a list of steps")
            if not isinstance(entry.get("seed"), int) or isinstance(entry.get("seed"), bool):
                problems.append(f"entry {i}: 'seed' must be an integer")
            if entry.get("teacher_sha256") is not None and not isinstance(entry["teacher_sha256"], str):
                problems.append(f"entry {i}: 'teacher_sha256' must be a string")
        if problems:
            raise CheckpointError(f"its '{META_LINEAGE}' metadata is malformed", where=where, problems=problems,
                                  hint=hint)
    return data


def _kind(x) -> str:
    if x is None:
        return "null"
    if isinstance(x, (list, dict)) and not x:
        return f"an empty {'list' if isinstance(x, list) else 'object'}"
    return f"a {type(x).__name__} ({json.dumps(x)[:40]})"


def entries_to_replay(lineage: list[dict], teacher_sha256: str, teacher: str) -> list[int]:
    """Indices of the lineage entries that lead from TEACHER to the student: the last entry
    when TEACHER is its teacher, else every entry from the latest one whose teacher it is."""
    for i in range(len(lineage) - 1, -1, -1):
        if lineage[i].get("teacher_sha256") == teacher_sha256:
            return list(range(i, len(lineage)))
    recorded = lineage[-1].get("teacher_sha256") or "none recorded"
    raise TeacherMismatch(
        f"TEACHER is not the checkpoint this student was grown from: its sha256 is {teacher_sha256}, the "
        f"student's lineage records {recorded}" + (f" (and {len(lineage) - 1} earlier teacher(s))"
                                                     if len(lineage) > 1 else ""),
        where=teacher, hint="Pass the teacher the student was grown from (the file itself, unchanged).")


# ----------------------------------------------------------------------------- result


@dataclass
class Certificate:
    status: str  # pass | fail | reproduced (bitwise, but the recorded growth is not function-preserving) | none
    checked: str
    tensors: int = 0
    bitwise: int = 0
    within_ulp: int = 0
    entries: list[int] = field(default_factory=list)  # lineage entries replayed
    function_preserving: bool | None = None
    methods: list[str] = field(default_factory=list)  # the inexact methods of the recorded steps
    difference: dict | None = None  # the first: tensor, index, expected, found, dtype, reason
    #: dtypes of the tensors whose computation rounds (None: no plan), for the probe tolerances
    rounding: list | None = None

    @property
    def passed(self) -> bool | None:
        return {"pass": True, "fail": False}.get(self.status)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rounding"] = None if self.rounding is None else [_dt(x) for x in self.rounding]
        return {"passed": self.passed, **d}

    def summary(self) -> str:
        """One line for people: ``PASS (n tensors bitwise identical)`` and the like."""
        if self.status == "none":
            return f"none ({self.checked})"
        counts = f"{self.bitwise} tensors bitwise identical" + (
            f", {self.within_ulp} within one ulp (noise)" if self.within_ulp else "")
        if self.status == "pass":
            return f"PASS ({counts}; {self.checked})"
        if self.status == "reproduced":
            return (f"reproduced bitwise ({counts}; {self.checked}), NOT function-preserving "
                    f"(method {', '.join(self.methods)})")
        d = self.difference or {}
        return f"FAIL ({describe_difference(d)}; {self.checked})"


def describe_difference(d: dict) -> str:
    where = f"tensor '{d.get('tensor')}'" if d.get("tensor") else "the student"
    if d.get("index") is not None:
        return (f"{where} element {list(d['index'])}: recomputed from the teacher {d['expected']!r}, stored "
                f"{d['found']!r} ({d['dtype']})")
    return f"{where}: {d.get('reason')}"


def none(reason: str) -> Certificate:
    return Certificate("none", reason)


# ----------------------------------------------------------------------------- replay


class PlannedSource(TensorSource):
    """The output of a plan as a read-only TensorSource (for replaying a multi-run lineage
    without writing the intermediate checkpoint): each ``get`` materializes one tensor."""

    def __init__(self, plan, source: TensorSource):
        self.path = source.path
        self.metadata = {}
        self._plan, self._mat = plan, Materializer(plan, source)

    def keys(self):
        return list(self._plan.recipes)

    def shape(self, key):
        return tuple(self._plan.shapes[key])

    def dtype(self, key):
        return self._plan.dtypes[key]

    def get(self, key):
        return self._mat.get(key)


def inexact_methods(plan) -> list[str]:
    out = []
    for s in plan.steps:
        if not s.function_preserving:
            step = s.entry.step
            what = getattr(step, "method", None) or "approximate"
            if getattr(step, "noise", 0) and getattr(step, "noise_mode", "zero-sum") == "independent":
                what = "independent noise"
            if what not in out:
                out.append(what)
    return out


def _noisy(recipe) -> bool:
    return any(isinstance(op, (Widen, Scale)) and op.noise > 0 for op in recipe)


@functools.lru_cache(maxsize=256)
def _divides_exactly(mapping) -> bool:
    """Is every unit copied a power-of-two number of times (a tile mapping by 2, 4, ...)? Then
    dividing by the copy count only changes the exponent: exact in every float dtype (but below
    the smallest normal number, 1.2e-38 in bfloat16 and float32, where no weight matters)."""
    counts = torch.bincount(make_mapping(mapping), minlength=mapping.old)
    return bool(((counts > 0) & ((counts & (counts - 1)) == 0)).all())


def may_round(recipe, dtype: torch.dtype) -> bool:
    """Can computing this tensor round in its dtype (a division, a scale, noise, a random or a
    non-representable constant)? Copies, zeros and identities cannot. Used to set verification
    tolerances by the tensors that actually round, not by the coarsest dtype in the file."""
    if not dtype.is_floating_point:
        return False
    for op in recipe:
        if isinstance(op, Widen):
            if op.method != "net2wider" or op.noise > 0:
                return True
            for _, axis, mapping in op.axes:
                if (axis.role == "in" and not _divides_exactly(mapping)) or axis.role == "norm_in" \
                        or (axis.role == "norm" and mapping.norm_scale != 1.0) \
                        or (axis.role == "embed" and mapping.embed_scale != 1.0):
                    return True
        elif isinstance(op, Scale):
            if op.noise > 0 or math.frexp(op.factor)[0] != 0.5:  # noise, or a factor not a power of two
                return True
        elif isinstance(op, Create):
            if op.init in ("default", "normal"):
                return True
            if op.init == "const" and float(torch.tensor(op.value, dtype=dtype)) != op.value:
                return True
    return False


def rounding_dtypes(plan) -> list[torch.dtype]:
    return sorted({plan.dtypes[k] for k, r in plan.recipes.items() if may_round(r, plan.dtypes[k])}, key=str)


# ----------------------------------------------------------------------------- comparison


def _first_difference(key: str, expected: torch.Tensor, found: torch.Tensor, ulp_ok: bool) -> tuple[dict | None, bool]:
    """(difference or None, whether the match needed the one-ulp allowance)."""
    if expected.dtype != found.dtype:
        return {"tensor": key, "index": None, "reason": f"dtype {_dt(found.dtype)}, the recorded growth gives "
                                                           f"{_dt(expected.dtype)}"}, False
    if tuple(expected.shape) != tuple(found.shape):
        return {"tensor": key, "index": None, "reason": f"shape {list(found.shape)}, the recorded growth gives "
                                                           f"{list(expected.shape)}"}, False
    as_int = _AS_INT.get(expected.dtype)
    if as_int is None:
        diff = expected != found
    else:
        diff = expected.contiguous().view(as_int) != found.contiguous().view(as_int)
    if not bool(diff.any()):
        return None, False
    if ulp_ok and as_int is not None:
        e, f = expected.to(torch.float64), found.to(torch.float64)
        _, exp = torch.frexp(e.abs().clamp_min(torch.finfo(expected.dtype).tiny))
        ulp = torch.ldexp(torch.ones_like(e), (exp - _DIGITS[expected.dtype]).to(torch.float64))
        beyond = diff & ((e - f).abs() > ulp)
        if not bool(beyond.any()):
            return None, True
        diff = beyond
    index = tuple(int(i) for i in diff.nonzero()[0]) if diff.dim() else ()
    return {"tensor": key, "index": list(index), "expected": float(expected[index]), "found": float(found[index]),
            "dtype": _dt(expected.dtype)}, False


def _dt(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def compare(plan, expected_source: TensorSource, student: TensorSource, checked: str, entries: list[int],
            progress: Callable[[str, int, int], None] | None = None) -> Certificate:
    """Recompute every tensor of ``plan`` and compare it with ``student``'s."""
    cert = Certificate("pass", checked, entries=entries, function_preserving=plan.function_preserving,
                       methods=inexact_methods(plan))
    mat = Materializer(plan, expected_source)
    keys, stored = list(plan.recipes), set(student.keys())
    missing = [k for k in keys if k not in stored]
    extra = sorted(stored - set(keys))
    if missing or extra:
        k = (missing or extra)[0]
        cert.status = "fail"
        cert.difference = {"tensor": k, "index": None,
                           "reason": "missing from the student" if missing else
                           "in the student, but not produced by the recorded growth"}
        return cert
    for n, key in enumerate(keys):
        d, ulp = _first_difference(key, mat.get(key), student.get(key), _noisy(plan.recipes[key]))
        cert.tensors += 1
        if d is not None:
            cert.status, cert.difference = "fail", d
            return cert
        cert.within_ulp += ulp
        cert.bitwise += not ulp
        if progress:
            progress("certificate", n + 1, len(keys))
    if not plan.function_preserving:
        cert.status = "reproduced"
    return cert


def _fail(checked: str, entries: list[int], reason: str, tensor: str | None = None) -> Certificate:
    return Certificate("fail", checked, entries=entries,
                       difference={"tensor": tensor, "index": None, "reason": reason})


def _checked(entries: list[int], total: int) -> str:
    if len(entries) == 1 and entries[0] == total - 1:
        return (f"lineage entry {total} of {total} replayed from the teacher" if total > 1
                else "the recorded growth replayed from the teacher")
    return f"lineage entries {entries[0] + 1}-{entries[-1] + 1} of {total} replayed from the teacher"


def _parse_steps(entry_cls, entry: dict, i: int, where: str) -> list:
    from pydantic import ValidationError

    try:
        # an intermediate_size widening recorded without a mapping predates --mapping: random then
        return [entry_cls.model_validate({**s, "widen": {"mapping": "random", **s["widen"]}}
                                         if isinstance(s.get("widen"), dict) and s["widen"].get("dim") == "intermediate_size"
                                         else s) for s in entry["steps"]]
    except ValidationError as e:
        raise CheckpointError(f"lineage entry {i + 1}: its steps are not valid steps of this n2n "
                              f"({e.errors()[0]['msg']})", where=where) from None


# ----------------------------------------------------------------------------- file checkpoints


def certify_file(t_src: TensorSource, t_desc, s_src: TensorSource, s_desc, lineage: list[dict], teacher_sha256: str,
                 progress=None) -> Certificate:
    """MLP/CNN: replay the lineage entries leading from the teacher to the student and compare."""
    from .seq_plan import build_plan
    from .spec import StepEntry

    entries = entries_to_replay(lineage, teacher_sha256, str(t_src.path))
    checked = _checked(entries, len(lineage))
    source, desc = t_src, t_desc
    header = {k: (t_src.dtype(k), t_src.shape(k)) for k in desc.layout().tensors}
    plan = None
    for i in entries:
        steps = _parse_steps(StepEntry, lineage[i], i, str(s_src.path))
        plan = _replan(lambda: build_plan(desc, header, steps, lineage[i]["seed"]), i, str(s_src.path))
        if i != entries[-1]:
            source, desc = PlannedSource(plan, source), plan.model_after
            header = {k: (plan.dtypes[k], plan.shapes[k]) for k in plan.recipes}
    if plan.model_after.to_json() != s_desc.to_json():
        cert = _fail(checked, entries, "the student's model description is not the one the recorded growth "
                                       "produces from the teacher's")
    else:
        cert = compare(plan, source, s_src, checked, entries, progress)
    cert.rounding = rounding_dtypes(plan)
    return cert


def _replan(build, i: int, where: str):
    try:
        return build()
    except N2NError as e:
        raise UserError(f"the student's recorded growth (lineage entry {i + 1}) cannot be replayed on this "
                        f"teacher: {e.message}", where=where,
                        hint="Is the teacher's model description (--model) the one it was grown with?") from None


# ----------------------------------------------------------------------------- Hugging Face directories


def certify_hf(t_source, t_arch, t_header, s_source, lineage: list[dict], teacher_sha256: str,
               progress=None) -> Certificate:
    from .hf_plan import HFStepEntry, build_hf_plan

    entries = entries_to_replay(lineage, teacher_sha256, str(t_source.path))
    checked = _checked(entries, len(lineage))
    source, config, arch, header = t_source, t_source.config, t_arch, t_header
    plan = None
    for i in entries:
        steps = _parse_steps(HFStepEntry, lineage[i], i, str(s_source.path))
        plan = _replan(lambda: build_hf_plan(config, arch, header, steps, lineage[i]["seed"]), i,
                       str(s_source.path))
        if i != entries[-1]:
            source, config, arch = PlannedSource(plan, source), plan.new_config(), plan.arch_after
            header = {k: (plan.dtypes[k], plan.shapes[k]) for k in plan.recipes}
    expected = json.loads(json.dumps(plan.new_config()))
    found = s_source.config
    changed = sorted(k for k in set(expected) | set(found) if expected.get(k) != found.get(k))
    if changed:
        k = changed[0]
        cert = _fail(checked, entries, f"config.json '{k}' is {json.dumps(found.get(k))}, the recorded growth "
                                       f"gives {json.dumps(expected.get(k))}", tensor=None)
    else:
        cert = compare(plan, source, s_source, checked, entries, progress)
    cert.rounding = rounding_dtypes(plan)
    return cert


def summary_of(d: dict) -> str:
    """``Certificate.summary`` of a certificate's ``to_dict()`` (what the CLI prints)."""
    keys = {f for f in Certificate.__dataclass_fields__}
    cert = Certificate(**{k: v for k, v in d.items() if k in keys and k != "rounding"})
    return cert.summary()
