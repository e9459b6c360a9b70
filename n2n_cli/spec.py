"""Growth specs and model description files: YAML in, validated pydantic objects out.

Every problem in a file is reported at once, each with its field path and line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from . import fsutil, layers as L
from .errors import ModelError, SpecError
from .limits import MAX_FACTOR, MAX_PROBES, MAX_WIDTH
from .model import ModelDescription

WIDEN_METHODS = ("net2wider", "random-pad")
DEEPEN_METHODS = ("net2deeper", "random-init")
NOISE_MODES = ("zero-sum", "independent")


#: a width or factor of a widening step (bounds: ``limits``)
Width = Annotated[int, Field(ge=1, le=MAX_WIDTH)]
Factor = Annotated[float, Field(gt=1, le=MAX_FACTOR, allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WidenStep(_Strict):
    """Make a linear/conv2d layer wider (more units or channels)."""

    layer: L.LayerName
    to: Width | None = None
    factor: Factor | None = None
    method: Literal["net2wider", "random-pad"] = "net2wider"
    noise: float = Field(default=0.0, ge=0)
    noise_mode: Literal["zero-sum", "independent"] = "zero-sum"

    @model_validator(mode="after")
    def _check(self):
        if (self.to is None) == (self.factor is None):
            raise ValueError("give exactly one of 'to' (new width) or 'factor' (> 1)")
        if self.noise and self.method != "net2wider":
            raise ValueError("'noise' applies to method net2wider only")
        return self

    def new_width(self, old: int) -> int:
        return self.to if self.to is not None else int(round(old * self.factor))

    def exact_counterpart(self) -> "WidenStep":
        return self.model_copy(update={"method": "net2wider", "noise": 0.0})


class DeepenStep(_Strict):
    """Insert a new layer (identity-initialised by net2deeper) after a linear/conv2d layer, or (models
    built by --model-code) a zeroed copy of residual block ``after_block`` after it."""

    after: L.LayerName | None = None
    after_block: L.LayerName | None = None
    method: Literal["net2deeper", "random-init"] = "net2deeper"
    name: L.LayerName | None = None
    kernel_size: PositiveInt | None = None

    @model_validator(mode="after")
    def _where(self):
        if (self.after is None) == (self.after_block is None):
            raise ValueError("give exactly one of 'after' (a layer) or 'after_block' (a residual block)")
        return self

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str | None) -> str | None:
        return v if v is None else L.check_layer_name(v)

    def exact_counterpart(self) -> "DeepenStep":
        return self.model_copy(update={"method": "net2deeper"})


class OneStep(_Strict):
    """A list item of ``steps:``: exactly one of ``widen: {...}`` or ``deepen: {...}``.
    Subclasses type the two fields (MLP/CNN steps here, Hugging Face steps in ``hf``)."""

    @model_validator(mode="after")
    def _one(self):
        if (self.widen is None) == (self.deepen is None):
            raise ValueError("each step is exactly one of 'widen: {...}' or 'deepen: {...}'")
        return self

    @property
    def step(self):
        return self.widen or self.deepen

    @property
    def kind(self) -> str:
        return "widen" if self.widen else "deepen"

    def to_dict(self) -> dict:
        return {self.kind: self.step.model_dump(mode="json", exclude_none=True)}


class StepEntry(OneStep):
    widen: WidenStep | None = None
    deepen: DeepenStep | None = None


class VerifySpec(_Strict):
    enabled: bool = True
    probes: int = Field(default=64, ge=1, le=MAX_PROBES)
    atol: float | None = Field(default=None, ge=0)
    rtol: float | None = Field(default=None, ge=0)


class GrowthSpec(_Strict):
    model: Union[str, ModelDescription, None] = None
    #: a model built by the user's own code (FILE.py:NAME or package.module:NAME), instead of ``model``
    model_code: str | None = Field(default=None, min_length=3)
    model_args: dict[str, Any] | None = None
    example_input: Union[list[int], dict[str, Any], str, None] = None
    seed: int = 0
    steps: list[StepEntry] = Field(min_length=1)
    verify: VerifySpec = VerifySpec()

    @model_validator(mode="after")
    def _one_model(self):
        if self.model is not None and self.model_code is not None:
            raise ValueError("give 'model' (a description) or 'model_code' (your own code), not both")
        return self


# --------------------------------------------------------------------------- Hugging Face steps
# (dimensions and layer counts of a transformer; planned by ``n2n_cli.hf``)


class HFWidenStep(_Strict):
    """Widen one dimension of every layer of a transformer."""

    dim: Literal["intermediate_size", "hidden_size", "num_attention_heads", "num_key_value_heads"]
    to: Width | None = None
    factor: Factor | None = None
    noise: float = Field(default=0.0, ge=0)  # zero-sum symmetry-breaking noise: still exact
    # intermediate_size: which units the new ones copy. tile: unit k copies k mod old (every unit
    # the same number of times for a multiple: a power-of-two count divides exactly in any float
    # dtype); random: seeded random picks. Default: tile for a multiple of the old size, else random.
    mapping: Literal["tile", "random"] | None = None

    @model_validator(mode="after")
    def _check(self):
        if (self.to is None) == (self.factor is None):
            raise ValueError("give exactly one of 'to' (new size) or 'factor' (> 1)")
        if self.mapping is not None and self.dim != "intermediate_size":
            raise ValueError(f"'mapping' applies to intermediate_size only; {self.dim} is widened by tiling")
        return self

    def new_size(self, old: int) -> int:
        return self.to if self.to is not None else int(round(old * self.factor))


class HFDeepenStep(_Strict):
    """Insert transformer blocks, each a copy of the block before it with zeroed output projections."""

    layers: PositiveInt | None = None
    placement: Literal["interleave", "end"] = "interleave"
    after: list[int] | None = None
    allow_approximate: bool = False

    @model_validator(mode="after")
    def _check(self):
        if (self.layers is None) == (self.after is None):
            raise ValueError("give exactly one of 'layers' (the new total number of layers) or 'after' "
                             "(a list of layer indices)")
        return self


class HFUpcycleStep(_Strict):
    """Dense to mixture of experts: every expert a copy of the dense MLP (``n2n_cli.hf_moe``)."""

    experts: int = Field(ge=2, le=1024)
    top_k: int = Field(ge=1, le=1024)
    router_init: Literal["zero", "small"] = "zero"
    router_std: float = Field(default=0.02, gt=0, le=10, allow_inf_nan=False)  # router_init small: N(0, std)
    noise: float = Field(default=0.0, ge=0, le=10, allow_inf_nan=False)  # zero-sum over the experts' down projections
    norm_topk_prob: bool = True  # Qwen-MoE: renormalise the top-k weights (exact); mixtral always does
    shared_expert: Literal["split", "zero"] = "split"  # Qwen2-MoE: half of the MLP in the shared expert, or none
    allow_approximate: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.top_k > self.experts:
            raise ValueError(f"top_k ({self.top_k}) must not exceed experts ({self.experts})")
        return self


class HFStepEntry(OneStep):
    widen: HFWidenStep | None = None
    deepen: HFDeepenStep | None = None
    upcycle: HFUpcycleStep | None = None

    @model_validator(mode="after")
    def _one(self):
        if sum(s is not None for s in (self.widen, self.deepen, self.upcycle)) != 1:
            raise ValueError("each step is exactly one of 'widen: {...}', 'deepen: {...}' or 'upcycle: {...}'")
        return self

    @property
    def step(self):
        return self.widen or self.deepen or self.upcycle

    @property
    def kind(self) -> str:
        return "widen" if self.widen else "deepen" if self.deepen else "upcycle"


class HFGrowthSpec(_Strict):
    """A growth spec for a Hugging Face directory (steps name dimensions, not layers)."""

    seed: int = 0
    steps: list[HFStepEntry] = Field(min_length=1)
    verify: VerifySpec = VerifySpec()


# --------------------------------------------------------------------------- loading


CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
MAX_YAML_BYTES = 10 * 2**20  # a spec or model description is a few KB; refuse what cannot be one


def _read_yaml(path: Path, error_cls):
    """Read a YAML mapping: (data, node tree for line numbers). Every way a file can fail to be
    one (missing, not a regular file, binary, a checkpoint passed in its place, malformed,
    duplicate keys, absurdly nested) is an ``error_cls`` naming the file."""
    what = "spec" if error_cls is SpecError else "model description"
    is_dir = os.path.isdir(path)  # False for names the file system cannot hold, as for missing ones
    if path.suffix.lower() in CHECKPOINT_SUFFIXES or is_dir:
        kind = "a directory (a Hugging Face model?)" if is_dir else f"a checkpoint ({path.suffix})"
        raise error_cls(f"expected a YAML {what} here, but this is {kind}", where=str(path),
                        hint="The order is: n2n grow SPEC SRC OUT (the spec first)." if error_cls is SpecError
                        else "Pass the model description YAML here.")
    fsutil.require_regular_file(path, "YAML file", error_cls)  # a FIFO or /dev/zero would hang or eat memory
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise error_cls(f"is {size / 2**20:.0f} MiB, too big to be a YAML {what}", where=str(path))
        raw = path.read_bytes()
    except OSError as e:
        raise error_cls(f"cannot read ({e.strerror or e})", where=_short(path)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        hint = "The order is: n2n grow SPEC SRC OUT (the spec first)." if error_cls is SpecError else None
        raise error_cls(f"is a binary file, not a YAML {what}", where=str(path), hint=hint) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        duplicates = _duplicate_keys(node)
        if duplicates:
            raise error_cls(f"duplicate key{'s' * (len(duplicates) > 1)} (YAML would silently keep the last)",
                            where=str(path), problems=duplicates, hint="Keep one of each.")
        data = yaml.SafeLoader("").construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise error_cls(f"malformed YAML: {problem}", where=where) from None
    except RecursionError:
        raise error_cls("malformed YAML: nested too deeply", where=str(path)) from None
    if not isinstance(data, dict):
        raise error_cls(f"expected a mapping at the top level, found {type(data).__name__}", where=str(path))
    return data, node


def _short(path: Path) -> str:
    """A path for messages: very long ones (ENAMETOOLONG) are shortened in the middle."""
    s = str(path)
    return s if len(s) <= 120 else f"{s[:60]}...{s[-40:]} ({len(s)} characters)"


def _duplicate_keys(root) -> list[str]:
    """Every key that appears twice in one mapping, with both line numbers (iterative: a
    deeply nested file cannot exhaust the stack here)."""
    problems, stack = [], [root]
    while stack:
        node = stack.pop()
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                    if k.value in seen:
                        problems.append(f"line {k.start_mark.line + 1}: duplicate key '{k.value}' (first at line "
                                        f"{seen[k.value]})")
                    else:
                        seen[k.value] = k.start_mark.line + 1
                stack.append(v)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return sorted(problems, key=lambda p: int(p[5:p.index(":")]))


def _line_of(node, loc: tuple) -> int | None:
    """The 1-based line of the YAML node at ``loc`` (or of its nearest existing parent)."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if k.value == part), None)
            if nxt is None:
                return line
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            continue  # pydantic's own loc parts (a union tag) have no node
        line = node.start_mark.line + 1
    return line


def _allowed_keys(cls: type[BaseModel] | None) -> str:
    return ", ".join(cls.model_fields) if cls is not None else ""


_LAYER_CLASSES = {cls.model_fields["type"].annotation.__args__[0]: cls
                  for cls in L.Layer.__origin__.__args__}  # type: ignore[attr-defined]


def _context_class(loc: tuple, root: type[BaseModel]) -> type[BaseModel] | None:
    """The pydantic class that owns the mapping at ``loc`` (for listing allowed keys)."""
    cls: type[BaseModel] | None = root
    i = 0
    while i < len(loc) and cls is not None:
        part = loc[i]
        if cls is GrowthSpec and part == "model":
            cls = ModelDescription
        elif cls is GrowthSpec and part == "steps":
            cls, i = StepEntry, i + 1
        elif cls is GrowthSpec and part == "verify":
            cls = VerifySpec
        elif cls is StepEntry and part in ("widen", "deepen"):
            cls = WidenStep if part == "widen" else DeepenStep
        elif cls is HFGrowthSpec and part in ("steps", "verify"):
            cls, i = (HFStepEntry, i + 1) if part == "steps" else (VerifySpec, i)
        elif cls is HFStepEntry and part in ("widen", "deepen", "upcycle"):
            cls = {"widen": HFWidenStep, "deepen": HFDeepenStep, "upcycle": HFUpcycleStep}[part]
        elif cls is ModelDescription and part == "layers":
            i += 1
            cls = _LAYER_CLASSES.get(loc[i + 1]) if i + 1 < len(loc) else None
            i += 1
        else:
            return None
        i += 1
    return cls


def _format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in L.LAYER_TYPES or part.startswith(("function-", "union[")):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def validation_problems(err: ValidationError, node, root: type[BaseModel]) -> list[str]:
    problems = []
    for e in err.errors():
        # pydantic names the branches of ``model: str | ModelDescription`` in the location; drop them
        loc = tuple(p for i, p in enumerate(e["loc"])
                    if not (p in ("str", "ModelDescription") and i > 0 and e["loc"][i - 1] == "model"))
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(_context_class(loc[:-1], root))
            msg = f"unknown key '{loc[-1] if loc else ''}'" + (f" (allowed: {allowed})" if allowed else "")
        elif e["type"] == "union_tag_invalid":
            msg = f"unknown layer type {e['input'].get('type')!r} (known: {', '.join(L.LAYER_TYPES)})"
        elif e["type"] == "union_tag_not_found":
            msg = f"layer has no 'type' (one of: {', '.join(L.LAYER_TYPES)})"
        elif e["type"] == "missing":
            msg = "missing required key"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] not in ("value_error", "assertion_error") and "input" in e and not isinstance(e["input"], (dict, list)):
                msg += f" (got {e['input']!r})"
        line = _line_of(node, loc)
        problems.append(f"line {line}: {_format_loc(loc)}: {msg}" if line else f"{_format_loc(loc)}: {msg}")
    # a union of str | ModelDescription reports both branches; keep the description's errors
    return list(dict.fromkeys(problems))


def parse_model_description(data, *, where: str, node=None) -> ModelDescription:
    try:
        return ModelDescription.model_validate(data)
    except ValidationError as e:
        problems = validation_problems(e, node, ModelDescription)
        raise ModelError(f"invalid model description ({len(problems)} problem{'s' * (len(problems) > 1)})",
                         where=where, problems=problems) from None


def load_model_description(path: str | Path) -> ModelDescription:
    path = Path(path)
    data, node = _read_yaml(path, ModelError)
    return parse_model_description(data, where=str(path), node=node)


def is_hf_spec(data: dict) -> bool:
    """A spec for Hugging Face directories: its steps name dimensions and layer counts."""
    steps = data.get("steps")
    for s in steps if isinstance(steps, list) else []:
        if isinstance(s, dict):
            w, d = s.get("widen"), s.get("deepen")
            if "upcycle" in s:
                return True
            if isinstance(w, dict) and "dim" in w:
                return True
            if isinstance(d, dict) and ("layers" in d or isinstance(d.get("after"), list) or "allow_approximate" in d):
                return True
    return False


def load_spec(path: str | Path) -> tuple[GrowthSpec, ModelDescription | None]:
    """Load a growth spec; resolve its ``model:`` (a path relative to the spec, or inline).

    A spec whose steps name dimensions (``widen: {dim: ...}``) is a Hugging Face spec and
    comes back as ``n2n_cli.hf.HFGrowthSpec`` (with no model description)."""
    path = Path(path)
    data, node = _read_yaml(path, SpecError)
    if is_hf_spec(data):
        try:
            return HFGrowthSpec.model_validate(data), None
        except ValidationError as e:
            problems = validation_problems(e, node, HFGrowthSpec)
            raise SpecError(f"invalid growth spec ({len(problems)} problem{'s' * (len(problems) > 1)})",
                            where=str(path), problems=problems) from None
    model_data = data.get("model")
    if isinstance(model_data, dict):
        # validate the inline description on its own, for precise messages
        try:
            ModelDescription.model_validate(model_data)
        except ValidationError as e:
            mnode = next((v for k, v in node.value if k.value == "model"), None)
            problems = [f"model: {p}" if not p.startswith("line") else p.replace(": ", ": model.", 1)
                        for p in validation_problems(e, mnode, ModelDescription)]
            rest = _spec_problems({**data, "model": None}, node)
            raise SpecError(f"invalid growth spec ({len(problems) + len(rest)} problems)", where=str(path),
                            problems=problems + rest) from None
    problems = _spec_problems(data, node)
    if problems:
        raise SpecError(f"invalid growth spec ({len(problems)} problem{'s' * (len(problems) > 1)})",
                        where=str(path), problems=problems)
    spec = GrowthSpec.model_validate(data)
    desc = None
    if isinstance(spec.model, str):
        mpath = (path.parent / spec.model)
        try:
            found = mpath.exists()
        except OSError as e:  # e.g. a name longer than the file system allows
            raise SpecError(f"model: cannot use this path ({e.strerror})", where=str(path)) from None
        if not found:
            raise SpecError(f"model: file '{spec.model}' not found (looked for {mpath})", where=str(path),
                            hint="The model path is relative to the spec file.")
        desc = load_model_description(mpath)
    elif isinstance(spec.model, ModelDescription):
        desc = spec.model
    return spec, desc


def lenient_steps(path: str | Path) -> tuple[list[int], list, ModelDescription | None, object]:
    """For ``n2n validate`` when the schema has problems: the steps that are valid on their own
    (their numbers, the entries), the model description if it can be resolved, and the YAML
    node tree (for line numbers), so that step problems can be reported alongside."""
    path = Path(path)
    data, node = _read_yaml(path, SpecError)
    hf = is_hf_spec(data)
    if hf:
        entry_cls = HFStepEntry
    else:
        entry_cls = StepEntry
    numbers, entries = [], []
    steps = data.get("steps")
    for i, raw in enumerate(steps if isinstance(steps, list) else []):
        try:
            entries.append(entry_cls.model_validate(raw))
            numbers.append(i)
        except ValidationError:
            pass
    desc = None
    if not hf:
        model = data.get("model")
        try:
            if isinstance(model, str) and (path.parent / model).is_file():
                desc = load_model_description(path.parent / model)
            elif isinstance(model, dict):
                desc = ModelDescription.model_validate(model)
        except (ModelError, ValidationError):
            desc = None
    return numbers, entries, desc, node


def step_line(node, number: int) -> int | None:
    return _line_of(node, ("steps", number)) if node is not None else None


def _spec_problems(data: dict, node) -> list[str]:
    try:
        GrowthSpec.model_validate(data)
        return []
    except ValidationError as e:
        return validation_problems(e, node, GrowthSpec)


def spec_from_steps(steps: list[dict], *, seed: int = 0, **verify) -> GrowthSpec:
    """Build a spec in code (used by ``n2n widen`` / ``n2n deepen``); raises SpecError.
    Steps that name dimensions make a Hugging Face spec (``n2n_cli.hf.HFGrowthSpec``)."""
    data = {"seed": seed, "steps": steps, "verify": {k: v for k, v in verify.items() if v is not None}}
    cls = GrowthSpec
    if is_hf_spec(data):
        cls = HFGrowthSpec
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        problems = validation_problems(e, None, cls)
        raise SpecError("invalid options", problems=problems) from None
