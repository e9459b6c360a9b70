"""Blockwise (streaming) verification: its forward is transformers' forward, for every family it
supports; it passes exact growth, and locates a mismatch at the block where it starts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import VOCAB, make_hf_model  # noqa: E402
from n2n_cli import api, checkpoints, hf_stream, hf_verify  # noqa: E402
from n2n_cli.spec import spec_from_steps  # noqa: E402

FAMILIES = [
    ("llama", {}),
    ("llama", {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}),
    ("mistral", {"sliding_window": 7}),
    ("qwen2", {"layer_types": ["sliding_attention", "full_attention"], "use_sliding_window": True,
               "sliding_window": 6, "max_window_layers": 1}),
]


#: the probes and tolerances of the comparisons here (both verifiers take the same ones)
STREAM_KW = dict(vocab=VOCAB, max_len=64, probes=12, seed=0, atol=1e-5, rtol=1e-4, device=torch.device("cpu"),
                 dtype=torch.float32)


def batches(n=(5, 16, 33)):
    out = []
    for k, length in enumerate(n):
        g = torch.Generator().manual_seed(k)
        ids = torch.randint(0, VOCAB, (3, length), generator=g)
        mask = torch.ones_like(ids)
        mask[1, length - length // 3:] = 0
        out.append((ids, mask))
    return out


@pytest.mark.parametrize("family,kw", FAMILIES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(FAMILIES)])
def test_streaming_forward_is_transformers_forward(tmp_path, family, kw):
    src = make_hf_model(tmp_path, family, **kw)  # norms perturbed (randomize_hf_norms)
    b = batches()
    model, causal = hf_verify.load_model(src, torch.float32, torch.device("cpu"))
    full = hf_verify.outputs(model, causal, b, torch.device("cpu"))
    stream = hf_stream.forward(src, b)
    assert stream.shape == full.shape
    assert torch.allclose(stream, full, rtol=1e-5, atol=1e-5), float((stream - full).abs().max())


def test_bf16_streaming_forward_matches_full_model_in_float32(tmp_path):
    src = make_hf_model(tmp_path, "llama", dtype=torch.bfloat16)
    b = batches()
    model, causal = hf_verify.load_model(src, torch.float32, torch.device("cpu"))
    full = hf_verify.outputs(model, causal, b, torch.device("cpu"))
    assert torch.allclose(hf_stream.forward(src, b), full, rtol=1e-5, atol=1e-5)


GROWTHS = [
    [{"deepen": {"layers": 5}}],
    [{"widen": {"dim": "intermediate_size", "factor": 2, "noise": 0.1}}],
    [{"widen": {"dim": "hidden_size", "to": 80}}, {"widen": {"dim": "num_attention_heads", "to": 8}},
     {"deepen": {"after": [0, 0, 1]}}],
]


@pytest.mark.parametrize("family,kw", FAMILIES[:1] + FAMILIES[2:], ids=["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("steps", GROWTHS, ids=["deepen", "widen-mlp", "hidden-heads-deepen"])
def test_streaming_verification_passes_exact_growth(tmp_path, family, kw, steps):
    if family == "qwen2" and "deepen" in json.dumps(steps):
        kw = {**kw}  # layer_types is in config.json, so deepening keeps which layers slide
    src = make_hf_model(tmp_path, family, **kw)
    out = tmp_path / "student"
    api.grow(spec_from_steps(steps, seed=1), src, out, device="cpu", verify=False)
    c = hf_stream.compare_dirs(src, out, **STREAM_KW)
    assert c.passed and c.first_divergence is None, c
    assert c.mode == "streaming" and c.blocks_compared >= 3
    full = hf_verify.compare_dirs(src, out, **STREAM_KW)
    assert abs(full.max_abs_error - c.max_abs_error) <= 1e-5 and full.max_abs_teacher == pytest.approx(
        c.max_abs_teacher, rel=1e-5)


def _grown(tmp_path, step: dict, edit=None, dtype=torch.float32) -> tuple[Path, Path]:
    """(teacher, student): a 4-block llama grown by ``step`` unverified, the student then
    ``edit``ed (a function of its state dict) when given."""
    src = make_hf_model(tmp_path, "llama", num_hidden_layers=4, dtype=dtype)
    out = tmp_path / "student"
    api.grow(spec_from_steps([step], seed=1), src, out, device="cpu", verify=False)
    if edit is not None:
        _edit(out, edit)
    return src, out


def _edit(out: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    f = out / "model.safetensors"
    sd = load_file(f)
    edit(sd)
    save_file(sd, f, metadata={"format": "pt"})


def _compare_deepened_with(tmp_path, edit) -> hf_stream.StreamComparison:
    """A 4-block llama deepened after block 1 (student block 2 inserted), ``edit``ed, compared
    blockwise with its teacher."""
    return hf_stream.compare_dirs(*_grown(tmp_path, {"deepen": {"after": [1]}}, edit), **STREAM_KW)


def test_mismatch_is_located_at_the_block_where_it_starts(tmp_path):
    def edit(sd):
        sd["model.layers.3.post_attention_layernorm.weight"] *= 1.01  # student block 3 = teacher block 2
    c = _compare_deepened_with(tmp_path, edit)
    assert not c.passed
    assert c.first_divergence.startswith("the residual stream differs after teacher block 2 (student block 3)"), c
    assert c.student_blocks_inserted == [2]


def test_a_mismatch_before_an_inserted_block_names_both(tmp_path):
    """The stream is compared only where a teacher block ends; with a block inserted after the
    changed one, the message names the student blocks run since (the changed one first)."""
    def edit(sd):
        sd["model.layers.1.mlp.up_proj.weight"][0] *= 1.5  # student block 1 = teacher block 1; block 2 inserted
    c = _compare_deepened_with(tmp_path, edit)
    assert not c.passed
    assert c.first_divergence.startswith("the residual stream differs after teacher block 1 "
                                         "(student blocks 1-2, inserted after 1)"), c


def test_a_teacher_deepened_before_is_aligned_block_by_block(tmp_path):
    """Deepening a deepened model: the teacher's own all-zero blocks are matched with their copies
    (not taken for inserted ones, which shifted every later comparison by a block: a passing
    verdict that also said the stream differed)."""
    src = make_hf_model(tmp_path, "llama", num_hidden_layers=4)
    once, twice = tmp_path / "once", tmp_path / "twice"
    api.grow(spec_from_steps([{"deepen": {"layers": 6}}], seed=1), src, once, device="cpu", verify=False)
    api.grow(spec_from_steps([{"deepen": {"layers": 9}}], seed=1), once, twice, device="cpu", verify=False)
    c = hf_stream.compare_dirs(once, twice, vocab=VOCAB, max_len=64, probes=12, seed=0, atol=1e-5, rtol=1e-4,
                               device=torch.device("cpu"), dtype=torch.float32)
    assert c.passed and c.first_divergence is None, c
    assert len(c.student_blocks_inserted) == 3 and c.blocks_compared == 7, c


def test_supports(tmp_path):
    assert hf_stream.supports(make_hf_model(tmp_path, "qwen2", name="q"))
    assert hf_stream.supports(make_hf_model(tmp_path, "gpt2", name="g"))
    assert hf_stream.supports(make_hf_model(tmp_path, "bert", name="b"))  # tests/test_stream_encoders.py
    assert not hf_stream.supports(tmp_path / "missing")


@pytest.mark.parametrize("family,kw", FAMILIES[:1] + FAMILIES[2:], ids=["llama", "mistral", "qwen2"])
def test_byte_identical_blocks_with_equal_inputs_are_not_run_twice(tmp_path, family, kw):
    """A deepen's original blocks are byte-identical copies of the teacher's and (the inserted
    blocks leaving the stream unchanged) get bitwise-equal inputs: their output is the teacher
    block's, so they are not run again; the verdict is the same as the full model's."""
    src = make_hf_model(tmp_path, family, **kw)  # 2 blocks
    out = tmp_path / "student"
    api.grow(spec_from_steps([{"deepen": {"after": [0, 1]}}], seed=1), src, out, device="cpu", verify=False)
    c = hf_stream.compare_dirs(src, out, **STREAM_KW)
    assert c.passed and c.student_blocks_inserted == [1, 3] and c.student_blocks_copied == [0, 2], c
    assert c.student_head_copied  # same final norm and head bytes, bitwise-equal final stream
    full = hf_verify.compare_dirs(src, out, **STREAM_KW)
    assert full.passed and c.max_abs_error == full.max_abs_error == 0.0


def test_identical_weights_under_a_different_config_are_run(tmp_path):
    """Same bytes are not enough: a config field the block reads (the norms' eps) differs in the
    student, so its blocks run, and the difference is found."""
    src = make_hf_model(tmp_path, "llama", num_hidden_layers=3)
    out = tmp_path / "student"
    api.grow(spec_from_steps([{"deepen": {"after": [0]}}], seed=1), src, out, device="cpu", verify=False)
    cfg = json.loads((out / "config.json").read_text())
    cfg["rms_norm_eps"] = 0.5
    (out / "config.json").write_text(json.dumps(cfg))
    c = hf_stream.compare_dirs(src, out, **STREAM_KW)
    assert c.student_blocks_copied == [] and not c.passed, c
    assert c.first_divergence.startswith("the residual stream differs after teacher block 0"), c


@pytest.mark.parametrize("what", ["head", "final_norm", "eps"])
def test_a_head_that_differs_is_run(tmp_path, what):
    """The student's head is taken from the teacher's only when its bytes and config are the
    teacher's: one changed value of lm_head or of the final norm, or the norms' eps in config.json,
    and it runs, and the difference is found in the outputs (not in the streams)."""
    src = make_hf_model(tmp_path, "llama", num_hidden_layers=2, tie_word_embeddings=False)
    out = tmp_path / "student"
    api.grow(spec_from_steps([{"deepen": {"after": [0]}}], seed=1), src, out, device="cpu", verify=False)
    if what == "eps":
        cfg = json.loads((out / "config.json").read_text())
        cfg["rms_norm_eps"] = 0.5
        (out / "config.json").write_text(json.dumps(cfg))
    else:
        _edit(out, lambda sd: sd["lm_head.weight" if what == "head" else "model.norm.weight"][3].add_(0.5))
    c = hf_stream.compare_dirs(src, out, **STREAM_KW)
    assert not c.student_head_copied and not c.passed, c
    if what != "eps":
        assert c.first_divergence == "the residual streams agree after every block; the final norm or the head differs"


def test_bytes_compared_in_place_window_by_window(tmp_path, monkeypatch):
    """The in-place comparisons map a file MAP_BYTES at a time: a difference or a non-zero value
    in any window (the last, short one included), at any offset, is seen."""
    from n2n_cli.checkpoints import RawSpan

    monkeypatch.setattr(checkpoints, "MAP_BYTES", 24)
    data = bytes(range(7)) + bytes(100)  # an unaligned start, 100 zero bytes
    for name in ("a", "b"):
        (tmp_path / name).write_bytes(data)
    fa, fb = (os.open(tmp_path / n, os.O_RDONLY) for n in ("a", "b"))
    try:
        span = lambda fd, off=7, n=100: RawSpan(fd, off, n, torch.uint8, (n,), "x")  # noqa: E731
        assert hf_stream._same_file_bytes(span(fa), span(fb))
        assert not hf_stream._same_file_bytes(span(fa), span(fb, n=96))
        for at in (0, 23, 24, 71, 99):
            changed = bytearray(data)
            changed[7 + at] = 1
            (tmp_path / "b").write_bytes(changed)
            assert not hf_stream._same_file_bytes(span(fa), span(fb)), at
            # a zero test (is a block's output projection zero?) sees the value in any window
            fake = type("M", (), {"source": type("S", (), {"raw": lambda self, k: span(fb)})()})()
            assert hf_stream._Model._any(fake, "k"), at
        (tmp_path / "b").write_bytes(data)
        fake = type("M", (), {"source": type("S", (), {"raw": lambda self, k: span(fb)})()})()
        assert not hf_stream._Model._any(fake, "k")
    finally:
        os.close(fa)
        os.close(fb)


@pytest.mark.parametrize("growth", ["deepen", "widen"])
def test_big_blocks_share_one_set_of_buffers_and_still_catch_a_wrong_block(tmp_path, monkeypatch, growth):
    """``n2n verify`` (no teacher thread) on blocks too big to hold two (BESIDE_BYTES): teacher and
    student load their blocks, one after the other, into the same buffers: a deepened student's
    blocks have the teacher's shapes (one block's buffers in all), a widened one's their own (two
    sets). The student's block must still be the one that runs: a weight changed in it is found."""
    monkeypatch.setattr(hf_stream, "BESIDE_BYTES", 0)
    step = {"deepen": {"after": [1]}} if growth == "deepen" else {"widen": {"dim": "intermediate_size", "factor": 2}}
    src, out = _grown(tmp_path, step)
    buffers = {}  # per _Memory: how many buffers it has held at most
    tensor = hf_stream._Memory.tensor

    def counted(self, *a, **kw):
        out = tensor(self, *a, **kw)
        buffers[id(self)] = max(buffers.get(id(self), 0), len(self._out))
        return out

    monkeypatch.setattr(hf_stream._Memory, "tensor", counted)
    c = hf_stream.compare_dirs(src, out, **STREAM_KW)
    assert c.passed, c
    per_block = 9  # q k v o, gate up down, two norms
    assert list(buffers.values()) == [per_block if growth == "deepen" else per_block + 3], buffers  # widened MLP
    _edit(out, lambda sd: sd["model.layers.3.mlp.down_proj.weight"][0].mul_(1.5))  # the student's last block
    c = hf_stream.compare_dirs(src, out, **STREAM_KW)
    assert not c.passed and "after teacher block" in c.first_divergence, c


@pytest.mark.parametrize("beside", [True, False])
@pytest.mark.parametrize("growth", ["deepen", "widen"])
def test_big_bfloat16_blocks_keep_their_weights_narrow_and_still_catch_a_wrong_block(tmp_path, monkeypatch, growth,
                                                                                      beside):
    """Blocks too big to convert whole (NARROW_BYTES; a 7B one is 0.87 GB in float32) keep their
    bfloat16 linear weights unloaded, each read and widened into one buffer per side as it runs,
    the teacher's side in its own thread: beside the student's (each side its own buffer) or
    before it (one set of buffers): the grown student still passes, and a weight changed in its
    last block is found there."""
    from n2n_cli import hf_attention

    monkeypatch.setattr(hf_stream, "NARROW_BYTES", 0)
    if not beside:
        monkeypatch.setattr(hf_stream, "BESIDE_BYTES", 0)
    widened = []
    forward = hf_attention.Widened.forward
    monkeypatch.setattr(hf_attention.Widened, "forward", lambda self, x: (widened.append(self.weight.dtype),
                                                                          forward(self, x))[1])
    step = {"deepen": {"after": [1]}} if growth == "deepen" else {"widen": {"dim": "intermediate_size", "factor": 2}}
    src, out = _grown(tmp_path, step, dtype=torch.bfloat16)
    planned = json.loads((out / "config.json").read_text())
    kw = {k: v for k, v in STREAM_KW.items() if k not in ("atol", "rtol")}

    def compare():
        with hf_stream.teacher_ahead(src, planned, **kw) as ahead:  # the teacher's side in its own thread
            assert ahead is not None
            c = hf_stream.compare_dirs(src, out, ahead=ahead, **STREAM_KW)
            assert ahead.result() is not None  # it was the thread's side that was compared
        return c

    c = compare()
    assert c.passed, c
    assert widened and set(widened) == {torch.bfloat16}
    _edit(out, lambda sd: sd["model.layers.3.mlp.down_proj.weight"][0].mul_(1.5))
    c = compare()
    assert not c.passed and "after teacher block" in c.first_divergence and "student block 3" in c.first_divergence, c


@pytest.mark.parametrize("mode", ["streaming", "full"])
def test_a_student_that_computes_nan_is_told_so(tmp_path, cli, mode):
    """A NaN weight in the student: exit 3, the message says the student's outputs are not finite
    (not "max abs error inf > ... * max|teacher| inf": the teacher's are finite) and, blockwise,
    after which block the stream stops being finite."""
    def edit(sd):
        sd["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    src, out = _grown(tmp_path, {"deepen": {"layers": 5}}, edit)
    r = cli("verify", src, out, "--verify-mode", mode, "--json")
    assert r.exit_code == 3, r.output
    assert "the student's outputs are not finite (NaN or Inf) where the teacher's are" in r.stderr, r.stderr
    assert "max|teacher| inf" not in r.stderr
    v = json.loads(r.stdout)["verification"]["exact"]
    assert v["max_abs_error"] == float("inf") and 0 < v["max_abs_teacher"] < float("inf")
    if mode == "streaming":
        assert v["first_divergence"] == "the residual stream differs after teacher block 1 (student block 1): the " \
                                        "student's is not finite (NaN or Inf)", v["first_divergence"]
