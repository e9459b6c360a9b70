"""The grown student loads into the user's own constructor with plain load_state_dict when some
constructor arguments reproduce its shapes (``student_args``), else ``n2n inspect`` says load_grown."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

import models_zoo as Z
import n2n_cli
from test_graph import ZOO, grow, rel_error, teacher_file

RESNET_X2 = [{"widen": {"layer": f"layer{i}.0.conv2", "factor": 2}} for i in range(1, 5)] + \
    [{"widen": {"layer": f"layer{i}.{j}.conv1", "factor": 2}} for i in range(1, 5) for j in (0, 1)]

UNIFORM = [
    ("resnet18", "every conv x2: width=16", RESNET_X2, [1, 3, 32, 32], {"width": 16}),
    ("ViT", "stream x2: dim=48", [{"widen": {"layer": "patch_embed", "factor": 2}}], [1, 3, 16, 16], {"dim": 48}),
    ("ViT", "MLP hidden of every block x2: mlp=96",
     [{"widen": {"layer": f"blocks.{i}.mlp.0", "factor": 2}} for i in (0, 1)], [1, 3, 16, 16], {"mlp": 96}),
    ("ViT", "heads 3 -> 6 in every block: num_heads=6 (head_dim=16 has the same shapes, another function)",
     [{"widen": {"layer": f"blocks.{i}.attn", "to": 6}} for i in (0, 1)], [1, 3, 16, 16], {"num_heads": 6}),
    ("mlp", "first hidden layer only: hidden=[32, 12]", [{"widen": {"layer": "0", "factor": 2}}], [1, 6],
     {"hidden": [32, 12]}),
    ("mlp", "both hidden layers, different factors", [{"widen": {"layer": "0", "factor": 2}},
                                                      {"widen": {"layer": "2", "to": 15}}], [1, 6],
     {"hidden": [32, 15]}),
    ("ResNet", "zeroed block copy at the end of stage 1: layers=[3, 2, 2, 2]",
     [{"deepen": {"after_block": "layer1.1"}}], [1, 3, 32, 32], {"layers": [3, 2, 2, 2]}),
    ("ResNet", "block copies in two stages, then width x2 everywhere: two arguments",
     [{"deepen": {"after_block": "layer1.1"}}, {"deepen": {"after_block": "layer3.1"}}]
     + [{"widen": {"layer": f"layer{i}.0.conv2", "factor": 2}} for i in range(1, 5)]
     + [{"widen": {"layer": f"layer{i}.{j}.conv1", "factor": 2}} for i in range(1, 5) for j in range(3 if i in (1, 3) else 2)],
     [1, 3, 32, 32], {"layers": [3, 2, 3, 2], "width": 16}),
    ("ViT", "zeroed block copy: depth=3", [{"deepen": {"after_block": "blocks.1"}}], [1, 3, 16, 16], {"depth": 3}),
]


def _recorded(path):
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["n2n_model_code"])


@pytest.mark.parametrize("factory,what,steps,shape,args", UNIFORM, ids=[f"{c[0]}: {c[1]}" for c in UNIFORM])
def test_plain_load_state_dict_into_the_users_constructor(tmp_path, cli, factory, what, steps, shape, args):
    teacher, grown, report = grow(tmp_path, factory, what, steps, shape)
    assert report["verification"]["passed"] is True
    assert report["load"]["how"] == "load_state_dict" and report["load"]["student_args"] == args
    path = tmp_path / "student.safetensors"
    assert _recorded(path)["student_args"] == args
    student = getattr(Z, factory)(**args)
    student.load_state_dict(load_file(str(path)), strict=True)  # the user's own code, no n2n
    assert rel_error(teacher, student.eval(), shape) <= 1e-5
    if factory != "ViT" or "heads" not in what:
        assert not report["load"]["rejected"]
    else:  # equal shapes are not accepted on shapes alone: the function is checked
        assert report["load"]["rejected"] == ['{"head_dim": 16}']
        wrong = Z.ViT(head_dim=16)
        wrong.load_state_dict(load_file(str(path)), strict=True)
        assert rel_error(teacher, wrong.eval(), shape) > 1e-3
    r = cli("inspect", path, "--example-input", ",".join(map(str, shape)))
    assert r.exit_code == 0, r.output
    line = f"load with: {factory}(**{json.dumps(args, sort_keys=True)}).load_state_dict(load_file(path))"
    assert line in r.output.replace("\n", "")


NON_UNIFORM = [
    ("resnet18", "conv1 of one block", [{"widen": {"layer": "layer3.1.conv1", "factor": 2}}], [1, 3, 32, 32]),
    ("resnet18", "one stage only (width sizes every stage)", [{"widen": {"layer": "layer2.0.conv2", "to": 24}}],
     [1, 3, 32, 32]),
    ("ViT", "heads of one block", [{"widen": {"layer": "blocks.1.attn", "to": 5}}], [1, 3, 16, 16]),
    ("ViT", "MLP hidden of one block", [{"widen": {"layer": "blocks.0.mlp.0", "factor": 2}}], [1, 3, 16, 16]),
    ("ResNet", "identity conv wrapped with a conv (names no constructor makes)",
     [{"deepen": {"after": "layer2.1.conv1"}}], [1, 3, 32, 32]),
    ("mlp", "identity layer inserted in the middle of the Sequential (ReLU numbering shifts)",
     [{"deepen": {"after": "0"}}], [1, 6]),
]


@pytest.mark.parametrize("factory,what,steps,shape", NON_UNIFORM, ids=[f"{c[0]}: {c[1]}" for c in NON_UNIFORM])
def test_non_uniform_growth_says_load_grown(tmp_path, cli, factory, what, steps, shape):
    teacher, grown, report = grow(tmp_path, factory, what, steps, shape)
    assert report["verification"]["passed"] is True
    assert report["load"]["how"] == "load_grown" and report["load"]["student_args"] is None
    assert 0 < report["load"]["tried"] <= 300
    path = tmp_path / "student.safetensors"
    assert "student_args" not in _recorded(path)
    assert rel_error(teacher, grown, shape) <= 1e-5  # load_grown works
    with pytest.raises(RuntimeError):
        getattr(Z, factory)().load_state_dict(load_file(str(path)), strict=True)
    r = cli("inspect", path, "--example-input", ",".join(map(str, shape)))
    assert r.exit_code == 0, r.output
    text = r.output.replace("\n", "")
    assert "load with n2n_cli.load_grown(model, path): no constructor arguments reproduce the grown shapes (tried " \
        in text


def test_inspect_a_teacher_and_the_grow_output_line(tmp_path, cli):
    _, path = teacher_file(tmp_path, Z.mlp)
    r = cli("inspect", path, "--model-code", f"{ZOO}:mlp", "--model-args", '{"classes": 3}')
    assert r.exit_code == 0, r.output
    assert 'load with: mlp(**{"classes": 3}).load_state_dict(load_file(path))' in r.output.replace("\n", "")
    r = cli("widen", path, tmp_path / "w.safetensors", "--model-code", f"{ZOO}:mlp", "--layer", "2", "--factor", "2",
            "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert 'load with: mlp(**{"hidden": [16, 24]}).load_state_dict(load_file(path))' in r.output.replace("\n", "")
    r = cli("widen", path, tmp_path / "v.safetensors", "--model-code", f"{ZOO}:sequential_cnn", "--layer", "0",
            "--factor", "2", "--device", "cpu")
    assert r.exit_code == 2  # (the mlp checkpoint does not load into sequential_cnn; nothing searched)


def test_a_chained_student_is_searched_from_the_teachers_arguments(tmp_path):
    shape = [1, 6]
    teacher, _, _ = grow(tmp_path, "mlp", "", [{"widen": {"layer": "0", "factor": 2}}], shape, out="a.safetensors")
    report = n2n_cli.api.grow(n2n_cli.api.spec_from_steps([{"widen": {"layer": "2", "to": 20}}], seed=1),
                              tmp_path / "a.safetensors", tmp_path / "b.safetensors", probes=4)
    assert report["load"]["student_args"] == {"hidden": [32, 20]}
    student = Z.mlp(hidden=[32, 20])
    student.load_state_dict(load_file(str(tmp_path / "b.safetensors")), strict=True)
    assert rel_error(teacher, student.eval(), shape) <= 1e-5
