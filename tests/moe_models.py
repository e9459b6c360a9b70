"""Tiny random mixture-of-experts models (mixtral, qwen2_moe, qwen3_moe) for the MoE tests:
norms and biases perturbed away from their default init, routers scaled up so that the top-k
choice differs from token to token (a router of near-zero logits would hide a wrong router)."""

from __future__ import annotations

from pathlib import Path

import torch

from helpers import VOCAB, make_hf_model, randomize_hf_norms

MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")


def moe_config(model_type: str, **kw):
    import transformers

    base = dict(vocab_size=VOCAB, max_position_embeddings=64, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2)
    if model_type == "mixtral":
        return transformers.MixtralConfig(**{**base, "intermediate_size": 24, "num_local_experts": 4, **kw})
    if model_type == "qwen2_moe":
        return transformers.Qwen2MoeConfig(**{**base, "intermediate_size": 48, "moe_intermediate_size": 24,
                                              "shared_expert_intermediate_size": 40, "num_experts": 4,
                                              "norm_topk_prob": False, **kw})
    if model_type == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**{**base, "intermediate_size": 48, "moe_intermediate_size": 24,
                                              "num_experts": 4, "norm_topk_prob": True, **kw})
    raise AssertionError(model_type)


def make_moe_model(tmp_path: Path, model_type: str, name: str = "teacher", seed: int = 0, dtype=torch.float32,
                   **kw) -> Path:
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(moe_config(model_type, **kw))
    randomize_hf_norms(model)
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if name_.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight", "shared_expert_gate.weight")):
                p.normal_(0, 0.5)
    path = tmp_path / name
    model.to(dtype).save_pretrained(path)
    return path


def make_dense_model(tmp_path: Path, family: str, name: str = "teacher", **kw) -> Path:
    return make_hf_model(tmp_path, family, name, **kw)
