"""Blockwise (streaming) verification of grown Hugging Face decoders, in bounded memory.

Teacher and student run in lockstep on the same probe batches, with transformers' own layer
classes (``LlamaDecoderLayer``, its rotary embedding, RMSNorm and causal-mask functions, as the
model's ``forward`` calls them): embed the probes once (only the probe tokens' rows of the
embedding are read), then for each teacher block load its tensors from the safetensors files,
run it, run the student's corresponding block(s), compare the residual streams, free the block;
the final norm and head at the end (the head read a slice of the vocabulary at a time). Memory:
one block in the compute dtype plus the activations, whatever the model's size.

Which student blocks correspond to teacher block i: the student's blocks are taken in order;
a block whose output projections are all zero (LLaMA Pro's inserted blocks) is an inserted
block as long as enough blocks remain for the teacher's, and the stream is compared after the
last inserted block that follows an original one. The verdict never depends on that matching:
every student block runs, and the final outputs decide. The per-block comparisons say WHERE a
mismatch starts ("the stream differs after teacher block 7"). A stream widened by tiling
(HyperCloning, LEMON's zero padding) is compared against the teacher's stream tiled the same way.

Supported: the llama family (llama, mistral, qwen2); :func:`supports` says which directories.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import hf_io
from .hf import arch_from_config
from . import hf_verify
from .hf_verify import probe_batches, require_transformers
from .verify import Comparison, compare_outputs, full_precision

STREAMING_TYPES = ("llama", "mistral", "qwen2")
HEAD_ROWS = 4096  # vocabulary rows of the head converted to the compute dtype at a time
COMPARE_ROWS = 256  # output positions compared in float64 at a time
OUTPUT_PROJECTIONS = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


@dataclass
class StreamComparison(Comparison):
    mode: str = "streaming"
    first_divergence: str | None = None
    blocks_compared: int = 0
    stream_max_rel_error: float = 0.0
    student_blocks_inserted: list[int] = field(default_factory=list)
    # student blocks not run: byte-identical copies of their teacher block with bitwise-equal
    # inputs (their output is the teacher block's; see ``copy_of_teacher`` in :func:`_run`)
    student_blocks_copied: list[int] = field(default_factory=list)
    probe_budget: str | None = None  # the budget the probes ran on at scale (:func:`probe_budget`), if any


def supports(path: str | Path) -> bool:
    """Can :func:`compare_dirs` verify the model in this directory (by its config.json)?"""
    try:
        config = hf_io._read_config(Path(path))
    except Exception:
        return False
    archs = config.get("architectures") or []  # a task head (score) is not streamed: full mode verifies it
    return config.get("model_type") in STREAMING_TYPES and all(a.endswith(("ForCausalLM", "Model")) for a in archs)


class _Model:
    """One side (teacher or student): its tensors, transformers config and classes."""

    def __init__(self, path: Path, dtype: torch.dtype, device: torch.device):
        transformers = require_transformers()
        transformers.logging.set_verbosity_error()
        self.source = hf_io.open_hf_dir(path)
        self.arch = arch_from_config(self.source.config, set(self.source.keys()), where=str(path / "config.json"))
        self.config = transformers.AutoConfig.from_pretrained(str(path))
        self.config._attn_implementation = "eager"
        mtype = self.config.model_type
        mod = importlib.import_module(f"transformers.models.{mtype}.modeling_{mtype}")
        base = transformers.models.auto.modeling_auto.MODEL_MAPPING_NAMES[mtype].removesuffix("Model")
        self.layer_cls = getattr(mod, f"{base}DecoderLayer")
        self.norm_cls = getattr(mod, f"{base}RMSNorm")
        self.rotary = getattr(mod, f"{base}RotaryEmbedding")(config=self.config).to(device)
        self.dtype, self.device = dtype, device
        self.prefix = self.arch.prefix
        self.causal = any(a.endswith("ForCausalLM") for a in (self.config.architectures or []))

    def get(self, name: str) -> torch.Tensor:
        return self.source.get(self.prefix + name)

    def block_keys(self, i: int) -> dict[str, str]:
        """Block ``i``'s tensors: name inside the block -> key in the files."""
        key = self.prefix + self.arch.family.layer.format(i=i)
        dropped = self.arch.family.dropped  # old buffers (rotary inv_freq) that transformers ignores too
        return {k[len(key):]: k for k in self.source.keys() if k.startswith(key) and not (dropped and k.endswith(dropped))}

    def block(self, i: int, memory: _Memory | None = None, ready: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
        """Block ``i`` with its weights from the files (built on the meta device, then assigned),
        each tensor converted to the compute dtype as it is read (never the block twice in memory;
        the files are read with ``pread``, nothing stays mapped); with ``memory``, into its reused
        buffers (the block is valid until the next one is loaded there), ``ready``: tensors already there."""
        if memory is None:
            sd = {name: self.source.get(k).to(self.device, self.dtype) for name, k in self.block_keys(i).items()}
        else:
            sd = {name: ready[name] if ready and name in ready else memory.tensor(self.source, k, name)
                  for name, k in self.block_keys(i).items()}
        with torch.device("meta"):
            layer = self.layer_cls(self.config, i)
        layer.load_state_dict(sd, assign=True, strict=True)
        del sd
        return layer.to(self.device, self.dtype).eval()

    def signature(self, i: int) -> tuple:
        """What block ``i``'s forward depends on besides its weights and its inputs: the config
        (but the number of layers and which layer slides: those enter through ``layer_idx``,
        and the mask each block gets is compared on its own) and every plain attribute of the
        block's modules except ``layer_idx`` (which only indexes a cache; none is used here)."""
        with torch.device("meta"):
            layer = self.layer_cls(self.config, i)
        attrs = tuple((name, k, repr(v)) for name, m in layer.named_modules() for k, v in sorted(vars(m).items())
                      if not k.startswith("_") and k not in ("layer_idx", "config", "training"))
        cfg = {k: v for k, v in self.config.to_dict().items()
               if k not in ("num_hidden_layers", "layer_types", "max_window_layers", "architectures",
                            "_name_or_path", "transformers_version")}
        return repr(sorted(cfg.items())), attrs

    def zero_output(self, i: int) -> bool:
        key = self.prefix + self.arch.family.layer.format(i=i)
        return all(not bool(self.source.get(key + n).any()) for n in OUTPUT_PROJECTIONS)

    def masks(self, h: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor) -> Callable[[int], torch.Tensor]:
        """Layer index -> its attention mask, as the model's forward builds them."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        kw = dict(config=self.config, inputs_embeds=h, attention_mask=mask, past_key_values=None,
                  position_ids=position_ids)
        types = getattr(self.config, "layer_types", None)
        if types:
            made = {t: (create_sliding_window_causal_mask if t == "sliding_attention" else create_causal_mask)(**kw)
                    for t in set(types)}
            return lambda i: made[types[i]]
        fn = create_sliding_window_causal_mask if getattr(self.config, "sliding_window", None) is not None \
            else create_causal_mask
        m = fn(**kw)
        return lambda i: m

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.get("embed_tokens.weight")).to(self.device, self.dtype)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm, then (causal LMs) the head, a slice of the vocabulary at a time."""
        norm = self.norm_cls(h.shape[-1], eps=self.config.rms_norm_eps)
        norm.weight = torch.nn.Parameter(self.get("norm.weight").to(self.device, self.dtype), requires_grad=False)
        h = norm(h)
        if not self.causal:
            return h
        w = self.source.get("lm_head.weight") if "lm_head.weight" in self.source.keys() \
            else self.get("embed_tokens.weight")
        return torch.cat([h @ w[r:r + HEAD_ROWS].to(self.device, self.dtype).T for r in range(0, w.shape[0], HEAD_ROWS)],
                         dim=-1)

    def close(self):
        self.source.close()


def _tile(h: torch.Tensor, width: int) -> torch.Tensor:
    """The teacher's stream as a stream widened to ``width`` carries it: tiled, then zeros."""
    r, pad = divmod(width, h.shape[-1])
    return torch.cat([h.repeat(*([1] * (h.dim() - 1)), r), h.new_zeros(*h.shape[:-1], pad)], dim=-1)


def compare_dirs(teacher: Path, student: Path, *, vocab: int, max_len: int, probes: int, seed: int, atol: float,
                 rtol: float, device: torch.device, dtype: torch.dtype,
                 progress: Callable[[str, int, int], None] | None = None, grown: bool = False,
                 budget: bool = False) -> StreamComparison:
    """Streaming counterpart of :func:`hf_verify.compare_dirs` (same probes, same verdict rule):
    the short probes at their kept positions, and the long probes past every declared attention
    window at their last ``LONG_TAIL`` positions. With ``budget`` (``probes`` is the default, not
    the user's), a teacher of more than ``BUDGET_PARAMETERS`` parameters runs the first
    ``BUDGET_SEQUENCES`` short probes of each length (:func:`probe_budget`); the long probes always."""
    batches = probe_batches(vocab, max_len, probes, seed)
    t, s = _Model(Path(teacher), dtype, device), _Model(Path(student), dtype, device)
    batches, note = probe_budget(batches, t.source) if budget else (batches, None)
    long_len = hf_verify.long_probe_length(t.config, s.config)
    for ids, mask in hf_verify.long_batches(vocab, long_len, seed) if long_len else []:
        keep = mask.bool()
        keep[:, :-hf_verify.LONG_TAIL] = False
        batches.append((ids, mask, keep))
    try:
        c = _run(t, s, batches, atol=atol, rtol=rtol, seed=seed, device=device, dtype=dtype, progress=progress)
        c.probe_budget = note
        return c
    finally:
        t.close()
        s.close()


# --------------------------------------------------------------------------- cost at scale

#: a teacher with more parameters than this verifies on a probe budget unless the probes are the
#: user's (--probes, a spec's verify.probes): each probe token costs a forward of every block
BUDGET_PARAMETERS = 10**8
#: probe sequences kept per short length under the budget: the first ones, right-padded and not alike
BUDGET_SEQUENCES = 4


def probe_budget(batches, source) -> tuple[list, str | None]:
    """The first ``BUDGET_SEQUENCES`` sequences of each short-probe batch (a subset of the full
    probes: the same seeded tokens) when the model in ``source`` is bigger than
    ``BUDGET_PARAMETERS``, and a note saying so (None, batches unchanged, when it is not). What
    the budget keeps is what catches errors that only some positions show: every length (the
    longest past nothing here; the long probes past every attention window are added apart, in
    full), padded and unpadded sequences; a wrong weight, rope or norm changes every position."""
    params = sum(math.prod(source.shape(k)) for k in source.keys())
    full = sum(len(ids) for ids, _ in batches)
    if params <= BUDGET_PARAMETERS or all(len(ids) <= BUDGET_SEQUENCES for ids, _ in batches):
        return batches, None
    kept = [(ids[:BUDGET_SEQUENCES], mask[:BUDGET_SEQUENCES]) for ids, mask in batches]
    n = sum(len(ids) for ids, _ in kept)
    tokens, all_tokens = sum(ids.numel() for ids, _ in kept), sum(ids.numel() for ids, _ in batches)
    return kept, (f"a model of {params / 1e9:.2f}B parameters verifies on a probe budget by default: {n} of the "
                  f"{full} probe sequences ({tokens} of {all_tokens} tokens; every length, padded and not), plus "
                  f"the probes past every attention window in full; --probes N runs N")


class _Memory:
    """Reused memory for loading one side's blocks: a read buffer for a tensor's bytes and, per
    tensor name, the tensor in the compute dtype. A fresh allocation of a block's size costs more
    than converting it (the kernel maps and zeroes new pages each time, and frees them again); a
    block built here is valid until the next block of its side is loaded here."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self._read = torch.empty(0, dtype=torch.uint8)
        self._out: dict[str, torch.Tensor] = {}

    def bytes(self, source, key: str) -> torch.Tensor | None:
        """``key``'s bytes as stored, in the read buffer (valid until the next read); None for a
        tensor that is not in a safetensors file."""
        span = source.raw(key)
        if span is None:
            return None
        if len(self._read) < span.nbytes:
            self._read = torch.empty(span.nbytes, dtype=torch.uint8)
        return source.read_bytes(key, out=self._read)

    def tensor(self, source, key: str, name: str, raw: torch.Tensor | None = None) -> torch.Tensor:
        """``key`` in the compute dtype, in the buffer for ``name`` (``raw``: its bytes, read already)."""
        raw = self.bytes(source, key) if raw is None else raw
        t = source.get(key) if raw is None else raw.view(source.dtype(key)).reshape(source.shape(key))
        out = self._out.get(name)
        if out is None or out.shape != t.shape:
            out = self._out[name] = torch.empty(t.shape, dtype=self.dtype, device=self.device)
        return out.copy_(t)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two uint8 tensors equal, compared 8 bytes at a time (4x faster than byte by byte)."""
    if a.numel() != b.numel():
        return False
    n = a.numel() // 8 * 8
    return torch.equal(a[:n].view(torch.int64), b[:n].view(torch.int64)) and torch.equal(a[n:], b[n:])


def _run(t: _Model, s: _Model, batches, *, atol, rtol, seed, device, dtype, progress) -> StreamComparison:
    T, S = t.arch.layers, s.arch.layers
    with torch.no_grad(), full_precision():
        state = []  # per batch: teacher stream, student stream, kept positions, teacher masks, student masks, pos, rope
        for ids, mask, *keep in batches:  # keep: the positions compared (default: those the mask keeps)
            ids, mask = ids.to(device), mask.to(device)
            pos = torch.arange(ids.shape[1], device=device).unsqueeze(0)
            ht, hs = t.embed(ids), s.embed(ids)
            state.append({"t": ht, "s": hs, "keep": keep[0].to(device) if keep else mask.bool(), "tm": t.masks(ht, mask, pos), "sm": s.masks(hs, mask, pos),
                          "pos": pos, "tpe": t.rotary(ht, pos), "spe": s.rotary(hs, pos)})
        first, worst, compared, inserted, copied = None, 0.0, 0, [], []

        def check(where: str):
            nonlocal first, worst, compared
            a = torch.cat([_tile(st["t"], st["s"].shape[-1])[st["keep"]] for st in state]).double()
            b = torch.cat([st["s"][st["keep"]] for st in state]).double()
            err, ref = float((a - b).abs().max()), float(a.abs().max())
            ok = bool(torch.isfinite(b).all()) and err <= atol + rtol * ref
            worst = max(worst, err / ref if ref > 0 else (0.0 if err == 0 else float("inf")))
            compared += 1
            if not ok and first is None:
                first = f"the residual stream differs {where}: max abs error {err:.3g} > atol {atol:g} + rtol {rtol:g} * {ref:.3g}"

        def same(a, b) -> bool:
            if a is None or b is None:
                return a is None and b is None
            if isinstance(a, (tuple, list)):
                return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
            return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)

        def copy_of_teacher(i: int, j: int, ready: dict[str, torch.Tensor]) -> bool:
            """May student block j be skipped, its output taken from teacher block i's?

            Sound when (1) the block's tensors are byte-identical (names, dtypes, shapes, bytes),
            (2) both layers are built alike (:meth:`_Model.signature`: same config but the layer
            count and per-layer types, same module attributes but ``layer_idx``), and (3) every
            input of the forward is bitwise equal: the stream, the attention mask of this layer
            (which carries the sliding window of a per-layer type) and the position embeddings
            (the position ids are the same tensor). A block's forward is a function of exactly
            these, so the student's block computes bitwise what the teacher's block computes;
            running it again could only repeat the teacher's result. (A deepen whose inserted
            blocks leave the stream bitwise unchanged keeps (3) for every original block.) Each
            teacher tensor compared is converted as read, into ``ready``, for running the block."""
            if not all(same(st["t"], st["s"]) and same(st["tm"](i), st["sm"](j)) and same(st["tpe"], st["spe"])
                       for st in state):
                return False
            tk, sk = t.block_keys(i), s.block_keys(j)
            if sorted(tk) != sorted(sk) or t.signature(i) != s.signature(j):
                return False
            for name in tk:
                a, b = t.source.raw(tk[name]), s.source.raw(sk[name])
                if a is None or b is None or a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
                    return False
                ta = memory[t].bytes(t.source, tk[name])
                equal = _same_bytes(ta, memory[s].bytes(s.source, sk[name]))
                ready[name] = memory[t].tensor(t.source, tk[name], name, raw=ta)
                if not equal:
                    return False
            return True

        memory = {t: _Memory(device, dtype), s: _Memory(device, dtype)}

        def run(side: _Model, i: int, key: str, masks: str, pe: str, ready: dict | None = None):
            layer = side.block(i, memory[side], ready)
            for st in state:
                out = layer(st[key], attention_mask=st[masks](i), position_embeddings=st[pe], position_ids=st["pos"],
                            past_key_values=None, use_cache=False)
                st[key] = out[0] if isinstance(out, tuple) else out
            del layer

        check("after the embeddings")
        i = 0
        for j in range(S):
            if progress:
                progress("verifying (blockwise)", j, S)
            if i > 0 and (S - j > T - i) and s.zero_output(j):
                run(s, j, "s", "sm", "spe")  # an inserted block: the stream must come out unchanged
                inserted.append(j)
                continue
            if i > 0:
                check(f"after teacher block {i - 1} (student block {j - 1})")
            if i < T:
                ready: dict[str, torch.Tensor] = {}
                skip = copy_of_teacher(i, j, ready)
                run(t, i, "t", "tm", "tpe", ready)
                i += 1
                if skip:
                    for st in state:
                        st["s"] = st["t"]
                    copied.append(j)
                    continue
            run(s, j, "s", "sm", "spe")
        while i < T:  # a student with fewer blocks: run the teacher's rest (the outputs will differ)
            run(t, i, "t", "tm", "tpe")
            i += 1
        check(f"after teacher block {T - 1} (student block {S - 1})")
        if progress:
            progress("verifying (blockwise)", S, S)
        # the outputs compared in float64 a few positions at a time (the logits of every probe
        # position over a 32k vocabulary in float64 would be the largest thing in memory)
        parts = []
        for st in state:
            a_all, b_all = t.head(st["t"])[st["keep"]], s.head(st["s"])[st["keep"]]
            for r in range(0, a_all.shape[0], COMPARE_ROWS):
                a, b = a_all[r:r + COMPARE_ROWS].to("cpu", torch.float64), b_all[r:r + COMPARE_ROWS].to("cpu", torch.float64)
                if not t.causal and b.shape[-1] != a.shape[-1]:
                    a = _tile(a, b.shape[-1])
                parts.append((len(a), compare_outputs(a, b, atol=atol, rtol=rtol, probes=0, seed=seed, device=device,
                                                      dtype=dtype)))
            del a_all, b_all
    c = _combine(parts, atol=atol, rtol=rtol, probes=sum(len(x[0]) for x in batches))
    if not t.causal:
        c.argmax_agreement = None
    if first is None and not c.passed:
        first = "the residual streams agree after every block; the final norm or the head differs"
    return StreamComparison(**c.to_dict(), first_divergence=first, blocks_compared=compared,
                            stream_max_rel_error=worst, student_blocks_inserted=inserted,
                            student_blocks_copied=copied)


def _combine(parts: list[tuple[int, Comparison]], *, atol: float, rtol: float, probes: int) -> Comparison:
    """One comparison from comparisons of disjoint row chunks (``(rows, comparison)``): the same
    maxima and verdict as :func:`verify.compare_outputs` on all rows at once."""
    first = parts[0][1]
    max_abs = max(c.max_abs_error for _, c in parts)
    ref = max(c.max_abs_teacher for _, c in parts)
    rel = max_abs / ref if ref > 0 else (0.0 if max_abs == 0 else float("inf"))
    finite = all(c.max_abs_error != float("inf") for _, c in parts)
    agree = (None if first.argmax_agreement is None
             else sum(n * c.argmax_agreement for n, c in parts) / sum(n for n, _ in parts))
    return Comparison(finite and max_abs <= atol + rtol * ref, probes, first.seed, atol, rtol, max_abs, rel, ref,
                      agree, first.device, first.dtype)


def forward(path: Path, batches, *, dtype: torch.dtype = torch.float32,
            device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """One model's outputs, blockwise, at the kept positions of every batch (as
    ``hf_verify.outputs`` gives them from the full model): the streaming forward on its own, for
    checking it against transformers' model class."""
    m = _Model(Path(path), dtype, device)
    try:
        with torch.no_grad(), full_precision():
            out = []
            for ids, mask in batches:
                ids, mask = ids.to(device), mask.to(device)
                pos = torch.arange(ids.shape[1], device=device).unsqueeze(0)
                h = m.embed(ids)
                masks, pe = m.masks(h, mask, pos), m.rotary(h, pos)
                for i in range(m.arch.layers):
                    o = m.block(i)(h, attention_mask=masks(i), position_embeddings=pe, position_ids=pos,
                                   past_key_values=None, use_cache=False)
                    h = o[0] if isinstance(o, tuple) else o
                out.append(m.head(h)[mask.bool()].to("cpu", torch.float64))
            return torch.cat(out)
    finally:
        m.close()


# --------------------------------------------------------------------------- choosing the mode

VERIFY_MODES = ("auto", "streaming", "full")


@dataclass
class FullComparison(Comparison):
    mode: str = "full"


def compare(teacher: Path, student: Path, *, mode: str = "auto",
            progress: Callable[[str, int, int], None] | None = None, budget: bool = False, **kw) -> Comparison:
    """Verify ``student`` against ``teacher`` blockwise (``streaming``: one block in memory), by
    loading both models whole with transformers (``full``), or (``auto``) blockwise whenever
    both directories are of a family the streaming verifier supports, else whole. ``budget``:
    the probes are the default ones, which a big model runs on a budget (:func:`probe_budget`)."""
    from .errors import UserError

    if mode not in VERIFY_MODES:
        raise UserError(f"verify mode '{mode}' is not one of {', '.join(VERIFY_MODES)}")
    able = supports(teacher) and supports(student)
    if mode == "streaming" and not able:
        raise UserError(f"blockwise verification supports the model types {', '.join(STREAMING_TYPES)} only",
                        where=str(student), hint="Use --verify-mode full (loads both models whole).")
    if mode == "streaming" or (mode == "auto" and able):
        return compare_dirs(teacher, student, progress=progress, budget=budget, **kw)
    return FullComparison(**hf_verify.compare_dirs(teacher, student, **kw).to_dict())
