"""Norms over a widened axis in models built by the user's code: GroupNorm (num_groups kept, each
channel repeated in place), LayerNorm over a widened feature axis (tiled: the statistics of [x, x]
are those of x) in MLPs and CNNs, over a concatenation (every tower by the same factor), the
functional F.layer_norm / F.group_norm, and norms written with tensor ops (a mean over the
features); refusals where exactness is impossible."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import models_zoo as Z
import n2n_cli
import norm_models as N
from n2n_cli import api

CODE = Path(__file__).resolve().parent / "norm_models.py"


def _teacher(tmp_path, name, seed=1):
    model = Z.perturb(getattr(N, name)(), seed)
    with torch.no_grad():  # free parameters used by F.layer_norm / F.group_norm: away from ones and zeros too
        for n, p in model.named_parameters():
            if n.endswith(("_w", "_b")):
                p.copy_(torch.rand(p.shape, generator=torch.Generator().manual_seed(7)) + (0.5 if n.endswith("_w")
                                                                                              else -0.5))
    path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def _rel(teacher, student, shape):
    x = torch.randn((8, *shape[1:]), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        t, s = teacher(x).double(), student(x).double()
    return float((t - s).abs().max() / t.abs().max())


CASES = [
    ("GNNet", ("GroupNorm: stem and residual block (num_groups 4 and 2), towers normalised together, "
               "affine=False, per-channel and one group"), [1, 3, 6, 6],
     [{"widen": {"layer": m, "factor": 2}} for m in ("stem", "block.conv1", "a", "c", "d", "e")]
     + [{"widen": {"layer": "b", "to": 36}}]),
    ("LNMLP", "LayerNorm after a linear, over a concatenation, pre-norm residual", [1, 6],
     [{"widen": {"layer": "fc1", "to": 36}}, {"widen": {"layer": "p", "factor": 2}},
      {"widen": {"layer": "up", "to": 21}}]),
    ("ChannelsFirstLN", "LayerNorm in a CNN: channels-last (permute), over (C, H, W), over (H, W)", [1, 3, 6, 6],
     [{"widen": {"layer": m, "factor": 2}} for m in ("stem", "conv")] + [{"widen": {"layer": "conv2", "to": 7}}]),
    ("FunctionalNorms", "F.group_norm (constant num_groups), F.layer_norm (x.shape[-1:], with and without weight)",
     [1, 3, 6, 6], [{"widen": {"layer": m, "factor": f}} for m, f in (("conv", 2), ("fc1", 3), ("fc2", 2))]),
    ("HandWrittenNorms", "written with tensor ops: ConvNeXt's LayerNorm2d (w[:, None, None] * x), RMSNorm",
     [1, 3, 6, 6], [{"widen": {"layer": "conv", "factor": 2}}, {"widen": {"layer": "fc", "factor": 3}},
                    {"widen": {"layer": "conv2", "to": 11}}]),
]


@pytest.mark.parametrize("name,what,shape,steps", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_norms_over_a_widened_axis_are_exact(tmp_path, name, what, shape, steps):
    teacher, path = _teacher(tmp_path, name)
    report = api.grow(api.spec_from_steps(steps, seed=2), path, tmp_path / "s.safetensors",
                      model_code=f"{CODE}:{name}", example_input=shape, probes=4)
    assert report["verification"]["passed"] is True
    student = n2n_cli.load_grown(getattr(N, name)(), tmp_path / "s.safetensors")
    assert sum(p.numel() for p in student.parameters()) == report["plan"]["params_after"] > \
        report["plan"]["params_before"]
    assert _rel(teacher, student, shape) <= 1e-5


def test_groupnorm_keeps_num_groups_so_the_users_constructor_loads_the_student(tmp_path):
    teacher, path = _teacher(tmp_path, "GNNet")
    report = api.grow(api.spec_from_steps([{"widen": {"layer": "stem", "factor": 2}},
                                           {"widen": {"layer": "block.conv1", "factor": 2}}]), path,
                      tmp_path / "s.safetensors", model_code=f"{CODE}:GNNet", example_input=[1, 3, 6, 6], probes=4)
    summary = report["plan"]["steps"][0]["summary"]
    assert "each unit repeated x2 in place" in summary and "coupled: block.conv2" in summary
    student = n2n_cli.load_grown(N.GNNet(), tmp_path / "s.safetensors")
    assert (student.gn0.num_groups, student.gn0.num_channels) == (4, 16)
    assert (student.block.gn2.num_groups, student.block.gn2.num_channels) == (2, 16) == \
        (student.block.gn1.num_groups, student.block.gn1.num_channels)
    # GroupNorm(4, width) in the user's constructor: plain load_state_dict into GNNet(width=16) works
    plain = N.GNNet(width=16)
    plain.load_state_dict(student.state_dict())
    assert _rel(teacher, plain.eval(), [1, 3, 6, 6]) <= 1e-5


def test_layernorm_over_a_concatenation_grows_every_tower_by_one_factor(tmp_path):
    teacher, path = _teacher(tmp_path, "LNMLP")
    report = api.grow(api.spec_from_steps([{"widen": {"layer": "q", "factor": 3}}]), path,
                      tmp_path / "s.safetensors", model_code=f"{CODE}:LNMLP", example_input=[1, 6], probes=4)
    assert "x3 with it (normalised together): p" in report["plan"]["steps"][0]["summary"]
    student = n2n_cli.load_grown(N.LNMLP(), tmp_path / "s.safetensors")
    assert (student.p.out_features, student.q.out_features) == (15, 21)
    assert student.ln_cat.normalized_shape == (36,) and student.down.out_features == 36
    assert _rel(teacher, student, [1, 6]) <= 1e-5


def test_a_normalised_value_added_to_a_concatenation_grows_all_its_regions(tmp_path):
    teacher, path = _teacher(tmp_path, "NormedPlusConcat")
    report = api.grow(api.spec_from_steps([{"widen": {"layer": "p", "factor": 2}}]), path,
                      tmp_path / "s.safetensors", model_code=f"{CODE}:NormedPlusConcat", example_input=[1, 6],
                      probes=4)
    assert "coupled: lin; x2 with it (normalised together): q" in report["plan"]["steps"][0]["summary"]
    student = n2n_cli.load_grown(N.NormedPlusConcat(), tmp_path / "s.safetensors")
    assert (student.p.out_features, student.q.out_features, student.ln.normalized_shape) == (8, 10, (18,))
    assert _rel(teacher, student, [1, 6]) <= 1e-5


def test_layernorm_over_channels_and_space_resizes_its_normalized_shape(tmp_path):
    teacher, path = _teacher(tmp_path, "ChannelsFirstLN")
    api.grow(api.spec_from_steps([{"widen": {"layer": "conv", "factor": 2}}]), path, tmp_path / "s.safetensors",
             model_code=f"{CODE}:ChannelsFirstLN", example_input=[1, 3, 6, 6], probes=4)
    student = n2n_cli.load_grown(N.ChannelsFirstLN(), tmp_path / "s.safetensors")
    assert student.ln_chw.normalized_shape == (10, 6, 6) and student.ln_hw.normalized_shape == (6, 6)
    assert _rel(teacher, student, [1, 3, 6, 6]) <= 1e-5


REFUSALS = [
    ("ConstantLN", ["--layer", "fc1", "--factor", "2"], [1, 4],
     ("'fc1' cannot be widened exactly: layer_norm() (node 'layer_norm') is given the constant normalized_shape "
      "(8,): after widening it would still normalise over 8 features; pass a shape read from the tensor")),
    ("PlainLN", ["--layer", "fc1", "--factor", "2"], [1, 4],
     ("module 'ln' (LayerNorm) normalises over these features but has no weight: its normalized_shape (8,) is not "
      "a tensor n2n can resize (elementwise_affine=False)")),
    ("ComputedGroups", ["--layer", "conv", "--factor", "2"], [1, 3, 4, 4],
     "group_norm() (node 'group_norm') computes num_groups in forward"),
    ("GNNet", ["--layer", "a", "--to", "6"], [1, 3, 6, 6],
     ("to: 6 is not an integer multiple of the current width 4 of 'a': module 'gn_cat' (GroupNorm) normalises "
      "5 groups of channels: with num_groups kept")),
    ("GNNet", ["--layer", "stem", "--to", "12"], [1, 3, 6, 6],
     "module 'gn0' (GroupNorm) normalises 4 groups of channels"),
    ("LNMLP", ["--layer", "fc1", "--to", "13"], [1, 6],
     ("to: 13 is not an integer multiple of the current width 12 of 'fc1': module 'ln1' (LayerNorm) normalises over "
      "these features: its mean and variance stay the same only when every feature is copied the same number of "
      "times")),
    ("HandWrittenNorms", ["--layer", "conv", "--to", "7"], [1, 3, 6, 6],
     ("to: 7 is not an integer multiple of the current width 6 of 'conv': .mean() (node 'mean' in module 'norm' "
      "(LayerNorm2d)) averages over these features")),
    ("HandWrittenNorms", ["--layer", "fc", "--to", "13"], [1, 3, 6, 6],
     ".mean() (node 'mean_2' in module 'rms' (RMSNorm)) averages over these features"),
    ("ChannelSum", ["--layer", "conv", "--factor", "2"], [1, 3, 6, 6],
     "'conv' cannot be widened exactly: .sum() (node 'sum_1') sums over the features"),
    ("FunctionalNorms", ["--layer", "fc2", "--to", "15"], [1, 3, 6, 6],
     "layer_norm() (node 'layer_norm_1') normalises over these features"),
]


@pytest.mark.parametrize("name,args,shape,message", REFUSALS, ids=[f"{r[0]} {' '.join(r[1])}" for r in REFUSALS])
def test_norm_refusals_name_the_module_and_why(tmp_path, cli, name, args, shape, message):
    _, path = _teacher(tmp_path, name)
    out = tmp_path / "out.safetensors"
    r = cli("widen", path, out, "--model-code", f"{CODE}:{name}", "--example-input", ",".join(map(str, shape)), *args)
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.split()), r.output
    assert not out.exists()


def test_optimizer_moments_follow_a_groupnorm_widening_exactly(tmp_path):
    """GroupNorm's in-place repetition ("spread") is an exact copy like tiling: the mapped Adam
    moments are the grown module's own, and nothing is reported approximate."""
    from test_optim_state import _ce, accumulate, compare_states

    teacher, path = _teacher(tmp_path, "GNNet")
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(3)]
    torch.save(accumulate(teacher, batches, _ce), tmp_path / "opt.pt")
    report = api.grow(api.spec_from_steps([{"widen": {"layer": "stem", "factor": 2}},
                                           {"widen": {"layer": "a", "factor": 2}}]), path, tmp_path / "s.safetensors",
                      model_code=f"{CODE}:GNNet", example_input=[1, 3, 6, 6], optimizer_state=tmp_path / "opt.pt",
                      optimizer_state_out=tmp_path / "opt-grown.pt")
    assert "approximate" not in report["optimizer_state"]
    student = n2n_cli.load_grown(N.GNNet(), tmp_path / "s.safetensors").eval()
    names = [n for n, _ in student.named_parameters()]
    mapped = torch.load(tmp_path / "opt-grown.pt", weights_only=True)
    # d.bias feeds a per-channel GroupNorm: its gradient is zero up to rounding on both sides
    assert compare_states(mapped, accumulate(student, batches, _ce), names, skip={"d.bias"}) < 5e-5
