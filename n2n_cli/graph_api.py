"""Growing a model built by the user's own code (``--model-code``): grow, inspect, load_grown.

The user's module is the architecture: n2n builds it, loads the checkpoint into it strictly,
traces it (``graph``), plans the steps into recipes (``graph_plan``), writes the student with
the same streaming writer as every other model, and verifies by running the user's module
with the teacher's weights against the same code resized to the student's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__, optim_state, outputs
from .hf_io import planned_bytes
from .certify import META_LINEAGE, META_VERIFICATION, META_VERSION, grown_lineage, read_lineage
from .checkpoints import atomic_output, check_output_path, open_checkpoint, write_safetensors
from .errors import CheckpointError, SpecError, UserError
from .execute import Materializer
from .graph import trace, trace_spaces
from .graph_args import find_student_args
from .graph_deepen import apply_edits
from .graph_plan import load_tensors, plan_graph, resize_module, run_model, widenable
from .spec import GrowthSpec, load_spec
from .transforms import generator
from .usercode import build_model, load_strict
from .verify import (compare_outputs, compute_dtype, default_tolerances, resolve_device, verification_facts,
                     verification_failed, verification_settings)

META_MODEL_CODE = "n2n_model_code"
SPEC_KEYS = ("model_code", "model_args", "example_input")


@dataclass
class ModelCode:
    ref: str
    args: dict = field(default_factory=dict)
    example_shape: list[int] | None = None
    edits: list[dict] = field(default_factory=list)  # module insertions by deepen steps, in order
    student_args: dict | None = None  # constructor arguments that build the grown shapes, when some do

    def build(self) -> torch.nn.Module:
        """The user's module with the recorded insertions replayed (teacher sizes until resized)."""
        return apply_edits(build_model(self.ref, self.args), self.edits)

    def to_json(self) -> str:
        data = {"model_code": self.ref, "model_args": self.args, "example_input": {"shape": self.example_shape}}
        if self.edits:
            data["insertions"] = self.edits
        if self.student_args is not None:
            data["student_args"] = self.student_args
        return json.dumps(data, sort_keys=True)


def _absolute(ref: str) -> str:
    """FILE.py refs are recorded with an absolute path, so a replay works from any directory."""
    where, _, name = ref.rpartition(":")
    return f"{Path(where).resolve()}:{name}" if where.endswith(".py") and Path(where).is_file() else ref


def parse_shape(value) -> list[int] | None:
    """``[1, 3, 32, 32]``, ``{shape: [...], dtype: float32}`` or ``"1,3,32,32"``."""
    if value is None:
        return None
    if isinstance(value, dict):
        if value.get("dtype", "float32") != "float32":
            raise SpecError("example_input: only dtype float32 inputs are supported")
        value = value.get("shape")
    if isinstance(value, str):
        value = value.replace("x", ",").split(",")
    try:
        shape = [int(v) for v in value]
    except (TypeError, ValueError):
        raise SpecError(f"example_input: '{value}' is not a shape such as 1,3,32,32") from None
    if not shape or any(v < 1 for v in shape):
        raise SpecError(f"example_input: {shape} is not a shape of positive sizes")
    return shape


def model_code_of(spec, src: Path, model_code: str | None, model_args: dict | None,
                  example_input) -> tuple[ModelCode | None, GrowthSpec | None]:
    """The user's model code for this job, from the options, the spec's ``model_code:`` or SRC's
    metadata (in that order); None when the job is not about a user-code model."""
    spec_obj = spec if isinstance(spec, GrowthSpec) else None  # Hugging Face specs are never user-code jobs
    if isinstance(spec, (str, Path)) and Path(spec).is_file():
        loaded, _ = load_spec(spec)
        if isinstance(loaded, GrowthSpec):
            spec_obj = loaded
    data = {k: getattr(spec_obj, k) for k in SPEC_KEYS if spec_obj is not None and getattr(spec_obj, k) is not None}
    recorded = {}
    if src.is_file() and src.suffix == ".safetensors" and model_code is None and not data:
        with open_checkpoint(src) as source:
            raw = source.metadata.get(META_MODEL_CODE)
        if raw:
            recorded = json.loads(raw)
    ref = model_code or data.get("model_code") or recorded.get("model_code")
    if ref is None:
        return None, spec_obj
    args = model_args if model_args is not None else data.get("model_args", recorded.get("model_args")) or {}
    if not isinstance(args, dict):
        raise SpecError("model_args: expected a mapping of keyword arguments")
    shape = parse_shape(example_input if example_input is not None else
                        data.get("example_input", recorded.get("example_input")))
    return ModelCode(_absolute(ref), args, shape), spec_obj


def example_for(model: torch.nn.Module, shape: list[int] | None) -> tuple[torch.Tensor, list[int]]:
    """An example input: the given shape, else inferred from the first conv/linear (trying a few
    image sizes until the model runs)."""
    if shape is not None:
        return torch.randn(shape, generator=generator("example")), shape
    first = next((m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.Conv1d))),
                 None)
    if isinstance(first, torch.nn.Linear):
        candidates = [[1, first.in_features]]
    elif isinstance(first, torch.nn.Conv1d):
        candidates = [[1, first.in_channels, n] for n in (64, 128)]
    elif isinstance(first, torch.nn.Conv2d):
        candidates = [[1, first.in_channels, n, n] for n in (32, 28, 64, 224)]
    else:
        candidates = []
    model.eval()
    for cand in candidates:
        try:
            with torch.no_grad():
                model(torch.zeros(cand))
            return torch.randn(cand, generator=generator("example")), cand
        except Exception:
            continue
    raise UserError("cannot infer the model's input shape", hint="Give it: --example-input 1,C,H,W (or "
                    "example_input: {shape: [1, C, H, W]} in the spec).")


def recorded_edits(source) -> list[dict]:
    """The module insertions recorded in a checkpoint grown by n2n (none for a user's own checkpoint)."""
    raw = source.metadata.get(META_MODEL_CODE)
    if not raw:
        return []
    try:
        edits = json.loads(raw).get("insertions", [])
    except (json.JSONDecodeError, AttributeError):
        raise CheckpointError(f"the '{META_MODEL_CODE}' metadata is not valid JSON", where=str(source.path)) from None
    return edits if isinstance(edits, list) else []


def _teacher(code: ModelCode, source) -> tuple[torch.nn.Module, dict]:
    code.edits = recorded_edits(source)
    model = code.build()
    if META_MODEL_CODE in source.metadata:  # grown by n2n before: resize as recorded in its tensors
        expected = model.state_dict()
        resize_module(model, {k: tuple(source.shape(k)) for k in source.keys() if k in expected})
    load_strict(model, source.get, source.keys(), source.shape, where=str(source.path))
    header = {k: (source.dtype(k), tuple(source.shape(k))) for k in model.state_dict()}
    bad = [k for k in header if source.get(k).is_floating_point() and not bool(torch.isfinite(source.get(k)).all())]
    if bad:
        raise CheckpointError("refusing: the checkpoint has non-finite weights", where=str(source.path), problems=bad)
    return model, header


# ----------------------------------------------------------------------------- validate


def plan_problems(spec: GrowthSpec, src: Path, code: ModelCode):
    """Build the user's module, load SRC, trace and plan every step (collecting problems, as
    ``n2n validate`` does for descriptions): (problems as (step index, message), plan)."""
    with open_checkpoint(Path(src)) as source:
        teacher, header = _teacher(code, source)
        x0, code.example_shape = example_for(teacher, code.example_shape)
        work = resize_module(code.build(), {k: s for k, (_, s) in header.items()})
        plan = plan_graph(work, header, spec.steps, spec.seed, x0, collect=True)
    return plan.problems, plan


# ----------------------------------------------------------------------------- grow


def grow(spec: GrowthSpec, src: Path, out: Path, code: ModelCode, *, device="cpu", seed=None, probes=None,
         atol=None, rtol=None, dry_run=False, force=False, verify=None, verify_dtype=None, progress=None,
         optimizer_state=None, optimizer_state_out=None) -> dict:
    src, out = Path(src), Path(out)
    if not dry_run:
        check_output_path(out, [src], force)
    with open_checkpoint(src) as source:
        previous = read_lineage(source.metadata, str(src)) or []  # malformed lineage: exit 2, before any work
        teacher, header = _teacher(code, source)
        x0, code.example_shape = example_for(teacher, code.example_shape)
        seed = spec.seed if seed is None else seed
        work = resize_module(code.build(), {k: s for k, (_, s) in header.items()})
        plan = plan_graph(work, header, spec.steps, seed, x0)
        code.edits = code.edits + plan.edits  # what the output records; the teacher keeps its own
        report = {"n2n_version": __version__, "source": str(src), "output": str(out), "dry_run": dry_run,
                  "model_code": json.loads(code.to_json()), "plan": plan.to_dict(), "written": False}
        opt = optim_state.prepare(optimizer_state, optimizer_state_out, plan, header, force,
                                  lambda: ([n for n, _ in teacher.named_parameters()],
                                           [n for n, _ in resize_module(code.build(), plan.shapes).named_parameters()]))
        if opt is not None:
            report["optimizer_state"] = optim_state.summary(*opt)
        if dry_run:
            return report
        mat = Materializer(plan, source, device=resolve_device(device))
        dtype = compute_dtype([d for d, _ in header.values()], verify_dtype)
        probes, atol, rtol, user_tol = verification_settings(spec, header, plan, probes=probes, atol=atol, rtol=rtol,
                                                             verify_dtype=verify_dtype)
        student = None
        if spec.verify.enabled if verify is None else verify:
            if progress:
                progress("verifying", 0, 1)
            student = load_tensors(resize_module(code.build(), plan.shapes), mat.get)
            x = torch.randn((probes, *code.example_shape[1:]), generator=generator(seed, "probes"))
            dev = resolve_device(device)
            c = compare_outputs(run_model(teacher, x, dev, dtype), run_model(student, x, dev, dtype), atol=atol,
                                rtol=rtol, probes=probes, seed=seed, device=dev, dtype=dtype).to_dict()
            if plan.function_preserving:
                v = {"passed": c["passed"], "checked": "student (the user's module, resized)", "exact": c,
                     "deviation": None}
            else:
                v = {"passed": None, "exact_student": False, "checked": "nothing exact", "exact": None,
                     "deviation": {**c, "passed": None},
                     "note": "inexact noise or a baseline method: the deviation is measured, not judged"}
            report["verification"] = v
            if progress:
                progress("verifying", 1, 1)
            if v["passed"] is False:
                raise verification_failed(c, src, report, grown=True, user_tol=user_tol)
        else:
            report["verification"] = {"passed": None, "skipped": True}
        if student is None:
            student = load_tensors(resize_module(code.build(), plan.shapes), mat.get)
        search = find_student_args(code.ref, code.args, student, x0, len(code.edits))
        code.student_args = search.student_args
        report["model_code"] = json.loads(code.to_json())
        report["load"] = search.to_dict()
        lineage = grown_lineage(previous, source.sha256(), spec, plan)
        metadata = {"format": "pt", META_VERSION: __version__, META_MODEL_CODE: code.to_json(),
                    META_LINEAGE: json.dumps(lineage, sort_keys=True, separators=(",", ":")),
                    META_VERIFICATION: json.dumps(verification_facts(report["verification"]), sort_keys=True,
                                                  separators=(",", ":"))}
        entries = plan.entries()
        outputs.before_writing(out, planned_bytes(entries))
        with atomic_output(out, force=force) as tmp:
            write_safetensors(tmp, entries, mat.get, metadata, name=str(out))
        report["written"] = True
        if opt is not None:
            optim_state.save_state(opt[0], optimizer_state_out, force=force)
            report["optimizer_state"]["written"] = str(optimizer_state_out)
        return report


# ----------------------------------------------------------------------------- inspect


def inspect(src: Path, code: ModelCode) -> dict:
    """The user's model: every space (coupled group of modules), and what can be widened."""
    with open_checkpoint(src) as source:
        model, header = _teacher(code, source)
        x, code.example_shape = example_for(model, code.example_shape)
        g = trace_spaces(model, trace(model, x))
        search = find_student_args(code.ref, code.args, model, x, len(code.edits))
        lineage = source.metadata.get(META_LINEAGE)
    spaces = []
    for sp in g.roots():
        if not sp.producers:
            continue
        spaces.append({"space": sp.id, "width": sp.width, "producers": sp.producers, "readers": sp.readers,
                       "followers": sp.followers, "widen": "no: " + sp.frozen[0] if sp.frozen else "yes"})
    return {"checkpoint": str(src), "model_code": json.loads(code.to_json()),
            "params": sum(p.numel() for p in model.parameters()),
            "modules": [{"name": n, "type": g.producer_modules[n], "widen": w} for n, w in widenable(g).items()],
            "spaces": spaces, "load": search.line(), "load_search": search.to_dict(),
            "student_args": search.student_args,
            "lineage": json.loads(lineage) if lineage else None}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ----------------------------------------------------------------------------- load_grown


def load_grown(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Resize ``model`` (teacher-shaped, built by the user's code) to the grown checkpoint at
    ``path`` and load its weights strictly. Returns the module (modified in place)."""
    with open_checkpoint(path) as source:
        apply_edits(model, recorded_edits(source))
        keys = list(source.keys())
        expected = set(model.state_dict())
        unknown = [k for k in keys if k not in expected]
        missing = [k for k in expected if k not in set(keys)]
        if unknown or missing:
            raise CheckpointError("the grown checkpoint does not load into this model", where=str(path),
                                  problems=[f"missing tensor '{k}'" for k in missing] +
                                  [f"unexpected tensor '{k}'" for k in unknown],
                                  hint="Build the model with the code and model_args recorded in the checkpoint's "
                                       f"'{META_MODEL_CODE}' metadata.")
        resize_module(model, {k: tuple(source.shape(k)) for k in keys})
        load_strict(model, source.get, keys, source.shape, where=str(path))
    return model.eval()


# ----------------------------------------------------------------------------- verify


def verify(teacher: Path, student: Path, code: ModelCode, *, device="cpu", seed=0, probes=64, atol=None, rtol=None,
           verify_dtype=None) -> dict:
    """Run the user's module with TEACHER's weights against the same code with STUDENT's (each
    replaying the insertions recorded in its own metadata, resized to its tensors)."""
    with open_checkpoint(teacher) as t_src, open_checkpoint(student) as s_src:
        t_model, t_head = _teacher(ModelCode(code.ref, code.args, code.example_shape), t_src)
        s_model, s_head = _teacher(ModelCode(code.ref, code.args, code.example_shape), s_src)
        _, code.example_shape = example_for(t_model, code.example_shape)
        dtypes = [d for d, _ in [*t_head.values(), *s_head.values()]]
        dev, dtype = resolve_device(device), compute_dtype(dtypes, verify_dtype)
        d_atol, d_rtol = default_tolerances(dtypes + [dtype])
        atol, rtol = (d_atol if atol is None else atol), (d_rtol if rtol is None else rtol)
        x = torch.randn((probes, *code.example_shape[1:]), generator=generator(seed, "probes"))
        c = compare_outputs(run_model(t_model, x, dev, dtype), run_model(s_model, x, dev, dtype), atol=atol,
                            rtol=rtol, probes=probes, seed=seed, device=dev, dtype=dtype)
    from .certify import none as no_certificate

    cert = no_certificate("models built by your code are not replayed yet: probe check only").to_dict()
    report = {"teacher": str(teacher), "student": str(student), "model_code": json.loads(code.to_json()),
              "passed": c.passed, **c.to_dict(), "params_teacher": sum(p.numel() for p in t_model.parameters()),
              "params_student": sum(p.numel() for p in s_model.parameters()),
              "verification": {"passed": c.passed, "exact_student": True, "checked": "probes only (your module on "
                               "both sides)", "exact": c.to_dict(), "deviation": None, "certificate": cert}}
    if not c.passed:
        raise verification_failed(c.to_dict(), student, report, grown=False)
    return report
