"""Regenerate the bundled example teachers in specs/teachers/ (seeded, byte-identical).

They are randomly initialised networks with non-trivial batchnorm statistics: enough for
the quickstart and the tests to exercise every remapping. For trained teachers on real
digits, see scripts/reproduce_net2net.py.

    python scripts/make_example_teachers.py
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from n2n_cli.model import to_torch_module
from n2n_cli.spec import load_model_description

ROOT = Path(__file__).resolve().parent.parent


def make(model_yaml: Path, out: Path, seed: int) -> None:
    desc = load_model_description(model_yaml)
    torch.manual_seed(seed)
    net = to_torch_module(desc)
    for m in net.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
            m.num_batches_tracked.fill_(100)
    sd = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    save_file(sd, str(out), metadata={"format": "pt"})
    print(f"wrote {out.relative_to(ROOT)} ({out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    (ROOT / "specs/teachers").mkdir(exist_ok=True)
    make(ROOT / "specs/models/mnist-cnn.yaml", ROOT / "specs/teachers/mnist-cnn.safetensors", 0)
    make(ROOT / "specs/models/mlp.yaml", ROOT / "specs/teachers/mlp.safetensors", 1)
