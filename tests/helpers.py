"""Helpers shared by the tests (import as ``from helpers import ...``)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from n2n_cli.model import ModelDescription, to_torch_module

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
CNN_YAML = SPECS / "models" / "mnist-cnn.yaml"
MLP_YAML = SPECS / "models" / "mlp.yaml"


def load_module(path: Path, name: str):
    """Import the Python file at ``path`` (a script of scripts/, a test's model code) as module
    ``name``, registered in ``sys.modules`` as dataclasses need while a class is built (a caller
    that loads it for a while may pop it again)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


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


VOCAB = 97


def _config(family: str, **kw):
    import transformers

    base = dict(vocab_size=VOCAB, max_position_embeddings=64)
    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config}[family]
        return cls(**{**base, "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "num_key_value_heads": 2, **kw})
    if family == "gpt2":
        return transformers.GPT2Config(**{"vocab_size": VOCAB, "n_embd": 32, "n_layer": 2, "n_head": 4,
                                          "n_positions": 64, **kw})
    if family == "bert":
        return transformers.BertConfig(**{**base, "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2,
                                          "num_attention_heads": 4, **kw})
    raise AssertionError(family)


def make_hf_model(tmp_path: Path, family: str, name: str = "teacher", dtype=torch.float32, seed: int = 0, **kw) -> Path:
    """A tiny randomly initialised transformers model of ``family``, saved in tmp_path/name."""
    import transformers

    torch.manual_seed(seed)
    cfg = _config(family, **kw)
    cls = transformers.BertModel if family == "bert" else transformers.AutoModelForCausalLM
    model = cls.from_config(cfg) if cls is not transformers.BertModel else cls(cfg)
    randomize_hf_norms(model)
    path = tmp_path / name
    model.to(dtype).save_pretrained(path)
    (path / "tokenizer_config.json").write_text('{"note": "copied as is"}\n')
    return path


def randomize_hf_norms(model) -> None:
    """Non-trivial norm weights and 1-d biases, so a wrong norm remap or scale shows up."""
    with torch.no_grad():
        for mod in model.modules():
            w = getattr(mod, "weight", None)
            if isinstance(w, torch.nn.Parameter) and w.dim() == 1:
                w.uniform_(0.5, 1.5)
            b = getattr(mod, "bias", None)
            if isinstance(b, torch.nn.Parameter) and b.dim() == 1:
                b.normal_(0, 0.1)
