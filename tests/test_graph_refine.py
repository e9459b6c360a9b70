"""A conv's output added to a concatenation (the property tests' former 7% of refusals): the conv's
space is refined into one region per tower, each widened with its tower's mapping."""

from __future__ import annotations


import torch
from safetensors.torch import save_file

import models_zoo as Z
from helpers import load_module
import n2n_cli
from n2n_cli import api

CODE = """
import torch, torch.nn as nn, torch.nn.functional as F

class AddToConcat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 2, 1)
        self.b = nn.Conv2d(3, 3, 3, padding=1)
        self.c = nn.Conv2d(3, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5 * 16, 2)

    def forward(self, x):
        h = F.relu(self.bn(self.c(x)) + torch.cat([self.a(x), self.b(x)], 1))
        return self.fc(h.flatten(1))

class Repeated(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 2, 1)
        self.c = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        a = self.a(x)
        return self.fc((self.c(x) + torch.cat([a, a], 1)).mean((2, 3)))
"""


def _setup(tmp_path, name):
    path = tmp_path / "models.py"
    path.write_text(CODE)
    mod = load_module(path, "refine_models_t")
    teacher = Z.perturb(getattr(mod, name)())
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(tmp_path / "t.safetensors"))
    return mod, teacher, f"{path}:{name}"


def _rel(teacher, student):
    x = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        t, s = teacher(x).double(), student(x).double()
    return float((t - s).abs().max() / t.abs().max())


def test_a_conv_added_to_a_concatenation_widens_region_by_region(tmp_path):
    mod, teacher, code = _setup(tmp_path, "AddToConcat")
    for i, (step, summary) in enumerate([
            ({"layer": "a", "to": 4}, "widen a width 2 -> 4 (net2wider); coupled: c"),
            ({"layer": "c", "to": 8}, "widen c width 5 -> 8 (net2wider); coupled: a, b"),
            ({"layer": "b", "factor": 3}, "widen b width 3 -> 9 (net2wider); coupled: c")]):
        out = tmp_path / f"s{i}.safetensors"
        report = api.grow(api.spec_from_steps([{"widen": step}], seed=1), tmp_path / "t.safetensors", out,
                          model_code=code, example_input=[1, 3, 4, 4], probes=4)
        assert report["plan"]["steps"][0]["summary"] == summary
        student = n2n_cli.load_grown(mod.AddToConcat(), out)
        assert student.c.out_channels == student.a.out_channels + student.b.out_channels == student.bn.num_features
        assert _rel(teacher, student) <= 1e-5
    tensors = {t["key"]: t["how"] for t in report["plan"]["steps"][0]["tensors"]}
    assert tensors["c.weight"] == "axis 0: out (channels 2..4)"  # b's region of c's output


def test_a_concatenation_of_one_value_twice_is_widened_through_that_value(tmp_path, cli):
    mod, teacher, code = _setup(tmp_path, "Repeated")
    out = tmp_path / "s.safetensors"
    api.grow(api.spec_from_steps([{"widen": {"layer": "a", "to": 3}}]), tmp_path / "t.safetensors", out,
             model_code=code, example_input=[1, 3, 4, 4], probes=4)
    student = n2n_cli.load_grown(mod.Repeated(), out)
    assert student.c.out_channels == 6 and _rel(teacher, student) <= 1e-5
    r = cli("widen", tmp_path / "t.safetensors", tmp_path / "o.safetensors", "--model-code", code, "--layer", "c",
            "--factor", "2", "--example-input", "1,3,4,4")
    assert r.exit_code == 2
    assert "'c' cannot be widened: its output is added to a concatenation that holds the same features twice" in \
        " ".join(r.output.split()), r.output
    assert "Widen the module that writes the repeated features instead" in r.output
    assert not (tmp_path / "o.safetensors").exists()
