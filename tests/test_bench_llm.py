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
