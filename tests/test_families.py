"""The families of issue 9 (Qwen3, SmolLM3, Granite, Gemma 1/2/3, Phi-3, OLMo 2, RoBERTa and task
heads): tiny random models with perturbed norms and biases, grown by every step kind and compared
logit for logit with transformers' own classes (padded and unpadded rows), or refused with the
reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import VOCAB, randomize_hf_norms  # noqa: E402
from n2n_cli import api  # noqa: E402
from n2n_cli.errors import StepError  # noqa: E402
from n2n_cli.spec import spec_from_steps  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
               eos_token_id=2)
ENCODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=66, pad_token_id=1)


def make(tmp_path: Path, model_type: str, arch: str = "AutoModelForCausalLM", name: str = "teacher", **kw) -> Path:
    torch.manual_seed(0)
    base = ENCODER if model_type in ("bert", "roberta", "xlm-roberta") else DECODER
    cfg = transformers.AutoConfig.for_model(model_type, **{**base, **kw})
    cls = getattr(transformers, arch)
    model = cls.from_config(cfg) if arch.startswith("Auto") else cls(cfg)
    randomize_hf_norms(model)
    with torch.no_grad():  # q/k norms and the like without a bias: perturb every 1-d parameter
        for n, p in model.named_parameters():
            if p.dim() == 1 and "norm" in n.lower():
                p.uniform_(0.5, 1.5)
    path = tmp_path / name
    model.save_pretrained(path)
    return path


def load(path: Path):
    cfg = transformers.AutoConfig.from_pretrained(path)
    cls = getattr(transformers, cfg.architectures[0])
    return cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def max_rel_error(teacher: Path, student: Path, length: int = 11) -> float:
    """Independent of n2n's verifier: our own probes, one padded row, logits at the kept positions
    (sequence-level logits as they are); base models' hidden states against the tiled teacher's."""
    t, s = load(teacher), load(student)
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(3, VOCAB, (3, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, length - 4:] = 0
    with torch.no_grad():
        a, b = t(input_ids=ids, attention_mask=mask), s(input_ids=ids, attention_mask=mask)
    if hasattr(a, "logits"):
        a, b = a.logits, b.logits
        if a.dim() == 3:
            a, b = a[mask.bool()], b[mask.bool()]
    else:
        a, b = a.last_hidden_state[mask.bool()], b.last_hidden_state[mask.bool()]
        r = b.shape[-1] // a.shape[-1]
        a = a.repeat(1, r)
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / a.abs().max())


def grow(src: Path, out: Path, steps: list[dict]) -> dict:
    return api.grow(spec_from_steps(steps, seed=0), src, out, device="cpu")


INTER = {"widen": {"dim": "intermediate_size", "to": 56}}
HID2 = {"widen": {"dim": "hidden_size", "factor": 2}}
HID_PAD = {"widen": {"dim": "hidden_size", "to": 40}}
HEADS = {"widen": {"dim": "num_attention_heads", "to": 8}}
HEADS6 = {"widen": {"dim": "num_attention_heads", "to": 6}}
KV = {"widen": {"dim": "num_key_value_heads", "to": 4}}
DEEP = {"deepen": {"layers": 4}}
DEEP_AFTER = {"deepen": {"after": [0]}}

GRANITE = dict(embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=4.0)
GEMMA2 = dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=12,
              attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
GEMMA3 = dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=12,
              final_logit_softcapping=3.0)
FAMILIES = {"qwen3": {}, "smollm3": dict(no_rope_layers=[1, 0]), "granite": GRANITE, "gemma": {},
            "gemma2": GEMMA2, "gemma3_text": GEMMA3, "phi3": {}, "olmo2": {}}
PAD_REFUSED = {"qwen3", "gemma3_text", "olmo2"}  # q/k norms share rms_norm_eps with the stream's norms
CASES = [(mt, step) for mt in FAMILIES for step in (INTER, HID2, HID_PAD, HEADS, KV, DEEP)
         if not (step is HID_PAD and mt in PAD_REFUSED)]


def _id(step: dict) -> str:
    kind, body = next(iter(step.items()))
    return f"{kind}:{body.get('dim', '')}:{body.get('to', body.get('factor', body.get('layers', '')))}"


@pytest.mark.parametrize("model_type,step", CASES, ids=[f"{m}-{_id(s)}" for m, s in CASES])
def test_family_growth_is_exact_against_transformers(tmp_path, model_type, step):
    src = make(tmp_path, model_type, **FAMILIES[model_type])
    out = tmp_path / "student"
    report = grow(src, out, [step])
    assert report["verification"]["passed"] is True, report["verification"]
    # past the sliding windows of Gemma 2/3 (8 tokens) as well as within them
    err = max_rel_error(src, out, length=20)
    assert err <= 1e-5, err
    if "deepen" in step or (step is KV and model_type != "olmo2"):
        assert err == 0.0  # zeroed output projections / repeated kv heads: the same sums (OLMo 2's k_norm
        # takes the mean square over the repeated heads: equal in exact arithmetic, not in float32)
    cfg = json.loads((out / "config.json").read_text())
    if step is DEEP:
        assert cfg["num_hidden_layers"] == 4
        if "layer_types" in FAMILIES[model_type]:  # each inserted block copies the layer before it
            assert cfg["layer_types"] == ["sliding_attention", "sliding_attention", "full_attention", "full_attention"]
        if model_type == "smollm3":
            assert cfg["no_rope_layers"] == [1, 1, 0, 0]
    if step is HID2:
        assert cfg["hidden_size"] == 64 and cfg["head_dim"] == 8


@pytest.mark.parametrize("model_type", sorted(PAD_REFUSED))
def test_padded_hidden_width_refused_where_q_k_norms_share_the_eps(tmp_path, model_type):
    src = make(tmp_path, model_type, **FAMILIES[model_type])
    with pytest.raises(StepError, match="q_norm and k_norm use the same rms_norm_eps") as e:
        grow(src, tmp_path / "out", [HID_PAD])
    assert "Use a multiple of 32" in e.value.hint
    assert not (tmp_path / "out").exists()


def test_olmo2_heads_grow_by_whole_multiples_only(tmp_path):
    src = make(tmp_path, "olmo2")
    with pytest.raises(StepError, match="normalise the whole query and key projections"):
        grow(src, tmp_path / "out", [HEADS6])
    report = grow(src, tmp_path / "out", [HEADS, DEEP])
    assert report["verification"]["passed"] is True
    assert max_rel_error(src, tmp_path / "out") <= 1e-5


@pytest.mark.parametrize("tied", [True, False])
def test_gemma_embedding_scale_and_one_plus_w_norms(tmp_path, tied):
    """Gemma multiplies embeddings by sqrt(hidden_size) and norms by (1 + w): the stored embedding
    of a 2x wider model is E * sqrt(1/2) tiled, and a tied head's final norm is (1 + w) / 2 / sqrt(1/2) - 1."""
    from safetensors.torch import load_file
    src = make(tmp_path, "gemma", tie_word_embeddings=tied)
    out = tmp_path / "out"
    report = grow(src, out, [HID2, INTER, DEEP_AFTER])
    assert report["verification"]["passed"] is True
    assert max_rel_error(src, out, length=20) <= 1e-5
    a, b = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    e = a["model.embed_tokens.weight"]
    assert torch.allclose(b["model.embed_tokens.weight"], torch.cat([e, e], 1) * 0.5 ** 0.5, rtol=1e-6, atol=0)
    w = a["model.norm.weight"]
    expected = ((1 + w) / 2 / 0.5 ** 0.5 - 1) if tied else w
    assert torch.allclose(b["model.norm.weight"], torch.cat([expected, expected]), rtol=1e-6, atol=1e-7)


def test_phi3_fused_qkv_with_grouped_kv_heads(tmp_path):
    """qkv_proj holds q | k | v of unequal sizes (8 query heads, 2 kv heads): each part widens in place."""
    src = make(tmp_path, "phi3", num_attention_heads=8, num_key_value_heads=2, head_dim=4)
    out = tmp_path / "out"
    report = grow(src, out, [{"widen": {"dim": "num_attention_heads", "to": 12}},
                             {"widen": {"dim": "num_key_value_heads", "to": 6}}, HID2, INTER, DEEP])
    assert report["verification"]["passed"] is True
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]) == (12, 6, 64)
    assert max_rel_error(src, out, length=20) <= 1e-5


# ----------------------------------------------------------------------------- encoders and task heads

ENCODER_CASES = [
    ("roberta", "RobertaForMaskedLM", [HID2, INTER]),
    ("roberta", "RobertaModel", [HID2]),
    ("xlm-roberta", "XLMRobertaForMaskedLM", [INTER, HID2]),
    ("roberta", "RobertaForSequenceClassification", [HID2, INTER]),
    ("xlm-roberta", "XLMRobertaForTokenClassification", [HID2]),
    ("bert", "BertForSequenceClassification", [HID2, INTER]),
    ("bert", "BertForTokenClassification", [INTER, HID2]),
    ("llama", "LlamaForSequenceClassification", [HID2, INTER, HEADS, DEEP]),
    ("llama", "LlamaForTokenClassification", [HID_PAD, INTER, KV, DEEP]),
]


@pytest.mark.parametrize("model_type,arch,steps", ENCODER_CASES, ids=[c[1] for c in ENCODER_CASES])
def test_encoders_and_task_heads(tmp_path, model_type, arch, steps):
    """The head reads the stream (widened as a reader); the labels never grow; logits compared."""
    kw = {"num_labels": 3} if "Classification" in arch else {}
    src = make(tmp_path, model_type, arch, **kw)
    out = tmp_path / "student"
    report = grow(src, out, steps)
    assert report["verification"]["passed"] is True, report["verification"]
    assert max_rel_error(src, out) <= 1e-5
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [arch] and len(cfg.get("id2label", {})) == (3 if kw else len(cfg.get("id2label", {})))


def test_roberta_probes_stay_within_the_offset_positions(tmp_path):
    """RoBERTa's positions start at padding_idx + 1: with max_position_embeddings 20 a sequence holds 18
    tokens; n2n's probes must fit (longer ones raise an index error inside transformers)."""
    src = make(tmp_path, "roberta", "RobertaForMaskedLM", max_position_embeddings=20)
    report = grow(src, tmp_path / "out", [HID2])
    assert report["verification"]["passed"] is True
    assert max_rel_error(src, tmp_path / "out", length=18) <= 1e-5


def test_roberta_deepening_is_refused_as_post_ln(tmp_path):
    src = make(tmp_path, "roberta", "RobertaForMaskedLM")
    with pytest.raises(StepError, match="post-LN"):
        grow(src, tmp_path / "out", [DEEP])


def test_old_bert_gamma_beta_names_are_read_and_written_modern(tmp_path):
    """TF-era BERT checkpoints name LayerNorm parameters gamma/beta; transformers still loads them.
    n2n reads them, writes weight/bias, and says so in the plan notes."""
    from safetensors.torch import load_file, save_file
    src = make(tmp_path, "bert", "BertForMaskedLM")
    sd = load_file(src / "model.safetensors")
    old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
           for k, v in sd.items()}
    assert any(k.endswith("LayerNorm.gamma") for k in old)
    save_file(old, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    report = grow(src, out, [HID2])
    assert report["verification"]["passed"] is True
    assert any("renamed" in n and "LayerNorm.gamma -> LayerNorm.weight" in n for n in report["plan"]["notes"])
    keys = set(load_file(out / "model.safetensors"))
    assert not any(k.endswith(("gamma", "beta")) for k in keys) and "bert.embeddings.LayerNorm.weight" in keys
    assert max_rel_error(src, out) <= 1e-5


@pytest.mark.parametrize("model_type,arch,growth,head", [
    ("qwen3", "AutoModelForCausalLM", {"hidden_size": "yes (integer multiples only)", "num_attention_heads": "yes"}, None),
    ("olmo2", "AutoModelForCausalLM", {"hidden_size": "yes (integer multiples only)",
                                       "num_attention_heads": "yes (whole multiples only)"}, None),
    ("gemma2", "AutoModelForCausalLM", {"hidden_size": "yes", "num_hidden_layers": "yes"}, None),
    ("roberta", "RobertaForMaskedLM", {"num_hidden_layers": "no"}, None),
    ("llama", "LlamaForSequenceClassification", {"hidden_size": "yes"}, {"kind": "ForSequenceClassification",
                                                                         "labels": 3}),
])
def test_inspect_tells_what_each_family_can_grow(tmp_path, cli, model_type, arch, growth, head):
    src = make(tmp_path, model_type, arch, **({"num_labels": 3} if head else {}))
    r = cli("inspect", src, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    for k, v in growth.items():
        assert report["growth"][k].startswith(v) if v == "no" else report["growth"][k] == v, (k, report["growth"][k])
    assert report.get("task_head") == head


def test_smollm3_without_no_rope_layers_gets_the_derived_list_written(tmp_path):
    """A config.json without no_rope_layers: transformers derives it from no_rope_layer_interval by layer
    index; n2n writes the teacher's derived list extended by deepening, so no layer changes its RoPE."""
    src = make(tmp_path, "smollm3", no_rope_layer_interval=2)
    cfg = json.loads((src / "config.json").read_text())
    assert cfg.pop("no_rope_layers") == [1, 0]
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    report = grow(src, out, [DEEP])
    assert report["verification"]["passed"] is True
    assert json.loads((out / "config.json").read_text())["no_rope_layers"] == [1, 1, 0, 0]
    assert max_rel_error(src, out) == 0.0


@pytest.mark.parametrize("model_type,arch,steps", [
    ("gemma", "AutoModelForCausalLM", [HID2, INTER, DEEP]),
    ("phi3", "AutoModelForCausalLM", [HEADS, HID_PAD, DEEP]),
    ("olmo2", "AutoModelForCausalLM", [HEADS, HID2, DEEP]),
    ("bert", "BertForSequenceClassification", [HID2, INTER]),
])
def test_n2n_verify_certifies_the_growth_bitwise(tmp_path, model_type, arch, steps):
    """n2n verify replays the recorded growth from the teacher and finds every tensor identical."""
    src = make(tmp_path, model_type, arch)
    out = tmp_path / "out"
    grow(src, out, steps)
    v = api.verify(src, out)["verification"]
    assert v["passed"] is True, v
    assert v["certificate"]["status"] == "pass", v["certificate"]
    assert v["certificate"]["bitwise"] == v["certificate"]["tensors"] > 0


def test_smollm3_no_rope_layers_of_the_wrong_kind_are_named(tmp_path, cli):
    src = make(tmp_path, "smollm3")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "no_rope_layers": ["yes", "no"]}))
    r = cli("inspect", src)
    assert r.exit_code == 2, r.output
    assert "'no_rope_layers' must be a list of 2 integers (one per layer)" in r.stderr
