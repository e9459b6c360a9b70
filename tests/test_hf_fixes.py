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

from helpers import VOCAB, make_hf_model  # noqa: E402
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
    assert hf_verify.long_probe_length(C(use_sliding_window=True, sliding_window=40, max_position_embeddings=64)) == 56
    assert hf_verify.long_probe_length(C(use_sliding_window=True, sliding_window=60, max_position_embeddings=64)) == 64
    assert hf_verify.long_probe_length(C(use_sliding_window=True, sliding_window=64, max_position_embeddings=64)) is None
    assert hf_verify.long_probe_length(C(use_sliding_window=False, sliding_window=40)) is None  # no window in use
    assert hf_verify.long_probe_length(transformers.MistralConfig(sliding_window=100, max_position_embeddings=4096)) \
        == 116
    assert hf_verify.long_probe_length(transformers.LlamaConfig()) is None


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
