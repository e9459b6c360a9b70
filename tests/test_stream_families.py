"""Blockwise (streaming) verification for every decoder family n2n grows beyond LLaMA/Mistral/Qwen2
(Qwen3, SmolLM3, Granite, Gemma 1/2/3, Phi-3, OLMo 2, Mixtral, Qwen2-MoE, Qwen3-MoE, GPT-2): tiny seeded
models with norms and biases perturbed away from their default init, float32. For each family:
the blockwise forward is transformers' own model's forward; n2n's deepened and widened students
pass blockwise with the verdict and figures of full verification; a weight corrupted in one block
is located at that block; the probes go past every sliding window the config declares (a student
whose only difference is its window fails)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import VOCAB, make_hf_model  # noqa: E402
from moe_models import make_moe_model  # noqa: E402
from n2n_cli import api, hf_stream, hf_verify  # noqa: E402
from n2n_cli.spec import spec_from_steps  # noqa: E402
from test_families import make as make_family  # noqa: E402
from test_hf_stream import batches  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
WINDOW = 6  # every family with a window gets this one (the probes of 16 and 33 tokens go past it)


def _alternating(n: int) -> list[str]:
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]


def family_config(model_type: str, layers: int) -> dict:
    """Config fields that exercise what the family's forward does around its blocks: windows
    (per layer where the family has layer types), embedding/logit multipliers, soft-capping."""
    lt = _alternating(layers)
    return {
        "qwen3": dict(use_sliding_window=True, sliding_window=WINDOW, layer_types=lt, max_window_layers=0),
        "smollm3": dict(use_sliding_window=True, sliding_window=WINDOW, layer_types=lt,
                        no_rope_layers=[1 - (i % 2) for i in range(layers)]),
        "granite": dict(embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2,
                        logits_scaling=4.0),
        "gemma": {},
        "gemma2": dict(sliding_window=WINDOW, layer_types=lt, query_pre_attn_scalar=12, attn_logit_softcapping=5.0,
                       final_logit_softcapping=3.0),
        # local rope (sliding layers, theta 10^4) differs from the global one (10^6) by default
        "gemma3_text": dict(sliding_window=WINDOW, layer_types=lt, query_pre_attn_scalar=12,
                            final_logit_softcapping=3.0),
        "phi3": dict(sliding_window=WINDOW),
        "olmo2": {},
        "mixtral": dict(sliding_window=WINDOW),
        "qwen2_moe": dict(use_sliding_window=True, sliding_window=WINDOW, layer_types=lt, max_window_layers=0),
        "qwen3_moe": dict(use_sliding_window=True, sliding_window=WINDOW),
        "gpt2": dict(n_inner=40),
    }[model_type]


FAMILIES = ["qwen3", "smollm3", "granite", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2", *MOE_TYPES, "gpt2"]
WINDOWED = [m for m in FAMILIES if "sliding_window" in family_config(m, 2)]


def make(tmp_path: Path, model_type: str, layers: int = 2, name: str = "teacher", **kw) -> Path:
    cfg = {**family_config(model_type, layers), "num_hidden_layers": layers, **kw}
    if model_type == "gpt2":  # tests/helpers' GPT-2 (hidden 32, 4 heads), its LayerNorms and biases perturbed
        return make_hf_model(tmp_path, "gpt2", name=name, **cfg)
    if model_type in MOE_TYPES:  # routers scaled up so that the top-k choice differs from token to token
        return make_moe_model(tmp_path, model_type, name=name, **cfg)
    return make_family(tmp_path, model_type, name=name, **cfg)  # norms and biases perturbed


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def full_outputs(path: Path, b) -> torch.Tensor:
    model, causal = hf_verify.load_model(path, torch.float32, torch.device("cpu"))
    return hf_verify.outputs(model, causal, b, torch.device("cpu"))


# ----------------------------------------------------------------------------- (1) the forward


@pytest.mark.parametrize("model_type", FAMILIES)
def test_streaming_forward_is_transformers_forward(tmp_path, model_type):
    src = make(tmp_path, model_type, layers=3)
    assert hf_stream.supports(src)
    b = batches()  # 5, 16 and 33 tokens, one padded row each: past the windows of 6
    full, stream = full_outputs(src, b), hf_stream.forward(src, b)
    assert stream.shape == full.shape
    err = rel_error(full, stream)
    print(f"{model_type}: max rel error {err:.3g}")
    assert err <= 1e-5, err


@pytest.mark.parametrize("model_type", FAMILIES)
def test_attention_and_mlp_run_in_slices_as_transformers_forward(tmp_path, monkeypatch, model_type):
    """Memory at long range: the blockwise forward runs each family's own eager attention a slice
    of queries at a time (here 1 to 3 rows of 33 keys, the heads that share a key/value head at a
    time: those keys and values repeated once, the boolean mask sliced with the queries) and the MLP a few tokens at a time; what it computes is
    still transformers' own model's forward (soft-capping, windows, experts' routing included)."""
    from n2n_cli import hf_attention

    src = make(tmp_path, model_type, layers=3)
    b = batches()
    full = full_outputs(src, b)
    slices, mlp_tokens = [], []
    float_mask = hf_attention._float_mask

    def counted_mask(mask, dtype):
        slices.append(None if mask is None else mask.shape[-2])
        return float_mask(mask, dtype)

    class Counted(hf_attention.TokenWise):
        def __init__(self, module):
            super().__init__(module)
            module.register_forward_pre_hook(lambda m, args: mlp_tokens.append(args[0].shape[1]))

    monkeypatch.setattr(hf_attention, "QUERY_BYTES", 3 * 4 * 33)  # 33 keys, float32: 3 rows of a head, 1 of two
    monkeypatch.setattr(hf_attention, "MLP_TOKENS", 4)
    monkeypatch.setattr(hf_attention, "_float_mask", counted_mask)
    monkeypatch.setattr(hf_attention, "TokenWise", Counted)
    stream = hf_stream.forward(src, b)
    assert rel_error(full, stream) <= 1e-5
    rows = [n for n in slices if n is not None]  # query rows per call: a 5-token batch fits in one
    assert rows and max(rows) <= 5 and len(rows) > 33, rows
    assert mlp_tokens and max(mlp_tokens) <= 4


def _to_bf16(path: Path) -> Path:
    """The model's weights stored in bfloat16 (as most released checkpoints are)."""
    from safetensors.torch import load_file, save_file

    f = path / "model.safetensors"
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(f).items()}, f,
              metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "bfloat16", "dtype": "bfloat16"}))
    return path


@pytest.mark.parametrize("model_type", ["qwen3", "smollm3", "gemma2", "gemma3_text", "phi3", "olmo2"])
def test_narrow_weights_widened_as_each_layer_runs_compute_the_forward(tmp_path, monkeypatch, model_type):
    """Big blocks (a 7B one is 0.87 GB in float32) do not load their bfloat16 linear weights: each
    is read from the file and widened as its layer runs, into one shared buffer: the blockwise forward is still
    transformers' own forward in float32 over the same bfloat16 weights (here every block is
    "big"; the long probes sliced as well), and the linear layers are those widened ones."""
    from n2n_cli import hf_attention

    src = _to_bf16(make(tmp_path, model_type, layers=3))
    b = batches()
    full = full_outputs(src, b)
    adopted = []
    adopt = hf_attention.Widened.adopt.__func__
    monkeypatch.setattr(hf_attention.Widened, "adopt", classmethod(
        lambda cls, m, scratch, span=None: (adopted.append((m.weight.dtype, span is not None)), adopt(cls, m, scratch, span))))
    monkeypatch.setattr(hf_stream, "NARROW_BYTES", 0)
    monkeypatch.setattr(hf_attention, "QUERY_BYTES", 3 * 4 * 33)
    monkeypatch.setattr(hf_attention, "MLP_TOKENS", 4)
    stream = hf_stream.forward(src, b)
    assert rel_error(full, stream) <= 1e-5
    model = hf_verify.load_model(src, torch.float32, torch.device("cpu"))[0]
    linears = sum(type(m) is torch.nn.Linear for m in model.get_decoder().layers[0].modules())
    # every block's, read from the file's pages as each runs
    assert set(adopted) == {(torch.bfloat16, True)} and len(adopted) == 3 * linears, (adopted, linears)


def test_a_widened_layer_without_a_mapped_file_widens_its_loaded_weight():
    """Where the file cannot be mapped (a pickled shard), the narrow weight is loaded as stored and
    widened at each call, into the shared buffer."""
    from n2n_cli import hf_attention

    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 5).to(torch.bfloat16)
    lin.bias.data = lin.bias.data.float()
    x = torch.randn(3, 8)
    expected = torch.nn.functional.linear(x, lin.weight.float(), lin.bias)
    buffer = torch.full((100,), float("nan"))
    hf_attention.Widened.adopt(lin, lambda n: buffer[:n])
    assert torch.equal(lin(x), expected) and lin.weight.dtype == torch.bfloat16
    assert torch.equal(buffer[:40].view(5, 8), lin.weight.float())  # widened into the shared buffer


def test_blocks_are_freed_as_soon_as_they_have_run(tmp_path, monkeypatch):
    """Each block built for the comparison is freed when it has run, by reference counting alone
    (no reference cycle through a wrapped forward keeps it until the cycle collector runs: at 1B
    that held 150 MB more at the peak)."""
    import gc
    import weakref

    src = make(tmp_path, "qwen3", layers=3)
    built = []
    block = hf_stream._Model.block

    def spy(self, i, memory=None):
        layer = block(self, i, memory)
        built.extend(weakref.ref(m) for m in layer.modules())  # its MLP, attention, norms too
        return layer

    monkeypatch.setattr(hf_stream._Model, "block", spy)
    gc.collect()
    gc.disable()
    try:
        hf_stream.forward(src, batches())
        alive = [r for r in built if r() is not None]
    finally:
        gc.enable()
    assert len(built) > 3 and not alive, alive


@pytest.mark.parametrize("model_type", ["llama", "gemma", "gpt2"])  # untied head, tied head, learned positions
def test_embedding_and_head_tables_are_never_read_whole(tmp_path, monkeypatch, model_type):
    """Memory: the probe tokens' embedding rows and the head's vocabulary slices are read alone
    (a 7B model's table is 262 MB in bf16, in float32 twice that); reading a whole table fails."""
    from n2n_cli import hf_io

    src = make_hf_model(tmp_path, "llama") if model_type == "llama" else make(tmp_path, model_type, layers=2)
    with hf_io.open_hf_dir(src) as source:
        assert ("lm_head.weight" in source.keys()) == (model_type == "llama")  # untied / tied heads
    b = batches()
    full = full_outputs(src, b)
    get = hf_io.HFDirSource.get

    def guarded(self, key):
        assert not key.endswith(("embed_tokens.weight", "lm_head.weight", "wte.weight", "wpe.weight")), key
        return get(self, key)

    monkeypatch.setattr(hf_io.HFDirSource, "get", guarded)
    monkeypatch.setattr(hf_stream, "HEAD_ROWS", 16)  # several vocabulary slices
    assert rel_error(full, hf_stream.forward(src, b)) <= 1e-5


@pytest.mark.parametrize("model_type,kw,packed", [
    ("qwen3", {}, True), ("gemma2", {}, True), ("mixtral", {}, True),  # causal, windows per layer, experts
    ("gemma3_text", dict(use_bidirectional_attention=True), False),  # an overlay on the masks
    ("gpt2", {}, False),  # learned positions: 0..n-1 of each batch
])
def test_short_probes_run_packed_where_the_masks_allow(tmp_path, model_type, kw, packed):
    """Causal models with rotary positions run the short probes as one sequence (each probe's own
    tokens, positions from 0, attention confined to it by transformers' packed-sequence masks);
    the long probes keep their batches; the report still counts probe sequences. What the packed
    forward computes is transformers' own model on the padded batches: the forward tests here."""
    src = make(tmp_path, model_type, layers=2, **kw)
    m = hf_stream._Model(src, torch.float32, torch.device("cpu"))
    try:
        b = batches()
        long_ids = torch.arange(40).unsqueeze(0) % 50
        long = (long_ids, torch.ones_like(long_ids), torch.ones_like(long_ids, dtype=torch.bool))
        laid = hf_stream._layout(m, [*b, long])
        real = sum(int(mask.sum()) for _, mask in b)
        if packed:
            assert len(laid) == 2 and laid[0][1] is None and laid[0][0].shape == (1, real)
            starts = (laid[0][3][0] == 0).nonzero().reshape(-1).tolist()
            assert len(starts) == sum(len(ids) for ids, _ in b)  # one segment per probe sequence
            assert laid[1][0] is long_ids
        else:
            assert len(laid) == 4 and all(x[1] is not None for x in laid)
        side = hf_stream._TeacherSide(m, [*b, long], None, None)
        assert side.sequences == sum(len(ids) for ids, _ in b) + 1
    finally:
        m.close()


@pytest.mark.parametrize("case", ["is_causal false", "transformers without packed masks"])
def test_probes_stay_in_their_batches_where_the_masks_would_not_keep_them_apart(tmp_path, monkeypatch, case):
    """Packing relies on the masks transformers builds; where they would let one packed probe see
    another (a config that makes the model bidirectional; transformers not applying its
    packed-sequence masks, as with torch before 2.6), the probes run in their padded batches and
    the forward is still transformers' own."""
    from helpers import make_hf_model
    import transformers.masking_utils as masking_utils

    if case == "is_causal false":
        src = make_hf_model(tmp_path, "llama", is_causal=False)
    else:
        src = make_hf_model(tmp_path, "llama")
        monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    m = hf_stream._Model(src, torch.float32, torch.device("cpu"))
    try:
        assert not m.packable()
        assert all(x[1] is not None for x in hf_stream._layout(m, batches()))
    finally:
        m.close()
    assert rel_error(full_outputs(src, batches()), hf_stream.forward(src, batches())) <= 1e-5


@pytest.mark.parametrize("model_type,kw", [
    ("gemma3_text", dict(use_bidirectional_attention=True)),  # bidirectional masks (symmetric windows)
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True)),  # the layer index enters the attention's scaling
], ids=["gemma3-bidirectional", "gpt2-scale-by-layer"])
def test_config_variants_are_transformers_forward(tmp_path, model_type, kw):
    src = make(tmp_path, model_type, layers=3, **kw)
    b = batches()
    full, stream = full_outputs(src, b), hf_stream.forward(src, b)
    assert rel_error(full, stream) <= 1e-5


@pytest.mark.parametrize("model_type,kw", [
    ("llama", dict(sliding_window=5)),  # LlamaModel ignores a window in config.json: one causal mask
    ("mistral", dict(sliding_window=5, layer_types=["full_attention", "full_attention"])),  # Mistral: the window
], ids=["llama-ignores-window", "mistral-ignores-layer-types"])
def test_masks_are_the_model_types_own(tmp_path, model_type, kw):
    from helpers import make_hf_model

    src = make_hf_model(tmp_path, model_type, **kw)
    b = batches()
    assert rel_error(full_outputs(src, b), hf_stream.forward(src, b)) <= 1e-5


# ----------------------------------------------------------------------------- (2) grown students

GROWTHS = {
    "deepen": [{"deepen": {"layers": 4}}],
    "widen-mlp": [{"widen": {"dim": "intermediate_size", "to": 56, "noise": 0.1}}],
    "hidden2-deepen": [{"widen": {"dim": "hidden_size", "factor": 2}}, {"deepen": {"after": [0]}}],
}
KW = dict(vocab=VOCAB, max_len=64, probes=12, seed=0, atol=1e-5, rtol=1e-4, device=torch.device("cpu"),
          dtype=torch.float32)


@pytest.mark.parametrize("growth", sorted(GROWTHS))
@pytest.mark.parametrize("model_type", FAMILIES)
def test_grown_students_pass_blockwise_as_in_full_mode(tmp_path, model_type, growth):
    src = make(tmp_path, model_type)
    out = tmp_path / "student"
    api.grow(spec_from_steps(GROWTHS[growth], seed=1), src, out, device="cpu", verify=False)
    c = hf_stream.compare(src, out, mode="auto", **KW)
    assert c.mode == "streaming" and c.passed and c.first_divergence is None, c
    if "deepen" in growth:
        assert c.student_blocks_inserted, c
    full = hf_stream.compare(src, out, mode="full", **KW)
    assert full.mode == "full" and full.passed
    assert abs(full.max_abs_error - c.max_abs_error) <= 1e-5
    assert full.max_abs_teacher == pytest.approx(c.max_abs_teacher, rel=1e-5)


# ----------------------------------------------------------------------------- (3) where it starts


@pytest.mark.parametrize("model_type", FAMILIES)
def test_corrupted_block_is_named(tmp_path, model_type):
    from safetensors.torch import load_file, save_file

    src = make(tmp_path, model_type, layers=3)
    out = tmp_path / "student"
    api.grow(spec_from_steps([{"deepen": {"after": [0]}}], seed=1), src, out, device="cpu", verify=False)
    f = out / "model.safetensors"
    sd = load_file(f)
    key = {"gpt2": "transformer.h.2.attn.c_proj.weight"}.get(model_type, "model.layers.2.self_attn.o_proj.weight")
    # student block 2 = teacher block 1
    sd[key] = sd[key] + 0.05 * torch.randn(sd[key].shape, generator=torch.Generator().manual_seed(0))
    save_file(sd, f, metadata={"format": "pt"})
    c = hf_stream.compare(src, out, mode="auto", **KW)
    assert c.mode == "streaming" and not c.passed
    assert c.first_divergence.startswith("the residual stream differs after teacher block 1 (student block 2)"), c
    assert c.student_blocks_inserted == [1]
    assert not hf_stream.compare(src, out, mode="full", **KW).passed


# ----------------------------------------------------------------------------- (4) past the windows


@pytest.mark.parametrize("model_type", WINDOWED)
def test_probes_go_past_every_declared_window(tmp_path, model_type):
    """A student that differs only in its sliding window (one token wider) computes the same within
    the window; blockwise verification must still fail it, so its probes go past the window."""
    src = make(tmp_path, model_type)
    out = tmp_path / "student"
    api.grow(spec_from_steps([{"deepen": {"layers": 3}}], seed=1), src, out, device="cpu", verify=False)
    assert hf_stream.compare(src, out, **KW).passed
    cfg = json.loads((out / "config.json").read_text())
    cfg["sliding_window"] = WINDOW + 1
    (out / "config.json").write_text(json.dumps(cfg))
    c = hf_stream.compare(src, out, **KW)
    assert c.mode == "streaming" and not c.passed, c
    assert c.first_divergence.startswith("the residual stream differs after teacher block 0"), c


# ----------------------------------------------------------------------------- the CLI picks streaming


@pytest.mark.parametrize("model_type", ["gemma2", "qwen2_moe"])
def test_cli_verifies_new_families_blockwise_and_full_on_request(tmp_path, cli, model_type):
    src = make(tmp_path, model_type)
    out, rep = tmp_path / "out", tmp_path / "r.json"
    r = cli("deepen", src, out, "--layers", "3", "--device", "cpu", "--report", rep)
    assert r.exit_code == 0, r.output
    v = json.loads(rep.read_text())["verification"]
    assert v["passed"] is True and v["exact"]["mode"] == "streaming" and v["exact"]["student_blocks_inserted"]
    r = cli("verify", src, out, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["mode"] == "streaming"
    r = cli("verify", src, out, "--verify-mode", "full", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["mode"] == "full"
