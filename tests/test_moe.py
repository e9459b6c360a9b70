"""Mixtures of experts (mixtral, qwen2_moe, qwen3_moe): growth checked against transformers'
own classes, and dense-to-MoE upcycling (``n2n upcycle``) checked against the dense teacher."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moe_models import MOE_TYPES, make_dense_model, make_moe_model  # noqa: E402
from test_hf import grow, max_rel_error  # noqa: E402
from n2n_cli import api  # noqa: E402
from n2n_cli.errors import StepError  # noqa: E402

STEPS = [
    [{"widen": {"dim": "intermediate_size", "to": 40, "noise": 0.05}}],
    [{"widen": {"dim": "hidden_size", "factor": 2}}],
    [{"deepen": {"layers": 4}}],
    [{"widen": {"dim": "num_attention_heads", "to": 8}}],
    [{"widen": {"dim": "num_key_value_heads", "to": 4}}],
    [{"deepen": {"after": [0]}}, {"widen": {"dim": "hidden_size", "factor": 2}},
     {"widen": {"dim": "intermediate_size", "to": 36}}],
]


@pytest.mark.parametrize("steps", STEPS, ids=lambda s: "+".join(k + ":" + str(v.get("dim", "")) for d in s
                                                                 for k, v in d.items()))
@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_moe_growth_is_exact(tmp_path, model_type, steps):
    src = make_moe_model(tmp_path, model_type)
    out = tmp_path / "out"
    r = grow(src, out, steps)
    assert r["verification"]["passed"] is True, r["verification"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == model_type
    ratio = cfg["hidden_size"] // 32
    assert max_rel_error(src, out) <= 1e-5
    if any("deepen" in s for s in steps):  # the new blocks' expert and shared-expert outputs are zero
        from safetensors import safe_open
        with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
            zero = [k for k in f.keys() if k.startswith("model.layers.1.") and ("down_proj" in k or ".w2." in k
                                                                               or "o_proj" in k)]
            assert zero and all(not f.get_tensor(k).any() for k in zero)
    assert ratio in (1, 2)


def test_moe_widen_intermediate_draws_a_mapping_per_expert(tmp_path):
    src = make_moe_model(tmp_path, "mixtral")
    grow(src, tmp_path / "out", [{"widen": {"dim": "intermediate_size", "to": 40}}])
    from safetensors import safe_open
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        a = f.get_tensor("model.layers.0.block_sparse_moe.experts.0.w1.weight")[24:]
        b = f.get_tensor("model.layers.0.block_sparse_moe.experts.1.w1.weight")[24:]
        t0 = f.get_tensor("model.layers.0.block_sparse_moe.gate.weight")
    assert a.shape == (16, 32)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        g0 = f.get_tensor("model.layers.0.block_sparse_moe.experts.0.w1.weight")
        assert torch.equal(t0, f.get_tensor("model.layers.0.block_sparse_moe.gate.weight"))  # router unchanged
    rows = [int((g0 == r).all(1).nonzero()[0]) for r in a]
    rows_b = [int((f_ == 0).sum()) for f_ in [b]]  # noqa: F841 (b exists with the new shape)
    assert len(set(rows)) > 1


def test_qwen3_moe_hidden_padding_refused_q_norm_shares_the_eps(tmp_path):
    src = make_moe_model(tmp_path, "qwen3_moe")
    with pytest.raises(StepError, match="q_norm .*read the same rms_norm_eps"):
        grow(src, tmp_path / "out", [{"widen": {"dim": "hidden_size", "to": 40}}])
    r = grow(make_moe_model(tmp_path, "mixtral", name="m"), tmp_path / "o2",
             [{"widen": {"dim": "hidden_size", "to": 40}}])  # no per-head norms: LEMON padding is exact
    assert r["verification"]["passed"] is True


def test_mixed_dense_and_sparse_layers_are_refused(tmp_path):
    src = make_moe_model(tmp_path, "qwen2_moe", decoder_sparse_step=2)
    with pytest.raises(Exception, match="decoder_sparse_step"):
        api.inspect(src)


UPCYCLES = [
    ("llama", {"experts": 4, "top_k": 2}, "mixtral"),
    ("mistral", {"experts": 8, "top_k": 2, "router_init": "small", "router_std": 0.5}, "mixtral"),
    ("llama", {"experts": 4, "top_k": 1, "router_init": "small", "router_std": 1.0}, "mixtral"),
    ("llama", {"experts": 4, "top_k": 4, "noise": 0.05}, "mixtral"),
    ("qwen2", {"experts": 4, "top_k": 2}, "qwen2_moe"),
    ("qwen2", {"experts": 4, "top_k": 2, "shared_expert": "zero", "router_init": "small", "router_std": 1.0},
     "qwen2_moe"),
    ("qwen2", {"experts": 3, "top_k": 3, "norm_topk_prob": False}, "qwen2_moe"),  # all selected: weights sum to 1
]


@pytest.mark.parametrize("family,step,target", UPCYCLES, ids=[f"{c[0]}-{i}" for i, c in enumerate(UPCYCLES)])
def test_upcycle_is_exact(tmp_path, family, step, target):
    src = make_dense_model(tmp_path, family)
    out = tmp_path / "moe"
    r = grow(src, out, [{"upcycle": step}])
    assert r["verification"]["passed"] is True, r["verification"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == target and cfg["num_experts_per_tok"] == step["top_k"]
    assert cfg.get("num_local_experts", cfg.get("num_experts")) == step["experts"]
    assert cfg["architectures"][0].endswith("ForCausalLM") and cfg["output_router_logits"] is False
    assert max_rel_error(src, out) <= 1e-5
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__.lower().startswith(target.replace("_", ""))
    v = api.verify(src, out, device="cpu")  # the recorded upcycle replays bitwise
    assert v["passed"] is True and v["verification"]["certificate"]["status"] == "pass"


def test_upcycle_then_grow_the_moe(tmp_path):
    src = make_dense_model(tmp_path, "qwen2")
    out = tmp_path / "moe"
    r = grow(src, out, [{"upcycle": {"experts": 4, "top_k": 2, "router_init": "small", "router_std": 0.5}},
                        {"widen": {"dim": "hidden_size", "factor": 2}}, {"deepen": {"layers": 3}},
                        {"widen": {"dim": "intermediate_size", "to": 48}}])
    assert r["verification"]["passed"] is True
    assert max_rel_error(src, out) <= 1e-5
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["moe_intermediate_size"], cfg["shared_expert_intermediate_size"], cfg["hidden_size"]) == (48, 40, 64)


@pytest.mark.parametrize("step,message", [
    ({"experts": 4, "top_k": 2, "noise": 0.01}, "noise 0.01 on the experts cancels only"),
    ({"experts": 4, "top_k": 4, "noise": 0.01, "router_init": "small"}, "random router"),
    ({"experts": 4, "top_k": 2, "norm_topk_prob": False}, "norm_topk_prob is false"),
])
def test_upcycle_refuses_what_cannot_be_exact_then_measures_it(tmp_path, step, message):
    src = make_dense_model(tmp_path, "qwen2")
    with pytest.raises(StepError, match=message):
        grow(src, tmp_path / "a", [{"upcycle": step}])
    r = grow(src, tmp_path / "b", [{"upcycle": {**step, "allow_approximate": True}}])
    v = r["verification"]
    assert v["passed"] is None and v["deviation"]["max_rel_error"] > 1e-6 and "approximate" in v["note"]


def test_upcycle_refusals(tmp_path):
    with pytest.raises(StepError, match="no place in a mixtral model"):
        grow(make_dense_model(tmp_path, "llama", attention_bias=True), tmp_path / "a",
             [{"upcycle": {"experts": 4, "top_k": 2}}])
    with pytest.raises(StepError, match="already a mixture of experts"):
        grow(make_moe_model(tmp_path, "mixtral", name="m"), tmp_path / "b", [{"upcycle": {"experts": 4, "top_k": 2}}])
    with pytest.raises(StepError, match="mixtral has no shared expert"):
        grow(make_dense_model(tmp_path, "llama", name="l"), tmp_path / "c",
             [{"upcycle": {"experts": 4, "top_k": 2, "shared_expert": "zero"}}])
    with pytest.raises(StepError, match="cannot be upcycled"):
        grow(make_dense_model(tmp_path, "gpt2", name="g"), tmp_path / "d", [{"upcycle": {"experts": 4, "top_k": 2}}])


def test_upcycle_is_byte_identical_for_a_seed(tmp_path):
    src = make_dense_model(tmp_path, "llama")
    step = [{"upcycle": {"experts": 4, "top_k": 4, "noise": 0.1, "router_init": "zero"}}]
    grow(src, tmp_path / "a", step, seed=3)
    grow(src, tmp_path / "b", step, seed=3)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_cli_upcycle_inspect_and_errors(tmp_path, cli):
    src = make_dense_model(tmp_path, "llama")
    r = cli("upcycle", src, tmp_path / "moe", "--experts", 8, "--top-k", 2, "-q")
    assert r.exit_code == 0, r.output
    r = cli("inspect", tmp_path / "moe")
    assert r.exit_code == 0 and "8 experts per layer, top-2 (renormalised)" in r.output
    r = cli("inspect", src, "--json")
    assert json.loads(r.output)["growth"]["upcycle"] == "yes"
    r = cli("upcycle", src, tmp_path / "x", "--experts", 8, "--top-k", 2, "--noise", 0.1)
    assert r.exit_code == 2 and "--allow-approximate" in r.output and not (tmp_path / "x").exists()
    r = cli("upcycle", src, tmp_path / "y", "--experts", 4, "--top-k", 5)
    assert r.exit_code == 2 and "top_k (5) must not exceed experts (4)" in r.output
    r = cli("upcycle", "--help")
    assert r.exit_code == 0 and "whatever the router picks" in r.output
    r = cli("verify", src, tmp_path / "moe", "-q")
    assert r.exit_code == 0, r.output


def test_upcycle_spec_file(tmp_path, cli):
    src = make_dense_model(tmp_path, "qwen2")
    spec = tmp_path / "up.yaml"
    spec.write_text("steps:\n  - upcycle: {experts: 4, top_k: 2}\n  - deepen: {layers: 3}\n")
    r = cli("grow", spec, src, tmp_path / "out", "-q")
    assert r.exit_code == 0, r.output
    spec.write_text("steps:\n  - upcycle: {experts: 4, top_k: 2, bogus: 1}\n")
    r = cli("validate", spec)
    assert r.exit_code == 2 and "bogus" in r.output
