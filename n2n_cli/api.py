"""The n2n library API: grow, verify, inspect, validate. Usable from Python without the CLI.

    from n2n_cli import api
    report = api.grow("specs/mnist-cnn-grow.yaml", "teacher.safetensors", "student.safetensors")
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib.util
import json
from pathlib import Path
from typing import Callable

import torch
import yaml

from . import __version__, fsutil, hf_io, hf_st, hf_stream, hf_verify, optim_state, outputs
from .checkpoints import TensorSource, atomic_output, check_output_path, open_checkpoint, write_safetensors
from .errors import ModelError, SpecError, StepError, UserError, VerificationFailed
from .execute import Materializer, NonFinite
from .phases import PhaseClock
from .layers import PRODUCERS
from .model import ModelDescription
from .seq_plan import Plan, build_plan, exact_counterpart
from .certify import (META_LINEAGE, META_VERIFICATION, META_VERSION, Certificate, certify_file, certify_hf,
                      describe_difference, grown_lineage, inexact_methods, read_lineage)
from .certify import none as certify_none
from .certify import summary_of as certificate_summary
from .hf import HFGrowthSpec
from .hf_plan import build_hf_plan
from .spec import (GrowthSpec, StepEntry, load_model_description, load_spec, parse_model_description,
                   spec_from_steps)
from .sources import (META_MODEL, check_checkpoint, check_finite, model_from_metadata,  # noqa: F401
                      open_hf as _open_hf, resolve_model)
from .validation import validate  # noqa: F401 (part of the API; light, so it lives apart)
from .verify import (compare_outputs, compute_dtype, default_tolerances, probe_inputs, resolve_device, run,
                     user_tolerance, verification_facts, verification_failed, verification_settings)

Progress = Callable[[str, int, int], None]  # (phase, done, total)

__all__ = ["grow", "verify", "inspect", "validate", "spec_from_steps", "model_from_metadata", "certificate_summary"]

#: what an MLP/CNN verification proves: the description's network, which is the user's only if
#: the description matches their module (a tanh described as relu still passes)
DESCRIPTION_NOTE = ("the network the model description describes, run by n2n, not your own nn.Module: if they "
                    "differ, check with your module (README: 'Check with your own module')")



# ----------------------------------------------------------------------------- checkpoint + model


# ----------------------------------------------------------------------------- grow


def grow(spec: GrowthSpec | str | Path, src: str | Path, out: str | Path, *, model: ModelDescription | str | Path | None = None,
         device: str = "cpu", seed: int | None = None, probes: int | None = None, atol: float | None = None,
         rtol: float | None = None, dry_run: bool = False, force: bool = False, verify: bool | None = None,
         max_shard_size: int | str = "5GB", verify_dtype: str | None = None, progress: Progress | None = None,
         model_code: str | None = None, model_args: dict | None = None, example_input=None,
         verify_mode: str = "auto", optimizer_state: str | Path | None = None,
         optimizer_state_out: str | Path | None = None) -> dict:
    """Grow ``src`` by ``spec`` into ``out`` (a .safetensors file, or a directory when ``src`` is a
    Hugging Face model directory). Returns the report (a dict).

    ``optimizer_state`` (a ``torch.save(optimizer.state_dict())`` file of the teacher's Adam/AdamW,
    parameters numbered in ``model.parameters()`` order) is grown along the same plan and written
    to ``optimizer_state_out`` after the checkpoint (see ``n2n_cli.optim_state``).

    ``model_code`` (FILE.py:NAME or package.module:NAME, with ``model_args``): the model is built by
    the user's own code (importing it runs it); also taken from the spec's ``model_code:`` or
    from SRC's metadata when SRC was grown that way.

    Raises a ``UserError`` for bad input and ``VerificationFailed`` when the grown network
    does not compute the teacher's function; in both cases nothing is written.
    """
    resolve_device(device)  # a dry run too: it stands for the real run, which would fail there
    # --- models built by the user's own code (issue 7)
    from . import graph_api

    code, graph_spec = graph_api.model_code_of(spec, Path(src), model_code, model_args, example_input)
    if code is not None:
        if model is not None:
            raise UserError("give either --model (a sequential description) or --model-code, not both")
        if graph_spec is None:
            graph_spec, _ = load_spec(spec)
        return graph_api.grow(graph_spec, Path(src), Path(out), code, device=device, seed=seed, probes=probes,
                              atol=atol, rtol=rtol, dry_run=dry_run, force=force, verify=verify,
                              verify_dtype=verify_dtype, progress=progress, optimizer_state=optimizer_state,
                              optimizer_state_out=optimizer_state_out)
    # ---
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
                        verify_dtype=verify_dtype, progress=progress, verify_mode=verify_mode,
                        optimizer_state=optimizer_state, optimizer_state_out=optimizer_state_out)
    if isinstance(model, (str, Path)):
        model = load_model_description(model)
    warnings = _output_warnings(lambda: check_output_path(out_path, [src], force), dry_run)
    with open_checkpoint(src) as source, _hashing(source, not dry_run) as teacher_sha256:
        desc = resolve_model(source, model, spec_model)
        previous = read_lineage(source.metadata, str(src)) or []
        header = check_checkpoint(source, desc)
        check_finite(source, header, progress)
        seed = spec.seed if seed is None else seed
        plan = build_plan(desc, header, spec.steps, seed)
        probes, atol, rtol, user_tol = verification_settings(spec, header, plan, probes=probes, atol=atol, rtol=rtol,
                                                 verify_dtype=verify_dtype)
        report = {"n2n_version": __version__, "source": str(src), "output": str(out_path), "dry_run": dry_run,
                  "plan": plan.to_dict(), "model": json.loads(plan.model_after.to_json()), "written": False,
                  "verified_against": DESCRIPTION_NOTE, **({"warnings": warnings} if warnings else {})}
        opt = optim_state.prepare(optimizer_state, optimizer_state_out, plan, header, force,
                                    lambda: (optim_state.sequential_names(desc),
                                             optim_state.sequential_names(plan.model_after)))
        if opt is not None:
            report["optimizer_state"] = optim_state.summary(*opt)
        if dry_run:
            return report
        outputs.before_writing(out_path, hf_io.planned_bytes(plan.entries()))
        mat = Materializer(plan, source, device=resolve_device(device))
        do_verify = spec.verify.enabled if verify is None else verify
        if do_verify:
            report["verification"] = _verify_plan(spec.steps, plan, source, desc, header, mat, probes=probes,
                                                  seed=seed, atol=atol, rtol=rtol, device=resolve_device(device),
                                                  dtype=compute_dtype([d for d, _ in header.values()], verify_dtype),
                                                  progress=progress)
            if report["verification"]["passed"] is False:
                raise verification_failed(_failed_comparison(report["verification"]), src, report, grown=True,
                                           user_tol=user_tol)
        else:
            report["verification"] = {"passed": None, "skipped": True}
        metadata = {
            "format": "pt",
            META_VERSION: __version__,
            META_MODEL: plan.model_after.to_json(),
            META_LINEAGE: json.dumps(grown_lineage(previous, teacher_sha256.result(), spec, plan), sort_keys=True,
                                      separators=(",", ":")),
            META_VERIFICATION: json.dumps(verification_facts(report["verification"]), sort_keys=True,
                                          separators=(",", ":")),
        }
        entries = plan.entries()
        with atomic_output(out_path, force=force) as tmp:
            done = iter(range(1, len(entries) + 1))
            write_safetensors(tmp, entries, mat.get, metadata, name=str(out_path),
                              on_tensor=(lambda k: progress("writing", next(done), len(entries))) if progress else None)
        report["written"] = True
        if opt is not None:
            optim_state.save_state(opt[0], optimizer_state_out, force=force)
            report["optimizer_state"]["written"] = str(optimizer_state_out)
        return report


def _grow_hf(spec: HFGrowthSpec, src: Path, out: Path, *, device, seed, probes, atol, rtol, dry_run, force, verify,
             max_shard_size, verify_dtype, progress, verify_mode="auto", optimizer_state=None,
             optimizer_state_out=None) -> dict:
    warnings = _output_warnings(lambda: hf_io.check_output_dir(out, src, force), dry_run)
    shard_bytes = hf_io.parse_size(max_shard_size)
    clock = PhaseClock()
    do_verify = spec.verify.enabled if verify is None else verify
    # transformers' config check: in line for a dry run; else in a thread (importing transformers
    # takes seconds) beside the writing, awaited before verifying and before the output is moved
    # into place, so a config it rejects still leaves nothing written
    with _open_hf(src) as (source, arch, header), _hashing(source, not dry_run) as teacher_sha256, \
            _config_checks(background=not dry_run) as (check_later, configs_ok):
        previous = read_lineage(source.metadata, str(src)) or []
        if dry_run:
            check_finite(source, header, progress)  # a real run checks each tensor as it reads it
        clock.mark("check")
        seed = spec.seed if seed is None else seed
        check_later(hf_verify.check_config, source.config, grown=False, where=str(src / "config.json"))
        plan = build_hf_plan(source.config, arch, header, spec.steps, seed)
        disagreement = hf_io.dtype_disagreement(source.config, header)
        if disagreement:
            warnings.append(disagreement)
        budget = probes is None and "probes" not in spec.verify.model_fields_set  # hf_stream.probe_budget
        probes, atol, rtol, user_tol = verification_settings(spec, header, plan, probes=probes, atol=atol, rtol=rtol,
                                                 verify_dtype=verify_dtype)
        check_later(hf_verify.check_config, plan.new_config())
        st = hf_st.plan_modules(src, plan)  # a sentence-transformers directory: its module tree grows too
        clock.mark("plan")
        report = {"n2n_version": __version__, "source": str(src), "output": str(out), "dry_run": dry_run,
                  "plan": plan.to_dict(), "written": False, **({"warnings": warnings} if warnings else {})}
        if st is not None:
            report["sentence_transformers"] = st.to_dict()
        opt = optim_state.prepare(optimizer_state, optimizer_state_out, plan, header, force,
                                    lambda: (optim_state.hf_names(source.config, header),
                                             optim_state.hf_names(plan.new_config(), plan.recipes)))
        if opt is not None:
            report["optimizer_state"] = optim_state.summary(*opt)
        if dry_run:
            return report
        if do_verify and importlib.util.find_spec("transformers") is None:
            hf_verify.require_transformers()  # refused before writing (imported in a thread beside the writing)
        spec_used = spec.model_copy(update={"seed": seed, "steps": [  # the mapping used, recorded
            e.model_copy(update={"widen": e.widen.model_copy(update={"mapping": plan.mapping_of[i]})})
            if i in plan.mapping_of else e for i, e in enumerate(spec.steps)]})
        # the teacher's digest is still being computed (a thread reads the input beside the writer):
        # each shard's header gets a placeholder of the same length, patched once the digest is known
        metadata = {"format": "pt", META_VERSION: __version__,
                    META_LINEAGE: json.dumps(grown_lineage(previous, hf_io.PENDING_SHA256, spec_used, plan), sort_keys=True,
                                             separators=(",", ":"))}
        clock.mark("hash")
        entries = plan.entries()
        outputs.before_writing(out, hf_io.planned_bytes(entries, src) + (st.written_bytes() if st else 0))
        done = iter(range(1, len(entries) + 1))
        # the teacher's side of the blockwise comparison runs in a thread beside the writing
        probe_kw = dict(vocab=arch.vocab, max_len=min(arch.positions or 64, 64), probes=probes, seed=seed,
                        device=resolve_device(device), dtype=compute_dtype([d for d, _ in header.values()], verify_dtype),
                        budget=budget) if do_verify else {}
        with fsutil.temp_beside(out, "stage", directory=True) as holder, \
                (hf_stream.teacher_ahead(src, plan.new_config(), mode=verify_mode, after=configs_ok, **probe_kw) if do_verify
                 else contextlib.nullcontext()) as ahead:
            staged = holder / out.name
            mat = Materializer(plan, source, check=True, raw=True, device=resolve_device(device))  # checked as read; copies as raw bytes
            try:
                hf_io.write_hf_dir(staged, entries, mat.get, config=plan.new_config(),
                                   metadata=metadata, src_dir=src, max_shard_size=shard_bytes,
                                   extra_files={"n2n_spec.yaml": yaml.safe_dump(spec_used.model_dump(mode="json",
                                                                                                    exclude_none=True),
                                                                                sort_keys=False)},
                                   on_tensor=(lambda k: progress("writing", next(done), len(entries))) if progress else None,
                                   replace=False, name=out)
                mat.finish()
            except NonFinite:
                mat.checked.clear()
            finally:
                mat.close()
            check_finite(source, [k for k in header if k not in mat.checked])  # the rest (all, after a bad one)
            configs_ok()
            hf_io.patch_headers(staged, hf_io.PENDING_SHA256, teacher_sha256.result(), out)
            if st is not None:
                hf_st.write_modules(st, staged, out)
            clock.mark("write")
            source.close()  # unmap the input (reopened on demand): its pages would count in RSS while verifying
            if do_verify:
                if progress:
                    progress("verifying", 0, 1)
                dtype = probe_kw["dtype"]
                c = hf_stream.compare(src, staged, mode=verify_mode, progress=progress, atol=atol, rtol=rtol,
                                      grown=True, ahead=ahead, **probe_kw)
                if progress:
                    progress("verifying", 1, 1)
                if plan.function_preserving:
                    v = {"passed": c.passed, "exact_student": True, "checked": "student", "exact": c.to_dict(),
                         "deviation": None}
                else:
                    v = {"passed": None, "exact_student": False, "checked": "nothing exact", "exact": None,
                         "deviation": {**c.to_dict(), "passed": None},
                         "note": "approximate growth (allow_approximate): the deviation is measured, not judged"}
                if st is not None:
                    v["sentence_embeddings"] = _verify_st(st.normalized, src, staged, v, atol=c.atol, rtol=c.rtol,
                                                          device=resolve_device(device), dtype=dtype, seed=seed)
                report["verification"] = v
                clock.mark("verify")
                report["timings"] = clock.seconds
                if v["passed"] is False:
                    failed = v["exact"] if v["exact"]["passed"] is False else v["sentence_embeddings"]
                    raise verification_failed(failed, src, report, grown=True, user_tol=user_tol)
            else:
                report["verification"] = {"passed": None, "skipped": True}
            hf_io.write_text(staged / "n2n_verification.json",
                             json.dumps(verification_facts(report["verification"]), indent=2, sort_keys=True) + "\n",
                             out)
            hf_io.move_into_place(staged, out, replace=force)
            clock.mark("move")
        report["written"] = True
        if opt is not None:
            optim_state.save_state(opt[0], optimizer_state_out, force=force)
            report["optimizer_state"]["written"] = str(optimizer_state_out)
        report["timings"] = clock.seconds
        return report


def _verify_st(normalized: bool | None, teacher: Path, student: Path, v: dict, **kw) -> dict:
    """Sentence embeddings of both directories with sentence-transformers (when installed): the
    student's, de-tiled, must be the teacher's; without sentence-transformers, a note.
    ``normalized``: a Normalize follows the tiled output (None: told by the student's norms)."""
    if not hf_st.installed():
        return {"passed": None, "skipped": True,
                "note": "sentence-transformers is not installed: the transformer's hidden states were verified, "
                        "the module tree (pooling, dense, normalize) was not run"}
    e = hf_st.compare_embeddings(teacher, student, normalized=normalized, **kw)
    if v["passed"] is None:  # approximate growth: measured, not judged
        e["passed"] = None
    elif not e["passed"]:
        v["passed"] = False
    return e


def _output_warnings(check: Callable[[], object], dry_run: bool) -> list[str]:
    """Run the output check: a real run raises; a dry run reports what the real run would refuse
    (e.g. an existing OUT without --force) as a warning and goes on planning."""
    if not dry_run:
        check()
        return []
    try:
        check()
    except UserError as e:
        return [f"a real run would refuse the output: {e.render()}"]
    return []


def _failed_comparison(v: dict) -> dict:
    """The comparison that failed in a verification result (the student's or the exact counterpart's)."""
    for key in ("exact", "exact_counterpart", "deviation"):
        if isinstance(v.get(key), dict) and v[key].get("passed") is False:
            return v[key]
    return v.get("exact") or v.get("exact_counterpart") or v["deviation"]


@contextlib.contextmanager
def _config_checks(background: bool):
    """Yields ``(check_later, wait)``: ``check_later(fn, *args)`` runs the check now, or with
    ``background`` in a worker thread; ``wait()`` raises the first check's error. If the body
    fails with an unexpected error, a config error found meanwhile is raised instead (it explains
    the failure: n2n plans only from configs transformers accepts)."""
    if not background:
        yield (lambda fn, *a, **kw: fn(*a, **kw)), (lambda: None)
        return
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    futures: list[concurrent.futures.Future] = []

    def wait():
        for f in futures:
            f.result()

    try:
        yield (lambda fn, *a, **kw: futures.append(pool.submit(fn, *a, **kw))), wait
    except UserError:
        raise
    except Exception:
        wait()
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


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
    unjudged = {**actual.to_dict(), "passed": None}  # an inexact student's deviation: measured, not judged
    inexact_note = ("the written student is NOT function-preserving ({}): its deviation is measured, not judged; "
                    "'exact_counterpart' is the same growth without noise / with the function-preserving methods")
    if [e.to_dict() for e in exact_steps] == [e.to_dict() for e in steps]:
        result = {"passed": actual.passed, "exact_student": True, "checked": "student", "exact": actual.to_dict(),
                  "deviation": None}
    else:
        methods = ", ".join(inexact_methods(plan)) or "noise"
        try:
            exact_plan = build_plan(desc, header, exact_steps, plan.seed)
        except StepError as e:
            result = {"passed": None, "exact_student": False, "checked": "nothing exact",
                      "note": f"no function-preserving counterpart: {e.message}", "exact": None,
                      "exact_counterpart": None, "deviation": unjudged}
        else:
            exact = compare_outputs(teacher, run(exact_plan.model_after, Materializer(exact_plan, source).get, x,
                                                 device, dtype), **kw)
            if plan.function_preserving:  # zero-sum noise: the written student must be exact as well
                result = {"passed": exact.passed and actual.passed, "exact_student": True,
                          "checked": "exact counterpart (no noise) and the student (zero-sum noise is exact)",
                          "exact": exact.to_dict() if not exact.passed or actual.passed else actual.to_dict(),
                          "exact_counterpart": exact.to_dict(), "deviation": actual.to_dict()}
            else:
                result = {"passed": None, "exact_student": False,
                          "checked": "exact counterpart only (no noise, function-preserving methods)",
                          "exact": None, "exact_counterpart": exact.to_dict(), "deviation": unjudged,
                          "note": inexact_note.format(methods)}
                if not exact.passed:  # the counterpart is n2n's exact transform: its failure is a failure
                    result["passed"] = False
    if progress:
        progress("verifying", 2, 2)
    return result


# ----------------------------------------------------------------------------- verify


def verify(teacher: str | Path, student: str | Path, *, model: ModelDescription | str | Path | None = None,
           student_model: ModelDescription | str | Path | None = None, device: str = "cpu", seed: int = 0,
           probes: int | None = None, atol: float | None = None, rtol: float | None = None,
           verify_dtype: str | None = None, progress: Progress | None = None, model_code: str | None = None,
           model_args: dict | None = None, example_input=None, verify_mode: str = "auto") -> dict:
    """Check that ``student`` is ``teacher`` grown: the certificate (when the student records its
    growth: every tensor recomputed from the teacher and compared bitwise) and the functional check
    on seeded probes. Raises VerificationFailed (exit 3) when either fails, TeacherMismatch (exit 2)
    when the teacher is not the one the student was grown from, ModelError (exit 2) when the
    architectures cannot be teacher and grown student. ``model_code`` (or the student's recorded
    n2n_model_code): both run through the user's module. ``probes``: 64 when not given (a Hugging
    Face model over 1e8 parameters then runs on the documented probe budget, as grow does)."""
    clock = PhaseClock()
    result = _verify(teacher, student, model=model, student_model=student_model, device=device, seed=seed,
                     probes=probes, atol=atol, rtol=rtol, verify_dtype=verify_dtype, progress=progress,
                     model_code=model_code, model_args=model_args, example_input=example_input,
                     verify_mode=verify_mode, clock=clock)
    clock.mark("verify")
    return {**result, "timings": clock.seconds}


def _verify(teacher, student, *, model, student_model, device, seed, probes, atol, rtol, verify_dtype, progress,
            model_code, model_args, example_input, verify_mode, clock: PhaseClock) -> dict:
    """:func:`verify`'s work; ``clock`` marks the certificate's end (the caller marks the rest)."""
    from . import graph_api

    budget, probes = probes is None, probes or 64

    code, _ = graph_api.model_code_of(None, Path(student), model_code, model_args, example_input) \
        if not Path(student).is_dir() else (None, None)
    if code is not None:
        return graph_api.verify(Path(teacher), Path(student), code, device=device, seed=seed, probes=probes,
                                atol=atol, rtol=rtol, verify_dtype=verify_dtype)
    if Path(teacher).is_dir() or Path(student).is_dir():
        return _verify_hf(Path(teacher), Path(student), device=device, seed=seed, probes=probes, atol=atol, rtol=rtol,
                          verify_dtype=verify_dtype, progress=progress, verify_mode=verify_mode, budget=budget,
                          clock=clock)
    if isinstance(model, (str, Path)):
        model = load_model_description(model)
    if isinstance(student_model, (str, Path)):
        student_model = load_model_description(student_model)
    with open_checkpoint(teacher) as t_src, open_checkpoint(student) as s_src:
        lineage = read_lineage(s_src.metadata, str(student))
        t_sha = t_src.sha256() if lineage else None
        recorded = _recorded_model(lineage, t_sha, str(student)) if model is None and lineage else None
        t_desc = resolve_model(t_src, model, recorded, spec_too=False)
        s_desc = resolve_model(s_src, student_model, flag="--student-model", spec_too=False)
        t_head, s_head = check_checkpoint(t_src, t_desc), check_checkpoint(s_src, s_desc)
        _check_architectures(t_desc, s_desc, str(student))
        if lineage:
            cert = certify_file(t_src, t_desc, s_src, s_desc, lineage, t_sha, progress)
        else:
            cert = certify_none("the student records no growth (n2n lineage): probe check only")
        clock.mark("certificate")
        dtypes = [d for d, _ in [*t_head.values(), *s_head.values()]]
        dev, dtype = resolve_device(device), compute_dtype(dtypes, verify_dtype)
        rounding = cert.rounding if cert.rounding is not None else differing_dtypes(t_src, s_src)
        d_atol, d_rtol = default_tolerances([dtype, *rounding])
        user_tol = user_tolerance(atol, rtol)
        atol = d_atol if atol is None else atol
        rtol = d_rtol if rtol is None else rtol
        x = probe_inputs(t_desc, probes, seed)
        c = compare_outputs(run(t_desc, t_src.get, x, dev, dtype), run(s_desc, s_src.get, x, dev, dtype),
                            atol=atol, rtol=rtol, probes=probes, seed=seed, device=dev, dtype=dtype)
        return _verify_result(teacher, student, c.to_dict(), cert, t_desc.layout().num_parameters(),
                              s_desc.layout().num_parameters(), user_tol)


def _recorded_model(lineage: list[dict], teacher_sha256: str, where: str) -> ModelDescription | None:
    """The teacher's description as the student's lineage recorded it, for the entry grown from
    this very teacher (same sha256), so that `n2n verify TEACHER STUDENT` needs no --model."""
    for i, entry in reversed(list(enumerate(lineage))):
        if entry.get("teacher_sha256") == teacher_sha256 and entry.get("model_before") is not None:
            return parse_model_description(entry["model_before"], where=f"{where} (metadata '{META_LINEAGE}' "
                                                                        f"entry {i + 1}: model_before)")
    return None


def _check_architectures(t_desc: ModelDescription, s_desc: ModelDescription, where: str) -> None:
    """Growth keeps the input, the output and every named layer (widened or not): anything else
    is a different architecture, not a grown copy (exit 2, saying what differs)."""
    problems = []
    if list(t_desc.input_shape) != list(s_desc.input_shape):
        problems.append(f"input shape {list(s_desc.input_shape)}, the teacher's is {list(t_desc.input_shape)}")
    t_out, s_out = list(t_desc.shapes()[-1]), list(s_desc.shapes()[-1])
    if t_out != s_out:
        problems.append(f"output shape {s_out}, the teacher's is {t_out}")
    s_layers = {layer.name: layer for layer in s_desc.layers if layer.parametric}
    for layer in t_desc.layers:
        if not layer.parametric:
            continue
        other = s_layers.get(layer.name)
        if other is None:
            problems.append(f"no layer '{layer.name}' (the teacher's {layer.type})")
        elif other.type != layer.type:
            problems.append(f"layer '{layer.name}' is a {other.type}, the teacher's is a {layer.type}")
    if problems:
        raise ModelError("the architectures differ: the student cannot be a grown copy of the teacher", where=where,
                         problems=problems, hint="Compare a teacher with a student grown from it (n2n keeps the "
                                                 "input, the output and every layer name).")


def differing_dtypes(t_src: TensorSource, s_src: TensorSource) -> list[torch.dtype]:
    """Dtypes of the student's floating tensors that are not bitwise copies of the teacher's
    (same key): only those can carry rounding into the comparison."""
    t_keys, out = set(t_src.keys()), set()
    for key in s_src.keys():
        d = s_src.dtype(key)
        if not d.is_floating_point or d in out:
            continue
        if key in t_keys and t_src.dtype(key) == d and tuple(t_src.shape(key)) == tuple(s_src.shape(key)) \
                and torch.equal(t_src.get(key), s_src.get(key)):
            continue
        out.add(d)
    return sorted(out, key=str)


def _verify_result(teacher, student, c: dict, cert: Certificate, params_t: int, params_s: int,
                   user_tol: str | None) -> dict:
    """``verify``'s report: ``verification`` has the keys of ``grow``'s, plus the certificate; the
    probe comparison's fields stay at the top level too (compatibility)."""
    if cert.status == "reproduced":
        v = {"passed": False, "exact_student": False, "checked": "certificate and probes", "exact": None,
             "deviation": {**c, "passed": None}, "certificate": cert.to_dict(),
             "note": f"reproduced bitwise from the teacher by its recorded growth, which is NOT function-preserving "
                     f"(method {', '.join(cert.methods)})"}
    else:
        v = {"passed": bool(c["passed"] and cert.passed is not False), "exact_student": cert.status == "pass" or None,
             "checked": "certificate and probes" if cert.status != "none" else "probes only (no lineage)",
             "exact": c, "deviation": None, "certificate": cert.to_dict()}
    report = {"teacher": str(teacher), "student": str(student), **c, "passed": v["passed"],
              "params_teacher": params_t, "params_student": params_s, "verification": v}
    if cert.status == "fail":
        probe = "PASS" if c["passed"] else "FAIL"
        raise VerificationFailed(
            f"the student is not what its recorded growth gives from this teacher: certificate FAIL: "
            f"{describe_difference(cert.difference)} (probe check: {probe}, max abs error {c['max_abs_error']:.3g})",
            where=str(student), report=report,
            hint="The student was changed after it was grown (or written by something else). Re-grow it.")
    if cert.status == "reproduced":
        raise VerificationFailed(
            f"the student does not compute the teacher's function: it is reproduced bitwise by its recorded "
            f"growth, which is NOT function-preserving (method {', '.join(cert.methods)}): deviation max abs error "
            f"{c['max_abs_error']:.3g}, max rel error {c['max_rel_error']:.3g}", where=str(student), report=report,
            hint="Expected for a baseline (random-pad, random-init, independent noise); nothing is wrong with the file.")
    if not c["passed"]:
        raise verification_failed(c, student, report, grown=False, user_tol=user_tol)
    return report


def _verify_hf(teacher: Path, student: Path, *, device, seed, probes, atol, rtol, verify_dtype, progress=None,
               verify_mode="auto", budget: bool = False, clock: PhaseClock) -> dict:
    if not (teacher.is_dir() and student.is_dir()):
        raise UserError("compare a Hugging Face directory with another directory", where=str(student))
    with _open_hf(teacher) as (t_src, t_arch, t_head), _open_hf(student) as (s_src, s_arch, s_head):
        if s_arch.hidden < t_arch.hidden or t_arch.vocab != s_arch.vocab:
            raise ModelError(f"the student (hidden_size {s_arch.hidden}, vocab {s_arch.vocab}) cannot be a grown copy "
                             f"of the teacher (hidden_size {t_arch.hidden}, vocab {t_arch.vocab}): the architectures "
                             "differ", where=str(student))
        lineage = read_lineage(s_src.metadata, str(student))
        upcycled = any("upcycle" in step for e in lineage or [] for step in e.get("steps") or [] if isinstance(step, dict))
        if t_arch.family.name != s_arch.family.name and not upcycled:  # an upcycle turns a dense model into a MoE
            raise ModelError(f"the architectures differ: the student is a {s_arch.family.name} model, the teacher a "
                             f"{t_arch.family.name} model", where=str(student))
        if lineage:
            cert = certify_hf(t_src, t_arch, t_head, s_src, lineage, t_src.sha256(), progress)
        else:
            cert = certify_none("the student records no growth (n2n lineage): probe check only")
        clock.mark("certificate")
        rounding = cert.rounding if cert.rounding is not None else differing_dtypes(t_src, s_src)
    dtypes = [d for d, _ in [*t_head.values(), *s_head.values()]]
    dtype = compute_dtype(dtypes, verify_dtype)
    d_atol, d_rtol = default_tolerances([dtype, *rounding])
    user_tol = user_tolerance(atol, rtol)
    atol, rtol = (d_atol if atol is None else atol), (d_rtol if rtol is None else rtol)
    c = hf_stream.compare(teacher, student, mode=verify_mode, vocab=t_arch.vocab,
                          max_len=min(t_arch.positions or 64, 64), probes=probes, seed=seed, atol=atol, rtol=rtol,
                          device=resolve_device(device), dtype=dtype, budget=budget, progress=progress).to_dict()
    if hf_st.read_modules(teacher) is not None and hf_st.read_modules(student) is not None:
        # sentence-transformers directories: what users consume is the embedding after pooling,
        # Dense and Normalize (which the hidden states alone do not check), as grow compares it
        e = _verify_st(None, teacher, student, c, atol=atol, rtol=rtol,
                       device=resolve_device(device), dtype=dtype, seed=seed)
        c["sentence_embeddings"] = e
        if e.get("passed") is False:
            c["max_abs_error"] = max(c["max_abs_error"], e["max_abs_error"])
            c["max_rel_error"] = max(c["max_rel_error"], e["max_rel_error"])
    return _verify_result(teacher, student, c, cert, t_arch.num_parameters(set(t_head)),
                          s_arch.num_parameters(set(s_head)), user_tol)


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


def hf_growth_options(config: dict, arch, header) -> dict[str, str]:
    """Can each dimension grow exactly (and if not, why)? Answered by planning the step."""
    from .hf import HFStepEntry

    trials = {"intermediate_size": {"widen": {"dim": "intermediate_size", "factor": 2}},
              "hidden_size": {"widen": {"dim": "hidden_size", "factor": 2}},
              "num_attention_heads": {"widen": {"dim": "num_attention_heads", "factor": 2}},
              "num_key_value_heads": {"widen": {"dim": "num_key_value_heads", "factor": 2}},
              "num_hidden_layers": {"deepen": {"layers": arch.layers + 1}}}
    if not arch.experts:  # dense to mixture of experts
        trials["upcycle"] = {"upcycle": {"experts": 8, "top_k": 2}}
    out = {}
    for name, step in trials.items():
        try:
            build_hf_plan(config, arch, header, [HFStepEntry.model_validate(step)], 0)
            out[name] = "yes"
            if name == "hidden_size":  # any width, or only multiples? (LayerNorm families)
                try:
                    build_hf_plan(config, arch, header, [HFStepEntry.model_validate(
                        {"widen": {"dim": "hidden_size", "to": arch.hidden + 1}})], 0)
                except StepError as e:
                    out[name] = f"yes ({e.short})"
            if name == "num_attention_heads" and arch.family.projection_norms:  # OLMo 2: whole multiples
                out[name] = "yes (whole multiples only)"
        except StepError as e:
            out[name] = "no: " + e.message.split(": ", 1)[-1]
    return out


def moe_facts(config: dict, arch) -> dict:
    """Experts, top-k and routing of a mixture-of-experts model (for ``inspect``)."""
    renorm = arch.family.moe.get("renormalize")
    return {"experts": arch.experts, "top_k": arch.top_k,
            "top_k_renormalised": True if renorm == "always" else bool(config.get(renorm, False)),
            **({"shared_expert_intermediate_size": arch.shared} if arch.shared else {})}


def _inspect_hf(src: Path) -> dict:
    with _open_hf(src) as (source, arch, header):
        lineage = read_lineage(source.metadata, str(src))
        return {"checkpoint": str(src), "family": arch.family.name, "model_type": source.config.get("model_type"),
                "sizes": {"hidden_size": arch.hidden, "intermediate_size": arch.intermediate,
                          "num_hidden_layers": arch.layers, "num_attention_heads": arch.heads,
                          "num_key_value_heads": arch.kv_heads, "head_dim": arch.head_dim, "vocab_size": arch.vocab,
                          "tie_word_embeddings": arch.tied},
                "params": arch.num_parameters(set(header)), "tensors": len(header),
                "dtypes": sorted({str(d).removeprefix("torch.") for d, _ in header.values()}),
                "weight_files": source.weight_files(),
                "growth": hf_growth_options(source.config, arch, header),
                **({"task_head": {"kind": arch.head_kind, "labels": arch.labels}} if arch.head_kind else {}),
                **({"moe": moe_facts(source.config, arch)} if arch.experts else {}),
                "lineage": lineage}


def inspect(src: str | Path, *, model: ModelDescription | str | Path | None = None, model_code: str | None = None,
            model_args: dict | None = None, example_input=None) -> dict:
    # --- models built by the user's own code (issue 7)
    from . import graph_api

    if not Path(src).is_dir():
        code, _ = graph_api.model_code_of(None, Path(src), model_code, model_args, example_input)
        if code is not None:
            return graph_api.inspect(Path(src), code)
    # ---
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
        lineage = read_lineage(source.metadata, str(src))
        if lineage is not None:
            report["lineage"] = lineage
        for key, name in ((META_VERIFICATION, "verification"),):
            if key in source.metadata:
                try:
                    report[name] = json.loads(source.metadata[key])
                except (json.JSONDecodeError, RecursionError):
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
