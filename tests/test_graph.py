"""Models built by the user's own code (--model-code): traced growth, exact against the user's module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import models_zoo as Z
import n2n_cli
from n2n_cli import api
from n2n_cli.errors import StepError

ZOO = Path(__file__).resolve().parent / "models_zoo.py"


def teacher_file(tmp_path, factory, name="teacher.safetensors", seed=1, prefix=""):
    model = Z.perturb(factory(), seed)
    path = tmp_path / name
    save_file({prefix + k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def rel_error(teacher, student, shape, n=8):
    x = torch.randn((n, *shape[1:]), generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        t, s = teacher(x).double(), student(x).double()
    return float((t - s).abs().max() / t.abs().max())


def grow(tmp_path, factory, name, steps, shape, out="student.safetensors", src=None, **kw):
    teacher, path = teacher_file(tmp_path, getattr(Z, factory)) if src is None else (None, src)
    report = api.grow(api.spec_from_steps(steps, seed=3), path, tmp_path / out, model_code=f"{ZOO}:{factory}",
                      example_input=shape, probes=4, **kw)
    student = n2n_cli.load_grown(getattr(Z, factory)(), tmp_path / out)
    return teacher, student, report


CASES = [
    ("resnet18", "stage (adds couple conv2, downsample, next block)", [{"widen": {"layer": "layer2.0.conv2", "to": 24}}],
     [1, 3, 32, 32]),
    ("resnet18", "conv1 inside a block", [{"widen": {"layer": "layer3.1.conv1", "factor": 2}}], [1, 3, 32, 32]),
    ("resnet_bottleneck", "inside (conv2) and across a stage (conv3)",
     [{"widen": {"layer": "layer2.1.conv2", "to": 11}}, {"widen": {"layer": "layer2.0.conv3", "to": 40}}],
     [1, 3, 32, 32]),
    ("InceptionNet", "every tower x2 (4 concatenated towers, BN after each conv)",
     [{"widen": {"layer": f"inc1.{t}.conv", "factor": 2}} for t in ("b1", "b2.1", "b3.2", "b4.1")]
     + [{"widen": {"layer": "inc2.b3.0.conv", "factor": 2}}], [1, 3, 16, 16]),
    ("DenseNet", "stem and layers (BN over the concatenation)",
     [{"widen": {"layer": m, "factor": 2}} for m in ("conv0", "layers.0.conv2", "layers.1.conv1", "layers.2.conv2")],
     [1, 3, 8, 8]),
    ("MobileNetV2", "expansion (depthwise follows), residual output, stem",
     [{"widen": {"layer": m, "factor": 2}} for m in ("features.1.conv.0", "features.3.conv.6", "features.0.0")],
     [1, 3, 16, 16]),
    ("sequential_cnn", "numeric names, flatten with H != W",
     [{"widen": {"layer": m, "factor": 2}} for m in ("0", "4", "9")], [1, 3, 16, 8]),
    ("FunctionalNet", "F.relu, x + y, torch.cat, view(n, -1), flatten(1)",
     [{"widen": {"layer": m, "factor": 2}} for m in ("a", "c", "d", "fc1")], [1, 3, 16, 8]),
]


@pytest.mark.parametrize("factory,what,steps,shape", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_widen_is_exact_against_the_users_module(tmp_path, factory, what, steps, shape):
    teacher, student, report = grow(tmp_path, factory, what, steps, shape)
    assert report["verification"]["passed"] is True
    assert report["plan"]["params_after"] > report["plan"]["params_before"]
    assert rel_error(teacher, student, shape) <= 1e-5
    # the student really is wider, and its state dict loads strictly into the user's resized code
    assert sum(p.numel() for p in student.parameters()) == report["plan"]["params_after"]


def test_residual_stage_is_widened_as_one_group(tmp_path):
    _, student, report = grow(tmp_path, "resnet18", "", [{"widen": {"layer": "layer2.0.conv2", "to": 24}}],
                              [1, 3, 32, 32])
    assert "coupled: layer2.0.downsample.0, layer2.1.conv2" in report["plan"]["steps"][0]["summary"]
    assert student.layer2[0].downsample[0].out_channels == 24 and student.layer2[1].bn2.num_features == 24
    assert student.layer2[1].conv1.in_channels == 24 and student.layer3[0].downsample[0].in_channels == 24
    assert student.layer2[0].conv1.out_channels == 16  # not coupled


def test_concat_consumer_gets_the_towers_channels_at_their_offsets(tmp_path):
    teacher, student, report = grow(tmp_path, "InceptionNet", "", [{"widen": {"layer": "inc1.b2.1.conv", "to": 9}}],
                                    [1, 3, 16, 16])
    tensors = {t["key"]: t for t in report["plan"]["steps"][0]["tensors"]}
    # tower 2 (6 channels) sits at channels 4..9 of inc1's 16; the consumers read them there
    assert tensors["inc2.b1.conv.weight"]["how"] == "axis 1: in (channels 4..9)"
    assert student.inc2.b1.conv.in_channels == 19
    assert rel_error(teacher, student, [1, 3, 16, 16]) <= 1e-5


def test_later_steps_need_no_model_code_and_chain_exactly(tmp_path):
    teacher, _, _ = grow(tmp_path, "resnet18", "", [{"widen": {"layer": "layer2.0.conv2", "to": 24}}], [1, 3, 32, 32])
    report = api.grow(api.spec_from_steps([{"widen": {"layer": "layer3.0.conv1", "factor": 2}}]),
                      tmp_path / "student.safetensors", tmp_path / "s2.safetensors", probes=4)
    assert report["verification"]["passed"] is True
    with safe_open(str(tmp_path / "s2.safetensors"), "pt") as f:
        meta = f.metadata()
    recorded = json.loads(meta["n2n_model_code"])
    assert recorded["model_code"] == f"{ZOO}:resnet18" and recorded["example_input"]["shape"] == [1, 3, 32, 32]
    assert len(json.loads(meta["n2n_lineage"])) == 2
    student = n2n_cli.load_grown(Z.resnet18(), tmp_path / "s2.safetensors")
    assert rel_error(teacher, student, [1, 3, 32, 32]) <= 1e-5


def test_spec_with_model_code(tmp_path, cli):
    _, path = teacher_file(tmp_path, Z.InceptionNet)
    spec = tmp_path / "grow.yaml"
    spec.write_text(f"model_code: {ZOO}:InceptionNet\nmodel_args: {{num_classes: 10}}\n"
                    "example_input: {shape: [1, 3, 16, 16], dtype: float32}\nseed: 1\n"
                    "verify: {probes: 4}\nsteps:\n  - widen: {layer: inc1.b1.conv, factor: 2}\n"
                    "  - widen: {layer: inc1.b3.1.conv, to: 5}\n")
    r = cli("grow", spec, path, tmp_path / "big.safetensors", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "verification (student): PASS" in r.output


def test_inspect_lists_coupled_groups(tmp_path, cli):
    _, path = teacher_file(tmp_path, Z.resnet18)
    r = cli("inspect", path, "--model-code", f"{ZOO}:resnet18")
    assert r.exit_code == 0, r.output
    assert "coupled (widened together): layer2.0.conv2, layer2.0.downsample.0, layer2.1.conv2" in r.output
    assert "no: its output reaches the network output" in r.output


def test_model_args_and_strict_load_listing_every_problem(tmp_path, cli):
    _, path = teacher_file(tmp_path, Z.sequential_cnn)
    r = cli("inspect", path, "--model-code", f"{ZOO}:sequential_cnn", "--model-args", '{"num_classes": 7}')
    assert r.exit_code == 2
    assert "(2 problems)" in r.output
    assert "tensor '11.weight' has shape [10, 16], the model expects [7, 16]" in r.output
    assert "tensor '11.bias' has shape [10], the model expects [7]" in r.output


# ----------------------------------------------------------------------------- bad input: exit 2


def test_ddp_prefix_hint(tmp_path, cli):
    _, path = teacher_file(tmp_path, Z.sequential_cnn, prefix="module.")
    r = cli("inspect", path, "--model-code", f"{ZOO}:sequential_cnn")
    assert r.exit_code == 2
    assert "missing tensor '0.weight'" in r.output and "unexpected tensor 'module.0.weight'" in r.output
    assert "Every key starts with 'module.'" in r.output


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_import_error_shows_the_python_line(tmp_path, cli):
    _, path = teacher_file(tmp_path, Z.sequential_cnn)
    code = _write(tmp_path, "broken.py", "import torch\n\ndef net():\n    return torch.nn.Linear(2, 2\n")
    r = cli("inspect", path, "--model-code", f"{code}:net")
    assert r.exit_code == 2
    assert f"importing '{code}' failed: {code}:4: SyntaxError" in r.output
    code = _write(tmp_path, "raises.py", "import torch\nx = 1\nraise RuntimeError('no GPU here')\n")
    r = cli("inspect", path, "--model-code", f"{code}:net")
    assert r.exit_code == 2 and f"{code}:3: RuntimeError: no GPU here" in r.output
    r = cli("inspect", path, "--model-code", "no_such_package_n2n.models:net")
    assert r.exit_code == 2 and "ModuleNotFoundError: No module named 'no_such_package_n2n'" in r.output


def test_missing_name_and_non_module(tmp_path, cli):
    _, path = teacher_file(tmp_path, Z.sequential_cnn)
    r = cli("inspect", path, "--model-code", f"{ZOO}:sequential_cn")
    assert r.exit_code == 2
    assert "has no 'sequential_cn'" in r.output and "Did you mean: sequential_cnn" in r.output
    code = _write(tmp_path, "notmod.py", "def net():\n    return 42\n")
    r = cli("inspect", path, "--model-code", f"{code}:net")
    assert r.exit_code == 2 and "it returned a int, not a torch.nn.Module" in r.output
    r = cli("inspect", path, "--model-code", f"{ZOO}")
    assert r.exit_code == 2 and "expected FILE.py:NAME or package.module:NAME" in r.output


def test_widen_refusals_name_the_module_and_why(tmp_path, cli):
    _, path = teacher_file(tmp_path, Z.resnet18)
    out = tmp_path / "out.safetensors"
    base = ["widen", path, out, "--model-code", f"{ZOO}:resnet18", "--factor", "2"]
    r = cli(*base, "--layer", "fc")
    assert r.exit_code == 2 and "'fc' cannot be widened exactly: its output reaches the network output" in r.output
    r = cli(*base, "--layer", "layer2.0.conv")
    assert r.exit_code == 2 and "the model has no module 'layer2.0.conv'" in r.output
    assert "Did you mean: layer2.0.conv2, layer2.0.conv1" in r.output
    r = cli(*base, "--layer", "layer2.0.bn1")
    assert r.exit_code == 2 and "'layer2.0.bn1' is a BatchNorm2d" in r.output
    assert not out.exists()


OPAQUE = """
import torch, torch.nn as nn, torch.nn.functional as F

class Chunky(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.b = nn.Conv2d(8, 6, 1)
        self.c = nn.Conv2d(3, 6, 1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        h = self.b(self.gn(self.a(x)))
        u, v = torch.chunk(self.c(x), 2, dim=1)
        return self.fc(F.adaptive_avg_pool2d(h * 1.0 + torch.cat([v, u], 1), 1).flatten(1)[:, :3])

class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        if x.sum() > 0:
            return self.a(x)
        return -self.a(x)
"""


def test_ops_n2n_cannot_see_through_are_refused(tmp_path, cli):
    code = _write(tmp_path, "opaque.py", OPAQUE)
    import importlib.util
    spec = importlib.util.spec_from_file_location("opaque_t", code)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = Z.perturb(mod.Chunky())
    save_file(model.state_dict(), str(tmp_path / "c.safetensors"))
    base = ["widen", tmp_path / "c.safetensors", tmp_path / "o.safetensors", "--model-code", f"{code}:Chunky",
            "--factor", "2", "--example-input", "1,3,8,8"]
    r = cli(*base, "--layer", "a")
    assert r.exit_code == 2
    assert "module 'gn' (GroupNorm) normalises over the widened features" in r.output
    r = cli(*base, "--layer", "c")
    assert r.exit_code == 2 and "chunk() (node 'chunk') is an op n2n cannot see through" in r.output
    save_file(Z.perturb(mod.Branchy()).state_dict(), str(tmp_path / "b.safetensors"))
    r = cli("widen", tmp_path / "b.safetensors", tmp_path / "o.safetensors", "--model-code", f"{code}:Branchy",
            "--layer", "a", "--factor", "2")
    assert r.exit_code == 2 and "torch.fx cannot trace the model" in r.output
    assert "Data-dependent control flow" in r.output


def test_deepen_is_refused_for_now(tmp_path):
    _, path = teacher_file(tmp_path, Z.resnet18)
    with pytest.raises(StepError, match="deepening a model built by --model-code is not supported yet"):
        api.grow(api.spec_from_steps([{"deepen": {"after": "layer1.0.conv1"}}]), path, tmp_path / "o.safetensors",
                 model_code=f"{ZOO}:resnet18")
