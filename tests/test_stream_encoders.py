"""Blockwise (streaming) verification of the encoders n2n grows: BERT, RoBERTa, XLM-RoBERTa, as base
models (last hidden states, tiled for a widened hidden) and with their masked-LM heads (logits), on
tiny seeded models with every LayerNorm, bias and embedding table perturbed away from its default
init, float32. For each: the blockwise forward is transformers' own model's forward (RoBERTa's
positions from the input ids, padding tokens inside the sequences included); n2n's widened students
pass blockwise with the verdict and figures of full verification, and a (post-LN, so approximate)
deepen gets the same deviation as in full mode, located after the inserted block; a weight corrupted
in one block is located at that block; the word embedding table is never read whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import VOCAB, randomize_hf_norms  # noqa: E402
from n2n_cli import api, hf_io, hf_stream  # noqa: E402
from n2n_cli.spec import spec_from_steps  # noqa: E402
from test_hf_stream import batches  # noqa: E402
from test_stream_families import full_outputs, rel_error  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

ENCODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_attention_heads=4, max_position_embeddings=64,
               type_vocab_size=2)
# (model_type, architecture): the base models and the masked-LM architectures n2n grows (families/bert.yaml,
# roberta.yaml: head_architectures)
MODELS = [("bert", "BertModel"), ("bert", "BertForMaskedLM"), ("bert", "BertForPreTraining"),
          ("roberta", "RobertaModel"), ("roberta", "RobertaForMaskedLM"),
          ("xlm-roberta", "XLMRobertaModel"), ("xlm-roberta", "XLMRobertaForMaskedLM")]
IDS = [a for _, a in MODELS]
PAD = {"bert": 0, "roberta": 1, "xlm-roberta": 1}
KW = dict(vocab=VOCAB, max_len=64, probes=12, seed=0, atol=1e-5, rtol=1e-4, device=torch.device("cpu"),
          dtype=torch.float32)


def make(tmp_path: Path, model_type: str, arch: str, layers: int = 2, name: str = "teacher", **kw) -> Path:
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(model_type, **{**ENCODER, "num_hidden_layers": layers, **kw})
    model = getattr(transformers, arch)(cfg)
    randomize_hf_norms(model)  # LayerNorms, every bias (the MLM head's vocabulary bias too)
    with torch.no_grad():  # embeddings of trained scale: token, position and type each move the stream
        for n, p in model.named_parameters():
            if n.endswith(("word_embeddings.weight", "position_embeddings.weight", "token_type_embeddings.weight")):
                p.normal_(0, 1.0 if "word" in n else 0.5)
            if n.endswith(("query.weight", "key.weight")):  # attention scores of order 1, not near-uniform
                p.mul_(8)
    path = tmp_path / name
    model.save_pretrained(path)
    return path


def probe(model_type: str):
    """The test batches with the padding token inside the sequences too (not masked out): RoBERTa
    gives it the padding position, and the streaming forward must do the same."""
    b = batches()
    for ids, _ in b:
        ids[:, 2] = PAD[model_type]
        ids[0, -1] = PAD[model_type]
    return b


# ----------------------------------------------------------------------------- (1) the forward


@pytest.mark.parametrize("model_type,arch", MODELS, ids=IDS)
def test_streaming_forward_is_transformers_forward(tmp_path, model_type, arch):
    src = make(tmp_path, model_type, arch, layers=3)
    assert hf_stream.supports(src)
    b = probe(model_type)
    full, stream = full_outputs(src, b), hf_stream.forward(src, b)
    assert stream.shape == full.shape
    assert stream.shape[-1] == (VOCAB if "For" in arch else ENCODER["hidden_size"])
    err = rel_error(full, stream)
    print(f"{arch}: max rel error {err:.3g}")
    assert err <= 1e-5, err


@pytest.mark.parametrize("model_type,arch,kw", [
    ("bert", "BertForMaskedLM", dict(tie_word_embeddings=False)),  # its own decoder and decoder bias
    ("roberta", "RobertaForMaskedLM", dict(tie_word_embeddings=False)),
    ("bert", "BertModel", dict(is_decoder=True)),  # a causal mask, as BertModel builds it for a decoder
    ("roberta", "RobertaModel", dict(hidden_act="gelu_new", layer_norm_eps=1e-3)),
], ids=["bert-untied", "roberta-untied", "bert-is-decoder", "roberta-act-eps"])
def test_config_variants_are_transformers_forward(tmp_path, model_type, arch, kw):
    src = make(tmp_path, model_type, arch, layers=2, **kw)
    if kw.get("tie_word_embeddings") is False:  # the untied decoder is really its own tensor here
        from safetensors import safe_open

        with safe_open(str(src / "model.safetensors"), "pt") as f:
            prefix = "cls.predictions." if model_type == "bert" else "lm_head."
            assert not torch.equal(f.get_tensor(prefix + "bias"), f.get_tensor(prefix + "decoder.bias"))
    b = probe(model_type)
    assert rel_error(full_outputs(src, b), hf_stream.forward(src, b)) <= 1e-5


def test_old_gamma_beta_names_are_read(tmp_path):
    """A TF-era BERT checkpoint (LayerNorm.gamma/beta), which transformers still loads."""
    from safetensors.torch import load_file, save_file

    src = make(tmp_path, "bert", "BertForMaskedLM")
    b = probe("bert")
    full = full_outputs(src, b)
    f = src / "model.safetensors"
    sd = load_file(f)
    sd = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
          for k, v in sd.items()}
    save_file(sd, f, metadata={"format": "pt"})
    assert any(k.endswith("gamma") for k in sd)
    assert rel_error(full, hf_stream.forward(src, b)) <= 1e-5


def test_word_table_is_never_read_whole(tmp_path, monkeypatch):
    """Memory: the probe tokens' rows of the embedding and the head's vocabulary slices are read
    alone (tied head: the same table); reading the whole table would fail here."""
    src = make(tmp_path, "roberta", "RobertaForMaskedLM")
    b = probe("roberta")
    full = full_outputs(src, b)
    get = hf_io.HFDirSource.get

    def guarded(self, key):
        assert "word_embeddings" not in key and "decoder.weight" not in key, key
        return get(self, key)

    monkeypatch.setattr(hf_io.HFDirSource, "get", guarded)
    monkeypatch.setattr(hf_stream, "HEAD_ROWS", 16)  # several vocabulary slices (97 rows)
    assert rel_error(full, hf_stream.forward(src, b)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_are_the_tensors_rows(tmp_path, dtype):
    src = make(tmp_path, "bert", "BertModel")
    if dtype != torch.float32:
        model = transformers.BertModel.from_pretrained(src).to(dtype)
        model.save_pretrained(src)
    m = hf_stream._Model(src, torch.float32, torch.device("cpu"))
    try:
        key = "embeddings.word_embeddings.weight"
        table = m.source.get(key)
        assert table.dtype == dtype
        ids = torch.tensor([[5, 3, 4, 96, 5], [0, 0, 1, 2, 50]])
        assert torch.equal(m.rows(key, ids), table[ids])
        assert torch.equal(m.rows(key, start=90, stop=200), table[90:])
        assert torch.equal(m.rows(key, start=0, stop=16), table[:16])
    finally:
        m.close()


# ----------------------------------------------------------------------------- (2) grown students

GROWTHS = {
    "widen-mlp": [{"widen": {"dim": "intermediate_size", "to": 56, "noise": 0.1}}],
    "hidden2": [{"widen": {"dim": "hidden_size", "factor": 2}}],  # heads grow with it (head_dim = hidden / heads)
    "hidden2-mlp": [{"widen": {"dim": "hidden_size", "factor": 2}},
                    {"widen": {"dim": "intermediate_size", "factor": 2, "noise": 0.05}}],
}
GROWN = [("bert", "BertModel"), ("bert", "BertForPreTraining"), ("roberta", "RobertaForMaskedLM"),
         ("xlm-roberta", "XLMRobertaModel")]


@pytest.mark.parametrize("growth", sorted(GROWTHS))
@pytest.mark.parametrize("model_type,arch", GROWN, ids=[a for _, a in GROWN])
def test_grown_students_pass_blockwise_as_in_full_mode(tmp_path, model_type, arch, growth):
    src = make(tmp_path, model_type, arch)
    out = tmp_path / "student"
    api.grow(spec_from_steps(GROWTHS[growth], seed=1), src, out, device="cpu", verify=False)
    c = hf_stream.compare(src, out, mode="auto", **KW)
    assert c.mode == "streaming" and c.passed and c.first_divergence is None, c
    assert c.blocks_compared == 3 and c.argmax_agreement is (None if arch.endswith("Model") else c.argmax_agreement)
    full = hf_stream.compare(src, out, mode="full", **KW)
    assert full.mode == "full" and full.passed
    assert abs(full.max_abs_error - c.max_abs_error) <= 1e-6
    assert full.max_abs_teacher == pytest.approx(c.max_abs_teacher, rel=1e-6)
    assert full.probes == c.probes


@pytest.mark.parametrize("model_type,arch", [("bert", "BertForMaskedLM"), ("roberta", "RobertaModel")],
                         ids=["bert-mlm", "roberta"])
def test_post_ln_deepen_deviation_is_full_modes(tmp_path, model_type, arch):
    """Post-LN: a block with zeroed output projections computes LayerNorm(h), not h, so n2n deepens
    only with allow_approximate. Streaming measures the same deviation as full mode and locates it
    after the inserted block (the block before it is a byte copy, not run again)."""
    src = make(tmp_path, model_type, arch, layers=3)
    out = tmp_path / "student"
    api.grow(spec_from_steps([{"deepen": {"after": [1], "allow_approximate": True}}], seed=1), src, out,
             device="cpu", verify=False)
    c = hf_stream.compare(src, out, mode="auto", **KW)
    full = hf_stream.compare(src, out, mode="full", **KW)
    assert c.mode == "streaming" and not c.passed and not full.passed
    assert c.student_blocks_inserted == [2] and c.student_blocks_copied == [0, 1]
    assert c.first_divergence.startswith("the residual stream differs after teacher block 1 (student block 2, inserted "
                                         "after 1)"), c
    assert c.max_abs_error == pytest.approx(full.max_abs_error, rel=1e-5)
    assert c.max_rel_error == pytest.approx(full.max_rel_error, rel=1e-5)


# ----------------------------------------------------------------------------- (3) where it starts


@pytest.mark.parametrize("model_type,arch,key", [
    ("bert", "BertForMaskedLM", "bert.encoder.layer.1.output.dense.weight"),
    ("roberta", "RobertaModel", "encoder.layer.1.attention.self.key.weight"),
    ("xlm-roberta", "XLMRobertaForMaskedLM", "roberta.encoder.layer.1.attention.output.LayerNorm.bias"),
], ids=["bert", "roberta", "xlm-roberta"])
def test_corrupted_block_is_named(tmp_path, model_type, arch, key):
    from safetensors.torch import load_file, save_file

    src = make(tmp_path, model_type, arch, layers=3)
    out = tmp_path / "student"
    api.grow(spec_from_steps(GROWTHS["widen-mlp"], seed=1), src, out, device="cpu", verify=False)
    assert hf_stream.compare(src, out, **KW).passed
    f = out / "model.safetensors"
    sd = load_file(f)
    sd[key] = sd[key] + 0.05 * torch.randn(sd[key].shape, generator=torch.Generator().manual_seed(0))
    save_file(sd, f, metadata={"format": "pt"})
    c = hf_stream.compare(src, out, mode="auto", **KW)
    assert c.mode == "streaming" and not c.passed
    assert c.first_divergence.startswith("the residual stream differs after teacher block 1 (student block 1)"), c
    assert not hf_stream.compare(src, out, mode="full", **KW).passed


def test_corrupted_head_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    src = make(tmp_path, "roberta", "RobertaForMaskedLM")
    out = tmp_path / "student"
    api.grow(spec_from_steps(GROWTHS["hidden2"], seed=1), src, out, device="cpu", verify=False)
    f = out / "model.safetensors"
    sd = load_file(f)
    sd["lm_head.dense.bias"] = sd["lm_head.dense.bias"] + 0.1
    save_file(sd, f, metadata={"format": "pt"})
    c = hf_stream.compare(src, out, **KW)
    assert c.mode == "streaming" and not c.passed
    assert c.first_divergence == "the residual streams agree after every block; the final norm or the head differs"


# ----------------------------------------------------------------------------- which mode


def test_task_heads_are_verified_in_full_mode(tmp_path, cli):
    src = make(tmp_path, "roberta", "RobertaForSequenceClassification")
    assert not hf_stream.supports(src)
    assert "'RobertaForSequenceClassification' has a task head" in hf_stream.unsupported(src)
    assert hf_stream.compare(src, src, mode="auto", **KW).mode == "full"
    r = cli("verify", src, src, "--verify-mode", "streaming")
    assert r.exit_code == 2 and "blockwise verification cannot verify this model" in r.output


@pytest.mark.parametrize("model_type,arch", [("bert", "BertForMaskedLM"), ("xlm-roberta", "XLMRobertaModel")])
def test_cli_verifies_encoders_blockwise_and_full_on_request(tmp_path, cli, model_type, arch):
    src = make(tmp_path, model_type, arch)
    out, rep = tmp_path / "out", tmp_path / "r.json"
    r = cli("widen", src, out, "--dim", "hidden_size", "--factor", "2", "--device", "cpu", "--report", rep)
    assert r.exit_code == 0, r.output
    v = json.loads(rep.read_text())["verification"]
    assert v["passed"] is True and v["exact"]["mode"] == "streaming"
    r = cli("verify", src, out, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["mode"] == "streaming"
    r = cli("verify", src, out, "--verify-mode", "full", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["mode"] == "full"


def test_roberta_probes_fit_its_position_table(tmp_path):
    """RoBERTa's positions start after the padding index: with 34 position embeddings a sequence
    holds 32 tokens, so the 33-token probes are left out, as in full mode (not an index error)."""
    src = make(tmp_path, "roberta", "RobertaForMaskedLM", max_position_embeddings=34)
    out = tmp_path / "student"
    api.grow(spec_from_steps(GROWTHS["widen-mlp"], seed=1), src, out, device="cpu", verify=False)
    kw = {**KW, "max_len": 34}
    c, full = hf_stream.compare(src, out, **kw), hf_stream.compare(src, out, mode="full", **kw)
    assert c.mode == "streaming" and c.passed and full.passed
    assert c.max_abs_teacher == pytest.approx(full.max_abs_teacher, rel=1e-6)
