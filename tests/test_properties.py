"""Property tests: random sequential networks, random growth steps; the grown checkpoint,
loaded with plain PyTorch (nn.Module + load_state_dict, not n2n's own forward), computes
the teacher's function (float32 max relative error <= 1e-5)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from n2n_cli import api
from n2n_cli.errors import StepError
from n2n_cli.layers import ACTIVATIONS, PRODUCERS
from n2n_cli.model import ModelDescription, to_torch_module
from n2n_cli.spec import spec_from_steps

from helpers import load_student, make_teacher, max_rel_error

ACTS = sorted(ACTIVATIONS) + ["relu"] * 5  # mostly relu, so that deepening is often possible


@st.composite
def cnn_models(draw):
    c, h, w = draw(st.integers(1, 3)), draw(st.integers(6, 12)), draw(st.integers(6, 12))
    layers, shape = [], (c, h, w)
    for i in range(draw(st.integers(1, 3))):
        k = draw(st.sampled_from([1, 2, 3, 5]))
        stride, dil = draw(st.integers(1, 2)), draw(st.integers(1, 2))
        pad = draw(st.integers(0, 2))
        ho = (shape[1] + 2 * pad - dil * (k - 1) - 1) // stride + 1
        wo = (shape[2] + 2 * pad - dil * (k - 1) - 1) // stride + 1
        if ho < 2 or wo < 2:
            k, stride, dil, pad = 3, 1, 1, 1
            ho, wo = shape[1], shape[2]
        out = draw(st.integers(2, 6))
        layers.append({"type": "conv2d", "name": f"conv{i}", "out_channels": out, "kernel_size": k,
                       "stride": stride, "padding": pad, "dilation": dil, "bias": draw(st.booleans())})
        shape = (out, ho, wo)
        if draw(st.booleans()):
            layers.append({"type": "batchnorm2d", "name": f"bn{i}"})
        if draw(st.booleans()):
            layers.append({"type": draw(st.sampled_from(ACTS))})
        if shape[1] >= 4 and shape[2] >= 4 and draw(st.booleans()):
            layers.append({"type": draw(st.sampled_from(["maxpool2d", "avgpool2d"])), "kernel_size": 2})
            shape = (shape[0], shape[1] // 2, shape[2] // 2)
    layers.append({"type": "flatten"})
    if draw(st.booleans()):  # per-feature ops on the flattened channel blocks
        layers.append({"type": "batchnorm1d", "name": "flat_bn"})
    if draw(st.booleans()):
        layers.append({"type": draw(st.sampled_from(["relu", "dropout", "tanh"]))})
    return {"input_shape": [c, h, w], "layers": layers + draw(mlp_tail(len(layers)))}


@st.composite
def mlp_tail(draw, offset=0):
    layers = []
    for i in range(draw(st.integers(0, 2))):
        layers.append({"type": "linear", "name": f"fc{i}", "out_features": draw(st.integers(2, 8)),
                       "bias": draw(st.booleans())})
        if draw(st.booleans()):
            layers.append({"type": "batchnorm1d", "name": f"fbn{i}"})
        if draw(st.booleans()):
            layers.append({"type": draw(st.sampled_from(ACTS))})
        if draw(st.booleans()):
            layers.append({"type": "dropout", "p": 0.5})
    layers.append({"type": "linear", "name": "out", "out_features": draw(st.integers(1, 5))})
    return layers


@st.composite
def mlp_models(draw):
    return {"input_shape": [draw(st.integers(1, 10))], "layers": draw(mlp_tail())}


@st.composite
def growth(draw):
    model = draw(st.one_of(cnn_models(), mlp_models()))
    names = [layer["name"] for layer in model["layers"] if layer["type"] in PRODUCERS]
    steps = []
    for i in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            hidden = names[:-1] if len(names) > 1 and draw(st.integers(0, 9)) else names  # output: 10%
            step = {"layer": draw(st.sampled_from(hidden))}
            if draw(st.booleans()):
                step["factor"] = draw(st.sampled_from([1.5, 2.0, 3.0]))
            else:
                step["to"] = draw(st.integers(5, 14))  # sometimes not larger: must be refused
            if draw(st.booleans()):
                step["noise"] = 0.05
            steps.append({"widen": step})
        else:
            step = {"after": draw(st.sampled_from(names)), "name": f"new{i}"}
            if draw(st.booleans()):
                step["kernel_size"] = draw(st.sampled_from([1, 3]))
            steps.append({"deepen": step})
            names.append(f"new{i}")
    return model, steps, draw(st.integers(0, 2**16))


WIDTH = {"linear": "out_features", "conv2d": "out_channels"}


def simulate(model: dict, steps: list[dict]) -> tuple[dict | None, str | None]:
    """An independent, plain-dict reading of the growth contract: the grown description,
    or the reason n2n must refuse."""
    layers = [dict(layer) for layer in model["layers"]]
    for s in steps:
        if "widen" in s:
            w = s["widen"]
            i = next((k for k, layer in enumerate(layers) if layer.get("name") == w["layer"]), None)
            if i is None:
                return None, "unknown layer"
            if not any(layer["type"] in PRODUCERS for layer in layers[i + 1:]):
                return None, "output layer"
            old = layers[i][WIDTH[layers[i]["type"]]]
            new = w["to"] if "to" in w else int(round(old * w["factor"]))
            if new <= old:
                return None, "is not larger than"
            layers[i][WIDTH[layers[i]["type"]]] = new
        else:
            d = s["deepen"]
            i = next((k for k, layer in enumerate(layers) if layer.get("name") == d["after"]), None)
            if i is None:
                return None, "unknown layer"
            after, j = layers[i], i + 1
            block = []
            if j < len(layers) and layers[j]["type"].startswith("batchnorm"):
                block.append({"type": layers[j]["type"], "name": d["name"] + "_bn"})
                j += 1
            if j < len(layers) and layers[j]["type"] in ACTIVATIONS:
                if layers[j]["type"] not in ("relu", "relu6"):
                    return None, "not idempotent"
                block.append(dict(layers[j]))
                j += 1
            if after["type"] == "linear" and "kernel_size" in d:
                return None, "has no kernel"
            if after["type"] == "linear":
                new = {"type": "linear", "name": d["name"], "out_features": after["out_features"],
                       "bias": after.get("bias", True)}
            else:
                k = d.get("kernel_size", after["kernel_size"])
                if k % 2 == 0:
                    return None, "even kernel"
                dil = after.get("dilation", 1)
                new = {"type": "conv2d", "name": d["name"], "out_channels": after["out_channels"],
                       "kernel_size": k, "padding": dil * (k - 1) // 2, "dilation": dil,
                       "bias": after.get("bias", True)}
            layers[j:j] = [new] + block
    return {"input_shape": model["input_shape"], "layers": layers}, None


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(growth())
def test_growth_preserves_function(case):
    raw, steps, seed = case
    model = ModelDescription.model_validate(raw)
    expected, refusal = simulate(raw, steps)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        src, out = d / "t.safetensors", d / "s.safetensors"
        teacher = make_teacher(model, src, seed=seed)
        spec = spec_from_steps(steps, seed=seed)
        event(f"refused: {refusal}" if refusal else f"grown: {len(steps)} steps")
        if refusal is not None:
            with pytest.raises(StepError, match=refusal):
                api.grow(spec, src, out, model=model, device="cpu")
            assert not out.exists()
            return
        report = api.grow(spec, src, out, model=model, device="cpu")
        assert report["verification"]["passed"] is True
        desc, student = load_student(out)
        # the grown architecture is the one the contract describes, tensor for tensor
        reference = to_torch_module(ModelDescription.model_validate(expected))
        assert {k: v.shape for k, v in student.state_dict().items()} == \
               {k: v.shape for k, v in reference.state_dict().items()}
        # and it computes the teacher's function, evaluated by plain torch.nn modules
        x = torch.randn((32, *model.input_shape), generator=torch.Generator().manual_seed(seed))
        assert max_rel_error(teacher, student, x) <= 1e-5
