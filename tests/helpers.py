"""Helpers shared by the tests (import as ``from helpers import ...``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from n2n_cli.model import ModelDescription, to_torch_module
from n2n_cli.spec import load_model_description

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
CNN_YAML = SPECS / "models" / "mnist-cnn.yaml"
MLP_YAML = SPECS / "models" / "mlp.yaml"


def randomize_norms(net: torch.nn.Module, gen: torch.Generator) -> None:
    """Give batchnorms non-trivial statistics and affine parameters (defaults would hide bugs)."""
    for m in net.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)


def make_teacher(desc: ModelDescription, path: Path, seed: int = 0, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = to_torch_module(desc)
    with torch.no_grad():
        randomize_norms(net, torch.Generator().manual_seed(seed))
    net = net.to(dtype)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return net.eval()


def load_student(path: Path) -> tuple[ModelDescription, torch.nn.Module]:
    """Load a grown checkpoint with plain PyTorch: its description from metadata,
    an nn.Module, load_state_dict(strict=True)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    desc = ModelDescription.model_validate(json.loads(meta["n2n_model"]))
    net = to_torch_module(desc)
    sd = load_file(str(path))
    net = net.to(next(iter(sd.values())).dtype if sd else torch.float32)
    net.load_state_dict(sd, strict=True)
    return desc, net.eval()


def max_rel_error(teacher: torch.nn.Module, student: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        t, s = teacher(x).double(), student(x).double()
    return float((t - s).abs().max() / t.abs().max().clamp_min(1e-12))
