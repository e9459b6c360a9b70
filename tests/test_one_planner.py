"""One planner for sequential, traced and Hugging Face models (issue 7): the refactor that merged the
three planners must not change a byte. Every grow below (every offline spec in specs/, sequential
widen/deepen with each method and mapping, traced models through adds and concats, Hugging Face
families with every dimension) is hashed: the written files (tensors, metadata, config) and the plan
the report prints, against digests recorded with the three planners before they were merged.
Refusals keep their messages too.

Record again (only when a change of output is intended): N2N_RECORD_GOLDEN=1 pytest tests/test_one_planner.py
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import models_zoo as Z
from helpers import CNN_YAML, MLP_YAML, SPECS, make_hf_model, make_teacher
from moe_models import make_moe_model
from n2n_cli import api
from n2n_cli.errors import N2NError
from n2n_cli.spec import load_model_description, parse_model_description, spec_from_steps

HERE = Path(__file__).resolve().parent
ZOO = HERE / "models_zoo.py"
GOLDEN_FILE = HERE / "golden_planner.json"
RECORD = os.environ.get("N2N_RECORD_GOLDEN") == "1"
GOLDEN = json.loads(GOLDEN_FILE.read_text()) if GOLDEN_FILE.exists() else {}

DIGITS_YAML = SPECS / "models" / "digits-cnn.yaml"
NUMBERED = {"kind": "sequential", "input_shape": [3, 8, 8], "layers": [
    {"type": "conv2d", "name": "features.0", "out_channels": 6, "kernel_size": 3, "padding": 1},
    {"type": "batchnorm2d", "name": "features.1"}, {"type": "relu"}, {"type": "maxpool2d", "kernel_size": 2},
    {"type": "conv2d", "name": "features.4", "out_channels": 5, "kernel_size": 3, "padding": 1},
    {"type": "relu"}, {"type": "flatten"},
    {"type": "linear", "name": "head.0", "out_features": 7}, {"type": "batchnorm1d", "name": "head.1"},
    {"type": "relu"}, {"type": "linear", "name": "head.3", "out_features": 3}]}


def digest(path: Path) -> str:
    """SHA-256 over every file written (name and bytes): tensors, metadata, config, copied files."""
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file():
            h.update(f"{f.relative_to(path) if path.is_dir() else f.name}|".encode())
            h.update(_content(f))
    return h.hexdigest()


def _content(f: Path) -> bytes:
    """A file's bytes; for safetensors, its metadata and tensors with the model code's path made
    relative (it depends on where the repository lies, and so does the header's padding)."""
    if f.suffix != ".safetensors":
        return f.read_bytes()
    from safetensors import safe_open

    with safe_open(str(f), "pt") as sf:
        meta = json.dumps(sf.metadata() or {}, sort_keys=True).replace(str(HERE), "<tests>")
        parts = [meta.encode()]
        for k in sf.keys():  # in file order
            t = sf.get_tensor(k).contiguous()
            parts.append(f"|{k}|{t.dtype}|{tuple(t.shape)}|".encode())
            parts.append(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return b"".join(parts)


def plan_digest(report: dict) -> str:
    return hashlib.sha256(json.dumps(report["plan"], sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- cases


SEQ = {  # name: (description, steps, teacher dtype)
    "mlp-noise-factor-deepen": ("mlp", [{"widen": {"layer": "fc1", "to": 256, "noise": 0.01}},
                                        {"widen": {"layer": "fc2", "factor": 1.5}}, {"deepen": {"after": "fc1"}}]),
    "mlp-random-pad": ("mlp", [{"widen": {"layer": "fc1", "to": 200, "method": "random-pad"}}]),
    "mlp-independent-noise": ("mlp", [{"widen": {"layer": "fc2", "to": 100, "noise": 0.1,
                                                 "noise_mode": "independent"}}]),
    "mlp-random-init-named": ("mlp", [{"deepen": {"after": "fc1", "method": "random-init", "name": "extra"}}]),
    "mlp-bf16": ("mlp-bf16", [{"widen": {"layer": "fc1", "to": 256, "noise": 0.01}}, {"deepen": {"after": "fc1"}}]),
    "cnn-widen-conv-fc-deepen": ("cnn", [{"widen": {"layer": "conv1", "to": 128}},
                                         {"widen": {"layer": "fc1", "factor": 2, "noise": 0.05}},
                                         {"deepen": {"after": "conv2"}}]),
    "cnn-widen-before-flatten": ("cnn", [{"widen": {"layer": "conv2", "to": 80}}]),
    "cnn-deepen-kernel5-random-init": ("cnn", [{"deepen": {"after": "conv1", "kernel_size": 5,
                                                           "method": "random-init"}}]),
    "cnn-random-pad-conv": ("cnn", [{"widen": {"layer": "conv2", "to": 70, "method": "random-pad"}}]),
    "digits-grow": ("digits", [{"widen": {"layer": "conv1", "factor": 2}}, {"deepen": {"after": "conv2"}},
                               {"widen": {"layer": "conv2_deeper", "to": 100}}, {"deepen": {"after": "fc1"}}]),
    "numbered-deepen-renumbers": ("numbered", [{"deepen": {"after": "features.0"}}, {"deepen": {"after": "head.0"}},
                                               {"widen": {"layer": "features.7", "to": 9}},
                                               {"widen": {"layer": "head.0", "to": 11}}]),
}

GRAPH = {  # name: (factory, steps, example input shape)
    "resnet-stage": ("resnet18", [{"widen": {"layer": "layer2.0.conv2", "to": 24}}], [1, 3, 32, 32]),
    "resnet-inside-noise": ("resnet18", [{"widen": {"layer": "layer3.1.conv1", "factor": 2, "noise": 0.05}}],
                            [1, 3, 32, 32]),
    "resnet-blocks-and-after": ("resnet18", [{"deepen": {"after_block": "layer1.0"}},
                                             {"deepen": {"after": "layer2.1.conv1"}},
                                             {"widen": {"layer": "layer1.1.conv1", "to": 12}}], [1, 3, 32, 32]),
    "bottleneck": ("resnet_bottleneck", [{"widen": {"layer": "layer2.1.conv2", "to": 11}},
                                         {"widen": {"layer": "layer2.0.conv3", "to": 40}}], [1, 3, 32, 32]),
    "inception-widen-deepen": ("InceptionNet", [{"widen": {"layer": f"inc1.{t}.conv", "factor": 2}}
                                                for t in ("b1", "b2.1", "b3.2", "b4.1")]
                               + [{"deepen": {"after": t}} for t in ("inc1.b1", "inc1.b2.1")], [1, 3, 16, 16]),
    "densenet": ("DenseNet", [{"widen": {"layer": m, "factor": 2}} for m in ("conv0", "layers.0.conv2",
                                                                              "layers.1.conv1")], [1, 3, 8, 8]),
    "mobilenet": ("MobileNetV2", [{"widen": {"layer": m, "factor": 2}} for m in ("features.1.conv.0",
                                                                                  "features.0.0")]
                  + [{"deepen": {"after_block": "features.1"}}], [1, 3, 16, 16]),
    "unet": ("UNet", [{"widen": {"layer": m, "factor": 2}} for m in ("enc1.0", "up2", "dec2.0")]
             + [{"deepen": {"after": "dec1.0", "kernel_size": 1}}], [1, 3, 16, 12]),
    "sequential-cnn": ("sequential_cnn", [{"deepen": {"after": "0"}}, {"deepen": {"after": "12"}},
                                          {"widen": {"layer": "7", "factor": 2}},
                                          {"deepen": {"after": "4", "method": "random-init"}}], [1, 3, 16, 8]),
    "functional-random-pad": ("FunctionalNet", [{"widen": {"layer": "a", "factor": 2, "method": "random-pad"}},
                                                {"widen": {"layer": "fc1", "to": 40}}], [1, 3, 16, 8]),
    "vit": ("ViT", [{"deepen": {"after_block": "blocks.0"}}, {"widen": {"layer": "blocks.1.attn", "to": 4}},
                    {"widen": {"layer": "blocks.2.mlp.0", "to": 61}},
                    {"widen": {"layer": "patch_embed", "factor": 2}}], [1, 3, 16, 16]),
    "vit-split": ("vit_split", [{"widen": {"layer": "blocks.0.attn", "to": 4}},
                                {"widen": {"layer": "patch_embed", "factor": 3}}], [1, 3, 16, 16]),
    "vit-torch": ("vit_torch", [{"widen": {"layer": "blocks.0.mlp.0", "to": 50}},
                                {"widen": {"layer": "patch_embed", "factor": 2}},
                                {"deepen": {"after_block": "blocks.1"}}], [1, 3, 16, 16]),
}

INTER = {"widen": {"dim": "intermediate_size", "to": 56}}
HF = {  # name: (family, steps)
    "llama-inter-tile": ("llama", [{"widen": {"dim": "intermediate_size", "factor": 2}}]),
    "llama-inter-random-noise": ("llama", [{"widen": {"dim": "intermediate_size", "to": 52, "noise": 0.1,
                                                      "mapping": "random"}}]),
    "llama-hidden-pad-heads-kv": ("llama", [{"widen": {"dim": "hidden_size", "to": 40}},
                                            {"widen": {"dim": "num_attention_heads", "to": 8}},
                                            {"widen": {"dim": "num_key_value_heads", "to": 8}}]),
    "llama-hidden-x2-deepen-after": ("llama", [{"widen": {"dim": "hidden_size", "factor": 2}},
                                               {"deepen": {"after": [0, 1, 1]}}]),
    "llama-deepen-append": ("llama", [{"deepen": {"layers": 5, "placement": "end"}}, INTER]),
    "llama-bf16": ("llama-bf16", [INTER, {"widen": {"dim": "hidden_size", "factor": 2}}, {"deepen": {"layers": 3}}]),
    "gpt2": ("gpt2", [{"widen": {"dim": "intermediate_size", "to": 160}}, {"widen": {"dim": "hidden_size", "factor": 2}}, {"deepen": {"layers": 3}}]),
    "bert": ("bert", [INTER, {"widen": {"dim": "hidden_size", "factor": 2}},
                      {"deepen": {"layers": 3, "allow_approximate": True}}]),
    "qwen3": ("qwen3", [INTER, {"widen": {"dim": "hidden_size", "factor": 2}},
                        {"widen": {"dim": "num_attention_heads", "to": 12}}, {"deepen": {"after": [1]}}]),
    "phi3": ("phi3", [{"widen": {"dim": "num_attention_heads", "to": 6}}, {"widen": {"dim": "hidden_size", "to": 40}},
                      INTER]),
    "gemma-tied": ("gemma", [{"widen": {"dim": "hidden_size", "to": 40}}, {"deepen": {"layers": 3}}]),
    "mixtral": ("mixtral", [{"widen": {"dim": "intermediate_size", "to": 30}},
                            {"widen": {"dim": "hidden_size", "to": 40}}, {"deepen": {"layers": 3}}]),
    "upcycle-then-grow": ("llama", [{"upcycle": {"experts": 4, "top_k": 2, "noise": 0.0}},
                                    {"widen": {"dim": "intermediate_size", "to": 48}}, {"deepen": {"layers": 3}}]),
}

SPEC_FILES = sorted(p.name for p in SPECS.glob("*.yaml"))

REFUSALS = {  # name: (kind, source, steps)
    "seq-output-layer": ("seq", "cnn", [{"widen": {"layer": "fc2", "to": 20}}]),
    "seq-not-larger": ("seq", "cnn", [{"widen": {"layer": "fc1", "to": 64}}]),
    "seq-factor-rounds": ("seq", "cnn", [{"widen": {"layer": "fc1", "factor": 1.001}}]),
    "seq-unknown": ("seq", "cnn", [{"widen": {"layer": "fc9", "to": 100}}]),
    "seq-not-producer": ("seq", "cnn", [{"deepen": {"after": "bn2"}}]),
    "seq-tanh": ("seq", "mlp", [{"deepen": {"after": "fc2"}}]),
    "seq-kernel-on-linear": ("seq", "cnn", [{"deepen": {"after": "fc1", "kernel_size": 3}}]),
    "seq-even-kernel": ("seq", "cnn", [{"deepen": {"after": "conv1", "kernel_size": 2}}]),
    "seq-name-clash": ("seq", "cnn", [{"deepen": {"after": "fc1", "name": "conv1"}}]),
    "seq-after-block": ("seq", "cnn", [{"deepen": {"after_block": "conv1"}}]),
    "graph-output": ("graph", "resnet18", [{"widen": {"layer": "fc", "to": 20}}]),
    "graph-not-larger": ("graph", "resnet18", [{"widen": {"layer": "layer2.0.conv1", "to": 8}}]),
    "graph-unknown": ("graph", "resnet18", [{"widen": {"layer": "layer2.0.conv9", "to": 40}}]),
    "graph-name": ("graph", "resnet18", [{"deepen": {"after": "layer2.0.conv1", "name": "x"}}]),
    "graph-ln-multiple": ("graph", "ViT", [{"widen": {"layer": "patch_embed", "to": 30}}]),
    "graph-mha-heads": ("graph", "vit_torch", [{"widen": {"layer": "blocks.0.attn.mha", "to": 4}}]),
    "hf-not-larger": ("hf", "llama", [{"widen": {"dim": "hidden_size", "to": 32}}]),
    "hf-factor": ("hf", "llama", [{"widen": {"dim": "intermediate_size", "factor": 1.01}}]),
    "hf-group": ("hf", "llama", [{"widen": {"dim": "num_attention_heads", "to": 5}}]),
    "hf-kv": ("hf", "llama", [{"widen": {"dim": "num_key_value_heads", "to": 3}}]),
    "hf-after-range": ("hf", "llama", [{"deepen": {"after": [5]}}]),
    "hf-layers": ("hf", "llama", [{"deepen": {"layers": 2}}]),
    "hf-post-ln": ("hf", "bert", [{"deepen": {"layers": 3}}]),
    "hf-gpt2-heads": ("hf", "gpt2", [{"widen": {"dim": "num_attention_heads", "to": 8}}]),
    "hf-gpt2-pad": ("hf", "gpt2", [{"widen": {"dim": "hidden_size", "to": 40}}]),
    "hf-qwen3-pad": ("hf", "qwen3", [{"widen": {"dim": "hidden_size", "to": 40}}]),
}


# ----------------------------------------------------------------------------- teachers (built once)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    made: dict[str, object] = {}

    def get(name: str):
        if name in made:
            return made[name]
        if name in ("mlp", "mlp-bf16", "cnn", "digits", "numbered"):
            desc = (load_model_description({"mlp": MLP_YAML, "mlp-bf16": MLP_YAML, "cnn": CNN_YAML,
                                            "digits": DIGITS_YAML}[name]) if name != "numbered"
                    else parse_model_description(NUMBERED, where="NUMBERED"))
            path = root / f"{name}.safetensors"
            make_teacher(desc, path, seed=1, dtype=torch.bfloat16 if name == "mlp-bf16" else torch.float32)
            made[name] = (desc, path)
        elif name.startswith("graph:"):
            factory = name.split(":", 1)[1]
            model = Z.perturb(getattr(Z, factory)(), 1)
            path = root / f"{factory}.safetensors"
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
            made[name] = path
        elif name == "mixtral":
            made[name] = make_moe_model(root, "mixtral", name=name)
        elif name in ("qwen3", "phi3", "gemma"):
            import transformers

            from test_families import make

            transformers.logging.set_verbosity_error()
            kw = {"tie_word_embeddings": True} if name == "gemma" else {}
            made[name] = make(root, name, name=name, **kw)
        else:
            family = name.split("-")[0]
            made[name] = make_hf_model(root, family, name=name,
                                       dtype=torch.bfloat16 if name.endswith("bf16") else torch.float32)
        if isinstance(made[name], Path) and made[name].is_dir():
            _without_transformers_version(made[name])
        return made[name]

    return get


def _without_transformers_version(path: Path) -> None:
    """save_pretrained writes the installed transformers' version into the teacher's config files,
    and the teacher's digest goes into the student's lineage: without this, every transformers
    release would change the recorded digests although n2n's output did not change."""
    for f in ("config.json", "generation_config.json"):
        if (path / f).exists():
            cfg = json.loads((path / f).read_text())
            cfg.pop("transformers_version", None)
            (path / f).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def check(name: str, value) -> None:
    if RECORD:
        GOLDEN[name] = value
        GOLDEN_FILE.write_text(json.dumps(GOLDEN, indent=1, sort_keys=True) + "\n")
        return
    assert name in GOLDEN, f"no recorded digest for {name}: record with N2N_RECORD_GOLDEN=1"
    assert value == GOLDEN[name], name


def _grow(spec, src, out, **kw) -> list[str]:
    report = api.grow(spec, src, out, device="cpu", verify=False, **kw)
    return [digest(out), plan_digest(report)]


@pytest.mark.parametrize("name", sorted(SEQ))
def test_sequential(tmp_path, teachers, name):
    which, steps = SEQ[name]
    desc, src = teachers(which)
    check(f"seq:{name}", _grow(spec_from_steps(steps, seed=2), src, tmp_path / "s.safetensors", model=desc))


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_graph(tmp_path, teachers, name):
    factory, steps, shape = GRAPH[name]
    src = teachers(f"graph:{factory}")
    check(f"graph:{name}", _grow(spec_from_steps(steps, seed=3), src, tmp_path / "s.safetensors",
                                 model_code=f"{ZOO}:{factory}", example_input=shape))


@pytest.mark.parametrize("name", sorted(HF))
def test_hugging_face(tmp_path, teachers, name):
    family, steps = HF[name]
    check(f"hf:{name}", _grow(spec_from_steps(steps, seed=5), teachers(family), tmp_path / "out"))


@pytest.mark.parametrize("spec", SPEC_FILES)
def test_specs(tmp_path, teachers, spec):
    if spec.startswith("llama"):
        src = teachers("llama")
        out = tmp_path / "out"
    else:
        src = SPECS / "teachers" / ("mlp.safetensors" if spec.startswith("mlp") else "mnist-cnn.safetensors")
        out = tmp_path / "s.safetensors"
    check(f"spec:{spec}", _grow(SPECS / spec, src, out))


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_refusals_keep_their_messages(tmp_path, teachers, name):
    kind, which, steps = REFUSALS[name]
    spec = spec_from_steps(steps, seed=0)
    with pytest.raises(N2NError) as e:
        if kind == "seq":
            desc, src = teachers(which)
            api.grow(spec, src, tmp_path / "s.safetensors", model=desc, dry_run=True)
        elif kind == "graph":
            api.grow(spec, teachers(f"graph:{which}"), tmp_path / "s.safetensors", model_code=f"{ZOO}:{which}",
                     example_input=[1, 3, 32, 32] if which == "resnet18" else [1, 3, 16, 16], dry_run=True)
        else:
            api.grow(spec, teachers(which), tmp_path / "out", dry_run=True)
    err = e.value
    check(f"refusal:{name}", [type(err).__name__, err.render(), getattr(err, "short", None),
                              getattr(err, "flags", None), err.exit_code])
    assert not (tmp_path / "s.safetensors").exists() and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the core on its own


def test_widen_spaces_widens_concatenated_regions_from_the_last():
    """Two towers concatenated on one axis of a reader: each region is widened with its own mapping,
    the later one first so that the earlier offset stays valid; untouched spaces are left alone."""
    from dataclasses import dataclass, field

    from n2n_cli.layers import Axis
    from n2n_cli.planner import Load, Mapping, RecipePlan, Widen, widen_spaces

    @dataclass
    class P(RecipePlan):
        recipes: dict
        shapes: dict
        steps: list = field(default_factory=list)

    plan = P({"a.weight": [Load("a.weight")], "r.weight": [Load("r.weight")], "x": [Load("x")]},
             {"a.weight": (4, 3), "r.weight": (2, 10), "x": (5,)})
    labels = {"r.weight": [(1, Axis("A", "in", offset=0, span=4)), (1, Axis("B", "in", offset=4, span=6))],
              "a.weight": [(0, Axis("A", "out"))], "x": [(0, Axis("C", "out"))]}
    mappings = {"A": Mapping("tile", 4, 8), "B": Mapping("random", 6, 7, (0, 0))}
    changes = widen_spaces(plan, 0, labels, mappings)
    assert plan.shapes == {"a.weight": (8, 3), "r.weight": (2, 15), "x": (5,)}
    op = plan.recipes["r.weight"][-1]
    assert isinstance(op, Widen) and [a.space for _, a, _ in op.axes] == ["B", "A"]
    assert [c.key for c in changes] == ["r.weight", "a.weight"]  # labels' order
    assert changes[0].how == "axis 1: in (channels 4..9), axis 1: in (channels 0..3)"
    assert plan.recipes["x"] == [Load("x")]


def test_imports_point_one_way():
    """spec <- planner <- front ends (seq_plan, graph_plan, hf_plan) <- api <- cli, without circles
    at module level: read from the sources (no import needed)."""
    import ast

    pkg = HERE.parent / "n2n_cli"
    top: dict[str, set[str]] = {}
    for f in pkg.glob("*.py"):
        tree = ast.parse(f.read_text())
        top[f.stem] = {(n.module or n.names[0].name).split(".")[0] for n in tree.body
                       if isinstance(n, ast.ImportFrom) and n.level == 1}
    assert top["planner"] <= {"errors", "layers", "spec"}
    for front in ("seq_plan", "graph_plan", "hf_plan"):
        assert "planner" in top[front] and not top[front] & {"api", "cli", "graph_api", "seq_plan", "graph_plan",
                                                              "hf_plan"} - {front}
    assert not any(front in top[m] for m in ("planner", "execute", "spec", "hf", "hf_moe")
                   for front in ("seq_plan", "graph_plan", "hf_plan"))

    def cycle(m, path):
        for k in top.get(m, ()):
            if k in path:
                return path[path.index(k):] + [k]
            c = cycle(k, path + [k])
            if c:
                return c
        return None

    for m in top:
        assert cycle(m, [m]) is None, m
