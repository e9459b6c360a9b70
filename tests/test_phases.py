"""Plain progress lines when stderr is not a TTY, phase timings in the report, --verify-mode."""

from __future__ import annotations

import io
import json

import pytest

from n2n_cli.phases import PhaseClock, line_progress

transformers = pytest.importorskip("transformers")

from helpers import make_hf_model  # noqa: E402


def test_line_progress_prints_a_line_per_phase_start_and_end():
    buf = io.StringIO()
    p = line_progress(buf)
    for phase, n in (("checking weights", 3), ("writing", 2)):
        for k in range(n + 1):
            p(phase, k, n)
    lines = buf.getvalue().splitlines()
    assert [ln.split(":")[1].split("(")[0].strip() for ln in lines] == ["checking weights", "checking weights",
                                                                         "writing", "writing"]
    assert lines[0] == "n2n: checking weights (3)..." and lines[1].startswith("n2n: checking weights: done in ")


def test_line_progress_says_where_a_long_phase_is_every_period():
    """A phase of minutes (blockwise verification of a 7B model) prints how far it is at the
    first update PERIOD seconds or more after its last line, and no more often."""
    from n2n_cli import phases

    buf, now = io.StringIO(), [0.0]
    p = line_progress(buf, clock=lambda: now[0])
    for k, t in enumerate((0, 10, 29, 31, 40, 70, 95, 100)):
        now[0] = t
        p("verifying (blockwise)", k, 7)
    assert buf.getvalue().splitlines() == ["n2n: verifying (blockwise) (7)...",
                                           "n2n: verifying (blockwise): 3/7 after 31 s",
                                           "n2n: verifying (blockwise): 5/7 after 70 s",
                                           "n2n: verifying (blockwise): done in 100.0 s"]
    assert phases.PERIOD == 30


def test_phase_clock_accumulates():
    c = PhaseClock()
    c.mark("a")
    c.mark("b")
    c.mark("a")
    assert list(c.seconds) == ["a", "b"] and all(v >= 0 for v in c.seconds.values())


def test_grow_reports_phases_timings_and_mode(tmp_path, cli):
    src = make_hf_model(tmp_path, "llama")
    out, rep = tmp_path / "out", tmp_path / "r.json"
    r = cli("deepen", src, out, "--layers", "3", "--device", "cpu", "--report", rep)
    assert r.exit_code == 0, r.output
    for phase in ("writing", "verifying"):  # each input tensor is checked for NaN/Inf as it is read for writing
        assert f"n2n: {phase}" in r.stderr
    report = json.loads(rep.read_text())
    assert set(report["timings"]) >= {"check", "plan", "write", "verify"}
    assert report["verification"]["exact"]["mode"] == "streaming"
    r = cli("verify", src, out, "--verify-mode", "full", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["mode"] == "full"


def test_verify_prints_its_phases_and_reports_their_timings(tmp_path, cli):
    """`n2n verify` of a big model is minutes of work: a line per phase on stderr (not a TTY here),
    and the timings in its JSON, as grow has them."""
    src = make_hf_model(tmp_path, "llama")
    out, rep = tmp_path / "out", tmp_path / "r.json"
    assert cli("deepen", src, out, "--layers", "3", "--device", "cpu", "--quiet").exit_code == 0
    r = cli("verify", src, out, "--device", "cpu", "--report", rep)
    assert r.exit_code == 0, r.output
    for phase in ("certificate", "verifying (blockwise)"):
        assert f"n2n: {phase} (" in r.stderr and f"n2n: {phase}: done in " in r.stderr, r.stderr
    assert set(json.loads(rep.read_text())["timings"]) == {"certificate", "verify"}
    r = cli("verify", src, out, "--device", "cpu", "--quiet")
    assert r.exit_code == 0 and "n2n:" not in r.stderr


def test_streaming_mode_refused_for_unsupported_family(tmp_path, cli):
    """Every model type n2n grows is streamed; a task head (a classifier) is verified in full mode."""
    src = tmp_path / "classifier"
    transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64)).save_pretrained(src)
    r = cli("verify", src, src, "--verify-mode", "streaming")
    assert r.exit_code == 2 and "blockwise verification cannot verify this model: the architecture " \
        "'BertForSequenceClassification' has a task head (only base models and masked LMs are streamed)" in r.output
