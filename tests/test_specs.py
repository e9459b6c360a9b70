"""Every growth spec shipped in specs/ validates and grows its bundled (or, for Hugging Face
specs, a tiny locally built) teacher."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import SPECS, load_student, make_hf_model, max_rel_error
from n2n_cli import api
from n2n_cli.model import to_torch_module
from n2n_cli.spec import is_hf_spec, load_model_description

GROWTH_SPECS = sorted(SPECS.glob("*.yaml"))
TEACHERS = {"models/mnist-cnn.yaml": SPECS / "teachers" / "mnist-cnn.safetensors",
            "models/mlp.yaml": SPECS / "teachers" / "mlp.safetensors"}


def test_there_are_specs():
    assert len(GROWTH_SPECS) >= 5


@pytest.mark.parametrize("spec", GROWTH_SPECS, ids=lambda p: p.name)
def test_spec_validates_and_grows(spec, tmp_path):
    data = yaml.safe_load(spec.read_text())
    if is_hf_spec(data):
        pytest.importorskip("transformers")
        teacher_path = make_hf_model(tmp_path, "llama")
        assert api.validate(spec, checkpoint=teacher_path)["valid"] is True
        report = api.grow(spec, teacher_path, tmp_path / "student", device="cpu")
        assert report["written"] and report["verification"]["passed"] is True
        return
    model_ref = data["model"]
    teacher_path = TEACHERS[model_ref]
    assert api.validate(spec, checkpoint=teacher_path)["valid"] is True
    out = tmp_path / "student.safetensors"
    report = api.grow(spec, teacher_path, out, device="cpu")
    v = report["verification"]
    if report["plan"]["function_preserving"]:
        assert report["written"] and v["passed"] is True and v["exact_student"] is True
    else:  # a baseline: only its exact counterpart is judged, the written student is not called exact
        assert report["written"] and v["passed"] is None and v["exact_student"] is False
        assert v["exact_counterpart"]["passed"] is True and v["deviation"]["passed"] is None
    _, student = load_student(out)
    desc = load_model_description(spec.parent / model_ref)
    teacher = to_torch_module(desc)
    teacher.load_state_dict(load_file(str(teacher_path)))
    teacher.eval()
    x = torch.randn((16, *desc.input_shape), generator=torch.Generator().manual_seed(0))
    err = max_rel_error(teacher, student, x)
    if report["plan"]["function_preserving"]:
        assert err <= 1e-5
    else:  # baselines move the function, measurably
        assert err > 1e-3


def test_seed_experiment_spec_matches_the_issue():
    """specs/ carries the seed's experiment: conv1 and fc1 64 -> 128; a conv after conv2 and a linear after fc1."""
    steps = yaml.safe_load((SPECS / "mnist-cnn-grow.yaml").read_text())["steps"]
    assert {"widen": {"layer": "conv1", "to": 128}} in steps
    assert any(s.get("widen", {}).get("layer") == "fc1" for s in steps)
    assert [s["deepen"]["after"] for s in steps if "deepen" in s] == ["conv2", "fc1"]
