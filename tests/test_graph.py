"""Models built by the user's own code (--model-code): traced growth, exact against the user's module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import models_zoo as Z
from helpers import load_module
import n2n_cli
from n2n_cli import api
from n2n_cli.usercode import build_model

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
    ("UNet", "encoder convs (skipped and downsampled), ConvTranspose2d, decoder convs reading a concat",
     [{"widen": {"layer": m, "factor": 2}} for m in ("enc1.0", "enc2.0", "mid.0", "up2", "dec2.0", "up1")],
     [1, 3, 16, 12]),
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
    mod = load_module(code, "opaque_t")
    model = Z.perturb(mod.Chunky())
    save_file(model.state_dict(), str(tmp_path / "c.safetensors"))
    base = ["widen", tmp_path / "c.safetensors", tmp_path / "o.safetensors", "--model-code", f"{code}:Chunky",
            "--factor", "2", "--example-input", "1,3,8,8"]
    r = cli(*base[:5], "--to", "12", *base[7:], "--layer", "a")  # GroupNorm(2, 8): each channel repeated in place, x2 only
    assert r.exit_code == 2
    assert "to: 12 is not an integer multiple of the current width 8 of 'a': module 'gn' (GroupNorm) normalises " \
        "2 groups of channels" in r.output, r.output
    r = cli(*base, "--layer", "c")
    assert r.exit_code == 2 and "chunk() (node 'chunk') is an op n2n cannot see through" in r.output
    save_file(Z.perturb(mod.Branchy()).state_dict(), str(tmp_path / "b.safetensors"))
    r = cli("widen", tmp_path / "b.safetensors", tmp_path / "o.safetensors", "--model-code", f"{code}:Branchy",
            "--layer", "a", "--factor", "2")
    assert r.exit_code == 2 and "torch.fx cannot trace the model" in r.output
    assert "Data-dependent control flow" in r.output


DEEPEN = [
    ("resnet18", "zeroed copies of BasicBlocks (first block of a stage, and a later one)",
     [{"deepen": {"after_block": "layer1.0"}}, {"deepen": {"after_block": "layer3.1"}}], [1, 3, 32, 32],
     lambda s: len(s.layer1) == 3 and len(s.layer3) == 3 and not s.layer1[1].bn2.weight.any()),
    ("resnet18", "identity conv after a conv used by a hand-written forward (wrapped)",
     [{"deepen": {"after": "layer2.1.conv1"}}], [1, 3, 32, 32],
     lambda s: isinstance(s.layer2[1].conv1, torch.nn.Sequential) and s.layer2[1].conv1[1].kernel_size == (3, 3)),
    ("InceptionNet", "every tower deepened by an identity ConvBN-ReLU (the paper's experiment)",
     [{"deepen": {"after": t}} for t in ("inc1.b1", "inc1.b2.1", "inc1.b3.2", "inc1.b4.1")], [1, 3, 16, 16],
     lambda s: len(s.inc1.b2) == 5 and len(s.inc1.b1) == 4 and len(s.inc1.b4) == 5),
    ("sequential_cnn", "nn.Sequential: inserted and renumbered, then widened by the new numbers",
     [{"deepen": {"after": "0"}}, {"deepen": {"after": "12"}}, {"widen": {"layer": "7", "factor": 2}}], [1, 3, 16, 8],
     lambda s: [type(m).__name__ for m in s][:8] == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d",
                                                    "ReLU", "MaxPool2d", "Conv2d"] and s[7].out_channels == 24),
    ("UNet", "identity ConvBN-ReLU after an encoder stage (skipped and downsampled) and a decoder stage",
     [{"deepen": {"after": "enc2.0"}}, {"deepen": {"after": "dec1.0", "kernel_size": 1}}], [1, 3, 16, 12],
     lambda s: len(s.enc2) == 6 and len(s.dec1) == 6 and s.dec1[3].kernel_size == (1, 1)),
    ("MobileNetV2", "zeroed copies of inverted residuals (no activation after the add)",
     [{"deepen": {"after_block": "features.1"}}, {"deepen": {"after_block": "features.4"}}], [1, 3, 16, 16],
     lambda s: len(s.features) == 7),
]


@pytest.mark.parametrize("factory,what,steps,shape,check", DEEPEN, ids=[f"{c[0]}: {c[1]}" for c in DEEPEN])
def test_deepen_is_exact_against_the_users_module(tmp_path, factory, what, steps, shape, check):
    teacher, student, report = grow(tmp_path, factory, what, steps, shape)
    assert report["verification"]["passed"] is True
    assert report["plan"]["params_after"] > report["plan"]["params_before"]
    assert rel_error(teacher, student, shape) <= 1e-5
    assert check(student)  # load_grown replayed the insertions on the user's own module
    assert sum(p.numel() for p in student.parameters()) == report["plan"]["params_after"]


def test_widen_deepen_widen_chain_needs_no_model_code(tmp_path):
    shape = [1, 3, 32, 32]
    teacher, _, _ = grow(tmp_path, "resnet18", "", [{"widen": {"layer": "layer2.0.conv2", "to": 24}}], shape,
                         out="a.safetensors")
    steps = [[{"deepen": {"after_block": "layer2.1"}}],
             [{"widen": {"layer": "layer2.2.conv1", "factor": 2}}, {"deepen": {"after": "layer2.2.conv1"}}],
             [{"widen": {"layer": "layer2.0.conv2", "to": 30}}]]  # the stage again: the copies are coupled too
    for i, s in enumerate(steps):
        src, dst = (tmp_path / f"{'abcd'[k]}.safetensors" for k in (i, i + 1))
        report = api.grow(api.spec_from_steps(s, seed=i), src, dst, probes=4)
        assert report["verification"]["passed"] is True, report["plan"]
    with safe_open(str(tmp_path / "d.safetensors"), "pt") as f:
        recorded = json.loads(f.metadata()["n2n_model_code"])
    assert [e["op"] for e in recorded["insertions"]] == ["insert", "wrap"]
    student = n2n_cli.load_grown(Z.resnet18(), tmp_path / "d.safetensors")
    assert len(student.layer2) == 3 and student.layer2[2].conv1[0].out_channels == 32
    assert student.layer2[2].bn2.num_features == 30 and student.layer3[0].conv1.in_channels == 30
    assert rel_error(teacher, student, shape) <= 1e-5


def test_deepen_random_init_is_measured_not_judged(tmp_path):
    _, _, report = grow(tmp_path, "sequential_cnn", "", [{"deepen": {"after": "4", "method": "random-init"}}],
                        [1, 3, 16, 8])
    assert report["verification"]["passed"] is None and report["verification"]["deviation"]["max_abs_error"] > 0


GELU_NET = """
import torch.nn as nn

def net():
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
"""


def test_deepen_refusals_name_the_module_and_why(tmp_path, cli):
    _, path = teacher_file(tmp_path, Z.resnet18)
    out = tmp_path / "out.safetensors"
    base = ["deepen", path, out, "--model-code", f"{ZOO}:resnet18"]
    r = cli(*base, "--after", "fc")
    assert r.exit_code == 2 and "the output of 'fc' is the network's output" in r.output
    r = cli(*base, "--after-block", "layer2.0")
    assert r.exit_code == 2 and "the shortcut of 'layer2.0' (BasicBlock) is not its input" in r.output
    assert "module 'layer2.0.downsample.1' (BatchNorm2d)" in r.output
    r = cli(*base, "--after-block", "layer2.0.conv1")
    assert r.exit_code == 2 and "'layer2.0.conv1' (Conv2d) reads" not in r.output and "not a residual block" in r.output
    r = cli(*base, "--after-block", "layer9")
    assert r.exit_code == 2 and "the model has no module 'layer9'" in r.output
    r = cli(*base, "--after", "layer1.0.conv1", "--kernel-size", "2")
    assert r.exit_code == 2 and "2x2 is even" in r.output
    _, ipath = teacher_file(tmp_path, Z.InceptionNet, name="inc.safetensors")
    r = cli("deepen", ipath, out, "--model-code", f"{ZOO}:InceptionNet", "--after-block", "inc1")
    assert r.exit_code == 2 and "'inc1' (InceptionModule) is not a residual block: its output is not x + f(x)" \
        in r.output and "cat()" in r.output
    assert not out.exists()
    code = _write(tmp_path, "gelu_net.py", GELU_NET)
    gelu = build_model(f"{code}:net")
    save_file({k: v.contiguous() for k, v in Z.perturb(gelu).state_dict().items()}, str(tmp_path / "g.safetensors"))
    base = ["deepen", tmp_path / "g.safetensors", out, "--model-code", f"{code}:net", "--device", "cpu"]
    r = cli(*base, "--after", "0")
    assert r.exit_code == 2 and "'0' is followed by GELU, which is not idempotent" in r.output
    assert not out.exists()
    r = cli(*base, "--after", "2")  # followed by ReLU: exact
    assert r.exit_code == 0 and "PASS" in r.output, r.output


def test_verify_runs_the_users_module_on_both_sides(tmp_path, cli):
    _, _, _ = grow(tmp_path, "resnet18", "", [{"deepen": {"after_block": "layer1.1"}},
                                              {"widen": {"layer": "layer1.0.conv1", "factor": 2}}], [1, 3, 32, 32])
    t, s = tmp_path / "teacher.safetensors", tmp_path / "student.safetensors"
    r = cli("verify", t, s, "--probes", "4", "--device", "cpu")  # the student's metadata names the code
    assert r.exit_code == 0 and "PASS" in r.output, r.output
    r = cli("verify", t, s, "--probes", "4", "--device", "cpu", "--model-code", f"{ZOO}:resnet18")
    assert r.exit_code == 0 and "PASS" in r.output, r.output
    _, other = teacher_file(tmp_path, Z.resnet18, name="other.safetensors", seed=5)
    r = cli("verify", other, s, "--probes", "4", "--device", "cpu")
    assert r.exit_code == 3 and "the student does not compute the teacher's function" in r.output


# ----------------------------------------------------------------------------- ViT

VIT = [
    ("ViT", "MLP hidden of every block", [{"widen": {"layer": f"blocks.{i}.mlp.0", "factor": 2}} for i in (0, 1)]),
    ("ViT", "MLP hidden of one block, non-multiple", [{"widen": {"layer": "blocks.1.mlp.0", "to": 61}}]),
    ("ViT", "heads 3 -> 5 (fused qkv)", [{"widen": {"layer": "blocks.1.attn", "to": 5}}]),
    ("ViT", "stream x2 (LayerNorm, class token, position embedding, head tiled)",
     [{"widen": {"layer": "patch_embed", "factor": 2}}]),
    ("vit_split", "heads (q, k, v Linears, sdpa) then stream x3",
     [{"widen": {"layer": "blocks.0.attn", "to": 4}}, {"widen": {"layer": "patch_embed", "factor": 3}}]),
    ("vit_torch", "nn.MultiheadAttention: MLP, then stream x2 tiles its heads",
     [{"widen": {"layer": "blocks.0.mlp.0", "to": 50}}, {"widen": {"layer": "patch_embed", "factor": 2}}]),
    ("ViT", "deepen with a zeroed pre-norm block copy, then heads and stream",
     [{"deepen": {"after_block": "blocks.0"}}, {"widen": {"layer": "blocks.1.attn", "to": 4}},
      {"widen": {"layer": "blocks.2.mlp.0", "factor": 2}}, {"widen": {"layer": "patch_embed", "factor": 2}}]),
    ("vit_split", "deepen after the last block", [{"deepen": {"after_block": "blocks.1"}}]),
    ("vit_torch", "stream x2, then a zeroed nn.MultiheadAttention block copy",
     [{"widen": {"layer": "patch_embed", "factor": 2}}, {"deepen": {"after_block": "blocks.1"}}]),
]


@pytest.mark.parametrize("factory,what,steps", VIT, ids=[f"{c[0]}: {c[1]}" for c in VIT])
def test_vit_growth_is_exact_against_the_users_module(tmp_path, factory, what, steps):
    shape = [1, 3, 16, 16]
    teacher, student, report = grow(tmp_path, factory, what, steps, shape)
    assert report["verification"]["passed"] is True
    assert rel_error(teacher, student, shape) <= 1e-5
    assert sum(p.numel() for p in student.parameters()) == report["plan"]["params_after"] > \
        report["plan"]["params_before"]
    x = torch.randn(2, 3, 16, 16)
    if any("attn" in s.get("widen", {}).get("layer", "") for s in steps):
        attn = student.blocks[1 if factory == "ViT" else 0].attn
        assert attn.num_heads in (4, 5) and attn.head_dim == 8  # heads added, head_dim kept
    if any(s.get("widen", {}).get("layer") == "patch_embed" for s in steps):
        assert student.cls_token.shape[-1] == student.norm.normalized_shape[0] == student.head.in_features >= 48
        if factory == "vit_torch":
            mha = student.blocks[0].attn.mha
            assert mha.embed_dim == 48 and mha.num_heads == 6 and mha.head_dim == 8
    if any("deepen" in s for s in steps):
        assert len(student.blocks) == 3
    with torch.no_grad():
        assert student(x).shape == teacher(x).shape


def test_vit_refusals_name_the_module_and_why(tmp_path, cli):
    out = tmp_path / "out.safetensors"
    _, path = teacher_file(tmp_path, Z.ViT)
    base = ["widen", path, out, "--model-code", f"{ZOO}:ViT", "--example-input", "1,3,16,16"]
    r = cli(*base, "--layer", "patch_embed", "--to", "36")
    assert r.exit_code == 2 and "to: 36 is not an integer multiple of the current width 24 of 'patch_embed'" \
        in r.output and "(LayerNorm) normalises over these features" in r.output, r.output
    r = cli(*base, "--layer", "blocks.0.attn", "--to", "3")
    assert r.exit_code == 2 and "the new heads 3 is not larger than the current heads 3" in r.output
    r = cli(*base, "--layer", "head", "--factor", "2")
    assert r.exit_code == 2 and "network output" in r.output
    _, tpath = teacher_file(tmp_path, Z.vit_torch, name="t.safetensors")
    r = cli("widen", tpath, out, "--model-code", f"{ZOO}:vit_torch", "--layer", "blocks.0.attn.mha", "--to", "4",
            "--example-input", "1,3,16,16")
    assert r.exit_code == 2 and "nn.MultiheadAttention 'blocks.0.attn.mha' has heads x head_dim = embed_dim" \
        in r.output and "factor: 2" in r.output, r.output
    r = cli("deepen", tpath, out, "--model-code", f"{ZOO}:vit_torch", "--after", "blocks.0.mlp.0",
            "--example-input", "1,3,16,16")
    assert r.exit_code == 2 and "GELU, which is not idempotent" in r.output
    assert not out.exists()


def test_after_block_is_refused_for_hugging_face_directories(tmp_path, cli):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text("{}")
    r = cli("deepen", d, tmp_path / "out", "--after-block", "3")
    assert r.exit_code == 2 and "--after-block is for models built by --model-code" in r.output


def test_validate_a_model_code_spec_reports_every_step_problem_by_line(tmp_path, cli):
    _, path = teacher_file(tmp_path, Z.ViT)
    spec = tmp_path / "vit.yaml"
    spec.write_text(f"""model_code: {ZOO}:ViT
example_input: {{shape: [1, 3, 16, 16]}}
steps:
  - widen: {{layer: patch_embed, to: 36}}
  - widen: {{layer: blocks.0.attn, to: 5}}
  - widen: {{layer: blocks.0.mlp.9, factor: 2}}
  - deepen: {{after_block: blocks.1}}
""")
    r = cli("validate", spec, "--checkpoint", path)
    assert r.exit_code == 2 and "2 steps cannot be applied" in r.output, r.output
    assert "line 4: steps[0] (widen patch_embed): to: 36 is not an integer multiple" in r.output
    assert "line 6: steps[2] (widen blocks.0.mlp.9): layer: the model has no module 'blocks.0.mlp.9'" in r.output
    assert "Did you mean" in r.output and "line 5" not in r.output
    spec.write_text(spec.read_text().replace("to: 36", "factor: 2").replace("mlp.9", "mlp.0"))
    r = cli("validate", spec, "--checkpoint", path, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["checked"] == "schema and steps (traced from your model code)"


def test_model_code_lineage_is_read_safely_and_names_the_teacher(tmp_path, cli):
    """The traced path reads and writes lineage like the others: malformed lineage is exit 2
    (not an internal error), and each entry records the teacher's sha256."""
    import hashlib

    from safetensors import safe_open

    model = Z.perturb(Z.resnet18())
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad), metadata={"n2n_lineage": "5"})
    r = cli("widen", bad, tmp_path / "o.safetensors", "--model-code", f"{ZOO}:resnet18", "--layer", "layer1.0.conv1",
            "--factor", "2")
    assert r.exit_code == 2, r.output
    assert "n2n_lineage" in r.output and "internal error" not in r.output
    assert not (tmp_path / "o.safetensors").exists()
    good = tmp_path / "t.safetensors"
    save_file(sd, str(good))
    r = cli("widen", good, tmp_path / "o.safetensors", "--model-code", f"{ZOO}:resnet18", "--layer", "layer1.0.conv1",
            "--factor", "2", "--no-verify")
    assert r.exit_code == 0, r.output
    with safe_open(str(tmp_path / "o.safetensors"), "pt") as f:
        lineage = json.loads(f.metadata()["n2n_lineage"])
    assert lineage[-1]["teacher_sha256"] == hashlib.sha256(good.read_bytes()).hexdigest()


def test_model_code_tolerances_are_the_same_rules_as_elsewhere(tmp_path, cli):
    """The traced path sets tolerances like the others (by the dtypes that round) and says when a
    failure is the user's own tolerance."""
    path = tmp_path / "t.safetensors"
    save_file({k: v.contiguous() for k, v in Z.perturb(Z.resnet18()).state_dict().items()}, str(path))
    r = cli("widen", path, tmp_path / "o.safetensors", "--model-code", f"{ZOO}:resnet18", "--layer", "layer2.0.conv2",
            "--factor", "2", "--atol", "0", "--rtol", "0")
    assert r.exit_code == 3, r.output
    assert "The tolerance is yours (--atol 0 --rtol 0)" in r.output and "This is not a bug in n2n" in r.output
    r = cli("widen", path, tmp_path / "o.safetensors", "--model-code", f"{ZOO}:resnet18", "--layer", "layer2.0.conv2",
            "--factor", "2", "--json")
    assert r.exit_code == 0, r.output
    v = json.loads(r.stdout)["verification"]["exact"]
    assert (v["atol"], v["rtol"]) == (1e-5, 1e-4)
