"""The plan's data: the recipe ops that say how each output tensor is computed from the teacher's
tensors (Load / Widen / Create / Scale), and the per-step records (PlannedStep, TensorChange).
No tensor is touched here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

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
    # widen: the space and its widths (for the mapping g)
    space: str | None = None
    old_width: int = 0
    new_width: int = 0

    def to_dict(self) -> dict:
        return {"index": self.index, **self.entry.to_dict(), "summary": self.summary,
                "function_preserving": self.function_preserving,
                "params_before": self.params_before, "params_after": self.params_after,
                "tensors": [c.to_dict() for c in self.changes]}
