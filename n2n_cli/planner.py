"""One planner for every kind of model: the plan's data and the planning itself.

The data: recipe ops that say how each output tensor is computed from the teacher's tensors
(Load / Widen / Create / Scale), per-step records (PlannedStep, TensorChange), and RecipePlan,
what every plan holds for the Materializer and the writer. No tensor is touched here.

The planning: each front end compiles its model into one representation, ``Labels`` (every
tensor axis that lives in a widenable space, with its role, blocks, and offset for a
concatenation's tower or a fused projection's part):

- ``seq_plan`` compiles a sequential YAML description (``model.compile_layout``);
- ``graph_plan`` the spaces traced from the user's module (``graph.trace_spaces``);
- ``hf_plan`` a family's tensor templates and config.json (``hf.Arch.tensors``).

It picks a mapping g per space (its own rules and refusals), and :func:`widen_spaces` plans
every labelled axis. Deepening: the front end says where each tensor of the deeper model comes
from (:class:`Kept`, :class:`Copied` for block copies, :class:`Created` with :func:`new_layer_op`
and :func:`new_norm_op` for identity layers) and :func:`rebuild` plans them. :func:`plan_steps`
runs the steps and words every refusal the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Union

if TYPE_CHECKING:
    import torch

from .errors import StepError
from .layers import Axis
from .spec import StepEntry

# ----------------------------------------------------------------------------- recipe ops


@dataclass(frozen=True)
class Load:
    key: str


@dataclass(frozen=True)
class Mapping:
    """Net2WiderNet's g for one widened space: which original unit each new unit copies.

    kind: ``random`` (g(j) = j for old units, uniform for new ones; seeded by ``seed``),
    ``tile`` (g(j) = j mod old: every unit copied the same number of times, which keeps
    norm statistics), ``spread`` (g(j) = j * old // new: each unit repeated in place, for
    key/value heads whose query groups shrink) or ``grouped`` (whole groups of ``group``
    units follow ``base``: query heads follow their key/value head's mapping).

    ``pad`` trailing new units are zeros instead of copies (LEMON-style widths that are not a
    multiple: only ``new - pad`` units come from g), and norm parameters of the space are
    multiplied by ``norm_scale`` (sqrt(k*old/new) keeps RMSNorm exact over a padded stream).
    ``embed_scale`` compensates a model that multiplies its embeddings by sqrt(hidden_size) (Gemma):
    sqrt(old/new), so that the scaled embedding of the wider model is the tiled old one.
    """

    kind: str
    old: int
    new: int
    seed: tuple = ()
    group: int = 1
    base: "Mapping | None" = None
    pad: int = 0
    norm_scale: float = 1.0
    embed_scale: float = 1.0  # embedding rows ("embed" axes) times this; a tied head's final norm divided by it


@dataclass(frozen=True)
class Widen:
    step: int
    axes: tuple[tuple[int, Axis, Mapping], ...]
    method: str = "net2wider"
    noise: float = 0.0
    noise_mode: str = "zero-sum"


@dataclass(frozen=True)
class Create:
    step: int
    shape: tuple[int, ...]
    init: str  # identity | const | default
    value: float = 0.0
    fan_in: int = 1


@dataclass(frozen=True)
class Scale:
    """Multiply the tensor by ``factor`` and add member ``member`` of ``members`` noise draws of std
    ``noise`` x the tensor's std, made zero-sum over the members (seeded by ``group``): the experts
    of a dense-to-MoE upcycle, whose noise must cancel over the experts (``n2n_cli.hf_moe``)."""

    step: int
    factor: float = 1.0
    noise: float = 0.0
    group: str = ""
    member: int = 0
    members: int = 1


Op = Union[Load, Widen, Create, Scale]


@dataclass
class TensorChange:
    key: str
    old_shape: tuple[int, ...] | None  # None: a new tensor
    new_shape: tuple[int, ...]
    how: str

    def to_dict(self) -> dict:
        return {"key": self.key, "old_shape": list(self.old_shape) if self.old_shape is not None else None,
                "new_shape": list(self.new_shape), "how": self.how}


@dataclass
class PlannedStep:
    index: int
    entry: StepEntry
    summary: str
    function_preserving: bool
    changes: list[TensorChange]
    params_before: int
    params_after: int

    def to_dict(self) -> dict:
        return {"index": self.index, **self.entry.to_dict(), "summary": self.summary,
                "function_preserving": self.function_preserving,
                "params_before": self.params_before, "params_after": self.params_after,
                "tensors": [c.to_dict() for c in self.changes]}


class RecipePlan:
    """What every plan holds for the Materializer and the writer, whatever the model: ``seed``,
    ``steps`` (PlannedStep), ``recipes`` (output key -> ops, in output order), ``dtypes``, ``shapes``
    and ``problems`` (step number, message) collected instead of raised. The front ends' plans
    (``seq_plan.Plan`` for sequential descriptions, ``graph_plan.GraphPlan``, ``hf_plan.HFPlan``) are
    dataclasses deriving from it and add what their model needs (descriptions, configs, edits)."""

    @property
    def function_preserving(self) -> bool:
        return all(s.function_preserving for s in self.steps)

    def entries(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        return [(k, self.dtypes[k], self.shapes[k]) for k in self.recipes]

    def to_dict(self) -> dict:
        """The plan as the report prints it (``params_before``/``params_after`` come from the front end)."""
        return {"seed": self.seed, "params_before": self.params_before, "params_after": self.params_after,
                "function_preserving": self.function_preserving, "steps": [s.to_dict() for s in self.steps]}


# ----------------------------------------------------------------------------- planning steps


def plan_steps(plan: RecipePlan, steps: list, plan_step: Callable[[RecipePlan, int, object], None],
               label: Callable[[object], str], *, collect: bool = False, numbers: list[int] | None = None) -> None:
    """Plan ``steps`` one by one with ``plan_step(plan, index, entry)``. A StepError is reworded
    ``steps[N] (LABEL): message``; with ``collect`` it is recorded in ``plan.problems`` and the
    step skipped, so that every problem is reported at once. ``numbers``: the steps' numbers in
    the spec (default: their positions)."""
    for i, entry in enumerate(steps):
        try:
            plan_step(plan, i, entry)
        except StepError as e:
            n = numbers[i] if numbers else i
            msg = f"steps[{n}] ({label(entry)}): {e.message}"
            if not collect:
                raise StepError(msg, hint=e.hint, short=e.short, flags=e.flags) from None
            plan.problems.append((n, msg + (f" {e.hint}" if e.hint else "")))


def check_larger(new: int, old: int, current: str, factor: float | None, unit: str = "value") -> None:
    """Refuse a widen that does not grow: ``current`` says what is widened ("width 64 of 'fc1'",
    "hidden_size 32"); ``factor`` is the step's factor, None when it gave ``to``."""
    if new > old:
        return
    if factor is None:
        raise StepError(f"to: {new} is not larger than the current {current}", hint=f"Use a {unit} above {old}.",
                        flags={"to: ": "--to "})
    least = math.ceil((old + 1) / old * 1000) / 1000  # the smallest factor (3 decimals) that grows old by one
    raise StepError(f"factor: {factor:g} rounds {old} to {new}, which is not larger than the current {current}",
                    hint=f"Use a factor of at least {least:g}, or to: {old + 1} or more.",
                    flags={"factor: ": "--factor ", "to: ": "--to "})


# ----------------------------------------------------------------------------- widening spaces

#: the model-independent representation every front end compiles its model into: each tensor
#: (in output order) with its axes that live in a widenable space, as (axis index, Axis). A
#: concatenation's consumer has one Axis per tower (offset, span); a fused projection (q|k|v)
#: one per part; a flattened (C, H, W) or an attention head axis has blocks.
Labels = dict[str, list[tuple[int, Axis]]]


def describe_axis(ax: int, a: Axis) -> str:
    """How one widened axis is changed, for the plan's table."""
    return (f"axis {ax}: {a.role}" + (f" (blocks of {a.block})" if a.block > 1 else "")
            + (f" (channels {a.offset}..{a.offset + a.span - 1})" if a.span else ""))


def widen_spaces(plan: RecipePlan, index: int, labels: Labels, mappings: dict[str, Mapping], *,
                 method: str = "net2wider", noise: float = 0.0, noise_mode: str = "zero-sum",
                 describe: Callable[[int, Axis], str] = describe_axis) -> list[TensorChange]:
    """Widen every space in ``mappings`` (space -> its mapping g): each labelled axis of a planned
    tensor that lives in one of them gets a Widen op, and the tensor its new shape. Regions of one
    axis (towers of a concat, parts of a fused projection) are widened from the last, so that the
    offsets of the earlier ones stay valid. Returns the changes, in ``labels`` order."""
    changes = []
    for key, axes in labels.items():
        axes = sorted(((ax, a) for ax, a in axes if a.space in mappings), key=lambda p: (p[0], -p[1].offset))
        if not axes or key not in plan.recipes:
            continue
        old_shape = plan.shapes[key]
        new_shape = list(old_shape)
        for ax, a in axes:
            m = mappings[a.space]
            new_shape[ax] += (m.new - m.old) * a.block * a.segments
        plan.recipes[key].append(Widen(index, tuple((ax, a, mappings[a.space]) for ax, a in axes), method, noise,
                                       noise_mode))
        plan.shapes[key] = tuple(new_shape)
        changes.append(TensorChange(key, old_shape, tuple(new_shape), ", ".join(describe(ax, a) for ax, a in axes)))
    return changes


# ----------------------------------------------------------------------------- deepening: new tensors


@dataclass(frozen=True)
class Kept:
    """An existing tensor, maybe under a new name; ``how`` lists it among the changes (a rename)."""

    key: str
    how: str | None = None


@dataclass(frozen=True)
class Copied:
    """A new tensor copied from an existing one (a block copy) with its recipe, or zeros of its shape."""

    key: str
    how: str
    zero: bool = False


@dataclass(frozen=True)
class Created:
    """A new tensor made from nothing (an identity layer's weight, a norm's constants)."""

    op: Create
    dtype: torch.dtype


def created_how(op: Create) -> str:
    return {"identity": "identity", "const": f"constant {op.value:g}", "default": "PyTorch default init"}[op.init]


def rebuild(plan: RecipePlan, index: int, origins: dict[str, Kept | Copied | Created]) -> list[TensorChange]:
    """Replace the plan's tensors by ``origins`` (every output key, in the new output order, with
    where it comes from). Returns the changes in that order: new tensors and listed renames."""
    recipes, dtypes, shapes, changes = {}, {}, {}, []
    for key, o in origins.items():
        if isinstance(o, Created):
            recipes[key], dtypes[key], shapes[key] = [o.op], o.dtype, o.op.shape
            changes.append(TensorChange(key, None, o.op.shape, created_how(o.op)))
            continue
        dtypes[key], shapes[key] = plan.dtypes[o.key], plan.shapes[o.key]
        if isinstance(o, Copied):
            recipes[key] = [Create(index, shapes[key], "const", 0.0)] if o.zero else list(plan.recipes[o.key])
            changes.append(TensorChange(key, None, shapes[key], o.how))
        else:
            recipes[key] = plan.recipes[o.key]
            if o.how:
                changes.append(TensorChange(key, shapes[key], shapes[key], o.how))
    plan.recipes, plan.dtypes, plan.shapes = recipes, dtypes, shapes
    return changes


def new_layer_op(index: int, attr: str, shape: tuple[int, ...], method: str, fan_in: int) -> Create:
    """A tensor of an inserted conv/linear: the identity (weight) and zero (bias) for net2deeper, else
    PyTorch's default init for ``fan_in`` inputs."""
    if method == "net2deeper":
        return Create(index, shape, "identity" if attr == "weight" else "const", 0.0)
    return Create(index, shape, "default", fan_in=fan_in)


def new_norm_op(index: int, attr: str, shape: tuple[int, ...], eps: float, exact: bool) -> Create:
    """A tensor of an inserted BatchNorm: the identity in eval mode (running mean 0, variance 1, gamma
    sqrt(1 + eps), beta 0) when ``exact``, else the defaults (gamma 1)."""
    value = {"weight": math.sqrt(1 + eps) if exact else 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0,
             "num_batches_tracked": 0.0}[attr]
    return Create(index, shape, "const", value)
