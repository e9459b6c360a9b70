"""Growing Hugging Face transformer directories: every family, every step kind, loaded back
with transformers' from_pretrained and compared logit for logit (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import CNN_YAML, VOCAB, make_hf_model as make_model  # noqa: E402
from n2n_cli import api  # noqa: E402
from n2n_cli.errors import CheckpointError, ModelError, SpecError, StepError, UserError  # noqa: E402
from n2n_cli.spec import spec_from_steps  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()



def load(path: Path):
    """(model, has_head): the class its architectures name, so a head's logits are compared."""
    cfg = transformers.AutoConfig.from_pretrained(path)
    arch = (cfg.architectures or ["AutoModel"])[0]
    cls = getattr(transformers, arch) if arch != "AutoModel" else transformers.AutoModel
    return cls.from_pretrained(path, dtype=torch.float32).eval(), arch.endswith(
        ("ForCausalLM", "LMHeadModel", "ForMaskedLM", "ForPreTraining"))


def max_rel_error(teacher: Path, student: Path, ratio: int = 1) -> float:
    """Independent check: our own probes, padding mask, comparison at kept positions."""
    t, causal = load(teacher)
    s, _ = load(student)
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(0, VOCAB, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        a, b = t(input_ids=ids, attention_mask=mask), s(input_ids=ids, attention_mask=mask)
    if causal and hasattr(a, "seq_relationship_logits"):  # BERT pre-training: both heads
        assert torch.allclose(a.seq_relationship_logits, b.seq_relationship_logits, rtol=1e-5, atol=1e-6)
    logits = (lambda o: o.prediction_logits if hasattr(o, "prediction_logits") else o.logits)
    a, b = (logits(a), logits(b)) if causal else (a.last_hidden_state, b.last_hidden_state)
    a, b = a[mask.bool()].double(), b[mask.bool()].double()
    if not causal:
        r, pad = divmod(b.shape[-1], a.shape[-1])
        assert r == ratio and not b[:, r * a.shape[-1]:].any()  # the padded units of the stream stay zero
        b = b[:, :r * a.shape[-1]].reshape(b.shape[0], r, a.shape[-1])  # every copy of the tiled stream must match
        return float(max((b[:, k] - a).abs().max() for k in range(r)) / a.abs().max())
    return float((a - b).abs().max() / a.abs().max())


def grow(src: Path, out: Path, steps: list[dict], **kw) -> dict:
    return api.grow(spec_from_steps(steps, seed=kw.pop("seed", 0)), src, out, device="cpu", **kw)


CASES = [
    ("llama", {}, [{"widen": {"dim": "intermediate_size", "to": 72}}], {"intermediate_size": 72}),
    ("llama", {}, [{"widen": {"dim": "hidden_size", "factor": 2}}], {"hidden_size": 64, "head_dim": 8}),
    ("llama", {}, [{"widen": {"dim": "num_attention_heads", "to": 8}}], {"num_attention_heads": 8,
                                                                         "num_key_value_heads": 4}),
    ("llama", {}, [{"widen": {"dim": "num_key_value_heads", "to": 4}}], {"num_key_value_heads": 4}),
    ("llama", {}, [{"deepen": {"layers": 5}}], {"num_hidden_layers": 5}),
    ("llama", {"tie_word_embeddings": True}, [{"widen": {"dim": "hidden_size", "to": 96}}], {"hidden_size": 96}),
    ("llama", {}, [{"widen": {"dim": "intermediate_size", "to": 64, "noise": 0.1}},
                   {"widen": {"dim": "hidden_size", "to": 64}}, {"widen": {"dim": "num_attention_heads", "to": 8}},
                   {"deepen": {"after": [0, 0, 1]}}], {"num_hidden_layers": 5, "num_attention_heads": 8}),
    ("llama", {"attention_bias": True, "mlp_bias": True},
     [{"widen": {"dim": "intermediate_size", "to": 50}}, {"widen": {"dim": "hidden_size", "to": 64}},
      {"widen": {"dim": "num_attention_heads", "to": 8}}, {"deepen": {"layers": 3}}], {"hidden_size": 64}),
    ("mistral", {}, [{"widen": {"dim": "hidden_size", "to": 64}}, {"deepen": {"layers": 3, "placement": "end"}}],
     {"hidden_size": 64, "num_hidden_layers": 3}),
    ("qwen2", {"tie_word_embeddings": True}, [{"widen": {"dim": "hidden_size", "to": 64}},
                                              {"widen": {"dim": "num_attention_heads", "to": 8}},
                                              {"widen": {"dim": "intermediate_size", "to": 50}}],
     {"hidden_size": 64, "num_attention_heads": 8}),
    ("qwen2", {"layer_types": ["full_attention", "sliding_attention"], "use_sliding_window": True,
               "sliding_window": 64}, [{"deepen": {"after": [1]}}],
     {"layer_types": ["full_attention", "sliding_attention", "sliding_attention"]}),
    ("gpt2", {}, [{"widen": {"dim": "intermediate_size", "to": 150}}], {"n_inner": 150}),
    ("gpt2", {}, [{"widen": {"dim": "hidden_size", "to": 64}}], {"n_embd": 64, "n_head": 8, "n_inner": 128}),
    ("gpt2", {}, [{"deepen": {"layers": 4}}, {"widen": {"dim": "hidden_size", "factor": 3}}],
     {"n_layer": 4, "n_embd": 96, "n_head": 12}),
    ("bert", {}, [{"widen": {"dim": "intermediate_size", "to": 64}}], {"intermediate_size": 64}),
    ("bert", {}, [{"widen": {"dim": "hidden_size", "to": 64}}], {"hidden_size": 64, "num_attention_heads": 8}),
]


@pytest.mark.parametrize("family,kw,steps,config", CASES,
                         ids=[f"{c[0]}-" + "+".join(next(iter(s)) + ":" + str(next(iter(s.values())).get("dim", ""))
                                                    for s in c[2]) for c in CASES])
def test_growth_is_exact_and_loads_with_from_pretrained(tmp_path, family, kw, steps, config):
    src = make_model(tmp_path, family, **kw)
    out = tmp_path / "student"
    report = grow(src, out, steps, max_shard_size="40KB")
    assert report["verification"]["passed"] is True, report["verification"]
    new_cfg = json.loads((out / "config.json").read_text())
    for k, v in config.items():
        assert new_cfg[k] == v, (k, new_cfg[k])
    old_hidden = json.loads((src / "config.json").read_text()).get("hidden_size") or 32
    ratio = (new_cfg.get("hidden_size") or new_cfg.get("n_embd")) // old_hidden
    assert max_rel_error(src, out, ratio) <= 1e-5
    # sharded with a standard index, tokenizer and spec files alongside
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("model-*.safetensors")}
    assert (out / "tokenizer_config.json").read_text() == '{"note": "copied as is"}\n'
    assert "steps" in (out / "n2n_spec.yaml").read_text()
    assert json.loads((out / "n2n_verification.json").read_text())["passed"] is True


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("heads,kv", [(8, 8), (8, 4), (8, 2), (8, 1)])
def test_gqa_grouping_is_preserved(tmp_path, family, heads, kv):
    src = make_model(tmp_path, family, hidden_size=64, num_attention_heads=heads, num_key_value_heads=kv,
                     head_dim=4)
    g = heads // kv
    # LLaMA's config wants heads dividing hidden_size; Qwen2's takes any whole number of groups
    to = 16 if family == "llama" else heads + 2 * g
    a = tmp_path / "a"
    grow(src, a, [{"widen": {"dim": "num_attention_heads", "to": to}}])
    assert max_rel_error(src, a) <= 1e-5
    cfg = json.loads((a / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (to, to // g, 4)
    if heads % (2 * kv) == 0:
        b = tmp_path / "b"
        grow(src, b, [{"widen": {"dim": "num_key_value_heads", "to": 2 * kv}}])
        assert max_rel_error(src, b) <= 1e-5


def test_qwen2_qkv_biases_are_grown(tmp_path):
    src = make_model(tmp_path, "qwen2")
    out = tmp_path / "out"
    grow(src, out, [{"widen": {"dim": "num_attention_heads", "to": 6}}, {"widen": {"dim": "hidden_size", "to": 64}}])
    from safetensors import safe_open
    keys = set()
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            keys |= set(h.keys())
            if "model.layers.0.self_attn.q_proj.bias" in h.keys():
                assert h.get_slice("model.layers.0.self_attn.q_proj.bias").get_shape() == [6 * 8]
    assert "model.layers.0.self_attn.k_proj.bias" in keys
    assert max_rel_error(src, out) <= 1e-5


@pytest.mark.parametrize("tied", [True, False])
def test_tied_and_untied_embeddings_survive_save_and_reload(tmp_path, tied):
    src = make_model(tmp_path, "llama", tie_word_embeddings=tied)
    out = tmp_path / "out"
    grow(src, out, [{"widen": {"dim": "hidden_size", "to": 64}}])
    model, _ = load(out)
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == tied
    resaved = tmp_path / "resaved"
    model.save_pretrained(resaved)  # a user's round trip: reload, save, grow again
    again = tmp_path / "again"
    grow(resaved, again, [{"widen": {"dim": "intermediate_size", "to": 64}}, {"deepen": {"layers": 3}}])
    assert max_rel_error(src, again) <= 1e-5


def test_bf16_checkpoint_stays_bf16_within_rounding(tmp_path):
    src = make_model(tmp_path, "llama", dtype=torch.bfloat16)
    out = tmp_path / "out"
    report = grow(src, out, [{"widen": {"dim": "intermediate_size", "to": 59}}, {"widen": {"dim": "hidden_size", "to": 64}}])
    assert report["verification"]["passed"] is True and report["verification"]["exact"]["rtol"] == 5e-2
    from safetensors import safe_open
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            assert {h.get_slice(k).get_dtype() for k in h.keys()} == {"BF16"}
    assert max_rel_error(src, out) <= 2e-2  # copies divided by 1, 2 or 3 and rounded to bf16


def test_bert_deepening_refused_unless_approximate(tmp_path):
    src = make_model(tmp_path, "bert")
    with pytest.raises(StepError, match="post-LN .* deepening cannot be exact"):
        grow(src, tmp_path / "out", [{"deepen": {"layers": 3}}])
    assert not (tmp_path / "out").exists()
    report = grow(src, tmp_path / "out", [{"deepen": {"layers": 3, "allow_approximate": True}}])
    v = report["verification"]
    assert v["passed"] is None and v["deviation"]["max_rel_error"] > 1e-3 and "approximate" in v["note"]


def test_grown_output_can_be_grown_again_and_keeps_lineage(tmp_path):
    src = make_model(tmp_path, "gpt2")
    a, b = tmp_path / "a", tmp_path / "b"
    grow(src, a, [{"widen": {"dim": "intermediate_size", "to": 140}}])
    grow(a, b, [{"deepen": {"layers": 3}}], seed=5)
    from safetensors import safe_open
    with safe_open(str(next(b.glob("*.safetensors"))), "pt") as h:
        lineage = json.loads(h.metadata()["n2n_lineage"])
    assert [e["seed"] for e in lineage] == [0, 5] and list(lineage[1]["steps"][0]) == ["deepen"]
    assert max_rel_error(src, b) <= 1e-5


def test_byte_identical_output(tmp_path):
    src = make_model(tmp_path, "llama")
    for name in ("a", "b"):
        grow(src, tmp_path / name, [{"widen": {"dim": "intermediate_size", "to": 64, "noise": 0.05}}])
    for f in (tmp_path / "a").iterdir():
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name


# ----------------------------------------------------------------------------- bad inputs


def test_unknown_family_lists_supported(tmp_path):
    src = make_model(tmp_path, "llama")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "t5"}))
    with pytest.raises(ModelError) as e:
        grow(src, tmp_path / "out", [{"widen": {"dim": "intermediate_size", "to": 64}}])
    assert "model_type 't5' is not supported" in e.value.render()
    supported = e.value.render().split("Supported model types: ")[1]
    assert all(t in supported for t in ("bert", "gemma", "gemma2", "gemma3_text", "gpt2", "granite", "llama", "mistral",
                                        "mixtral", "olmo2", "phi3", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "roberta",
                                        "smollm3", "xlm-roberta"))


def test_inconsistent_config(tmp_path):
    src = make_model(tmp_path, "llama")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": 3, "intermediate_size": -1}))
    with pytest.raises(ModelError) as e:
        api.inspect(src)
    text = e.value.render()
    assert "inconsistent config" in text and "'intermediate_size' must be a positive integer, got -1" in text
    (src / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": 3}))
    with pytest.raises(ModelError, match="is not divisible by 'num_key_value_heads'"):
        api.inspect(src)
    (src / "config.json").write_text(json.dumps({**cfg, "hidden_size": 48}))
    with pytest.raises(CheckpointError) as e:
        api.inspect(src)
    assert "does not match its config.json" in e.value.render()
    assert "tensor 'model.embed_tokens.weight' has shape [97, 32], config.json implies [97, 48]" in e.value.render()


@pytest.mark.parametrize("steps,message", [
    ([{"widen": {"dim": "num_attention_heads", "to": 5}}], "not a multiple of the query group size 2"),
    ([{"widen": {"dim": "num_key_value_heads", "to": 3}}], "must be a multiple of the current 2 key/value heads"),
    ([{"widen": {"dim": "intermediate_size", "to": 20}}], "to: 20 is not larger than the current intermediate_size 40"),
    ([{"deepen": {"layers": 2}}], "layers: 2 is not larger than the current 2 layers"),
    ([{"deepen": {"after": [5]}}], "after: layer indices [5] are out of range 0..1"),
])
def test_steps_that_cannot_be_exact_are_refused(tmp_path, steps, message):
    src = make_model(tmp_path, "llama")
    with pytest.raises(StepError) as e:
        grow(src, tmp_path / "out", steps)
    assert message in e.value.render()
    assert not (tmp_path / "out").exists()


def test_transformers_config_validation_is_applied(tmp_path):
    src = make_model(tmp_path, "llama")
    with pytest.raises(StepError, match="rejects the grown config.json: .*not a multiple of the number of attention"):
        grow(src, tmp_path / "out", [{"widen": {"dim": "num_attention_heads", "to": 6}},
                                     {"widen": {"dim": "hidden_size", "to": 64}}])


@pytest.mark.parametrize("steps,messages", [
    ([{"widen": {"dim": "num_attention_heads", "to": 8}}],
     ["ties the head count to the hidden size", "Widen hidden_size by an integer factor instead"]),
    ([{"widen": {"dim": "hidden_size", "to": 48}}],
     ["to: 48 is not an integer multiple of hidden_size 32; gpt2 uses LayerNorm", "Use a multiple of 32, e.g. 64."]),
])
def test_gpt2_refusals_say_what_to_change(tmp_path, steps, messages):
    src = make_model(tmp_path, "gpt2")
    with pytest.raises(StepError) as e:
        grow(src, tmp_path / "out", steps)
    for m in messages:
        assert m in e.value.render()


def test_without_transformers_refuses_unless_no_verify(tmp_path, monkeypatch):
    import builtins
    src = make_model(tmp_path, "llama")
    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("no transformers")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(UserError) as e:
        grow(src, tmp_path / "out", [{"widen": {"dim": "intermediate_size", "to": 64}}])
    assert "needs the 'transformers' package" in e.value.render() and "pip install 'n2n-cli[hf]'" in e.value.render()
    assert not (tmp_path / "out").exists()
    report = grow(src, tmp_path / "out", [{"widen": {"dim": "intermediate_size", "to": 64}}], verify=False)
    assert report["written"] and report["verification"] == {"passed": None, "skipped": True}


def test_spec_kind_must_match_source(tmp_path):
    src = make_model(tmp_path, "llama")
    with pytest.raises(SpecError, match="steps name layers of a sequential model"):
        grow(src, tmp_path / "out", [{"widen": {"layer": "fc1", "to": 64}}])


# ----------------------------------------------------------------------------- CLI


def test_cli_on_a_model_directory(tmp_path, cli):
    src = make_model(tmp_path, "llama")
    r = cli("inspect", src)
    assert r.exit_code == 0 and "llama family" in r.stdout and "num_key_value_heads" in r.stdout
    r = cli("widen", src, tmp_path / "w", "--dim", "intermediate_size", "--to", "64", "--dry-run")
    assert r.exit_code == 0 and "model.layers.1.mlp.down_proj.weight" in r.stdout and not (tmp_path / "w").exists()
    r = cli("widen", src, tmp_path / "w", "--dim", "hidden_size", "--factor", "2", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "PASS" in r.stdout
    r = cli("deepen", tmp_path / "w", tmp_path / "d", "--layers", "3", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["verification"]["passed"] is True
    r = cli("deepen", tmp_path / "w", tmp_path / "d", "--after", "0,1")
    assert r.exit_code == 2 and "already exists" in r.stderr
    r = cli("deepen", tmp_path / "w", tmp_path / "d", "--after", "0,1", "--force", "--max-shard-size", "30KB")
    assert r.exit_code == 0 and len(list((tmp_path / "d").glob("model-*.safetensors"))) > 1
    r = cli("verify", src, tmp_path / "d")
    assert r.exit_code == 0 and r.stdout.startswith("PASS")
    r = cli("widen", src, tmp_path / "x", "--layer", "fc1", "--to", "3")
    assert r.exit_code == 2 and "choose what to widen with --dim" in r.stderr
    r = cli("deepen", src, tmp_path / "x", "--after", "a,b")
    assert r.exit_code == 2 and "not a comma-separated list of layer indices" in r.stderr
    r = cli("widen", src, src, "--dim", "hidden_size", "--to", "64", "--force")
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_cli_validate_hf_spec(tmp_path, cli):
    src = make_model(tmp_path, "gpt2")
    spec = tmp_path / "s.yaml"
    spec.write_text("steps:\n  - widen: {dim: hidden_size, to: 48}\n  - widen: {dim: num_attention_heads, to: 8}\n"
                    "  - deepen: {layers: 3, placment: end}\n")
    r = cli("validate", spec)
    assert r.exit_code == 2 and "line 4: steps[2].deepen.placment: unknown key 'placment'" in r.stderr
    spec.write_text("steps:\n  - widen: {dim: hidden_size, to: 48}\n  - widen: {dim: num_attention_heads, to: 8}\n")
    r = cli("validate", spec, "--checkpoint", src)
    assert r.exit_code == 2 and "2 steps cannot be applied" in r.stderr
    assert "not an integer multiple of hidden_size 32" in r.stderr and "ties the head count" in r.stderr


def test_verification_failure_exit_3_leaves_nothing(tmp_path, cli):
    src = make_model(tmp_path, "llama")
    out, rep = tmp_path / "out", tmp_path / "r.json"
    r = cli("widen", src, out, "--dim", "intermediate_size", "--to", "77", "--atol", "0", "--rtol", "0",
            "--report", rep)
    assert r.exit_code == 3, r.output
    assert "does not compute the teacher's function" in r.stderr and "nothing was written" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "teacher"]  # no OUT, no staging dir
    assert json.loads(rep.read_text())["verification"]["exact"]["max_abs_error"] > 0


def test_pytorch_model_bin_directory(tmp_path):
    src = make_model(tmp_path, "gpt2")
    from safetensors.torch import load_file
    sd = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    torch.save(sd, src / "pytorch_model.bin")
    out = tmp_path / "out"
    assert grow(src, out, [{"widen": {"dim": "hidden_size", "to": 64}}])["verification"]["passed"] is True
    assert (out / "model.safetensors").exists() and not (out / "pytorch_model.bin").exists()


def test_missing_shard_and_escaping_shard_cli(tmp_path, cli):
    src = make_model(tmp_path, "llama")
    index = {"metadata": {}, "weight_map": {}}
    from safetensors import safe_open
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        index["weight_map"] = {k: "model-00001-of-00002.safetensors" for k in f.keys()}
    index["weight_map"]["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (src / "model.safetensors").rename(src / "model-00001-of-00002.safetensors")
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    r = cli("inspect", src)
    assert r.exit_code == 2 and "missing model-00002-of-00002.safetensors" in r.stderr
    index["weight_map"]["model.norm.weight"] = "../../etc/passwd"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    r = cli("grow", tmp_path / "x.yaml", src, tmp_path / "out")
    assert r.exit_code == 2
    spec = tmp_path / "s.yaml"
    spec.write_text("steps:\n  - widen: {dim: intermediate_size, to: 64}\n")
    r = cli("grow", spec, src, tmp_path / "out")
    assert r.exit_code == 2 and "names shard files outside the model directory" in r.stderr


def test_cli_usage_errors_between_the_two_kinds_of_source(tmp_path, cli, cnn_teacher):
    src = make_model(tmp_path, "llama")
    other = make_model(tmp_path, "llama", name="other", hidden_size=48, num_attention_heads=4, num_key_value_heads=2)
    spec = tmp_path / "hf.yaml"
    spec.write_text("steps:\n  - widen: {dim: intermediate_size, to: 64}\n")
    cases = [
        (["deepen", src, tmp_path / "o"], "give exactly one of --layers N (the new total) or --after I,J"),
        (["deepen", src, tmp_path / "o", "--layers", "3", "--after", "0"], "give exactly one of --layers N"),
        (["widen", src, tmp_path / "o", "--dim", "hidden_size", "--to", "64", "--method", "random-pad"],
         "Hugging Face models are widened by net2wider with zero-sum noise only"),
        (["widen", cnn_teacher, tmp_path / "o.safetensors", "--dim", "hidden_size", "--to", "64"],
         "choose the layer to widen with --layer (--dim is for Hugging Face model directories)"),
        (["deepen", cnn_teacher, tmp_path / "o.safetensors", "--layers", "3"],
         "choose where to deepen with --after LAYER (--layers is for Hugging Face model directories)"),
        (["grow", spec, cnn_teacher, tmp_path / "o.safetensors"],
         "this spec grows Hugging Face model directories (its steps name dimensions), but SRC is not a directory"),
        (["verify", src, cnn_teacher], "compare a Hugging Face directory with another directory"),
        (["verify", other, src], "the student (hidden_size 32, vocab 97) cannot be a grown copy of the teacher "
                                 "(hidden_size 48, vocab 97)"),
        (["inspect", src, "--model", CNN_YAML], "--model describes MLP/CNN checkpoints"),
    ]
    for args, message in cases:
        r = cli(*args)
        assert r.exit_code == 2, (args, r.output)
        assert message in r.stderr, (message, r.stderr)
        assert "Traceback" not in r.output


@pytest.mark.parametrize("family,tied", [("llama", False), ("qwen2", True)])
@pytest.mark.parametrize("to", [40, 48, 72])
def test_rmsnorm_families_grow_hidden_to_any_width_lemon_style(tmp_path, family, tied, to):
    """Stream [x, .., x, 0]: RMSNorm gamma * sqrt(s), eps * s (s = r*D/D'). A large eps makes a
    missing eps rescale visible (DESIGN.md: ~1.6e-5 error at eps 1e-6)."""
    src = make_model(tmp_path, family, rms_norm_eps=1e-2, tie_word_embeddings=tied)
    out = tmp_path / "out"
    report = grow(src, out, [{"widen": {"dim": "hidden_size", "to": to}}, {"deepen": {"layers": 3}}])
    assert report["verification"]["passed"] is True
    cfg = json.loads((out / "config.json").read_text())
    r = to // 32
    assert cfg["hidden_size"] == to and cfg["head_dim"] == 8
    assert cfg["rms_norm_eps"] == pytest.approx(1e-2 * r * 32 / to)
    assert max_rel_error(src, out) <= 1e-5



@pytest.mark.parametrize("family,tied,to", [("llama", False, 64), ("llama", True, 64), ("llama", True, 40),
                                            ("gpt2", True, 64)])
def test_base_models_without_a_head(tmp_path, cli, family, tied, to):
    """LlamaModel / GPT2Model: no lm_head even when tie_word_embeddings says tied, so the final
    norm keeps its scale and the hidden states are compared tiled (and zero-padded)."""
    torch.manual_seed(0)
    import helpers
    cfg = helpers._config(family, tie_word_embeddings=tied)
    model = (transformers.LlamaModel if family == "llama" else transformers.GPT2Model)(cfg)
    helpers.randomize_hf_norms(model)
    src = tmp_path / "base"
    model.save_pretrained(src)
    out = tmp_path / "out"
    r = cli("widen", src, out, "--dim", "hidden_size", "--to", str(to))
    assert r.exit_code == 0, r.output
    assert max_rel_error(src, out, ratio=to // 32) <= 1e-5
    assert "hidden_size" in api.inspect(src)["growth"]
    r = cli("verify", src, out)  # n2n verify accepts what n2n grow wrote, padded stream included
    assert r.exit_code == 0, r.output


def test_verify_after_lemon_width_on_a_causal_lm(tmp_path, cli):
    src = make_model(tmp_path, "llama")
    assert cli("widen", src, tmp_path / "out", "--dim", "hidden_size", "--to", "40").exit_code == 0
    r = cli("verify", src, tmp_path / "out")
    assert r.exit_code == 0 and r.stdout.startswith("PASS")


def test_deepening_keeps_index_assigned_sliding_windows(tmp_path):
    """Once refused; now config.json gets the layer_types transformers derives for the teacher."""
    src = make_model(tmp_path, "qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("layer_types", None)
    (src / "config.json").write_text(json.dumps(cfg))
    assert grow(src, tmp_path / "out", [{"deepen": {"layers": 3}}])["verification"]["passed"] is True
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention"]
    assert cfg["max_window_layers"] == 1


def test_verify_in_bfloat16_to_halve_memory(tmp_path):
    src = make_model(tmp_path, "llama")
    report = grow(src, tmp_path / "out", [{"widen": {"dim": "hidden_size", "to": 64}}], verify_dtype="bfloat16")
    v = report["verification"]
    assert v["passed"] is True and v["exact"]["dtype"] == "bfloat16" and v["exact"]["rtol"] == 5e-2


@pytest.mark.parametrize("head", ["BertForMaskedLM", "BertForPreTraining"])
def test_bert_with_task_heads(tmp_path, head):
    """bert-base-uncased-style checkpoints: the tied MLM decoder reads the tiled stream, so the
    head's LayerNorm is scaled by 1/r; next-sentence prediction reads the tiled pooler output."""
    import helpers
    torch.manual_seed(0)
    model = getattr(transformers, head)(helpers._config("bert"))
    helpers.randomize_hf_norms(model)
    src = tmp_path / "teacher"
    model.save_pretrained(src)
    out = tmp_path / "out"
    report = grow(src, out, [{"widen": {"dim": "hidden_size", "factor": 2}},
                             {"widen": {"dim": "intermediate_size", "to": 64}}])
    assert report["verification"]["passed"] is True
    assert max_rel_error(src, out) <= 1e-5
