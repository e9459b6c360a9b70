"""Issue 11, Hugging Face part: sliding windows kept on deepening and probed past, config.json
fields of the wrong type, absurd sizes, flag wording, dry-run/validate checks, inspect wording,
old checkpoints' rotary buffers. Through the CLI where a user would meet them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import CNN_YAML, VOCAB, make_hf_model  # noqa: E402
from n2n_cli import hf_verify  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()


def edit_config(src: Path, **changes) -> dict:
    cfg = json.loads((src / "config.json").read_text())
    for k, v in changes.items():
        if v is ...:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (src / "config.json").write_text(json.dumps(cfg))
    return cfg


def causal_lm(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def rel_error(teacher: Path, student: Path, length: int) -> float:
    t, s = causal_lm(teacher), causal_lm(student)
    ids = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        a, b = t(input_ids=ids).logits.double(), s(input_ids=ids).logits.double()
    return float((a - b).abs().max() / a.abs().max())


# ----------------------------------------------------------------------------- 9. sliding windows


@pytest.fixture
def qwen2_old_sliding(tmp_path):
    """A Qwen2 config as saved before transformers 5: use_sliding_window, no layer_types, every
    layer below max_window_layers (so all full attention), window 40 < max_position_embeddings 64."""
    src = make_hf_model(tmp_path, "qwen2", use_sliding_window=True, sliding_window=40, max_window_layers=2)
    edit_config(src, layer_types=...)
    return src


def test_deepening_an_old_qwen2_config_keeps_its_windows(tmp_path, cli, qwen2_old_sliding):
    src, out = qwen2_old_sliding, tmp_path / "out"
    r = cli("deepen", src, out, "--layers", "4", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["verification"]["passed"] is True
    assert any("no layer_types" in n for n in report["plan"]["notes"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["layer_types"] == ["full_attention"] * 4
    assert cfg["max_window_layers"] == 4  # transformers < 4.53 (no layer_types) reads the same story
    assert causal_lm(out).config.layer_types == ["full_attention"] * 4
    for n in (48, 64):  # past the window: the grown model must still attend like the teacher
        assert rel_error(src, out, n) <= 1e-5


def test_probes_reach_past_the_window_so_a_wrong_config_fails(tmp_path, cli, qwen2_old_sliding):
    """The student the bug wrote (layer_types not written, so transformers re-derives windows for
    the new layer count) differs only past 40 tokens: verification must now see it (exit 3)."""
    src, out = qwen2_old_sliding, tmp_path / "out"
    assert cli("deepen", src, out, "--layers", "4").exit_code == 0
    edit_config(out, layer_types=..., max_window_layers=2)
    assert causal_lm(out).config.layer_types[2:] == ["sliding_attention"] * 2
    assert rel_error(src, out, 64) > 1e-3  # really wrong past the window ...
    assert rel_error(src, out, 33) <= 1e-5  # ... and invisible to the old probes (at most 33 tokens)
    r = cli("verify", src, out)  # the certificate sees the config.json that its replay would not write
    assert r.exit_code == 3, r.output
    assert "the student is not what its recorded growth" in r.stderr
    from safetensors.torch import load_file, save_file
    for shard in out.glob("*.safetensors"):  # without lineage, the probes alone must see it
        save_file(load_file(str(shard)), str(shard), metadata={"format": "pt"})
    r = cli("verify", src, out)
    assert r.exit_code == 3, r.output
    assert "does not compute the teacher's function" in r.stderr


def test_grow_refuses_the_wrong_config_it_would_have_written(tmp_path, cli, qwen2_old_sliding, monkeypatch):
    """Without the layer_types fix, grow itself must now fail verification (exit 3), nothing written."""
    from n2n_cli import hf

    real = hf.Arch.to_config

    def buggy(self, original):
        cfg = real(self, original)
        cfg.pop("layer_types")
        cfg["max_window_layers"] = original["max_window_layers"]
        return cfg

    monkeypatch.setattr(hf.Arch, "to_config", buggy)
    r = cli("deepen", qwen2_old_sliding, tmp_path / "out", "--layers", "4")
    assert r.exit_code == 3, r.output
    assert not (tmp_path / "out").exists()


def test_long_probe_length():
    C = transformers.Qwen2Config
    uniform = C(use_sliding_window=True, sliding_window=40, max_window_layers=0, max_position_embeddings=64)
    assert not hf_verify.per_layer_windows(uniform) and hf_verify.long_probe_length(uniform) == 56  # every layer slides
    assert hf_verify.long_probe_length(C(use_sliding_window=True, sliding_window=60, max_position_embeddings=64)) == 64
    assert hf_verify.long_probe_length(C(use_sliding_window=True, sliding_window=64, max_position_embeddings=64)) is None
    assert hf_verify.long_probe_length(C(use_sliding_window=False, sliding_window=40)) is None  # no window in use
    assert hf_verify.long_probe_length(transformers.MistralConfig(sliding_window=100, max_position_embeddings=4096)) \
        == 116
    assert hf_verify.long_probe_length(transformers.LlamaConfig()) is None
    # layers of two kinds (some slide, some attend to all): past twice the longest window
    per_layer = C(use_sliding_window=True, sliding_window=40, max_window_layers=2, num_hidden_layers=4,
                  max_position_embeddings=4096)
    assert hf_verify.per_layer_windows(per_layer) and hf_verify.long_probe_length(per_layer) == 96
    assert hf_verify.long_probe_length(C(use_sliding_window=True, sliding_window=40, max_window_layers=2,
                                         num_hidden_layers=4, max_position_embeddings=64)) == 64  # the limit
    assert hf_verify.long_probe_length(transformers.Gemma2Config(sliding_window=100)) == 216
    assert hf_verify.long_probe_length(transformers.Gemma3TextConfig(sliding_window=512)) == 1040
    # a teacher of one kind, a student whose layers differ: the pair is probed past twice the window
    assert hf_verify.long_probe_length(transformers.MistralConfig(sliding_window=100), transformers.Gemma2Config(
        sliding_window=50)) == 216


def test_mistral_uniform_window_survives_deepening_and_is_probed(tmp_path, cli):
    src = make_hf_model(tmp_path, "mistral", sliding_window=24)
    out = tmp_path / "out"
    r = cli("deepen", src, out, "--layers", "3")
    assert r.exit_code == 0, r.output
    assert "layer_types" not in json.loads((out / "config.json").read_text())  # Mistral has none: one window
    assert rel_error(src, out, 64) <= 1e-5


@pytest.mark.parametrize("layer_types,mwl", [(None, 1), (None, 0), (["sliding_attention", "full_attention"], 28)])
def test_derived_layer_types_match_transformers(tmp_path, layer_types, mwl):
    """n2n's rule (families/llama.yaml) against the installed transformers' own derivation."""
    from n2n_cli import api

    src = make_hf_model(tmp_path, "qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=mwl)
    edit_config(src, layer_types=layer_types if layer_types else ...)
    with api._open_hf(src) as (_, arch, _h):
        assert arch.per_layer["layer_types"] == transformers.AutoConfig.from_pretrained(src).layer_types


# ----------------------------------------------------------------------------- crashes and limits


@pytest.mark.parametrize("family,field,value,message", [
    ("llama", "model_type", ["llama"], "'model_type' must be a string naming the model family, got [\"llama\"]"),
    ("llama", "model_type", {"a": 1}, "'model_type' must be a string naming the model family, got {\"a\": 1}"),
    ("llama", "architectures", 5, "'architectures' must be a list of class names (strings), got 5"),
    ("llama", "architectures", [5], "'architectures' must be a list of class names (strings), got [5]"),
    ("llama", "quantization_config", {"quant_method": "bitsandbytes", "load_in_4bit": True},
     "quantized checkpoints cannot be grown exactly"),
    ("llama", "num_hidden_layers", 1000000, "'num_hidden_layers' is 1000000, but the checkpoint holds 2 blocks (0..1)"),
    ("llama", "num_hidden_layers", 10 ** 12, "the checkpoint holds 2 blocks"),
    ("llama", "hidden_size", "32", "'hidden_size' must be a positive integer, got \"32\""),
    ("llama", "head_dim", -8, "'head_dim' must be a positive integer or null, got -8"),
    ("llama", "tie_word_embeddings", "false", "'tie_word_embeddings' must be true or false, got \"false\""),
    ("llama", "rms_norm_eps", "1e-6", "'rms_norm_eps' must be a positive number, got \"1e-6\""),
    ("llama", "rms_norm_eps", 5, "rejects its config.json"),  # transformers wants a float: exit 2, not 1
    ("llama", "layer_types", ["full_attention", 5], "'layer_types' must be a list of 2 strings"),
    ("qwen2", "use_sliding_window", "yes", "'use_sliding_window' must be true or false, got \"yes\""),
    ("qwen2", "max_window_layers", None, "'max_window_layers' must be a non-negative integer, got null"),
    ("qwen2", "sliding_window", 1.5, "'sliding_window' must be a positive integer or null, got 1.5"),
    ("gpt2", "n_inner", 0, "'n_inner' must be a positive integer, got 0"),
    ("gpt2", "n_positions", [64], "'n_positions' must be a positive integer, got [64]"),
    ("bert", "type_vocab_size", None, "'type_vocab_size' must be a positive integer, got null"),
])
def test_config_fields_of_the_wrong_type_exit_2_naming_the_field(tmp_path, cli, family, field, value, message):
    src = make_hf_model(tmp_path, family)
    edit_config(src, **{field: value}, **({"layer_types": ...} if family == "qwen2" else {}))  # old Qwen2 configs
    for args in (["inspect", src], ["deepen", src, tmp_path / "o", "--layers", "3"],
                 ["widen", src, tmp_path / "o", "--dim", "intermediate_size", "--factor", "2"]):
        if args[0] == "inspect" and "rejects" in message:
            continue  # inspect reads the header only; transformers' own checks come with grow and validate
        r = cli(*args)
        assert r.exit_code == 2, (args, r.output)
        assert message in r.stderr, (args, r.stderr)
    assert not (tmp_path / "o").exists()


def test_deeply_nested_config_json_exit_2(tmp_path, cli):
    src = make_hf_model(tmp_path, "llama")
    (src / "config.json").write_text('{"model_type": "llama", "x": ' + "[" * 100000 + "]" * 100000 + "}")
    r = cli("inspect", src)
    assert r.exit_code == 2 and "config.json is not valid JSON" in r.stderr, r.output


@pytest.mark.parametrize("how", ["cli", "spec"])
def test_absurd_depth_is_refused_at_once_with_the_planned_size(tmp_path, cli, how):
    src = make_hf_model(tmp_path, "llama")
    t = time.monotonic()
    if how == "cli":
        r = cli("deepen", src, tmp_path / "o", "--layers", "1000000000")
    else:
        spec = tmp_path / "s.yaml"
        spec.write_text("steps:\n  - deepen: {layers: 1000000000}\n")
        r = cli("grow", spec, src, tmp_path / "o")
    assert time.monotonic() - t < 10
    assert r.exit_code == 2, r.output
    assert "1,000,000,000 layers would make a checkpoint of about" in r.stderr
    assert "TB" in r.stderr and "n2n plans at most 10,000 layers" in r.stderr
    assert not (tmp_path / "o").exists()


def test_absurd_width_is_refused_before_any_tensor_is_made(tmp_path, cli, monkeypatch):
    src = make_hf_model(tmp_path, "llama")
    r = cli("widen", src, tmp_path / "o", "--dim", "intermediate_size", "--to", str(10 ** 12))
    assert r.exit_code == 2 and "Invalid value for '--to'" in r.stderr, r.output
    spec = tmp_path / "s.yaml"
    spec.write_text("steps:\n  - widen: {dim: intermediate_size, to: 1000000000000}\n")
    r = cli("grow", spec, src, tmp_path / "o")
    assert r.exit_code == 2 and "line 2: steps[0].widen.to: Input should be less than or equal to 16777216" \
        in r.stderr, r.output
    from n2n_cli import hf_plan
    monkeypatch.setattr(hf_plan, "MAX_PLANNED_BYTES", 10 ** 6)  # the real bound (16 TiB) needs a real model
    r = cli("widen", src, tmp_path / "o", "--dim", "hidden_size", "--to", "4096", "--dry-run")
    assert r.exit_code == 2, r.output
    assert "the planned output is about 10.3 MB (10,338,304 bytes)" in r.stderr and "beyond the 1.0 MB n2n writes" in r.stderr
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- wording, validate, dry run


def test_allow_approximate_is_named_as_the_flag_the_user_typed(tmp_path, cli):
    src = make_hf_model(tmp_path, "bert")
    r = cli("deepen", src, tmp_path / "o", "--layers", "3")
    assert r.exit_code == 2 and "Add --allow-approximate to grow anyway" in r.stderr, r.output
    assert "allow_approximate: true" not in r.stderr
    spec = tmp_path / "s.yaml"
    spec.write_text("steps:\n  - deepen: {layers: 3}\n")
    r = cli("grow", spec, src, tmp_path / "o")
    assert r.exit_code == 2 and "Add allow_approximate: true to the step to grow anyway" in r.stderr, r.output


def test_a_factor_too_small_to_grow_reads_well(tmp_path, cli, cnn_teacher):
    src = make_hf_model(tmp_path, "llama")
    r = cli("widen", src, tmp_path / "o", "--dim", "num_key_value_heads", "--factor", "1.01")
    assert r.exit_code == 2, r.output
    assert ("--factor 1.01 rounds 2 to 2, which is not larger than the current num_key_value_heads 2" in r.stderr
            and "Use a factor of at least 1.5, or --to 3 or more." in r.stderr), r.stderr
    spec = tmp_path / "s.yaml"
    spec.write_text("steps:\n  - widen: {dim: intermediate_size, factor: 1.01}\n")
    r = cli("grow", spec, src, tmp_path / "o")
    assert r.exit_code == 2, r.output
    assert ("factor: 1.01 rounds 40 to 40, which is not larger than the current intermediate_size 40" in r.stderr
            and "Use a factor of at least 1.025, or to: 41 or more." in r.stderr), r.stderr
    # MLP/CNN: the same wording (planner.check_larger)
    r = cli("widen", cnn_teacher, tmp_path / "o.safetensors", "--model", CNN_YAML, "--layer", "fc1", "--factor", "1.005")
    assert r.exit_code == 2, r.output
    assert "--factor 1.005 rounds 64 to 64, which is not larger than the current width 64 of 'fc1'" in r.stderr, r.stderr
    assert "Use a factor of at least 1.016, or --to 65 or more." in r.stderr


def test_validate_runs_the_transformers_checks_of_grow(tmp_path, cli):
    src = make_hf_model(tmp_path, "llama")
    spec = tmp_path / "s.yaml"
    spec.write_text("steps:\n  - widen: {dim: num_attention_heads, to: 6}\n  - widen: {dim: hidden_size, to: 64}\n")
    r = cli("validate", spec, "--checkpoint", src)
    assert r.exit_code == 2, r.output
    assert "rejects the grown config.json" in r.stderr and "line 3:" in r.stderr, r.stderr
    r = cli("grow", spec, src, tmp_path / "o", "--dry-run")
    assert r.exit_code == 2 and "rejects the grown config.json" in r.stderr, r.output
    edit_config(src, rms_norm_eps=5)  # a field n2n does not type itself but transformers refuses
    spec.write_text("steps:\n  - widen: {dim: intermediate_size, to: 64}\n")
    r = cli("validate", spec, "--checkpoint", src)
    assert r.exit_code == 2 and "rejects its config.json" in r.stderr, r.output


@pytest.mark.parametrize("kind", ["hf", "cnn"])
def test_dry_run_warns_about_an_existing_output(tmp_path, cli, cnn_teacher, kind):
    if kind == "hf":
        src, out = make_hf_model(tmp_path, "llama"), tmp_path / "o"
        out.mkdir()
        args = ["widen", src, out, "--dim", "intermediate_size", "--to", "64", "--dry-run"]
    else:
        src, out = cnn_teacher, tmp_path / "o.safetensors"
        out.write_bytes(cnn_teacher.read_bytes())  # a checkpoint: --force may replace it
        args = ["widen", src, out, "--model", CNN_YAML, "--layer", "fc1", "--to", "96", "--dry-run"]
    r = cli(*args)
    assert r.exit_code == 0, r.output
    assert "warning: a real run would refuse the output:" in r.stderr and "already exists" in r.stderr, r.stderr
    assert "Pass --force to replace it." in r.stderr
    report = json.loads(cli(*args, "--json").stdout)
    assert "already exists" in report["warnings"][0]
    r = cli(*args, "--force")
    assert r.exit_code == 0 and "warning" not in r.stderr, r.output


# ----------------------------------------------------------------------------- inspect, old checkpoints


@pytest.mark.parametrize("family,expected", [("gpt2", "yes (integer multiples only: LayerNorm)"),
                                             ("bert", "yes (integer multiples only: LayerNorm)"),
                                             ("llama", "yes")])
def test_inspect_says_layernorm_families_grow_hidden_by_multiples_only(tmp_path, cli, family, expected):
    src = make_hf_model(tmp_path, family)
    r = cli("inspect", src, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["growth"]["hidden_size"] == expected


def test_old_llama_rotary_buffers_are_dropped_with_a_note(tmp_path, cli):
    from safetensors.torch import load_file, save_file

    src = make_hf_model(tmp_path, "llama")
    sd = load_file(str(src / "model.safetensors"))
    for i in range(2):  # as transformers < 4.31 saved them
        sd[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "o"
    r = cli("deepen", src, out, "--layers", "3", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["verification"]["passed"] is True
    assert any("dropped 2 tensor(s) that transformers ignores on load (rotary_emb.inv_freq" in n
               for n in report["plan"]["notes"]), report["plan"]
    assert not any("inv_freq" in k for k in load_file(str(out / "model.safetensors")))


@pytest.mark.parametrize("field", ["torch_dtype", "dtype"])
def test_a_config_dtype_that_is_not_the_weights_dtype_is_warned_about(tmp_path, cli, field):
    """config.json saying float16 over bfloat16 weights (transformers' dtype="auto" would load
    them as float16, overflowing past 65504): a warning on stderr and in the report, the config
    copied as it is; none when they agree (transformers 5 writes ``dtype``, older ones
    ``torch_dtype``)."""
    src = make_hf_model(tmp_path, "llama", dtype=torch.bfloat16)
    cfg = json.loads((src / "config.json").read_text())
    for k in ("dtype", "torch_dtype"):
        cfg.pop(k, None)
    (src / "config.json").write_text(json.dumps({**cfg, field: "float16"}))
    r = cli("deepen", src, tmp_path / "o", "--layers", "3")
    assert r.exit_code == 0, r.output
    assert (f"warning: config.json declares {field} float16 but most weights are stored as bfloat16: "
            f"transformers' dtype=\"auto\" loads them as float16 (values beyond float16's range") in r.stderr, r.stderr
    assert json.loads((tmp_path / "o" / "config.json").read_text())[field] == "float16"
    report = json.loads(cli("deepen", src, tmp_path / "o2", "--layers", "3", "--dry-run", "--json").stdout)
    assert any("declares" in w for w in report["warnings"]), report
    (src / "config.json").write_text(json.dumps({**cfg, field: "bfloat16"}))
    r = cli("deepen", src, tmp_path / "o3", "--layers", "3")
    assert r.exit_code == 0 and "warning" not in r.stderr, r.output
