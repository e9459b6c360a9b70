"""``n2n validate``: every problem of a growth spec, schema and steps, reported at once by line.

Light on purpose: checking a spec (alone, or against a model description) reads YAML and plans
without loading torch; only a ``--checkpoint`` brings in the checkpoint readers.
"""

from __future__ import annotations

from pathlib import Path

from .errors import SpecError, StepError
from .model import ModelDescription
from .seq_plan import build_plan
from .spec import GrowthSpec, HFGrowthSpec, HFStepEntry, lenient_steps, load_model_description, load_spec, step_line


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
    if checkpoint is not None and isinstance(spec, GrowthSpec) and spec.model_code is not None:  # the user's code
        from . import graph_api

        code, _ = graph_api.model_code_of(spec, Path(checkpoint), None, None, None)
        found, plan = graph_api.plan_problems(spec, Path(checkpoint), code)
        problems = [f"line {step_line(node, n)}: {msg}" if step_line(node, n) else msg for n, msg in found]
        if problems:
            raise SpecError(f"{len(problems)} step{'s' * (len(problems) > 1)} cannot be applied",
                            where=str(spec_path), problems=_by_line(problems))
        return {"spec": str(spec_path), "valid": True, "checked": "schema and steps (traced from your model code)",
                "plan": plan.to_dict()}
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
    if entries and isinstance(entries[0], HFStepEntry):
        if checkpoint is None:
            return ([], None) if return_plan else []
        from . import hf_verify
        from .sources import open_hf  # the checkpoint readers (and torch) only when a checkpoint is given
        from .hf_plan import build_hf_plan

        with open_hf(checkpoint) as (source, arch, header):
            hf_verify.check_config(source.config, grown=False, where=str(Path(checkpoint) / "config.json"))
            plan = build_hf_plan(source.config, arch, header, entries, seed, collect=True, numbers=numbers)
            if not plan.problems:  # as grow does: transformers must accept the grown config.json
                try:
                    hf_verify.check_config(plan.new_config())
                except StepError as e:
                    plan.problems.append((numbers[-1], e.message + (f" {e.hint}" if e.hint else "")))
    else:
        header = None
        if checkpoint is not None:
            from .sources import check_checkpoint, resolve_model
            from .checkpoints import open_checkpoint

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
