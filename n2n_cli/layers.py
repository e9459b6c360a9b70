"""Layer types of a sequential model description, as data.

Each layer type says which tensors it owns, the shape of each tensor axis and the
*space* each axis lives in. Widening a space transforms every axis labelled with it
(see ``n2n_cli.transforms``); the growth code never switches on layer types.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal, Union


from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PositiveInt, field_validator

if TYPE_CHECKING:
    import torch

Pair = Union[PositiveInt, tuple[PositiveInt, PositiveInt]]
NonNegPair = Union[Annotated[int, Field(ge=0)], tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]]]


def _int_name(v):
    """``nn.Sequential`` names its children 0, 1, 2...: YAML reads ``name: 0`` as an integer."""
    return str(v) if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else v


#: a layer name as written in YAML: a string, or a non-negative integer (nn.Sequential's names)
LayerName = Annotated[str, BeforeValidator(_int_name), Field(min_length=1)]


def check_layer_name(v: str) -> str:
    if any(not part for part in v.split(".")) or any(c.isspace() for c in v):
        raise ValueError("a layer name is dot-separated non-empty parts without spaces, e.g. 'fc1' or 'features.0'")
    return v


def pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class _Layer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: layers with parameters have a name; their tensors are ``<name>.<suffix>``
    parametric: ClassVar[bool] = False

    def describe(self) -> str:
        return f"{self.type} '{self.name}'" if self.parametric else self.type


class _Named(_Layer):
    name: LayerName
    parametric: ClassVar[bool] = True

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        return check_layer_name(v)


class Linear(_Named):
    type: Literal["linear"]
    out_features: PositiveInt
    bias: bool = True


class Conv2d(_Named):
    type: Literal["conv2d"]
    out_channels: PositiveInt
    kernel_size: Pair
    stride: Pair = 1
    padding: NonNegPair = 0
    dilation: Pair = 1
    bias: bool = True


class BatchNorm1d(_Named):
    type: Literal["batchnorm1d"]
    eps: float = Field(default=1e-5, gt=0)
    momentum: float = 0.1


class BatchNorm2d(_Named):
    type: Literal["batchnorm2d"]
    eps: float = Field(default=1e-5, gt=0)
    momentum: float = 0.1


class ReLU(_Layer):
    type: Literal["relu"]


class ReLU6(_Layer):
    type: Literal["relu6"]


class LeakyReLU(_Layer):
    type: Literal["leaky_relu"]
    negative_slope: float = 0.01


class Tanh(_Layer):
    type: Literal["tanh"]


class Sigmoid(_Layer):
    type: Literal["sigmoid"]


class GELU(_Layer):
    type: Literal["gelu"]
    approximate: Literal["none", "tanh"] = "none"


class SiLU(_Layer):
    type: Literal["silu"]


class MaxPool2d(_Layer):
    type: Literal["maxpool2d"]
    kernel_size: Pair
    stride: Pair | None = None
    padding: NonNegPair = 0


class AvgPool2d(_Layer):
    type: Literal["avgpool2d"]
    kernel_size: Pair
    stride: Pair | None = None
    padding: NonNegPair = 0


class Flatten(_Layer):
    type: Literal["flatten"]


class Dropout(_Layer):
    type: Literal["dropout"]
    p: float = Field(default=0.5, ge=0, lt=1)


Layer = Annotated[
    Union[Linear, Conv2d, BatchNorm1d, BatchNorm2d, ReLU, ReLU6, LeakyReLU, Tanh, Sigmoid, GELU,
          SiLU, MaxPool2d, AvgPool2d, Flatten, Dropout],
    Field(discriminator="type"),
]

LAYER_TYPES = ["linear", "conv2d", "batchnorm1d", "batchnorm2d", "relu", "relu6", "leaky_relu",
               "tanh", "sigmoid", "gelu", "silu", "maxpool2d", "avgpool2d", "flatten", "dropout"]
PRODUCERS = ("linear", "conv2d")
NORMS = ("batchnorm1d", "batchnorm2d")


@dataclass(frozen=True)
class Activation:
    """An elementwise activation. ``idempotent``: phi(phi(v)) == phi(v) for every v, which is
    what an identity layer inserted after phi needs to be exact (Net2DeeperNet)."""

    idempotent: bool
    why: str


ACTIVATIONS: dict[str, Activation] = {
    "relu": Activation(True, "relu(relu(x)) = relu(x)"),
    "relu6": Activation(True, "relu6(relu6(x)) = relu6(x)"),
    "leaky_relu": Activation(False, "leaky_relu(leaky_relu(x)) != leaky_relu(x) for x < 0"),
    "tanh": Activation(False, "tanh(tanh(x)) != tanh(x)"),
    "sigmoid": Activation(False, "sigmoid(sigmoid(x)) != sigmoid(x)"),
    "gelu": Activation(False, "gelu(gelu(x)) != gelu(x)"),
    "silu": Activation(False, "silu(silu(x)) != silu(x)"),
}


# --------------------------------------------------------------------------- shapes


def out_hw(h: int, w: int, k, s, p, d=1) -> tuple[int, int]:
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = pair(k), pair(s), pair(p), pair(d)
    return ((h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)


def output_shape(layer, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The per-sample output shape of ``layer`` for input ``shape``; ValueError if it does not fit."""
    t = layer.type
    if t == "linear":
        if len(shape) != 1:
            raise ValueError(f"needs a flat input but gets {list(shape)}; add {{type: flatten}} before it")
        return (layer.out_features,)
    if t in ("conv2d", "maxpool2d", "avgpool2d", "batchnorm2d") and len(shape) != 3:
        raise ValueError(f"needs a [channels, height, width] input but gets {list(shape)}")
    if t == "batchnorm1d" and len(shape) != 1:
        raise ValueError(f"needs a flat [features] input but gets {list(shape)}")
    if t == "conv2d":
        h, w = out_hw(shape[1], shape[2], layer.kernel_size, layer.stride, layer.padding, layer.dilation)
        if h < 1 or w < 1:
            raise ValueError(f"input {list(shape)} is too small for this kernel (output would be {h}x{w})")
        return (layer.out_channels, h, w)
    if t in ("maxpool2d", "avgpool2d"):
        kh, kw = pair(layer.kernel_size)
        ph, pw = pair(layer.padding)
        if 2 * ph > kh or 2 * pw > kw:
            raise ValueError("padding must be at most half the kernel size")
        h, w = out_hw(shape[1], shape[2], layer.kernel_size, layer.stride or layer.kernel_size, layer.padding)
        if h < 1 or w < 1:
            raise ValueError(f"input {list(shape)} is too small for this pooling (output would be {h}x{w})")
        return (shape[0], h, w)
    if t == "flatten":
        return (math.prod(shape),)
    return shape


# --------------------------------------------------------------------------- axes


@dataclass(frozen=True)
class Axis:
    """One tensor axis that lives in a widenable space.

    role: ``out`` (a producer's rows / out-channels, and its bias), ``in`` (a consumer's
    columns / in-channels) or ``norm`` (a per-channel norm parameter or statistic).
    block: > 1 when the axis holds a block of features per unit: channel-major blocks of H*W
    features after a flatten, or the head_dim features of an attention head.
    pad: what random-pad puts in new entries: ``normal`` N(0, 0.1), ``bias`` 0.1, ``one``, ``zero``.
    """

    space: str
    role: str
    block: int = 1
    pad: str = "normal"
    segments: int = 1  # > 1 for fused tensors: GPT-2's c_attn holds q|k|v, each a copy of the space
    offset: int = 0  # with span: only elements [offset, offset + span) of the axis live in the space
    span: int = 0  # 0: the whole axis (a concatenation's consumer reads each tower at its offset)
    norm_shift: float = 0.0  # a norm weight stored as gamma - norm_shift (Gemma's RMSNorm scales by 1 + w)
    parts: tuple["Axis", ...] = ()  # a fused axis of several spaces (q|k|v of unequal sizes), each with offset/span


@dataclass(frozen=True)
class TensorInfo:
    key: str
    layer: str
    shape: tuple[int, ...]
    axes: tuple[Axis | None, ...]
    floating: bool = True


def layer_tensors(layer, in_shape: tuple[int, ...], in_space: str, in_block: int) -> list[TensorInfo]:
    """The tensors a parametric layer owns, with shapes and axis spaces (PyTorch layout)."""
    n, t = layer.name, layer.type
    ins = Axis(in_space, "in", in_block)
    if t == "linear":
        out = [TensorInfo(f"{n}.weight", n, (layer.out_features, in_shape[0]), (Axis(n, "out"), ins))]
        if layer.bias:
            out.append(TensorInfo(f"{n}.bias", n, (layer.out_features,), (Axis(n, "out", pad="bias"),)))
        return out
    if t == "conv2d":
        kh, kw = pair(layer.kernel_size)
        out = [TensorInfo(f"{n}.weight", n, (layer.out_channels, in_shape[0], kh, kw),
                          (Axis(n, "out"), ins, None, None))]
        if layer.bias:
            out.append(TensorInfo(f"{n}.bias", n, (layer.out_channels,), (Axis(n, "out", pad="bias"),)))
        return out
    if t in NORMS:
        c = in_shape[0]  # a batchnorm1d after a flatten normalises channel-major blocks of H*W features
        return [
            TensorInfo(f"{n}.weight", n, (c,), (Axis(in_space, "norm", in_block, pad="one"),)),
            TensorInfo(f"{n}.bias", n, (c,), (Axis(in_space, "norm", in_block, pad="zero"),)),
            TensorInfo(f"{n}.running_mean", n, (c,), (Axis(in_space, "norm", in_block, pad="zero"),)),
            TensorInfo(f"{n}.running_var", n, (c,), (Axis(in_space, "norm", in_block, pad="one"),)),
            TensorInfo(f"{n}.num_batches_tracked", n, (), (), floating=False),
        ]
    raise AssertionError(t)


# --------------------------------------------------------------------------- math


def apply_layer(layer, x: torch.Tensor, get) -> torch.Tensor:
    import torch  # here, not at the top: descriptions and plans are read without loading torch
    import torch.nn.functional as F

    """Evaluate one layer in eval mode. ``get(key)`` returns a tensor of this layer."""
    t = layer.type
    if t == "linear":
        return F.linear(x, get(f"{layer.name}.weight"), get(f"{layer.name}.bias") if layer.bias else None)
    if t == "conv2d":
        return F.conv2d(x, get(f"{layer.name}.weight"), get(f"{layer.name}.bias") if layer.bias else None,
                        stride=pair(layer.stride), padding=pair(layer.padding), dilation=pair(layer.dilation))
    if t in NORMS:
        n = layer.name
        return F.batch_norm(x, get(f"{n}.running_mean"), get(f"{n}.running_var"), get(f"{n}.weight"),
                            get(f"{n}.bias"), training=False, eps=layer.eps)
    if t == "relu":
        return F.relu(x)
    if t == "relu6":
        return F.relu6(x)
    if t == "leaky_relu":
        return F.leaky_relu(x, layer.negative_slope)
    if t == "tanh":
        return torch.tanh(x)
    if t == "sigmoid":
        return torch.sigmoid(x)
    if t == "gelu":
        return F.gelu(x, approximate=layer.approximate)
    if t == "silu":
        return F.silu(x)
    if t == "maxpool2d":
        return F.max_pool2d(x, pair(layer.kernel_size), pair(layer.stride or layer.kernel_size), pair(layer.padding))
    if t == "avgpool2d":
        return F.avg_pool2d(x, pair(layer.kernel_size), pair(layer.stride or layer.kernel_size), pair(layer.padding))
    if t == "flatten":
        return torch.flatten(x, 1)
    if t == "dropout":
        return x  # eval mode
    raise AssertionError(t)


def torch_layer(layer, in_shape: tuple[int, ...]) -> torch.nn.Module:
    """The ``torch.nn`` module equivalent to ``layer`` for per-sample input ``in_shape``."""
    import torch

    nn = torch.nn
    t = layer.type
    if t == "linear":
        return nn.Linear(in_shape[0], layer.out_features, bias=layer.bias)
    if t == "conv2d":
        return nn.Conv2d(in_shape[0], layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                         layer.dilation, bias=layer.bias)
    if t == "batchnorm1d":
        return nn.BatchNorm1d(in_shape[0], eps=layer.eps, momentum=layer.momentum)
    if t == "batchnorm2d":
        return nn.BatchNorm2d(in_shape[0], eps=layer.eps, momentum=layer.momentum)
    if t == "relu":
        return nn.ReLU()
    if t == "relu6":
        return nn.ReLU6()
    if t == "leaky_relu":
        return nn.LeakyReLU(layer.negative_slope)
    if t == "tanh":
        return nn.Tanh()
    if t == "sigmoid":
        return nn.Sigmoid()
    if t == "gelu":
        return nn.GELU(approximate=layer.approximate)
    if t == "silu":
        return nn.SiLU()
    if t == "maxpool2d":
        return nn.MaxPool2d(layer.kernel_size, layer.stride, layer.padding)
    if t == "avgpool2d":
        return nn.AvgPool2d(layer.kernel_size, layer.stride, layer.padding)
    if t == "flatten":
        return nn.Flatten()
    if t == "dropout":
        return nn.Dropout(layer.p)
    raise AssertionError(t)
