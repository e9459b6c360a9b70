"""Verify grown Hugging Face checkpoints by loading both with ``transformers``.

Seeded random token ids at several lengths, half of the sequences right-padded with an
attention mask; compare logits (causal LMs) or hidden states (encoders; when the hidden
size grew r-fold the student's states must be the teacher's tiled r times) at the
positions the mask keeps. Where a config declares an attention window (``sliding_window``) that
the position limit lets a sequence exceed, one extra sequence per padding pattern goes past it
(past twice it where only some layers slide), so that a grown model whose windows sit on other
layers cannot pass.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import CheckpointError, StepError, UserError
from .transforms import generator
from .verify import Comparison, compare_outputs, full_precision

INSTALL_HINT = "Install it with: pip install 'n2n-cli[hf]' (or pip install transformers)."
LENGTHS = (5, 16, 33)
# config attributes (as transformers' config classes expose them) that bound how far attention looks
WINDOW_FIELDS = ("sliding_window", "attention_window", "attention_chunk_size", "local_window_size")
POSITION_FIELDS = ("max_position_embeddings", "n_positions")
PAST_WINDOW = 16  # the long probes run this many tokens past the largest window (twice it: per-layer types)
LONG_TAIL = 48  # positions of each long probe compared (the last ones: those past the window)


def require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("verifying a Hugging Face checkpoint needs the 'transformers' package, which is not "
                        "installed; n2n will not write unverified output",
                        hint=f"{INSTALL_HINT} Or pass --no-verify to write it unverified.") from None
    return transformers


def check_config(config: dict, *, grown: bool = True, where: str | None = None) -> None:
    """When transformers is installed, make sure it accepts the grown config.json (its config
    classes validate e.g. that LLaMA's hidden_size is a multiple of num_attention_heads), or, with
    ``grown=False``, the input's (a field of the wrong type that n2n itself does not read)."""
    try:
        import transformers
    except ImportError:
        return
    transformers.logging.set_verbosity_error()
    cfg = {k: v for k, v in config.items() if k != "model_type"}
    try:
        transformers.AutoConfig.for_model(config["model_type"], **cfg)
    except Exception as e:  # transformers raises ValueError or its own validation errors
        cause = str(e).strip().splitlines()[-1].strip()
        if not grown:
            raise CheckpointError(f"transformers {transformers.__version__} rejects its config.json: {cause}",
                                  where=where, hint="Fix config.json (or use the one saved with these weights); "
                                  "n2n grows only models that transformers can load.") from None
        raise StepError(f"transformers {transformers.__version__} rejects the grown config.json: {cause}",
                        hint="Choose sizes that the model family's config accepts (e.g. heads dividing "
                             "hidden_size for LLaMA).") from None


def load_model(path: Path, dtype: torch.dtype, device: torch.device, user_input: bool = True):
    transformers = require_transformers()
    transformers.logging.set_verbosity_error()  # n2n reports its own progress; no loading bars or warnings
    transformers.logging.disable_progress_bar()
    try:
        config = transformers.AutoConfig.from_pretrained(str(path))
    except Exception as e:  # transformers' validation errors have many types; none is a bug of n2n
        cause = (str(e).strip().splitlines() or [type(e).__name__])[-1].strip()
        raise CheckpointError(f"transformers {transformers.__version__} cannot read its config.json: {cause}",
                              where=str(path)) from None
    archs = config.architectures or []
    heads = {"ForCausalLM": "AutoModelForCausalLM", "LMHeadModel": "AutoModelForCausalLM",
             "ForMaskedLM": "AutoModelForMaskedLM", "ForPreTraining": "AutoModelForPreTraining",
             "ForSequenceClassification": "AutoModelForSequenceClassification",
             "ForTokenClassification": "AutoModelForTokenClassification"}
    auto = next((cls for suffix, cls in heads.items() if any(a.endswith(suffix) for a in archs)), "AutoModel")
    causal = auto != "AutoModel"  # a model with a head: compare its logits
    cls = getattr(transformers, auto)
    major = int(transformers.__version__.split(".")[0])
    kw = {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}
    if hasattr(config, "_experts_implementation"):  # the reference loop over experts: transformers' grouped_mm
        kw["experts_implementation"] = "eager"  # fails on CPU for sizes whose rows are not 16-byte aligned
    try:
        model = cls.from_pretrained(str(path), attn_implementation="eager", **kw)
    except Exception as e:
        if not user_input:
            raise  # n2n wrote it: a failure to load is n2n's bug
        cause = (str(e).strip().splitlines() or [type(e).__name__])[-1].strip()
        raise CheckpointError(f"transformers {transformers.__version__} cannot load it: {cause}", where=str(path),
                              hint="Check that config.json matches the weights (transformers builds the model "
                                   "from config.json).") from None
    return model.to(device).eval(), causal


def _ints(v) -> list[int]:
    vals = v if isinstance(v, (list, tuple)) else [v]
    return [x for x in vals if isinstance(x, int) and not isinstance(x, bool) and x > 0]


def per_layer_windows(config) -> bool:
    """Do the layers of this config attend over different spans (``layer_types`` of more than one
    kind: some layers slide, others attend to everything)?"""
    types = getattr(config, "layer_types", None)
    return isinstance(types, (list, tuple)) and len(set(types)) > 1


def long_probe_length(*configs) -> int | None:
    """A length past every attention window the configs declare (``PAST_WINDOW`` tokens past the
    longest) and, where the layers' window types differ, past twice the longest window (through
    two sliding layers a position reaches two windows back: which layers slide shows in full only
    there), within every position limit; None when no declared window can be exceeded (or none
    is declared)."""
    windows = [w for c in configs for f in WINDOW_FIELDS for w in _ints(getattr(c, f, None))]
    limits = [n for c in configs for f in POSITION_FIELDS for n in _ints(getattr(c, f, None))]
    if not windows:
        return None
    reach = max(windows) * (2 if any(per_layer_windows(c) for c in configs) else 1) + PAST_WINDOW
    n = min(reach, min(limits)) if limits else reach
    return n if n > max(windows) + 1 else None


def long_batches(vocab: int, length: int, seed: int):
    """Two sequences of ``length`` tokens, one unpadded and one with its last 4 tokens padded,
    each its own batch (long attention is quadratic in memory)."""
    gen = generator(seed, "hf-long-probes", length)
    ids = torch.randint(0, vocab, (2, length), generator=gen)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, length - 4:] = 0
    return [(ids[i:i + 1], mask[i:i + 1]) for i in range(2)]


def probe_batches(vocab: int, max_len: int, probes: int, seed: int):
    """(input_ids, attention_mask) batches: ``probes`` sequences over a few lengths."""
    lengths = [n for n in LENGTHS if n <= max_len] or [max_len]
    per = max(1, probes // len(lengths))
    batches = []
    for n in lengths:
        gen = generator(seed, "hf-probes", n)
        ids = torch.randint(0, vocab, (per, n), generator=gen)
        mask = torch.ones(per, n, dtype=torch.long)
        mask[::2, n - max(1, n // 4):] = 0  # right-pad every other sequence
        batches.append((ids, mask))
    return batches


def outputs(model, causal: bool, batches, device, tail: int | None = None) -> torch.Tensor:
    """Outputs at the kept positions of every batch, concatenated: [positions, features]
    (with ``tail``: only the last ``tail`` positions of each sequence, then the kept ones)."""
    out = []
    with torch.no_grad(), full_precision():
        for ids, mask in batches:
            res = model(input_ids=ids.to(device), attention_mask=mask.to(device))
            y = (getattr(res, "logits", None) if getattr(res, "logits", None) is not None
                 else res.prediction_logits) if causal else res.last_hidden_state
            if y.dim() == 2:  # sequence classification: one row of logits per sequence
                out.append(y.to("cpu", torch.float64))
                continue
            keep = mask.to(device).bool()
            if tail is not None:
                y, keep = y[:, -tail:], keep[:, -tail:]
            out.append(y[keep].to("cpu", torch.float64))
    return torch.cat(out)


def _max_tokens(path: Path) -> int:
    """How many tokens a sequence may hold: RoBERTa's positions start at padding_idx + 1 (the family's
    ``position_offset``), so it holds max_position_embeddings - 2."""
    from . import hf_io
    from .hf import families

    config = hf_io._read_config(Path(path))
    fam = families().get(config.get("model_type"))
    n = config.get("max_position_embeddings")
    if fam is None or not fam.position_offset or not isinstance(n, int):
        return 1 << 30
    return max(1, n - fam.position_offset)


def compare_dirs(teacher: Path, student: Path, *, vocab: int, max_len: int, probes: int,
                 seed: int, atol: float, rtol: float, device: torch.device, dtype: torch.dtype,
                 grown: bool = False) -> Comparison:
    """Logits of models with a head (causal or masked LM) must match; hidden states of base
    models must be the teacher's tiled r times, then zeros where the stream was padded (LEMON)."""
    transformers = require_transformers()
    max_len = min(max_len, _max_tokens(teacher))
    batches = probe_batches(vocab, max_len, probes, seed)
    long_len = long_probe_length(transformers.AutoConfig.from_pretrained(str(teacher)),
                                 transformers.AutoConfig.from_pretrained(str(student)))
    long = long_batches(vocab, long_len, seed) if long_len else []
    t_model, causal = load_model(teacher, dtype, device)
    t_out = torch.cat([outputs(t_model, causal, b, device, tail) for b, tail in ((batches, None), (long, LONG_TAIL)) if b])
    del t_model
    s_model, _ = load_model(student, dtype, device, user_input=not grown)
    s_out = torch.cat([outputs(s_model, causal, b, device, tail) for b, tail in ((batches, None), (long, LONG_TAIL)) if b])
    if not causal and s_out.shape[-1] != t_out.shape[-1]:
        r, pad = divmod(s_out.shape[-1], t_out.shape[-1])
        t_out = torch.cat([t_out.repeat(1, r), t_out.new_zeros(t_out.shape[0], pad)], dim=1)
    c = compare_outputs(t_out, s_out, atol=atol, rtol=rtol, probes=sum(len(b[0]) for b in batches + long), seed=seed,
                        device=device, dtype=dtype)
    if not causal:
        c.argmax_agreement = None  # an argmax over hidden features means nothing
    return c
