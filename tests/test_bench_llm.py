"""The LLM benchmark's smoke mode: builds a tiny LLaMA checkpoint, runs the tools, prints the table."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import load_module

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    return load_module(ROOT / "scripts" / "bench_llm.py", "bench_llm")


def test_checkpoint_loads_in_transformers(tmp_path):
    import torch
    import transformers

    bench = load_bench()
    n = bench.build_checkpoint(tmp_path / "m", "tiny", "fp32")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    assert n == sum(p.numel() * 4 for p in model.parameters())


def test_windowed_checkpoint_is_mistral_and_its_verification_probes_past_the_window(tmp_path):
    import torch
    import transformers

    from n2n_cli import api
    from n2n_cli.spec import spec_from_steps

    bench = load_bench()
    bench.build_checkpoint(tmp_path / "m", "tiny", "fp32", window=40)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    assert type(model).__name__ == "MistralForCausalLM" and model.config.sliding_window == 40
    r = api.grow(spec_from_steps([{"deepen": {"layers": 5}}], seed=0), tmp_path / "m", tmp_path / "o", device="cpu")
    assert r["verification"]["exact"]["passed"] and r["verification"]["exact"]["probes"] == 63 + 2  # two long ones


def test_quick(tmp_path, capsys):
    bench = load_bench()
    table = bench.main(["--quick", "--tools", "cp,naive,n2n-noverify", "--workdir", str(tmp_path)])
    rows = {(r["op"], r["tool"]): r for r in table["rows"]}
    assert set(rows) == {("deepen", "cp"), ("deepen", "naive"), ("deepen", "n2n-noverify")}
    assert rows[("deepen", "n2n-noverify")]["x_n2n_noverify"] == 1.0
    # every tool is timed until its output is on disk: the exit time plus the fsync of its files
    assert all(0 < r["exit_seconds"] <= r["seconds"] for r in rows.values())
    assert rows[("deepen", "n2n-noverify")]["written_bytes"] > rows[("deepen", "cp")]["written_bytes"]
    assert "| deepen | n2n-noverify |" in capsys.readouterr().out and table["device"] == "cpu"
    assert not any(tmp_path.iterdir())  # cleaned up
