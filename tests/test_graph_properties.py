"""Property tests for models built by the user's code: random small residual / concat graphs
(conv-bn-relu, BasicBlock residual adds, concatenated towers, flatten + linear head) and random
growth steps (widen a random conv/linear by a random width, deepen after a random layer or block).
The grown checkpoint, loaded into the user's own module with ``load_grown``, computes the teacher's
function (float32 max relative error <= 1e-5). A refused step must be a clear StepError, and only of a
kind where exactness is impossible (``ALLOWED``): deepening after_block a block that is not x + f(x),
or a width that is not an integer multiple where a GroupNorm (num_groups kept) or a LayerNorm
normalises the widened features."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import models_zoo as Z
import n2n_cli
from n2n_cli import api
from n2n_cli.errors import StepError

ZOO = Path(__file__).resolve().parent / "models_zoo.py"
SHAPE = [1, 3, 6, 6]


@st.composite
def graphs(draw):
    arch = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["cbr", "res", "cat", "gn", "ln"]))
        if kind == "gn":
            groups = draw(st.integers(1, 3))
            arch.append([kind, groups * draw(st.integers(1, 3)), groups])
            continue
        arch.append([kind] if kind == "res" else [kind, draw(st.integers(2, 5))] +
                    ([draw(st.integers(2, 5))] if kind == "cat" else []))
    return {"arch": arch, "c": draw(st.integers(2, 5)), "hidden": draw(st.sampled_from([0, 0, 7]))}


def candidates(args):
    """Every conv/linear a step could name, every block, every insertion point."""
    convs, blocks, res = ["stem.0"], [], []
    for i, (kind, *_) in enumerate(args["arch"]):
        blocks.append(f"blocks.{i}")
        if kind == "res":
            res.append(f"blocks.{i}")
        convs += {"cbr": [f"blocks.{i}.0"], "res": [f"blocks.{i}.conv1", f"blocks.{i}.conv2"],
                  "cat": [f"blocks.{i}.a.0", f"blocks.{i}.b.0"], "gn": [f"blocks.{i}.0"],
                  "ln": [f"blocks.{i}.conv"]}[kind]
    return convs + (["fc.0"] if args["hidden"] else []), blocks, res


@st.composite
def growth(draw, args):
    convs, blocks, res = candidates(args)
    steps = []
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(["widen", "widen", "after", "after_block"]))
        if what == "widen":
            step = {"layer": draw(st.sampled_from(convs))}
            step.update({"factor": 2} if draw(st.booleans()) else {"to": "+"})
            steps.append({"widen": step, "_more": draw(st.integers(1, 4))})
        elif what == "after":
            steps.append({"deepen": {"after": draw(st.sampled_from(convs + blocks))}})
        else:
            steps.append({"deepen": {"after_block": draw(st.sampled_from(res))}} if res else
                         {"deepen": {"after": draw(st.sampled_from(convs + blocks))}})
    return steps


#: refusals where no exact growth exists (short -> why); any other refusal fails the test
ALLOWED = {
    "not a residual block": "after_block needs a block computing x + f(x)",
    "integer multiples only: norm statistics": "a GroupNorm (num_groups kept) or LayerNorm normalises the widened "
                                               "features: only an integer factor keeps its statistics",
}


def _check_refusal(e: StepError, step: dict, current) -> None:
    assert e.short in ALLOWED, f"refused where exact growth is possible: {e.message}"
    if e.short.startswith("integer multiples"):
        old = _widths(current)[step["widen"]["layer"]]
        assert "to" in step["widen"] and step["widen"]["to"] % old, e.message
        assert "normalises" in e.message and ("GroupNorm" in e.message or "LayerNorm" in e.message), e.message


def _widths(model):
    return {n: (m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features)
            for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}


@settings(max_examples=int(os.environ.get("N2N_GRAPH_EXAMPLES", "25")), deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_random_graphs_grow_exactly(data):
    args = data.draw(graphs())
    steps = data.draw(growth(args))
    teacher = Z.perturb(Z.RandomGraph(**args), seed=len(str(args)))
    with tempfile.TemporaryDirectory(prefix="n2n-graphprop-") as d:
        d = Path(d)
        save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(d / "t.safetensors"))
        src, done = d / "t.safetensors", 0
        current = teacher
        for i, step in enumerate(steps):  # one step per run: later steps name modules of the grown model
            more = step.pop("_more", 0)
            named = next(iter(next(iter(step.values())).values()))
            if named not in (_widths(current) if "widen" in step else dict(current.named_modules())):
                # renamed by an earlier deepen (nn.Sequential numbering): the drawn name means another module now
                event("skipped: renamed by an earlier deepen")
                continue
            if "widen" in step and step["widen"].get("to") == "+":
                step["widen"]["to"] = _widths(current)[step["widen"]["layer"]] + more
            out = d / f"s{i}.safetensors"
            try:
                api.grow(api.spec_from_steps([step], seed=i), src, out, model_code=f"{ZOO}:RandomGraph",
                         model_args=args, example_input=SHAPE, probes=2)
            except StepError as e:  # refusals must be clear: the step and the reason
                assert e.message.startswith("steps[0]") and len(e.message) > 30, e.message
                _check_refusal(e, step, current)
                event(f"refused: {e.short or e.message[:40]}")
                continue
            src, done = out, done + 1
            current = n2n_cli.load_grown(Z.RandomGraph(**args), out)
        event(f"steps done: {done}")
        x = torch.randn((8, *SHAPE[1:]), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            t, s = teacher(x).double(), current(x).double()
        assert (t - s).abs().max() / t.abs().max() <= 1e-5
