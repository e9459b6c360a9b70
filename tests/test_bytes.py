"""Growth output is byte-identical to what n2n wrote before the speed work (issue 8): the
tensors' bytes (names, dtypes, shapes, data) of grown checkpoints, hashed, against digests
recorded with the old code path (float32/float64 round trip for every tensor)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import CNN_YAML, MLP_YAML, load_module, make_teacher
from n2n_cli import api
from n2n_cli.spec import load_model_description, spec_from_steps

ROOT = Path(__file__).resolve().parents[1]


def tensor_digest(path: Path) -> str:
    """SHA-256 over (name, dtype, shape, raw bytes) of every tensor of a file or directory, by name."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    h = hashlib.sha256()
    tensors = {}
    for f in files:
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                tensors[k] = sf.get_tensor(k)
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def llama(tmp_path: Path, dtype: str) -> Path:
    bench = load_module(ROOT / "scripts" / "bench_llm.py", "bench_llm")
    bench.build_checkpoint(tmp_path / f"llama-{dtype}", "tiny", dtype, seed=3)
    return tmp_path / f"llama-{dtype}"


HF_CASES = {
    "deepen": [{"deepen": {"layers": 6}}],
    "widen-mlp-noise": [{"widen": {"dim": "intermediate_size", "factor": 2, "noise": 0.1, "mapping": "random"}}],
    "widen-mlp-tile": [{"widen": {"dim": "intermediate_size", "factor": 2}}],  # the default since the tile mapping
    "widen-hidden-heads-deepen": [{"widen": {"dim": "hidden_size", "to": 160}},
                                  {"widen": {"dim": "num_attention_heads", "to": 8}}, {"deepen": {"after": [0, 2]}}],
}
GOLDEN = json.loads((Path(__file__).parent / "golden_bytes.json").read_text()) \
    if (Path(__file__).parent / "golden_bytes.json").exists() else {}


def hf_digest(tmp_path, dtype, case, device="cpu"):
    src = llama(tmp_path, dtype)
    out = tmp_path / "out"
    api.grow(spec_from_steps(HF_CASES[case], seed=5), src, out, device=device, verify=False)
    return tensor_digest(out)


def mlp_digest(tmp_path, which, device="cpu"):
    desc_path, steps = {
        "mlp": (MLP_YAML, [{"widen": {"layer": "fc1", "to": 256, "noise": 0.01}}, {"widen": {"layer": "fc2", "factor": 1.5}},
                           {"deepen": {"after": "fc1"}}]),
        "cnn": (CNN_YAML, [{"widen": {"layer": "conv1", "to": 128}}, {"widen": {"layer": "fc1", "factor": 2, "noise": 0.05}},
                           {"deepen": {"after": "conv2"}}]),
        "mlp-bf16": (MLP_YAML, [{"widen": {"layer": "fc1", "to": 256, "noise": 0.01}}, {"deepen": {"after": "fc1"}}]),
    }[which]
    desc = load_model_description(desc_path)
    src = tmp_path / "t.safetensors"
    make_teacher(desc, src, seed=1, dtype=torch.bfloat16 if which.endswith("bf16") else torch.float32)
    out = tmp_path / "s.safetensors"
    api.grow(spec_from_steps(steps, seed=2), src, out, model=desc, device=device, verify=False)
    return tensor_digest(out)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_bytes_unchanged(tmp_path, dtype, case):
    pytest.importorskip("transformers")
    assert hf_digest(tmp_path, dtype, case) == GOLDEN[f"hf-{dtype}-{case}"]


@pytest.mark.parametrize("which", ["mlp", "cnn", "mlp-bf16"])
def test_mlp_bytes_unchanged(tmp_path, which):
    assert mlp_digest(tmp_path, which) == GOLDEN[f"{which}"]


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")


@needs_cuda
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_bytes_same_on_cuda(tmp_path, dtype, case):
    """--device cuda runs the transforms on the GPU: the same bytes as on the CPU."""
    pytest.importorskip("transformers")
    assert hf_digest(tmp_path, dtype, case, device="cuda") == GOLDEN[f"hf-{dtype}-{case}"]


@needs_cuda
@pytest.mark.parametrize("which", ["mlp", "cnn", "mlp-bf16"])
def test_mlp_bytes_same_on_cuda(tmp_path, which):
    assert mlp_digest(tmp_path, which, device="cuda") == GOLDEN[f"{which}"]


@needs_cuda
@pytest.mark.parametrize("case", ["deepen", "widen-mlp-noise", "widen-hidden-heads-deepen"])
def test_hf_verified_on_cuda(tmp_path, case):
    pytest.importorskip("transformers")
    src = llama(tmp_path, "fp32")
    report = api.grow(spec_from_steps(HF_CASES[case], seed=5), src, tmp_path / "out", device="cuda")
    v = report["verification"]
    assert v["passed"] is True and v["exact"]["device"].startswith("cuda"), v


def test_transforms_device_unavailable_is_a_user_error(tmp_path):
    """--device cuda without a GPU: exit-2 message before anything is written, also with --no-verify."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from n2n_cli.errors import UserError
    with pytest.raises(UserError, match="--device cuda: CUDA is not available"):
        mlp_digest(tmp_path, "mlp", device="cuda")
    assert not (tmp_path / "s.safetensors").exists()


if __name__ == "__main__":  # record the digests (run once, with the reference code)
    import tempfile

    golden = {}
    for dtype in ("bf16", "fp32"):
        for case in HF_CASES:
            with tempfile.TemporaryDirectory() as d:
                golden[f"hf-{dtype}-{case}"] = hf_digest(Path(d), dtype, case)
    for which in ("mlp", "cnn", "mlp-bf16"):
        with tempfile.TemporaryDirectory() as d:
            golden[which] = mlp_digest(Path(d), which)
    (Path(__file__).parent / "golden_bytes.json").write_text(json.dumps(golden, indent=2, sort_keys=True) + "\n")
    print(golden)
