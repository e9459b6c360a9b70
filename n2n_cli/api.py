"""The n2n library API: grow, verify, inspect, validate. Usable from Python without the CLI.

    from n2n_cli import api
    report = api.grow("specs/mnist-cnn-grow.yaml", "teacher.safetensors", "student.safetensors")
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
import yaml

from . import __version__, hf_io, hf_stream, hf_verify
from .checkpoints import TensorSource, atomic_output, check_output_path, open_checkpoint, write_safetensors
from .errors import CheckpointError, ModelError, SpecError, StepError, UserError, VerificationFailed
from .execute import Materializer
from .phases import PhaseClock
from .transforms import all_finite
from .layers import PRODUCERS
from .model import ModelDescription
from .plan import Plan, build_plan, exact_counterpart
from .hf import HFGrowthSpec, arch_from_config, build_hf_plan, check_hf_checkpoint
from .spec import (GrowthSpec, StepEntry, lenient_steps, load_model_description, load_spec, parse_model_description,
                   spec_from_steps, step_line)
from .verify import compare_outputs, compute_dtype, default_tolerances, probe_inputs, resolve_device, run

Progress = Callable[[str, int, int], None]  # (phase, done, total)

__all__ = ["grow", "verify", "inspect", "validate", "spec_from_steps", "model_from_metadata"]

#: what an MLP/CNN verification proves: the description's network, which is the user's only if
#: the description matches their module (a tanh described as relu still passes)
DESCRIPTION_NOTE = ("the network the model description describes, run by n2n, not your own nn.Module: if they "
                    "differ, check with your module (README: 'Check with your own module')")

META_MODEL = "n2n_model"
META_LINEAGE = "n2n_lineage"
META_VERIFICATION = "n2n_verification"
META_VERSION = "n2n_version"


# ----------------------------------------------------------------------------- checkpoint + model


def model_from_metadata(source: TensorSource) -> ModelDescription | None:
    raw = source.metadata.get(META_MODEL)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"its '{META_MODEL}' metadata is not valid JSON ({e})", where=str(source.path)) from None
    return parse_model_description(data, where=f"{source.path} (metadata '{META_MODEL}')")


def resolve_model(source: TensorSource, *candidates: ModelDescription | None) -> ModelDescription:
    """The first given description, else the one the checkpoint carries."""
    for desc in candidates:
        if desc is not None:
            return desc
    desc = model_from_metadata(source)
    if desc is None:
        raise ModelError("no model description for this checkpoint", where=str(source.path),
                         hint="Pass --model FILE.yaml (or set model: in the spec); checkpoints written by n2n "
                              "carry their own.")
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


# ----------------------------------------------------------------------------- grow


def _settings(spec: GrowthSpec, header, *, seed, probes, atol, rtol, verify_dtype=None):
    seed = spec.seed if seed is None else seed
    dtypes = [d for d, _ in header.values()]
    d_atol, d_rtol = default_tolerances(dtypes + [compute_dtype(dtypes, verify_dtype)])
    return (seed, probes or spec.verify.probes,
            atol if atol is not None else (spec.verify.atol if spec.verify.atol is not None else d_atol),
            rtol if rtol is not None else (spec.verify.rtol if spec.verify.rtol is not None else d_rtol))


def grow(spec: GrowthSpec | str | Path, src: str | Path, out: str | Path, *, model: ModelDescription | str | Path | None = None,
         device: str = "cpu", seed: int | None = None, probes: int | None = None, atol: float | None = None,
         rtol: float | None = None, dry_run: bool = False, force: bool = False, verify: bool | None = None,
         max_shard_size: int | str = "5GB", verify_dtype: str | None = None, progress: Progress | None = None,
         verify_mode: str = "auto") -> dict:
    """Grow ``src`` by ``spec`` into ``out`` (a .safetensors file, or a directory when ``src`` is a
    Hugging Face model directory). Returns the report (a dict).

    Raises a ``UserError`` for bad input and ``VerificationFailed`` when the grown network
    does not compute the teacher's function; in both cases nothing is written.
    """
    spec_model = None
    if not isinstance(spec, (GrowthSpec, HFGrowthSpec)):
        spec, spec_model = load_spec(spec)
    src = Path(src)
    out_path = Path(out)
    if src.suffix.lower() in (".yaml", ".yml"):
        raise UserError("SRC is a YAML file; it should be the teacher checkpoint (a .safetensors file, a state dict "
                        "or a Hugging Face model directory)", where=str(src),
                        hint="The order is: n2n grow SPEC SRC OUT; for a model description use --model.")
    if src.is_dir() or isinstance(spec, HFGrowthSpec):
        if not src.is_dir():
            raise SpecError("this spec grows Hugging Face model directories (its steps name dimensions), but SRC "
                            "is not a directory", where=str(src))
        if model is not None:
            raise UserError("--model describes MLP/CNN checkpoints; a Hugging Face directory is described by its "
                            "config.json", where=str(src), hint="Drop --model.")
        if isinstance(spec, GrowthSpec):
            raise SpecError("SRC is a Hugging Face model directory, but the steps name layers of a sequential "
                            "model", where=str(src), hint="Use widen: {dim: intermediate_size, to: N} or "
                            "deepen: {layers: N} (see the README).")
        return _grow_hf(spec, src, out_path, device=device, seed=seed, probes=probes, atol=atol, rtol=rtol,
                        dry_run=dry_run, force=force, verify=verify, max_shard_size=max_shard_size,
                        verify_dtype=verify_dtype, progress=progress, verify_mode=verify_mode)
    if isinstance(model, (str, Path)):
        model = load_model_description(model)
    if not dry_run:
        check_output_path(out_path, [src], force)
    with open_checkpoint(src) as source, _hashing(source, not dry_run) as teacher_sha256:
        desc = resolve_model(source, model, spec_model)
        header = check_checkpoint(source, desc)
        check_finite(source, header, progress)
        seed, probes, atol, rtol = _settings(spec, header, seed=seed, probes=probes, atol=atol, rtol=rtol,
                                             verify_dtype=verify_dtype)
        plan = build_plan(desc, header, spec.steps, seed)
        report = {"n2n_version": __version__, "source": str(src), "output": str(out_path), "dry_run": dry_run,
                  "plan": plan.to_dict(), "model": json.loads(plan.model_after.to_json()), "written": False,
                  "verified_against": DESCRIPTION_NOTE}
        if dry_run:
            return report
        mat = Materializer(plan, source)
        do_verify = spec.verify.enabled if verify is None else verify
        if do_verify:
            report["verification"] = _verify_plan(spec.steps, plan, source, desc, header, mat, probes=probes,
                                                  seed=seed, atol=atol, rtol=rtol, device=resolve_device(device),
                                                  dtype=compute_dtype([d for d, _ in header.values()], verify_dtype),
                                                  progress=progress)
            if report["verification"]["passed"] is False:
                raise _verification_failed(report["verification"]["exact"], src, report, grown=True)
        else:
            report["verification"] = {"passed": None, "skipped": True}
        metadata = {
            "format": "pt",
            META_VERSION: __version__,
            META_MODEL: plan.model_after.to_json(),
            META_LINEAGE: json.dumps(_lineage(source, teacher_sha256.result(), spec, plan), sort_keys=True,
                                      separators=(",", ":")),
            META_VERIFICATION: json.dumps(report["verification"], sort_keys=True, separators=(",", ":")),
        }
        entries = plan.entries()
        with atomic_output(out_path) as tmp:
            done = iter(range(1, len(entries) + 1))
            write_safetensors(tmp, entries, mat.get, metadata, name=str(out_path),
                              on_tensor=(lambda k: progress("writing", next(done), len(entries))) if progress else None)
        report["written"] = True
        return report


def _grow_hf(spec: HFGrowthSpec, src: Path, out: Path, *, device, seed, probes, atol, rtol, dry_run, force, verify,
             max_shard_size, verify_dtype, progress, verify_mode="auto") -> dict:
    if not dry_run:
        hf_io.check_output_dir(out, src, force)
    shard_bytes = hf_io.parse_size(max_shard_size)
    clock = PhaseClock()
    with _open_hf(src) as (source, arch, header), _hashing(source, not dry_run) as teacher_sha256:
        check_finite(source, header, progress)
        clock.mark("check")
        seed, probes, atol, rtol = _settings(spec, header, seed=seed, probes=probes, atol=atol, rtol=rtol,
                                             verify_dtype=verify_dtype)
        plan = build_hf_plan(source.config, arch, header, spec.steps, seed)
        hf_verify.check_config(plan.new_config())
        clock.mark("plan")
        report = {"n2n_version": __version__, "source": str(src), "output": str(out), "dry_run": dry_run,
                  "plan": plan.to_dict(), "written": False}
        if dry_run:
            return report
        do_verify = spec.verify.enabled if verify is None else verify
        if do_verify:
            hf_verify.require_transformers()
        spec_used = spec.model_copy(update={"seed": seed})
        metadata = {"format": "pt", META_VERSION: __version__,
                    META_LINEAGE: json.dumps(_lineage(source, teacher_sha256.result(), spec_used, plan), sort_keys=True,
                                             separators=(",", ":"))}
        clock.mark("hash")
        entries = plan.entries()
        done = iter(range(1, len(entries) + 1))
        holder = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".n2n-stage", dir=out.parent))
        try:
            staged = holder / out.name
            hf_io.write_hf_dir(staged, entries, Materializer(plan, source).get, config=plan.new_config(),
                               metadata=metadata, src_dir=src, max_shard_size=shard_bytes,
                               extra_files={"n2n_spec.yaml": yaml.safe_dump(spec_used.model_dump(mode="json",
                                                                                                exclude_none=True),
                                                                            sort_keys=False)},
                               on_tensor=(lambda k: progress("writing", next(done), len(entries))) if progress else None)
            clock.mark("write")
            source.close()  # unmap the input (reopened on demand): its pages would count in RSS while verifying
            if do_verify:
                if progress:
                    progress("verifying", 0, 1)
                dtype = compute_dtype([d for d, _ in header.values()], verify_dtype)
                c = hf_stream.compare(src, staged, mode=verify_mode, progress=progress, vocab=arch.vocab,
                                      max_len=min(arch.positions or 64, 64), probes=probes, seed=seed, atol=atol,
                                      rtol=rtol, device=resolve_device(device), dtype=dtype)
                if progress:
                    progress("verifying", 1, 1)
                if plan.function_preserving:
                    v = {"passed": c.passed, "checked": "student", "exact": c.to_dict(), "deviation": None}
                else:
                    v = {"passed": None, "checked": "nothing exact", "exact": None, "deviation": c.to_dict(),
                         "note": "approximate growth (allow_approximate): the deviation is measured, not judged"}
                report["verification"] = v
                clock.mark("verify")
                report["timings"] = clock.seconds
                if v["passed"] is False:
                    raise _verification_failed(v["exact"], src, report, grown=True)
            else:
                report["verification"] = {"passed": None, "skipped": True}
            (staged / "n2n_verification.json").write_text(json.dumps(report["verification"], indent=2, sort_keys=True) + "\n")
            hf_io.move_into_place(staged, out)
            clock.mark("move")
        finally:
            shutil.rmtree(holder, ignore_errors=True)
        report["written"] = True
        report["timings"] = clock.seconds
        return report


def _verification_failed(c: dict, where: Path, report: dict, *, grown: bool) -> VerificationFailed:
    """The one message for a failed comparison (``c`` is a ``Comparison.to_dict()``)."""
    what = "the grown network" if grown else "the student"
    if c["dtype"] in ("bfloat16", "float16"):
        hint = (f"Verification ran in {c['dtype']}, whose rounding alone can exceed these tolerances: use "
                "--verify-dtype float32, or looser --atol/--rtol.")
    else:
        hint = "This is a bug in n2n or a numerically extreme checkpoint; please report it with --report." if grown \
            else None
    return VerificationFailed(
        f"{what} does not compute the teacher's function: max abs error {c['max_abs_error']:.3g} > atol "
        f"{c['atol']:g} + rtol {c['rtol']:g} * max|teacher| {c['max_abs_teacher']:.3g}"
        + ("; nothing was written" if grown else "")
        + (f" ({c['first_divergence']})" if c.get("first_divergence") else ""), where=str(where), report=report,
        hint=hint)


@contextlib.contextmanager
def _hashing(source: TensorSource, enabled: bool = True):
    """Hash the teacher's file(s) in a background thread (hashlib releases the GIL) while the
    weights are checked and transformed; yields a future of the hex digest (None if disabled)."""
    if not enabled:
        done: concurrent.futures.Future = concurrent.futures.Future()
        done.set_result(None)
        yield done
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        yield pool.submit(source.sha256)


def _lineage(source: TensorSource, teacher_sha256: str, spec: GrowthSpec, plan: Plan) -> list[dict]:
    try:
        previous = json.loads(source.metadata.get(META_LINEAGE, "[]"))
    except json.JSONDecodeError:
        previous = []
    return [*previous, {"n2n_version": __version__, "seed": plan.seed, "teacher_sha256": teacher_sha256,
                        "steps": [e.to_dict() for e in spec.steps],
                        "params_before": plan.params_before, "params_after": plan.params_after}]


def _verify_plan(steps: list[StepEntry], plan: Plan, source: TensorSource, desc: ModelDescription, header,
                 mat: Materializer, *, probes, seed, atol, rtol, device, dtype, progress) -> dict:
    """Verify the exact transform; measure (not judge) inexact noise and random baselines on top.
    A student that claims to be exact (zero-sum noise) is judged too."""
    x = probe_inputs(desc, probes, seed)
    kw = dict(atol=atol, rtol=rtol, probes=probes, seed=seed, device=device, dtype=dtype)
    if progress:
        progress("verifying", 0, 2)
    teacher = run(desc, source.get, x, device, dtype)
    student = run(plan.model_after, mat.get, x, device, dtype)
    if progress:
        progress("verifying", 1, 2)
    actual = compare_outputs(teacher, student, **kw)
    exact_steps = exact_counterpart(steps)
    if [e.to_dict() for e in exact_steps] == [e.to_dict() for e in steps]:
        result = {"passed": actual.passed, "checked": "student", "exact": actual.to_dict(), "deviation": None}
    else:
        try:
            exact_plan = build_plan(desc, header, exact_steps, plan.seed)
        except StepError as e:
            result = {"passed": None, "checked": "nothing exact",
                      "note": f"no function-preserving counterpart: {e.message}", "exact": None,
                      "deviation": actual.to_dict()}
        else:
            exact = compare_outputs(teacher, run(exact_plan.model_after, Materializer(exact_plan, source).get, x,
                                                 device, dtype), **kw)
            if plan.function_preserving:  # zero-sum noise: the written student must be exact as well
                result = {"passed": exact.passed and actual.passed,
                          "checked": "exact counterpart (no noise) and the student (zero-sum noise is exact)",
                          "exact": exact.to_dict() if not exact.passed or actual.passed else actual.to_dict(),
                          "deviation": actual.to_dict()}
            else:
                result = {"passed": exact.passed,
                          "checked": "exact counterpart (no noise, function-preserving methods)",
                          "exact": exact.to_dict(), "deviation": actual.to_dict()}
    if progress:
        progress("verifying", 2, 2)
    return result


# ----------------------------------------------------------------------------- verify


def verify(teacher: str | Path, student: str | Path, *, model: ModelDescription | str | Path | None = None,
           student_model: ModelDescription | str | Path | None = None, device: str = "cpu", seed: int = 0,
           probes: int = 64, atol: float | None = None, rtol: float | None = None,
           verify_dtype: str | None = None, verify_mode: str = "auto") -> dict:
    """Compare two checkpoints' functions on seeded probes. Raises VerificationFailed on mismatch."""
    if Path(teacher).is_dir() or Path(student).is_dir():
        return _verify_hf(Path(teacher), Path(student), device=device, seed=seed, probes=probes, atol=atol, rtol=rtol,
                          verify_dtype=verify_dtype, verify_mode=verify_mode)
    if isinstance(model, (str, Path)):
        model = load_model_description(model)
    if isinstance(student_model, (str, Path)):
        student_model = load_model_description(student_model)
    with open_checkpoint(teacher) as t_src, open_checkpoint(student) as s_src:
        t_desc = resolve_model(t_src, model)
        s_desc = resolve_model(s_src, student_model)
        t_head, s_head = check_checkpoint(t_src, t_desc), check_checkpoint(s_src, s_desc)
        if list(t_desc.input_shape) != list(s_desc.input_shape):
            raise ModelError(f"the networks take different inputs: {t_desc.input_shape} vs {s_desc.input_shape}",
                             where=str(student))
        dtypes = [d for d, _ in [*t_head.values(), *s_head.values()]]
        dev, dtype = resolve_device(device), compute_dtype(dtypes, verify_dtype)
        d_atol, d_rtol = default_tolerances(dtypes + [dtype])
        atol = d_atol if atol is None else atol
        rtol = d_rtol if rtol is None else rtol
        x = probe_inputs(t_desc, probes, seed)
        c = compare_outputs(run(t_desc, t_src.get, x, dev, dtype), run(s_desc, s_src.get, x, dev, dtype),
                            atol=atol, rtol=rtol, probes=probes, seed=seed, device=dev, dtype=dtype)
        report = {"teacher": str(teacher), "student": str(student), "passed": c.passed, **c.to_dict(),
                  "params_teacher": t_desc.layout().num_parameters(),
                  "params_student": s_desc.layout().num_parameters()}
        if not c.passed:
            raise _verification_failed(c.to_dict(), student, report, grown=False)
        return report


def _verify_hf(teacher: Path, student: Path, *, device, seed, probes, atol, rtol, verify_dtype, verify_mode="auto") -> dict:
    if not (teacher.is_dir() and student.is_dir()):
        raise UserError("compare a Hugging Face directory with another directory", where=str(student))
    with _open_hf(teacher) as (_, t_arch, t_head), _open_hf(student) as (_, s_arch, s_head):
        pass
    if s_arch.hidden < t_arch.hidden or t_arch.vocab != s_arch.vocab:
        raise ModelError(f"the student (hidden_size {s_arch.hidden}, vocab {s_arch.vocab}) cannot be a grown copy of "
                         f"the teacher (hidden_size {t_arch.hidden}, vocab {t_arch.vocab})", where=str(student))
    dtypes = [d for d, _ in [*t_head.values(), *s_head.values()]]
    dtype = compute_dtype(dtypes, verify_dtype)
    d_atol, d_rtol = default_tolerances(dtypes + [dtype])
    atol, rtol = (d_atol if atol is None else atol), (d_rtol if rtol is None else rtol)
    c = hf_stream.compare(teacher, student, mode=verify_mode, vocab=t_arch.vocab,
                          max_len=min(t_arch.positions or 64, 64), probes=probes, seed=seed, atol=atol, rtol=rtol,
                          device=resolve_device(device), dtype=dtype)
    report = {"teacher": str(teacher), "student": str(student), "passed": c.passed, **c.to_dict(),
              "params_teacher": t_arch.num_parameters(set(t_head)), "params_student": s_arch.num_parameters(set(s_head))}
    if not c.passed:
        raise _verification_failed(c.to_dict(), student, report, grown=False)
    return report


# ----------------------------------------------------------------------------- inspect / validate


def growth_options(desc: ModelDescription) -> dict[str, dict[str, str]]:
    """For each linear/conv2d layer: can it be widened / deepened after exactly, and if not, why.
    Answered by planning the step itself, so it can never disagree with ``grow``."""
    out = {}
    for layer in desc.layers:
        if layer.type not in PRODUCERS:
            continue
        res = {}
        for kind, step in (("widen", {"widen": {"layer": layer.name, "factor": 2}}),
                           ("deepen", {"deepen": {"after": layer.name}})):
            try:
                build_plan(desc, None, [StepEntry.model_validate(step)], 0)
                res[kind] = "yes"
            except StepError as e:
                res[kind] = f"no: {e.short}"
        out[layer.name] = res
    return out


@contextlib.contextmanager
def _open_hf(src: str | Path):
    src = Path(src)
    with hf_io.open_hf_dir(src) as source:
        arch = arch_from_config(source.config, set(source.keys()), where=str(src / "config.json"))
        yield source, arch, check_hf_checkpoint(source, arch)


def hf_growth_options(config: dict, arch, header) -> dict[str, str]:
    """Can each dimension grow exactly (and if not, why)? Answered by planning the step."""
    from .hf import HFStepEntry

    trials = {"intermediate_size": {"widen": {"dim": "intermediate_size", "factor": 2}},
              "hidden_size": {"widen": {"dim": "hidden_size", "factor": 2}},
              "num_attention_heads": {"widen": {"dim": "num_attention_heads", "factor": 2}},
              "num_key_value_heads": {"widen": {"dim": "num_key_value_heads", "factor": 2}},
              "num_hidden_layers": {"deepen": {"layers": arch.layers + 1}}}
    out = {}
    for name, step in trials.items():
        try:
            build_hf_plan(config, arch, header, [HFStepEntry.model_validate(step)], 0)
            out[name] = "yes"
        except StepError as e:
            out[name] = "no: " + e.message.split(": ", 1)[-1]
    return out


def _inspect_hf(src: Path) -> dict:
    with _open_hf(src) as (source, arch, header):
        lineage = source.metadata.get(META_LINEAGE)
        return {"checkpoint": str(src), "family": arch.family.name, "model_type": source.config.get("model_type"),
                "sizes": {"hidden_size": arch.hidden, "intermediate_size": arch.intermediate,
                          "num_hidden_layers": arch.layers, "num_attention_heads": arch.heads,
                          "num_key_value_heads": arch.kv_heads, "head_dim": arch.head_dim, "vocab_size": arch.vocab,
                          "tie_word_embeddings": arch.tied},
                "params": arch.num_parameters(set(header)), "tensors": len(header),
                "dtypes": sorted({str(d).removeprefix("torch.") for d, _ in header.values()}),
                "weight_files": source.weight_files(),
                "growth": hf_growth_options(source.config, arch, header),
                "lineage": json.loads(lineage) if lineage else None}


def inspect(src: str | Path, *, model: ModelDescription | str | Path | None = None) -> dict:
    if Path(src).is_dir():
        if model is not None:
            raise UserError("--model describes MLP/CNN checkpoints; a Hugging Face directory is described by its "
                            "config.json", where=str(src), hint="Drop --model.")
        return _inspect_hf(Path(src))
    if isinstance(model, (str, Path)):
        model = load_model_description(model)
    with open_checkpoint(src) as source:
        tensors = [{"key": k, "shape": list(source.shape(k)), "dtype": str(source.dtype(k)).removeprefix("torch.")}
                   for k in source.keys()]
        report: dict = {"checkpoint": str(src), "tensors": tensors,
                        "n2n_version": source.metadata.get(META_VERSION)}
        for key, name in ((META_LINEAGE, "lineage"), (META_VERIFICATION, "verification")):
            if key in source.metadata:
                try:
                    report[name] = json.loads(source.metadata[key])
                except json.JSONDecodeError:
                    report[name] = source.metadata[key]
        desc = model if model is not None else model_from_metadata(source)
        if desc is None:
            report["model"] = None
            return report
        check_checkpoint(source, desc)
        layout, options = desc.layout(), growth_options(desc)
        layers = []
        for i, layer in enumerate(desc.layers):
            (ins, outs) = layout.layer_io[i]
            params = layout.num_parameters(layer.name) if layer.parametric else 0
            layers.append({"index": i, "type": layer.type, "name": getattr(layer, "name", None),
                           "input_shape": list(ins), "output_shape": list(outs), "params": params,
                           **options.get(getattr(layer, "name", None), {})})
        report.update(model=json.loads(desc.to_json()), layers=layers, params=layout.num_parameters())
        return report


def validate(spec_path: str | Path, *, checkpoint: str | Path | None = None,
             model: ModelDescription | str | Path | None = None) -> dict:
    """Check a spec: every schema problem and every step problem, reported at once, by line."""
    if isinstance(model, (str, Path)):
        model = load_model_description(model)
    try:
        spec, spec_model = load_spec(spec_path)
    except SpecError as e:
        if not e.problems:
            raise
        # the schema has problems: plan the steps that are valid on their own, to report theirs too
        numbers, entries, desc, node = lenient_steps(spec_path)
        extra = _step_problems(spec_path, entries, numbers, model or desc, checkpoint, node, 0) if entries else []
        problems = _by_line(e.problems + extra)
        raise SpecError(f"invalid growth spec ({len(problems)} problem{'s' * (len(problems) > 1)})",
                        where=str(spec_path), problems=problems) from None
    numbers = list(range(len(spec.steps)))
    node = lenient_steps(spec_path)[3]
    if checkpoint is None and (isinstance(spec, HFGrowthSpec) or (model or spec_model) is None):
        return {"spec": str(spec_path), "valid": True, "checked": "schema only",
                "note": "pass --checkpoint (or, for MLP/CNN specs, --model) to check the steps too"}
    problems, plan = _step_problems(spec_path, spec.steps, numbers, model or spec_model, checkpoint, node, spec.seed,
                                    return_plan=True)
    if problems:
        raise SpecError(f"{len(problems)} step{'s' * (len(problems) > 1)} cannot be applied", where=str(spec_path),
                        problems=_by_line(problems))
    return {"spec": str(spec_path), "valid": True, "checked": "schema and steps", "plan": plan.to_dict()}


def _step_problems(spec_path, entries, numbers, desc, checkpoint, node, seed, return_plan=False):
    """Plan ``entries`` (collecting problems) against the checkpoint or the description."""
    from .hf import HFStepEntry

    if entries and isinstance(entries[0], HFStepEntry):
        if checkpoint is None:
            return ([], None) if return_plan else []
        with _open_hf(checkpoint) as (source, arch, header):
            plan = build_hf_plan(source.config, arch, header, entries, seed, collect=True, numbers=numbers)
    else:
        header = None
        if checkpoint is not None:
            with open_checkpoint(checkpoint) as source:
                desc = resolve_model(source, desc)
                header = check_checkpoint(source, desc)
        if desc is None:
            return ([], None) if return_plan else []
        plan = build_plan(desc, header, entries, seed, collect=True, numbers=numbers)
    problems = [f"line {step_line(node, n)}: {msg}" if step_line(node, n) else msg for n, msg in plan.problems]
    return (problems, plan) if return_plan else problems


def _by_line(problems: list[str]) -> list[str]:
    """Problems in file order (those without a line keep their place at the end)."""
    def key(p: str):
        head = p.split(":", 1)[0]
        return (0, int(head[5:])) if head.startswith("line ") and head[5:].isdigit() else (1, 0)
    return sorted(problems, key=key)
