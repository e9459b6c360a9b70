"""Blockwise verification at scale (issue 8): the probe budget of big models catches what the full
probes catch (a wrong weight, rope, norm, attention window), says what ran, and gives way to the
user's --probes; the teacher's side computed ahead, in a thread beside the writing, gives the
comparison the lockstep one gives."""

from __future__ import annotations

import json
import threading

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import VOCAB, make_hf_model  # noqa: E402
from n2n_cli import api, hf_stream, hf_verify  # noqa: E402
from n2n_cli.spec import spec_from_steps  # noqa: E402

KW = dict(vocab=VOCAB, max_len=64, probes=64, seed=0, atol=1e-5, rtol=1e-4, device=torch.device("cpu"),
          dtype=torch.float32)


@pytest.fixture
def budget_everywhere(monkeypatch):
    """Tiny models get the budget that big ones get by default."""
    monkeypatch.setattr(hf_stream, "BUDGET_PARAMETERS", 0)


def both(src, out):
    return hf_stream.compare_dirs(src, out, **KW), hf_stream.compare_dirs(src, out, budget=True, **KW)


def deepened(tmp_path, family="llama", **kw):
    src = make_hf_model(tmp_path, family, num_hidden_layers=3, **kw)
    out = tmp_path / "student"
    api.grow(spec_from_steps([{"deepen": {"after": [0, 2]}}], seed=1), src, out, device="cpu", verify=False)
    return src, out


def edit(out, **fields):
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(fields)
    (out / "config.json").write_text(json.dumps(cfg))


def scale(out, key, factor, row=None):
    from safetensors.torch import load_file, save_file

    sd = load_file(out / "model.safetensors")
    if row is None:
        sd[key] = sd[key] * factor
    else:
        sd[key][row] *= factor
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})


def test_the_budget_runs_a_prefix_of_the_full_probes_and_says_so(tmp_path, budget_everywhere):
    src, out = deepened(tmp_path)
    full, budget = both(src, out)
    assert full.passed and budget.passed
    assert full.probes == 63 and budget.probes == 3 * hf_stream.BUDGET_SEQUENCES
    assert full.to_dict().get("probe_budget") is None and "probe_budget" not in full.to_dict()
    assert "12 of the 63 probe sequences (216 of 1134 tokens" in budget.probe_budget
    assert "--probes N runs N" in budget.probe_budget
    batches = hf_verify.probe_batches(VOCAB, 64, 64, 0)
    kept, note = hf_stream.probe_budget(batches, hf_stream.hf_io.open_hf_dir(src))
    for (ids, mask), (k_ids, k_mask) in zip(batches, kept):  # the same seeded tokens, padded and not
        assert torch.equal(k_ids, ids[:4]) and torch.equal(k_mask, mask[:4])
        assert {bool(m.all()) for m in k_mask} == {True, False}


def test_no_budget_below_the_threshold(tmp_path):
    src, out = deepened(tmp_path)
    c = hf_stream.compare_dirs(src, out, budget=True, **KW)
    assert c.passed and c.probes == 63 and c.probe_budget is None


@pytest.mark.parametrize("family,kw,wrong", [
    ("llama", {}, "weight"),  # one weight of one copied block
    ("llama", {}, "row"),  # one row of one inserted block's output projection
    ("llama", {}, "rope"),
    ("llama", {}, "norm"),  # the final norm
    ("mistral", {"sliding_window": 7}, "window"),  # a wider window: only positions past 7 see it
    ("qwen2", {"layer_types": ["sliding_attention", "full_attention", "full_attention"], "use_sliding_window": True,
               "sliding_window": 6, "max_window_layers": 1}, "layer_types"),  # which layers slide, shifted
], ids=["weight", "row", "rope", "norm", "window", "layer-types"])
def test_the_budget_catches_what_the_full_probes_catch(tmp_path, budget_everywhere, family, kw, wrong):
    src, out = deepened(tmp_path, family, **kw)  # student blocks 0 1 2 3 4: teacher 0, inserted, 1, 2, inserted
    if wrong == "weight":
        scale(out, "model.layers.2.mlp.up_proj.weight", 1.05, row=3)
    elif wrong == "row":
        scale(out, "model.layers.4.self_attn.o_proj.weight", 0.0, row=0)
        from safetensors.torch import load_file, save_file
        sd = load_file(out / "model.safetensors")
        sd["model.layers.4.self_attn.o_proj.weight"][5, 7] = 1e-3  # no longer an inserted (zero) block
        save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    elif wrong == "rope":
        edit(out, rope_parameters={"rope_theta": 20000.0, "rope_type": "default"})
    elif wrong == "norm":
        scale(out, "model.norm.weight", 1.01)
    elif wrong == "window":
        edit(out, sliding_window=9)
    else:
        types = json.loads((out / "config.json").read_text())["layer_types"]
        assert types[2] == "full_attention"  # teacher block 1
        edit(out, layer_types=["sliding_attention"] * len(types))
    full, budget = both(src, out)
    assert not full.passed and not budget.passed, (full, budget)
    where = (lambda c: (c.first_divergence or "").split(":")[0])
    assert where(budget) == where(full), (full.first_divergence, budget.first_divergence)
    assert budget.probe_budget is not None


@pytest.mark.parametrize("window", [7, None])
def test_the_budget_keeps_one_of_the_two_long_probes(tmp_path, budget_everywhere, window):
    """Past the window, tokens x parameters is most of a big model's verification: the budget runs
    the right-padded long probe (before its padding, a causal model computes what the unpadded one
    does) and says so; the full probes run both. (What the budget still catches past the window,
    a wider window or shifted layer types: test_the_budget_catches_what_the_full_probes_catch.)"""
    src, out = deepened(tmp_path, "mistral", sliding_window=window)
    full, budget = both(src, out)
    assert full.probes == 63 + (2 if window else 0) and budget.probes == 12 + (1 if window else 0)
    assert ("1 of the 2 probes of 23 tokens past the attention windows" in budget.probe_budget) == bool(window)


def test_grow_uses_the_budget_unless_the_probes_are_the_users(tmp_path, budget_everywhere):
    src = make_hf_model(tmp_path, "llama")
    steps = [{"widen": {"dim": "intermediate_size", "factor": 2}}]
    r = api.grow(spec_from_steps(steps, seed=1), src, tmp_path / "a", device="cpu")
    v = r["verification"]["exact"]
    assert v["passed"] and v["probes"] == 12 and "probe budget" in v["probe_budget"]
    facts = json.loads((tmp_path / "a" / "n2n_verification.json").read_text())
    assert facts["exact"]["probe_budget"] == v["probe_budget"]  # the record says what ran
    r = api.grow(spec_from_steps(steps, seed=1), src, tmp_path / "b", device="cpu", probes=64)
    assert r["verification"]["exact"]["probes"] == 63 and "probe_budget" not in r["verification"]["exact"]
    spec = spec_from_steps(steps, seed=1).model_copy(update={"verify": hf_stream_verify(probes=64)})
    r = api.grow(spec, src, tmp_path / "c", device="cpu")
    assert r["verification"]["exact"]["probes"] == 63
    for name in "abc":  # the weights are the same whatever the probes
        assert (tmp_path / name / "model.safetensors").read_bytes() == (tmp_path / "a" / "model.safetensors").read_bytes()


def hf_stream_verify(**kw):
    from n2n_cli.spec import VerifySpec

    return VerifySpec(**kw)


def test_grow_computes_the_teachers_side_ahead_in_a_thread(tmp_path, monkeypatch):
    """The teacher's blocks run in a thread while the student is written; the verdict and the
    measured errors are the lockstep comparison's."""
    src = make_hf_model(tmp_path, "qwen2", layer_types=["sliding_attention", "full_attention"], use_sliding_window=True,
                        sliding_window=6, max_window_layers=1)
    threads = []
    real = hf_stream._TeacherSide.run_all

    def spy(self, *a, **k):
        threads.append(threading.current_thread().name)
        return real(self, *a, **k)

    monkeypatch.setattr(hf_stream._TeacherSide, "run_all", spy)
    steps = [{"widen": {"dim": "intermediate_size", "factor": 2, "noise": 0.1}}, {"deepen": {"after": [1]}}]
    r = api.grow(spec_from_steps(steps, seed=1), src, tmp_path / "out", device="cpu")
    assert threads == ["n2n-teacher-ahead"]
    ahead = r["verification"]["exact"]
    plain = hf_stream.compare_dirs(src, tmp_path / "out", vocab=VOCAB, max_len=64, probes=64, seed=1,
                                   atol=ahead["atol"], rtol=ahead["rtol"], device=torch.device("cpu"),
                                   dtype=torch.float32).to_dict()
    assert ahead["passed"] and ahead == plain
    assert not [t for t in threading.enumerate() if t.name == "n2n-teacher-ahead"]


def test_a_teacher_side_for_other_probes_is_not_used(tmp_path):
    """Planned with a config whose window differs from the student's on disk (other long probes):
    the comparison computes the teacher's side again, for the probes it needs."""
    src, out = deepened(tmp_path, "mistral", sliding_window=7)
    planned = json.loads((out / "config.json").read_text())
    with hf_stream.teacher_ahead(src, {**planned, "sliding_window": 20}, **{k: v for k, v in KW.items()
                                                                             if k not in ("atol", "rtol")}) as ahead:
        assert ahead is not None and ahead.result().key[-1] != 23
        c = hf_stream.compare_dirs(src, out, ahead=ahead, **KW)
    assert c.passed and c.to_dict() == hf_stream.compare_dirs(src, out, **KW).to_dict()


def test_leaving_early_stops_the_thread(tmp_path):
    src, out = deepened(tmp_path)
    planned = json.loads((out / "config.json").read_text())
    kw = {k: v for k, v in KW.items() if k not in ("atol", "rtol")}
    with pytest.raises(RuntimeError, match="the writer failed"):
        with hf_stream.teacher_ahead(src, planned, **kw):
            raise RuntimeError("the writer failed")
    assert not [t for t in threading.enumerate() if t.name == "n2n-teacher-ahead"]
    with hf_stream.teacher_ahead(src, planned, mode="full", **kw) as ahead:
        assert ahead is None
    headed = {**planned, "architectures": ["LlamaForSequenceClassification"]}
    with hf_stream.teacher_ahead(src, headed, **kw) as ahead:
        assert ahead is None  # a task head: full mode verifies it, nothing runs ahead


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 17])
def test_same_bytes(n):
    a = torch.arange(n, dtype=torch.uint8)
    assert hf_stream._same_bytes(a, a.clone())
    assert not hf_stream._same_bytes(a, torch.arange(n + 1, dtype=torch.uint8))
    if n:
        b = a.clone()
        b[-1] ^= 1
        assert not hf_stream._same_bytes(a, b)
        b = a.clone()
        b[0] ^= 1
        assert not hf_stream._same_bytes(a, b)


def test_verify_uses_the_budget_unless_the_probes_are_the_users(tmp_path, budget_everywhere, cli):
    """`n2n verify` of a big model runs the same budget as grow; --probes runs what it says."""
    src, out = deepened(tmp_path)
    r = api.verify(src, out, device="cpu")
    assert r["passed"] and r["probes"] == 12 and "probe budget" in r["probe_budget"]
    r = api.verify(src, out, device="cpu", probes=64)
    assert r["passed"] and r["probes"] == 63 and "probe_budget" not in r
    res = cli("verify", src, out, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["probes"] == 12
    res = cli("verify", src, out, "--probes", "64", "--json")
    assert json.loads(res.stdout)["probes"] == 63


def test_the_student_side_runs_behind_the_teacher_side_while_it_computes(tmp_path, monkeypatch):
    """The comparison starts as soon as the teacher's side is set up: the student's blocks wait for
    each teacher stream as the thread produces it (not for all of them), and the verdict and
    figures are those of the lockstep comparison."""
    src, out = deepened(tmp_path)
    planned = json.loads((out / "config.json").read_text())
    kw = {k: v for k, v in KW.items() if k not in ("atol", "rtol")}
    gate = threading.Event()
    events = []
    real_block = hf_stream._Model.block

    def slow_block(self, i, memory=None):
        if threading.current_thread().name == "n2n-teacher-ahead":
            if i == 1:
                assert gate.wait(30), "the comparison never started while the teacher's side was computing"
            events.append(("teacher", i))
        else:
            events.append(("student", i))
            gate.set()  # the student's side started before the teacher's block 1 ran
        return real_block(self, i, memory)

    monkeypatch.setattr(hf_stream._Model, "block", slow_block)
    with hf_stream.teacher_ahead(src, planned, **kw) as ahead:
        assert ahead is not None
        c = hf_stream.compare_dirs(src, out, ahead=ahead, **KW)
        assert ahead.result() is not None
    assert events.index(("teacher", 1)) > min(events.index(e) for e in events if e[0] == "student")
    assert c.passed and c.to_dict() == hf_stream.compare_dirs(src, out, **KW).to_dict()


def test_a_failing_student_side_stops_the_teacher_thread_before_its_files_close(tmp_path, monkeypatch):
    """The student's side fails while the teacher's thread is inside a block (whose big weights
    are read from the files as each layer runs): the thread is stopped before the teacher's files
    are closed, so it never reads through a closed (or reused) file descriptor; the error is the
    student's."""
    src, out = deepened(tmp_path)
    planned = json.loads((out / "config.json").read_text())
    kw = {k: v for k, v in KW.items() if k not in ("atol", "rtol")}
    inside, release, alive_at_close = threading.Event(), threading.Event(), []
    real_block, real_close, real_cancel = hf_stream._Model.block, hf_stream._Model.close, hf_stream.TeacherAhead.cancel

    def block(self, i, memory=None):
        if threading.current_thread().name == "n2n-teacher-ahead":
            if i == 1:
                inside.set()
                assert release.wait(30)
            return real_block(self, i, memory)
        assert inside.wait(30)
        raise RuntimeError("the student's side failed")

    def close(self):
        if self.source.path == src:
            alive_at_close.append(any(t.name == "n2n-teacher-ahead" for t in threading.enumerate()))
            release.set()
        real_close(self)

    def cancel(self):
        release.set()
        real_cancel(self)

    monkeypatch.setattr(hf_stream._Model, "block", block)
    monkeypatch.setattr(hf_stream._Model, "close", close)
    monkeypatch.setattr(hf_stream.TeacherAhead, "cancel", cancel)
    with pytest.raises(RuntimeError, match="the student's side failed"):
        with hf_stream.teacher_ahead(src, planned, **kw) as ahead:
            hf_stream.compare_dirs(src, out, ahead=ahead, **KW)
    assert alive_at_close and alive_at_close[0] is False, alive_at_close


def test_an_error_in_the_teacher_thread_reaches_the_comparison(tmp_path, monkeypatch):
    """A failure of the thread while the comparison waits for a stream is raised in the
    comparison (not a hang, not a silent recomputation)."""
    src, out = deepened(tmp_path)
    planned = json.loads((out / "config.json").read_text())
    kw = {k: v for k, v in KW.items() if k not in ("atol", "rtol")}
    real_block = hf_stream._Model.block

    def failing(self, i, memory=None):
        if threading.current_thread().name == "n2n-teacher-ahead" and i == 2:
            raise OSError("disk went away")
        return real_block(self, i, memory)

    monkeypatch.setattr(hf_stream._Model, "block", failing)
    result = {}

    def run():
        try:
            with hf_stream.teacher_ahead(src, planned, **kw) as ahead:
                hf_stream.compare_dirs(src, out, ahead=ahead, **KW)
        except BaseException as e:  # noqa: BLE001
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    assert not t.is_alive(), "the comparison hangs when the teacher's thread fails"
    assert isinstance(result.get("error"), OSError) and "disk went away" in str(result["error"])


def test_big_blocks_run_after_the_teacher_thread(tmp_path, monkeypatch):
    """When both sides' block buffers would not fit in BESIDE_BYTES (a 7B model's block is 0.8 GB
    in float32), no student block is loaded before the teacher's thread has run all of its own
    (one block in memory at a time, as the memory bound promises); the verdict is the same."""
    src, out = deepened(tmp_path)
    planned = json.loads((out / "config.json").read_text())
    kw = {k: v for k, v in KW.items() if k not in ("atol", "rtol")}
    monkeypatch.setattr(hf_stream, "BESIDE_BYTES", 0)
    events = []
    real_block = hf_stream._Model.block

    def spy(self, i, memory=None):
        events.append("teacher" if threading.current_thread().name == "n2n-teacher-ahead" else "student")
        return real_block(self, i, memory)

    monkeypatch.setattr(hf_stream._Model, "block", spy)
    with hf_stream.teacher_ahead(src, planned, **kw) as ahead:
        c = hf_stream.compare_dirs(src, out, ahead=ahead, **KW)
    first_student = events.index("student")
    assert events[:first_student] == ["teacher"] * 3 and "teacher" not in events[first_student:]
    monkeypatch.setattr(hf_stream, "BESIDE_BYTES", 768 * 2**20)
    assert c.passed and c.to_dict() == hf_stream.compare_dirs(src, out, **KW).to_dict()
