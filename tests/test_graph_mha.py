"""nn.MultiheadAttention in models built by the user's code, beyond self-attention: packed
cross-attention (the memory's features are the query's: one space), kdim/vdim (key and value
streams grow freely), add_bias_kv / add_zero_attn; and the refusals (heads alone, a memory that
concatenates several widths). Exact against the user's own module, loaded back with load_grown."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import attention_models as A
import models_zoo as Z
import n2n_cli
from n2n_cli import api

CODE = Path(__file__).resolve().parent / "attention_models.py"
SHAPE = [1, 3, 16, 16]


def _teacher(tmp_path, name):
    model = Z.perturb(getattr(A, name)(), seed=4)
    path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def _rel(teacher, student):
    x = torch.randn((8, *SHAPE[1:]), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        t, s = teacher(x).double(), student(x).double()
    return float((t - s).abs().max() / t.abs().max())


CASES = [
    ("CrossAttnNet", "learned queries read a memory: memory, queries, heads and output x2 together",
     [{"widen": {"layer": "ctx", "factor": 2}}, {"widen": {"layer": "embed", "to": 17}},
      {"widen": {"layer": "mlp.0", "to": 30}}, {"deepen": {"after": "ctx"}}],
     lambda s: (s.attn.embed_dim, s.attn.num_heads, s.attn.head_dim, s.queries.shape[-1]) == (32, 4, 8, 32)),
    ("KVDimNet", "kdim/vdim: key and value streams by any width, then the query stream x2 (heads tiled)",
     [{"widen": {"layer": "kin", "to": 13}}, {"widen": {"layer": "vin", "to": 9}},
      {"widen": {"layer": "embed", "factor": 2}}],
     lambda s: (s.attn.embed_dim, s.attn.kdim, s.attn.vdim, s.attn.num_heads) == (32, 13, 9, 4)
     and not s.attn._qkv_same_embed_dim),
    ("BiasKVNet", "add_bias_kv and add_zero_attn: bias_k, bias_v follow the heads",
     [{"widen": {"layer": "embed", "factor": 2}}],
     lambda s: s.attn.bias_k.shape == (1, 1, 32) and s.attn.num_heads == 4),
    ("MemoryOfOtherWidth", "a memory from another branch: its producer is coupled to the query's",
     [{"widen": {"layer": "a", "factor": 3}}], lambda s: s.b.out_channels == 48 and s.attn.num_heads == 6),
]


@pytest.mark.parametrize("name,what,steps,check", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_multihead_attention_growth_is_exact(tmp_path, name, what, steps, check):
    teacher, path = _teacher(tmp_path, name)
    report = api.grow(api.spec_from_steps(steps, seed=5), path, tmp_path / "s.safetensors",
                      model_code=f"{CODE}:{name}", example_input=SHAPE, probes=4)
    assert report["verification"]["passed"] is True
    student = n2n_cli.load_grown(getattr(A, name)(), tmp_path / "s.safetensors")
    assert sum(p.numel() for p in student.parameters()) == report["plan"]["params_after"]
    assert check(student)
    assert _rel(teacher, student) <= 1e-5


REFUSALS = [
    ("KVDimNet", ["--layer", "attn", "--to", "3"],
     ("nn.MultiheadAttention 'attn' has heads x head_dim = embed_dim, the width of the query stream it reads and of "
      "its output, so heads cannot be added alone")),
    ("MemoryConcat", ["--layer", "a", "--factor", "2"],
     ("'a' cannot be widened exactly: module 'attn' (MultiheadAttention) reads keys/values that concatenate several "
      "widths")),
    ("MemoryConcat", ["--layer", "p", "--factor", "2"], "module 'attn' (MultiheadAttention) reads keys/values"),
    ("CrossAttnNet", ["--layer", "ctx", "--to", "20"],
     "to: 20 is not an integer multiple of the current width 16 of 'ctx'"),
]


@pytest.mark.parametrize("name,args,message", REFUSALS, ids=[f"{r[0]} {' '.join(r[1])}" for r in REFUSALS])
def test_multihead_attention_refusals_name_the_module_and_why(tmp_path, cli, name, args, message):
    _, path = _teacher(tmp_path, name)
    out = tmp_path / "out.safetensors"
    r = cli("widen", path, out, "--model-code", f"{CODE}:{name}", "--example-input", "1,3,16,16", *args)
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.split()), r.output
    assert not out.exists()
