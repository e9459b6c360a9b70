"""Sequential model descriptions: parsing, shape inference and the tensor layout.

``ModelDescription.layout()`` compiles a description into plain data: every tensor the
checkpoint must hold (key, shape, the space of each axis) and every widenable space
(which layer produces it, which layers read it). Growth planning works on that data.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Literal


from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from .layers import NORMS, PRODUCERS, Layer, TensorInfo, apply_layer, layer_tensors, output_shape

if TYPE_CHECKING:
    import torch

INPUT_SPACE = "<input>"


class ModelDescription(BaseModel):
    """A feed-forward stack of layers (``kind: sequential``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["sequential"] = "sequential"
    input_shape: list[PositiveInt] = Field(min_length=1, max_length=3)
    layers: list[Layer] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> "ModelDescription":
        if len(self.input_shape) == 2:
            raise ValueError("input_shape is [features] or [channels, height, width], not 2 numbers")
        names: dict[str, int] = {}
        for i, layer in enumerate(self.layers):
            if layer.parametric:
                if layer.name in names:
                    raise ValueError(f"layers[{i}]: name '{layer.name}' is already used by layers[{names[layer.name]}]")
                names[layer.name] = i
        for n in names:
            for m in names:
                if m.startswith(n + "."):
                    raise ValueError(f"layer names '{n}' and '{m}' clash: '{m}' would be a tensor key of '{n}'")
        self.shapes()  # raises ValueError with the layer index when shapes do not fit
        if not any(layer.type in PRODUCERS for layer in self.layers):
            raise ValueError("the model has no linear or conv2d layer")
        return self

    # ------------------------------------------------------------------ queries

    def shapes(self) -> list[tuple[int, ...]]:
        """Per-sample shapes: ``shapes()[i]`` is the input of layer i, the last is the output."""
        shape = tuple(self.input_shape)
        out = [shape]
        for i, layer in enumerate(self.layers):
            try:
                shape = output_shape(layer, shape)
            except ValueError as e:
                raise ValueError(f"layers[{i}] ({layer.describe()}): {e}") from None
            out.append(shape)
        return out

    def index_of(self, name: str) -> int | None:
        for i, layer in enumerate(self.layers):
            if layer.parametric and layer.name == name:
                return i
        return None

    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.parametric]

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude_defaults=True), sort_keys=True,
                          separators=(",", ":"))

    def layout(self) -> "Layout":
        return compile_layout(self)

    def output_space(self) -> str:
        return self.layout().output_space


@dataclass
class Space:
    """A widenable axis of the network: the output units/channels of one producer layer."""

    name: str
    width: int
    producer: str | None  # None for the input
    readers: list[str] = field(default_factory=list)  # consumer layer names ("in" role)
    norms: list[str] = field(default_factory=list)


@dataclass
class Layout:
    tensors: dict[str, TensorInfo]  # in layer order
    spaces: dict[str, Space]
    output_space: str
    layer_io: list[tuple[tuple[int, ...], tuple[int, ...]]]

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: t.shape for k, t in self.tensors.items()}

    def num_parameters(self, layer: str | None = None) -> int:
        """Trainable parameters (not batchnorm statistics), of the whole model or one layer."""
        return sum(math.prod(t.shape) for t in self.tensors.values() if t.floating
                   and not t.key.endswith((".running_mean", ".running_var")) and layer in (None, t.layer))


def compile_layout(desc: ModelDescription) -> Layout:
    shapes = desc.shapes()
    tensors: dict[str, TensorInfo] = {}
    spaces: dict[str, Space] = {INPUT_SPACE: Space(INPUT_SPACE, desc.input_shape[0], None)}
    space, block = INPUT_SPACE, 1
    for i, layer in enumerate(desc.layers):
        in_shape = shapes[i]
        if layer.parametric:
            for t in layer_tensors(layer, in_shape, space, block):
                tensors[t.key] = t
        if layer.type in PRODUCERS:
            spaces[space].readers.append(layer.name)
            space, block = layer.name, 1
            spaces[space] = Space(space, shapes[i + 1][0], layer.name)
        elif layer.type in NORMS:
            spaces[space].norms.append(layer.name)
        elif layer.type == "flatten" and len(in_shape) == 3:
            block *= in_shape[1] * in_shape[2]
    return Layout(tensors, spaces, space, [(shapes[i], shapes[i + 1]) for i in range(len(desc.layers))])


# --------------------------------------------------------------------------- evaluation


def forward(desc: ModelDescription, get: Callable[[str], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Evaluate the network in eval mode, fetching each layer's tensors only when it runs.

    ``get(key)`` returns a tensor already on ``x``'s device and dtype. Layer-at-a-time
    fetching keeps memory near one layer's tensors, whatever the model's size.
    """
    for layer in desc.layers:
        x = apply_layer(layer, x, get)
    return x


def to_torch_module(desc: ModelDescription):
    """The description's ``torch.nn.Module`` (``model_torch.SequentialNet``), whose ``state_dict``
    keys are the checkpoint's."""
    from .model_torch import SequentialNet

    return SequentialNet(desc)


def __getattr__(name: str):  # ``model.SequentialNet`` still works, without importing torch up front
    if name == "SequentialNet":
        from .model_torch import SequentialNet

        return SequentialNet
    raise AttributeError(name)
