"""Blockwise (streaming) verification of grown Hugging Face decoders, in bounded memory.

Teacher and student run in lockstep on the same probe batches, with transformers' own layer
classes (``LlamaDecoderLayer``, its rotary embedding, RMSNorm and causal-mask functions, as the
model's ``forward`` calls them; which classes, masks and embedding/logit scalings a model type uses
is data: the ``stream`` entries of families/*.yaml): embed the probes once (only the probe tokens' rows of the
embedding are read), then for each teacher block load its tensors from the safetensors files,
run it, run the student's corresponding block(s), compare the residual streams, free the block;
the final norm and head at the end (the head read a slice of the vocabulary at a time). Memory:
one block in the compute dtype plus the activations, whatever the model's size. The teacher's
side never depends on the student: while a grown student is being written, it runs ahead in a
thread (:func:`teacher_ahead`), keeping its stream after every block for the comparison.

At scale the probes' cost is blocks x tokens: a model over ``BUDGET_PARAMETERS`` parameters runs
the first ``BUDGET_SEQUENCES`` probe sequences of each length (and one of the two long probes past
every attention window) unless the user chose the probes (:func:`probe_budget`).

Which student blocks correspond to teacher block i: the student's blocks are taken in order;
a block whose output projections are all zero (LLaMA Pro's inserted blocks) is an inserted
block as long as enough blocks remain for the teacher's, and the stream is compared after the
last inserted block that follows an original one. The verdict never depends on that matching:
every student block runs, and the final outputs decide. The per-block comparisons say WHERE a
mismatch starts ("the stream differs after teacher block 7"). A stream widened by tiling
(HyperCloning, LEMON's zero padding) is compared against the teacher's stream tiled the same way.

Supported: every family n2n grows (the model types with a ``stream`` entry in families/*.yaml:
:func:`streaming_types`): the decoders (base models and causal LMs) and the encoders BERT, RoBERTa
and XLM-RoBERTa (base models: the last hidden states; masked LMs: the logits of their head, as full
mode compares them; no final norm; the embedding module of transformers fed with the probe tokens'
rows only). Task heads (classifiers) are verified in full mode; :func:`supports` says which
directories.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import hf_attention, hf_io
from .checkpoints import RawSpan
from .hf import arch_from_config, families
from . import hf_verify
from .hf_verify import probe_batches, require_transformers
from .errors import UserError
from .verify import DIVERGENCE_AMOUNT, Comparison, compare_outputs, full_precision

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")  # architectures whose outputs are logits
HEAD_ROWS = 4096  # vocabulary rows of the head converted to the compute dtype at a time
COMPARE_ROWS = 256  # output positions compared in float64 at a time


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
    # the student's final norm and head not run: byte-identical to the teacher's, on a bitwise-equal
    # final stream (:meth:`_Model.same_head`), so its outputs are the teacher's
    student_head_copied: bool = False
    probe_budget: str | None = None  # the budget the probes ran on at scale (:func:`probe_budget`), if any

    def to_dict(self) -> dict:
        d = super().to_dict()
        if d["probe_budget"] is None:  # no budget: the same record as before budgets existed
            del d["probe_budget"]
        return d


def stream_facts(model_type: str | None) -> dict | None:
    """What the model type's forward does around its blocks (its family's ``stream`` entry in
    families/*.yaml); None for a model type the blockwise verifier does not know."""
    fam = families().get(model_type)
    return fam.stream.get(model_type) if fam is not None else None


def streaming_types() -> list[str]:
    """The model types (of config.json) verified blockwise."""
    return sorted(mt for mt, fam in families().items() if mt in fam.stream)


def unsupported(path: str | Path) -> str | None:
    """Why :func:`compare_dirs` cannot verify the model in this directory (by its config.json);
    None when it can."""
    try:
        config = hf_io._read_config(Path(path))
    except Exception:
        return f"{path} has no readable config.json"
    return _unsupported(config)


def _supported(config: dict) -> bool:
    return _unsupported(config) is None


def _unsupported(config: dict) -> str | None:
    mt = config.get("model_type")
    if stream_facts(mt) is None:
        return f"the model type {mt!r} is not one of {', '.join(streaming_types())}"
    archs = config.get("architectures") or []  # a task head (score) is not streamed: full mode verifies it
    facts = stream_facts(mt)
    if "mlm_heads" in facts:  # an encoder: its base model and its masked-LM heads
        head = next((a for a in archs if a != facts["base"] and a not in facts["mlm_heads"]), None)
        return f"the architecture {head!r} has a task head (only base models and masked LMs are streamed)" \
            if head else None
    head = next((a for a in archs if not str(a).endswith((*CAUSAL_SUFFIXES, "Model"))), None)
    return f"the architecture {head!r} has a task head (only base models and causal LMs are streamed)" if head else None


def _dotted(name: str):
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _cache_parameter(mask_function) -> str:
    """The name transformers gives the cache in its mask functions' signature."""
    import inspect

    return "cache" if "cache" in inspect.signature(mask_function).parameters else "past_key_values"


def supports(path: str | Path) -> bool:
    """Can :func:`compare_dirs` verify the model in this directory (by its config.json)?"""
    return unsupported(path) is None


class _Model:
    """One side (teacher or student): its tensors, transformers config and classes, and what the
    model's forward does around its blocks (the family's ``stream`` facts in families/*.yaml)."""

    def __init__(self, path: Path, dtype: torch.dtype, device: torch.device):
        transformers = require_transformers()
        transformers.logging.set_verbosity_error()
        self.source = hf_io.open_hf_dir(path)
        self.arch = arch_from_config(self.source.config, set(self.source.keys()), where=str(path / "config.json"))
        self.config = transformers.AutoConfig.from_pretrained(str(path))
        self.config._attn_implementation = hf_attention.register()  # eager attention, a slice of queries at a time
        if hasattr(self.config, "_experts_implementation"):  # the reference loop over experts, as hf_verify loads it
            self.config._experts_implementation = "eager"
        # by the model type transformers makes of config.json (a mistral one with layer_types is ministral)
        self.facts = self.arch.family.stream.get(self.config.model_type)
        if self.facts is None:
            raise UserError(f"blockwise verification does not know transformers' model type {self.config.model_type}",
                            where=str(path / "config.json"), hint="Use --verify-mode full (loads both models whole).")
        self.module = importlib.import_module(f"transformers.models.{self.facts['module']}.modeling_{self.facts['module']}")
        self.layer_cls = getattr(self.module, self.facts["layer"])
        norm = self.facts.get("norm")  # a class of the module, or a dotted path (torch.nn.LayerNorm); None: no final norm
        self.norm_cls = None if norm is None else _dotted(norm) if "." in norm else getattr(self.module, norm)
        if self.arch.renamed:  # an old checkpoint's names (BERT's LayerNorm.gamma): read under today's names
            self.source.rename(self.arch.renamed)
        self.rotary = getattr(self.module, self.facts["rotary"])(config=self.config).to(device) \
            if self.facts.get("rotary") else None  # None: learned positions (``positions`` table)
        self.dtype, self.device = dtype, device
        self._packs: bool | None = None  # packable(), once found
        self.prefix = self.arch.prefix
        archs = self.config.architectures or []
        # the outputs are logits: a causal LM's, or an encoder's masked-LM head's (``mlm_heads``)
        self.causal = any(a.endswith(CAUSAL_SUFFIXES) for a in archs) if "mlm_heads" not in self.facts \
            else any(a in self.facts["mlm_heads"] for a in archs)

    def get(self, name: str) -> torch.Tensor:
        return self.source.get(self.prefix + name)

    def block_keys(self, i: int) -> dict[str, str]:
        """Block ``i``'s tensors: name inside the block -> key in the files."""
        key = self.prefix + self.arch.family.layer.format(i=i)
        dropped = self.arch.family.dropped  # old buffers (rotary inv_freq) that transformers ignores too
        ignored = set(self.facts.get("ignored") or ())  # old buffers the layer class no longer has (GPT-2's attn.bias)
        return {k[len(key):]: k for k in self.source.keys() if k.startswith(key) and k[len(key):] not in ignored
                and not (dropped and k.endswith(dropped))}

    def _state(self, i: int) -> dict[str, torch.Tensor]:
        """Block ``i``'s state dict as transformers' layer class names it: checkpoint names renamed
        (``renamed``), per-expert tensors stacked into the fused 3-D expert parameters (``experts``),
        each tensor converted to the compute dtype as it is read."""
        keys = self.block_keys(i)
        sd = {}
        for target, parts in (self.facts.get("experts") or {}).items():
            n = self.arch.experts
            first = [keys[p.format(e=0)] for p in parts]
            shapes = [self.source.shape(k) for k in first]
            out = torch.empty(n, sum(sh[0] for sh in shapes), *shapes[0][1:], dtype=self.dtype, device=self.device)
            for e in range(n):
                r = 0
                for p, sh in zip(parts, shapes):
                    out[e, r:r + sh[0]] = self.source.get(keys.pop(p.format(e=e))).to(self.device, self.dtype)
                    r += sh[0]
            sd[target] = out
        renamed = self.facts.get("renamed") or {}
        for name, k in keys.items():
            for old, new in renamed.items():
                name = name.replace(old, new)
            sd[name] = self.source.get(k).to(self.device, self.dtype)
        return sd

    def block(self, i: int, memory: _Memory | None = None) -> torch.nn.Module:
        """Block ``i`` with its weights from the files (built on the meta device, then assigned),
        each tensor converted to the compute dtype as it is read (never the block twice in memory;
        the files are read with ``pread``, nothing stays mapped); with ``memory``, into its reused
        buffers (the block is valid until the next one is loaded there). There, a big block's
        linear weights stored narrower than the compute dtype (bfloat16 under float32) are not
        loaded: each is read from the file's pages and widened as its layer runs, into one buffer
        (:class:`hf_attention.Widened`): a 7B block then takes one 0.23 GB float32 projection, not
        0.87 GB."""
        with torch.device("meta"):
            layer = self.layer_cls(self.config, i)
        narrow: dict[str, object] = {}  # weight name -> its bytes in the files (None: not mappable, kept)
        if memory is None or self.facts.get("experts") or self.facts.get("renamed"):
            sd = self._state(i)  # renamed or stacked (fused experts) tensors: fresh ones
        else:
            keys = self.block_keys(i)
            if self.block_bytes(i) > NARROW_BYTES:
                narrow = {w: self.source.raw(keys[w]) for w in (f"{n}.weight" for n, m in layer.named_modules()
                                                                 if type(m) is torch.nn.Linear)
                          if w in keys and self.source.dtype(keys[w]).is_floating_point
                          and self.source.dtype(keys[w]).itemsize < self.dtype.itemsize}
            sd = {name: torch.empty(self.source.shape(k), dtype=self.source.dtype(k), device="meta")
                  if narrow.get(name) is not None else memory.tensor(self.source, k, name, stored=name in narrow)
                  for name, k in keys.items()}
        layer.load_state_dict(sd, assign=True, strict=True)
        del sd
        for name, m in layer.named_modules():
            if f"{name}.weight" in narrow:
                hf_attention.Widened.adopt(m, memory.scratch, narrow[f"{name}.weight"])
            else:  # the rest in the compute dtype (a no-op for what was read into it)
                m._apply(lambda x: x.to(self.device, self.dtype) if x.is_floating_point() else x.to(self.device),
                         recurse=False)
        if isinstance(getattr(layer, "mlp", None), torch.nn.Module):  # the decoders' MLP: each token on its own
            layer.mlp = hf_attention.TokenWise(layer.mlp)
        return layer.eval()

    def block_bytes(self, i: int = 0) -> int:
        """What block ``i`` takes in the compute dtype (as reused buffers, all converted)."""
        return sum(math.prod(self.source.shape(k)) for k in self.block_keys(i).values()) * self.dtype.itemsize

    def signature(self, i: int) -> tuple:
        """What block ``i``'s forward depends on besides its weights and its inputs: the config
        (but the number of layers and the per-layer lists, such as which layer slides: those enter
        through ``layer_idx`` into the module attributes compared below, and the mask each block
        gets is compared on its own) and every plain attribute of the block's modules except
        ``layer_idx`` (which only indexes a cache; none is used here)."""
        with torch.device("meta"):
            layer = self.layer_cls(self.config, i)
        attrs = tuple((name, k, repr(v)) for name, m in layer.named_modules() for k, v in sorted(vars(m).items())
                      if not k.startswith("_") and k not in ("layer_idx", "config", "training"))
        return self._config_signature(), attrs

    def _config_signature(self) -> str:
        """The config but the number of layers, the per-layer lists and the bookkeeping fields."""
        per_layer = tuple(self.arch.family.config.get("per_layer") or ())
        cfg = {k: v for k, v in self.config.to_dict().items()
               if k not in ("num_hidden_layers", "layer_types", "max_window_layers", "architectures",
                            "_name_or_path", "transformers_version", *per_layer)}
        return repr(sorted(cfg.items()))

    def same_head(self, other: "_Model") -> bool:
        """Does ``other`` compute what :meth:`head` computes here, from a bitwise-equal stream? Yes
        when every tensor outside the blocks (embeddings, final norm, head) is byte-identical
        (names, dtypes, shapes, bytes: a deepen copies them), the config is the same but the layer
        count and per-layer lists, and the outputs are of the same kind (logits or hidden states)."""
        if (self._config_signature(), self.causal, tuple(self.config.architectures or ())) != \
                (other._config_signature(), other.causal, tuple(other.config.architectures or ())):
            return False
        mine = self.outside_blocks()
        return mine == other.outside_blocks() and all(_same_stored(self.source.raw(k), other.source.raw(k))
                                                      for k in mine)

    def outside_blocks(self) -> list[str]:
        """The names of the tensors no block reads."""
        inside = {k for i in range(self.arch.layers) for k in self.block_keys(i).values()}
        return sorted(k for k in self.source.keys() if k not in inside)

    def zero_output(self, i: int) -> bool:
        """Is block ``i`` an inserted block: every output projection the family names
        (``block_outputs``: attention and MLP outputs; every expert's and a shared expert's
        down projection) present and all zero?"""
        key = self.prefix + self.arch.family.layer.format(i=i)
        present = set(self.source.keys())
        names = [key + n for n in self.arch.block_names(self.arch.family.block_outputs) if key + n in present]
        return bool(names) and all(not self._any(n) for n in names)

    def _any(self, key: str) -> bool:
        """Any non-zero value in tensor ``key`` (read in place when it is in a safetensors file; its
        first 64 KiB first: a trained weight shows a non-zero value there, a zeroed one is read whole)."""
        span = self.source.raw(key)
        if span is None:
            return bool(self.source.get(key).any())
        for window in span.windows():
            with window.mapped() as raw:
                if bool(raw[:1 << 16].view(span.dtype).any()) or bool(raw.view(span.dtype).any()):
                    return True
        return False

    def packable(self) -> bool:
        """May several probes run packed in one sequence (:func:`_layout`)? For causal masks that
        transformers builds (``causal``, ``window``, ``layer_types``: packed sequences are found
        from the position ids) without a bidirectional overlay, with rotary positions (taken from
        the position ids) and plain token embeddings; not for encoders, learned positions (GPT-2)
        or an overlay."""
        bi = self.facts.get("bidirectional")
        if not (self.facts["masks"] in ("causal", "window", "layer_types") and self.rotary is not None
                and not self.facts.get("positions") and not self.facts.get("embeddings")
                and not (bi and getattr(self.config, bi["flag"], False))):
            return False
        if self._packs is None:
            self._packs = self._masks_separate_packed_probes()
        return self._packs

    def _masks_separate_packed_probes(self) -> bool:
        """Do the masks transformers builds here keep two packed probes apart? Two one-token probes
        (positions 0 and 0): every layer's mask must block the second from seeing the first. Not
        so where transformers does not apply its packed-sequence masks (with torch before 2.6), or
        where the config makes the model bidirectional (``is_causal: false``): then the probes run
        in their padded batches."""
        h = torch.zeros(1, 2, self.config.hidden_size, dtype=self.dtype, device=self.device)
        masks = self.masks(h, None, torch.zeros(1, 2, dtype=torch.long, device=self.device))
        for i in range(self.arch.layers):
            m = masks(i)
            if m is None:
                return False
            seen = m[..., 1, 0]  # the second probe's token attending to the first's
            if bool(seen.any()) if m.dtype == torch.bool else bool((seen == 0).any()):
                return False
        return True

    def masks(self, h: torch.Tensor, mask: torch.Tensor | None, position_ids: torch.Tensor) -> Callable[[int], torch.Tensor]:
        """Layer index -> its attention mask, as the model's forward builds them (``masks``); no
        ``mask``: probes packed in one sequence, told apart by their position ids."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        # no cache: the 4th parameter, named past_key_values before transformers 5.24 and cache since
        kw = dict(config=self.config, inputs_embeds=h, attention_mask=mask,
                  **{_cache_parameter(create_causal_mask): None}, position_ids=position_ids)
        sliding_kw = dict(kw)
        bi = self.facts.get("bidirectional")
        if bi and getattr(self.config, bi["flag"], False):
            kw["or_mask_function"] = lambda *args: torch.tensor(True, dtype=torch.bool)
            sliding_kw["or_mask_function"] = getattr(self.module, bi["window_overlay"])(self.config.sliding_window)
        rule = self.facts["masks"]
        if rule == "encoder":  # as BertModel._create_attention_masks: bidirectional unless the config is a decoder's
            from transformers.masking_utils import create_bidirectional_mask

            m = create_causal_mask(**kw) if getattr(self.config, "is_decoder", False) else \
                create_bidirectional_mask(config=self.config, inputs_embeds=h, attention_mask=mask)
            return lambda i: m
        if rule == "layer_types":
            types = self.config.layer_types
            made = {t: create_sliding_window_causal_mask(**sliding_kw) if t == "sliding_attention"
                    else create_causal_mask(**kw) for t in set(types)}
            return lambda i: made[types[i]]
        if rule == "window" and getattr(self.config, "sliding_window", None) is not None:
            m = create_sliding_window_causal_mask(**sliding_kw)
        elif rule in ("causal", "window"):
            m = create_causal_mask(**kw)
        else:
            raise AssertionError(f"unknown mask rule {rule!r}")
        return lambda i: m

    def positions(self, h: torch.Tensor, position_ids: torch.Tensor) -> Callable[[int], tuple]:
        """Layer index -> its rotary position embeddings (one per layer type where the family has
        local and global rope: ``rope_per_layer_type``)."""
        if self.rotary is None:
            return lambda i: None
        if self.facts.get("rope_per_layer_type"):
            types = self.config.layer_types
            made = {t: self.rotary(h, position_ids, t) for t in set(types)}
            return lambda i: made[types[i]]
        pe = self.rotary(h, position_ids)
        return lambda i: pe

    def rows(self, key: str, ids: torch.Tensor | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows of a tensor in the files (the rows ``ids``, else ``start:stop``), read alone: only
        those rows' bytes are read, never the whole table (a slice in place, through a mapping of
        its bytes; the rows ``ids`` with ``pread``)."""
        span = self.source.raw(key)
        if span is None:  # a pickled shard: torch.load maps it
            t = self.source.get(key)
            return t[ids].clone() if ids is not None else t[start:stop].clone()
        shape, dtype = tuple(span.shape), span.dtype
        row = span.nbytes // shape[0] if shape[0] else 0
        if ids is None:  # a slice: read in place (the caller converts it, which copies it)
            stop = shape[0] if stop is None else min(stop, shape[0])
            return RawSpan(span.fd, span.offset + start * row, max(0, stop - start) * row, dtype,
                           (max(0, stop - start), *shape[1:]), span.where).tensor()
        spans: list[tuple[int, int]] = []
        for i in sorted(set(int(i) for i in ids.reshape(-1).tolist())):  # runs of consecutive rows: one read each
            if spans and spans[-1][1] == i:
                spans[-1] = (spans[-1][0], i + 1)
            else:
                spans.append((i, i + 1))
        parts = []
        for a, b in spans:
            buf, n = bytearray((b - a) * row), (b - a) * row
            span.read_into(memoryview(buf), a * row)
            parts.append(torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(b - a, *shape[1:]) if n
                         else torch.empty(0, *shape[1:], dtype=dtype))
        out = torch.cat(parts) if len(parts) != 1 else parts[0]
        pos = {i: n for n, i in enumerate(r for a, b in spans for r in range(a, b))}
        return out[torch.tensor([pos[int(i)] for i in ids.reshape(-1).tolist()], dtype=torch.long)].reshape(
            *ids.shape, *shape[1:])

    def _embed_encoder(self, ids: torch.Tensor) -> torch.Tensor:
        """An encoder's embeddings (``embeddings``: BertEmbeddings and the like) as transformers' own
        class computes them: the probe tokens' rows, token type 0, the positions the model gives
        these ids (RoBERTa's start after the padding index and skip padding: ``position_ids``), the
        LayerNorm; the class is built without its word table (the rows are its inputs_embeds)."""
        cls = getattr(self.module, self.facts["embeddings"])
        with torch.device("meta"):
            emb = cls(self.config)
        emb.word_embeddings = None  # the rows below are passed as inputs_embeds
        name = self.prefix + "embeddings."
        wanted = set(emb.state_dict())
        sd = {k[len(name):]: self.source.get(k).to(self.device, self.dtype) for k in self.source.keys()
              if k.startswith(name) and k[len(name):] in wanted}
        emb.load_state_dict(sd, assign=True, strict=True)
        emb.eval()
        rows = self.rows(name + "word_embeddings.weight", ids.cpu()).to(self.device, self.dtype)
        if self.facts.get("position_ids") == "from_input_ids":
            pos = cls.create_position_ids_from_input_ids(ids, self.config.pad_token_id)
        else:
            pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        # the buffers (position_ids, token_type_ids) stay on the meta device: both ids are given
        return emb(input_ids=None, token_type_ids=torch.zeros_like(ids), position_ids=pos, inputs_embeds=rows)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The probe tokens' embedding rows, scaled as the model scales them (``embed_scale``,
        ``embed_multiplier``); an encoder's embedding module (``embeddings``)."""
        if self.facts.get("embeddings"):
            return self._embed_encoder(ids)
        # only the probe tokens' rows are read (a 7B model's table is 262 MB in bf16)
        h = self.rows(self.prefix + self.facts.get("embed", "embed_tokens.weight"), ids.cpu()).to(self.device, self.dtype)
        if self.facts.get("positions"):  # learned positions (GPT-2's wpe): the rows of positions 0..n-1 added
            n = ids.shape[-1]
            h = h + self.rows(self.prefix + self.facts["positions"], start=0, stop=n).to(self.device, self.dtype)
        if self.facts.get("embed_scale") == "sqrt_hidden":  # as GemmaTextScaledWordEmbedding: in the weights' dtype
            h = h * torch.tensor(self.config.hidden_size ** 0.5).to(h.dtype)
        if self.facts.get("embed_multiplier"):
            h = h * getattr(self.config, self.facts["embed_multiplier"])
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm, then (causal LMs) the head, a slice of the vocabulary at a time, and the
        logits' scaling (``logits_divisor``) or soft-capping (``logit_softcap``); an encoder (no final
        norm): its last hidden states, or its masked-LM head's logits (``mlm_head``)."""
        if self.facts.get("final_norm", "norm") is not None:
            name = self.prefix + self.facts.get("final_norm", "norm") + "."
            sd = {k[len(name):]: self.source.get(k).to(self.device, self.dtype) for k in self.source.keys()
                  if k.startswith(name)}
            with torch.device("meta"):
                norm = self.norm_cls(h.shape[-1], eps=getattr(self.config, self.facts.get("norm_eps", "rms_norm_eps")))
            norm.load_state_dict(sd, assign=True, strict=True)
            h = norm(h)
        if not self.causal:
            return h
        if self.facts.get("mlm_head"):
            return self._mlm_logits(h)
        w_key = "lm_head.weight" if "lm_head.weight" in self.source.keys() \
            else self.prefix + self.facts.get("embed", "embed_tokens.weight")
        divisor = getattr(self.config, self.facts["logits_divisor"]) if self.facts.get("logits_divisor") else None
        cap = getattr(self.config, self.facts["logit_softcap"], None) if self.facts.get("logit_softcap") else None
        out = []
        for r in range(0, self.source.shape(w_key)[0], HEAD_ROWS):  # a slice of the vocabulary read at a time
            y = h @ self.rows(w_key, start=r, stop=r + HEAD_ROWS).to(self.device, self.dtype).T
            if divisor is not None:
                y = y / divisor
            if cap is not None:
                y = torch.tanh(y / cap) * cap
            out.append(y)
        return torch.cat(out, dim=-1)

    def _mlm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """A masked-LM head's logits: the head class of transformers (``mlm_head``: dense,
        activation, LayerNorm, built without its decoder), then the decoder and its bias a slice of
        the vocabulary at a time. The decoder is the word embedding table and its bias the head's
        ``bias`` when config.tie_word_embeddings (transformers ties them), else its own tensors."""
        head = self.facts["mlm_heads"][next(a for a in self.config.architectures if a in self.facts["mlm_heads"])]
        with torch.device("meta"):
            mod = getattr(self.module, self.facts["mlm_head"])(self.config)
        mod.decoder = torch.nn.Identity()  # the vocabulary projection runs below, in slices
        del mod.bias  # the decoder's bias (tied to it): read below
        wanted = set(mod.state_dict())
        sd = {k[len(head):]: self.source.get(k).to(self.device, self.dtype) for k in self.source.keys()
              if k.startswith(head) and k[len(head):] in wanted}
        mod.load_state_dict(sd, assign=True, strict=True)
        x = mod.eval()(h)
        keys = set(self.source.keys())
        embed = self.prefix + "embeddings.word_embeddings.weight"
        tied = getattr(self.config, "tie_word_embeddings", True)
        w_key = embed if tied or head + "decoder.weight" not in keys else head + "decoder.weight"
        b_keys = [head + "bias", head + "decoder.bias"] if tied else [head + "decoder.bias", head + "bias"]
        b_key = next((k for k in b_keys if k in keys), None)
        bias = self.source.get(b_key).to(self.device, self.dtype) if b_key else None
        out = []
        for r in range(0, self.source.shape(w_key)[0], HEAD_ROWS):
            w = self.rows(w_key, start=r, stop=r + HEAD_ROWS).to(self.device, self.dtype)
            out.append(F.linear(x, w, None if bias is None else bias[r:r + HEAD_ROWS]))
        return torch.cat(out, dim=-1)

    def close(self):
        self.source.close()


def _tile(h: torch.Tensor, width: int) -> torch.Tensor:
    """The teacher's stream as a stream widened to ``width`` carries it: tiled, then zeros."""
    r, pad = divmod(width, h.shape[-1])
    return torch.cat([h.repeat(*([1] * (h.dim() - 1)), r), h.new_zeros(*h.shape[:-1], pad)], dim=-1)


def compare_dirs(teacher: Path, student: Path, *, vocab: int, max_len: int, probes: int, seed: int, atol: float,
                 rtol: float, device: torch.device, dtype: torch.dtype,
                 progress: Callable[[str, int, int], None] | None = None, grown: bool = False,
                 budget: bool = False, ahead: TeacherAhead | None = None) -> StreamComparison:
    """Streaming counterpart of :func:`hf_verify.compare_dirs` (same probes, same verdict rule):
    the short probes at their kept positions, and the long probes past every declared attention
    window at their last ``LONG_TAIL`` positions. With ``budget`` (``probes`` is the default, not
    the user's), a teacher of more than ``BUDGET_PARAMETERS`` parameters runs the first
    ``BUDGET_SEQUENCES`` short probes of each length and one of the two long probes (:func:`probe_budget`).
    ``ahead``: the teacher's side, computed while the student was written (:func:`teacher_ahead`),
    used when it ran on these same probes."""
    max_len = min(max_len, hf_verify._max_tokens(teacher))  # RoBERTa's positions start after the padding index
    s = _Model(Path(student), dtype, device)
    side = ahead.started() if ahead is not None else None
    if side is not None and side.key != (Path(teacher), vocab, max_len, probes, seed, str(device), dtype, budget,
                                         hf_verify.long_probe_length(side.t.config, s.config)):
        ahead.cancel()  # stops its thread and closes its files
        side = None  # not these probes (the student's config.json is not the planned one): run it here
    if side is None:
        t = _Model(Path(teacher), dtype, device)
        side = _TeacherSide(t, *_probes(t, s.config, vocab=vocab, max_len=max_len, probes=probes, seed=seed,
                                        budget=budget), key=None)
    try:
        c = _run(side, s, atol=atol, rtol=rtol, seed=seed, device=device, dtype=dtype, progress=progress)
        c.probe_budget = side.note
        return c
    finally:
        if ahead is not None and side.runner is not None:  # the student's side failed while the teacher's
            ahead.cancel()  # thread is inside a block: stopped before its files (read as it runs) are closed
        side.t.close()
        s.close()


def _probes(t: _Model, student_config, *, vocab, max_len, probes, seed, budget) -> tuple[list, str | None]:
    """The probe batches ``(ids, mask[, kept positions])`` and the budget's note (None: no budget)."""
    batches = probe_batches(vocab, max_len, probes, seed)
    long_len = hf_verify.long_probe_length(t.config, student_config)
    batches, note = probe_budget(batches, t.source, long_len) if budget else (batches, None)
    long = hf_verify.long_batches(vocab, long_len, seed) if long_len else []
    for ids, mask in long[-1:] if note else long:  # the budget's: the right-padded one
        keep = mask.bool()
        keep[:, :-hf_verify.LONG_TAIL] = False
        batches.append((ids, mask, keep))
    return batches, note


# --------------------------------------------------------------------------- cost at scale

#: a teacher with more parameters than this verifies on a probe budget unless the probes are the
#: user's (--probes, a spec's verify.probes): each probe token costs a forward of every block
BUDGET_PARAMETERS = 10**8
#: probe sequences kept per short length under the budget: the first ones, right-padded and not alike
BUDGET_SEQUENCES = 4
#: the teacher's side runs ahead (all its streams held at once) only when they take at most this
AHEAD_BYTES = 256 * 2**20
#: the student's blocks run while the teacher's thread still runs its own only when both sides'
#: block buffers together take at most this (else peak memory would hold two blocks)
BESIDE_BYTES = 768 * 2**20
#: blocks bigger than this in the compute dtype keep their narrow linear weights as stored (see
#: :meth:`_Model.block`); smaller ones are converted once as they are read (faster: a 1B block is
#: 0.18 GB in float32, and is run once per probe batch)
NARROW_BYTES = 256 * 2**20


def probe_budget(batches, source, long_len: int | None = None) -> tuple[list, str | None]:
    """The first ``BUDGET_SEQUENCES`` sequences of each short-probe batch (a subset of the full
    probes: the same seeded tokens) when the model in ``source`` is bigger than
    ``BUDGET_PARAMETERS``, and a note saying so (None, batches unchanged, when it is not). What
    the budget keeps is what catches errors that only some positions show: every length (the
    longest past nothing here), padded and unpadded sequences; a wrong weight, rope or norm
    changes every position. The long probes (``long_len`` tokens, past every attention window)
    are added apart: under the budget the right-padded one of the two (a causal position does not
    see the padding after it: before the padding it computes what an unpadded one computes;
    tokens x parameters is most of a 7B verification's time at 4112 tokens)."""
    params = sum(math.prod(source.shape(k)) for k in source.keys())
    full = sum(len(ids) for ids, _ in batches)
    if params <= BUDGET_PARAMETERS or all(len(ids) <= BUDGET_SEQUENCES for ids, _ in batches):
        return batches, None
    kept = [(ids[:BUDGET_SEQUENCES], mask[:BUDGET_SEQUENCES]) for ids, mask in batches]
    n = sum(len(ids) for ids, _ in kept)
    tokens, all_tokens = sum(ids.numel() for ids, _ in kept), sum(ids.numel() for ids, _ in batches)
    return kept, (f"a model of {params / 1e9:.2f}B parameters verifies on a probe budget by default: {n} of the "
                  f"{full} probe sequences ({tokens} of {all_tokens} tokens; every length, padded and not)"
                  + (f", and 1 of the 2 probes of {long_len} tokens past the attention windows" if long_len else "")
                  + "; --probes N runs N")


class _Memory:
    """Reused memory for loading blocks: per tensor name and shape, the tensor in the compute
    dtype. A fresh allocation of a block's size costs more than converting it (the kernel maps and
    zeroes new pages each time, and frees them again); a block built here is valid until the next
    block is loaded here. Teacher and student share one when their blocks run one after the other:
    a deepened student's blocks then reuse the teacher's buffers (one block in memory, not two);
    a widened one's have other shapes (two sets)."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self._out: dict[tuple[str, tuple[int, ...], torch.dtype], torch.Tensor] = {}
        self._scratch = torch.empty(0, dtype=dtype, device=device)

    def tensor(self, source, key: str, name: str, stored: bool = False) -> torch.Tensor:
        """``key`` in the compute dtype (``stored``: in the dtype of the file), in the buffer for
        ``name``: converted from the file's pages in place (a mapping of the tensor alone, closed
        right after: no copy into a read buffer)."""
        shape = tuple(source.shape(key))
        dtype = source.dtype(key) if stored else self.dtype
        out = self._out.get((name, shape, dtype))
        if out is None:
            out = self._out[name, shape, dtype] = torch.empty(shape, dtype=dtype, device=self.device)
        span = source.raw(key)
        if span is None:  # not in a safetensors file
            return out.copy_(source.get(key))
        with span.mapped() as raw:
            return out.copy_(raw.view(span.dtype).reshape(shape))

    def scratch(self, numel: int) -> torch.Tensor:
        """A flat compute-dtype buffer of ``numel`` elements, the same memory at every call (grown
        when asked for more): where each narrow linear weight is widened while its layer runs."""
        if self._scratch.numel() < numel:
            self._scratch = torch.empty(0, dtype=self.dtype, device=self.device)  # the old one freed first
            self._scratch = torch.empty(numel, dtype=self.dtype, device=self.device)
        return self._scratch[:numel]

    def clear(self) -> None:
        self._out.clear()
        self._scratch = torch.empty(0, dtype=self.dtype, device=self.device)


def _same_stored(a, b) -> bool:
    """Two stored tensors (``RawSpan``s; None: not in a safetensors file) with the same dtype,
    shape and bytes."""
    return a is not None and b is not None and a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) \
        and _same_file_bytes(a, b)


def _same_file_bytes(a, b) -> bool:
    """Two tensors' bytes in their files (``RawSpan``s) equal, compared in place, ``MAP_BYTES`` at
    a time (an embedding table of a 7B model is 262 MB: mapped whole on both sides, it would count
    twice that in RSS)."""
    if a.nbytes != b.nbytes:
        return False
    for x_span, y_span in zip(a.windows(), b.windows()):
        with x_span.mapped() as x, y_span.mapped() as y:
            if not _same_bytes(x, y):
                return False
    return True


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two uint8 tensors equal, compared 8 bytes at a time (4x faster than byte by byte)."""
    if a.numel() != b.numel():
        return False
    n = a.numel() // 8 * 8
    return torch.equal(a[:n].view(torch.int64), b[:n].view(torch.int64)) and torch.equal(a[n:], b[n:])


def _layout(t: _Model, batches: list) -> list[tuple]:
    """The probe batches ``(ids, mask[, kept positions])`` as the blocks run them: ``(ids, mask,
    keep, position ids)``. For a causal model whose masks transformers builds from position ids
    (:meth:`_Model.packable`), the short probes (those without their own kept positions) are packed
    into one sequence: each probe's tokens (right padding dropped), its positions restarting at 0,
    and no 2-D mask, so that transformers' mask functions confine attention to each probe
    (``find_packed_sequence_indices``). A causal position never sees the padding after it, so each
    kept position computes what it computes in its padded batch, while every weight is read once
    per block instead of once per batch (one matmul of 216 rows instead of 20, 64 and 132: 28%
    less time at 1B). The long probes (past the attention windows) keep their own batches."""
    out, packed = [], []
    pack = any(len(b) == 2 and bool(b[1].any()) for b in batches) and t.packable()
    for ids, mask, *keep in batches:
        if pack and not keep:
            packed += [row[m.bool()] for row, m in zip(ids, mask)]
            continue
        out.append((ids, mask, keep[0] if keep else mask.bool(),
                    torch.arange(ids.shape[1]).unsqueeze(0)))
    if packed:
        ids = torch.cat(packed).unsqueeze(0)
        pos = torch.cat([torch.arange(len(r)) for r in packed]).unsqueeze(0)
        out.insert(0, (ids, None, torch.ones_like(ids, dtype=torch.bool), pos))
    return out


class _TeacherSide:
    """The teacher's side of a comparison, which never depends on the student: per probe batch,
    the residual stream after the embeddings (stream 0) and after each block k - 1 (stream k),
    the masks and position embeddings its blocks get, and its outputs at the kept positions.
    Computed on demand (:meth:`stream`: in lockstep with the student, earlier streams dropped with
    :meth:`release`) or all at once (:meth:`run_all`: ahead, in a thread while the student is
    written, when the streams fit in ``AHEAD_BYTES``). While that thread (the runner) computes,
    :meth:`stream` and :meth:`outputs` called from another thread wait for what they ask for, so
    the student's side runs block by block behind the teacher's instead of after all of it; the
    runner's own buffers (``memory``) are the runner's alone until it has finished."""

    def __init__(self, t: _Model, batches: list, note: str | None, key: tuple | None):
        self.t, self.note, self.key = t, note, key
        self.memory = _Memory(t.device, t.dtype)
        self.sequences = sum(len(b[0]) for b in batches)  # probe sequences, however they are laid out
        self.state, first = [], []
        with torch.no_grad(), full_precision():
            for ids, mask, keep, pos in _layout(t, batches):
                ids, pos, keep = ids.to(t.device), pos.to(t.device), keep.to(t.device)
                mask = None if mask is None else mask.to(t.device)
                h = t.embed(ids)
                self.state.append({"ids": ids, "mask": mask, "pos": pos, "keep": keep,
                                   "masks": t.masks(h, mask, pos), "pe": t.positions(h, pos)})
                first.append(h)
        self.streams: dict[int, list[torch.Tensor]] = {0: first}
        self.done = 0  # blocks run
        self._outputs: list[torch.Tensor] | None = None
        self._cv = threading.Condition()  # guards streams, done and _outputs while a runner computes
        self.runner: threading.Thread | None = None  # the thread in run_all, set before others see this side
        self._error: BaseException | None = None  # what stopped the runner, raised again to its waiters

    def _wait(self, ready: Callable[[], bool]) -> None:
        """Called from another thread than a running runner: wait until ``ready()`` or the runner
        stopped (then its error, if any, is raised here; else whatever is missing is computed
        here). The caller holds ``self._cv``."""
        while self.runner is not None and self.runner is not threading.current_thread() and not ready():
            self._cv.wait()
        if self._error is not None and not ready():
            raise self._error

    def stream_bytes(self) -> int:
        """What all the streams take at once."""
        return sum(h.numel() * h.element_size() for h in self.streams[0]) * (self.t.arch.layers + 1)

    def stream(self, k: int) -> list[torch.Tensor]:
        with self._cv:
            self._wait(lambda: self.done >= k)
        while self.done < k:
            i = self.done
            layer = self.t.block(i, self.memory)
            with torch.no_grad(), full_precision():
                out = [layer(h, attention_mask=st["masks"](i), position_embeddings=st["pe"](i), position_ids=st["pos"],
                             use_cache=False) for h, st in zip(self.streams[i], self.state)]
            del layer
            with self._cv:
                self.streams[i + 1] = [o[0] if isinstance(o, tuple) else o for o in out]
                self.done += 1
                self._cv.notify_all()
        with self._cv:
            return self.streams[k]

    def wait_runner(self) -> None:
        """Wait until the runner (if any) has run every block and freed its block buffers."""
        with self._cv:
            self._wait(lambda: self.runner is None)

    def release(self, k: int) -> None:
        """Streams before ``k`` are not needed any more (those still needed to compute it are kept)."""
        with self._cv:
            for n in [n for n in self.streams if n < min(k, self.done)]:
                del self.streams[n]

    def outputs(self) -> list[torch.Tensor]:
        """The final norm and head (causal LMs) at the kept positions, per batch (compute dtype)."""
        with self._cv:
            self._wait(lambda: self._outputs is not None)
        if self._outputs is None:
            h = self.stream(self.t.arch.layers)
            with torch.no_grad(), full_precision():
                outputs = kept_outputs(self.t, h, [st["keep"] for st in self.state])
            with self._cv:
                self._outputs = outputs
                self._cv.notify_all()
        return self._outputs

    def run_all(self, cancelled: Callable[[], bool] = lambda: False) -> None:
        """Every stream and the outputs (in the runner: the thread that set ``runner``)."""
        try:
            for k in range(1, self.t.arch.layers + 1):
                if cancelled():
                    return
                self.stream(k)
            self.outputs()
            self.memory.clear()  # every block has run: its converted tensors are not needed again
        except BaseException as e:
            self._error = e
            raise
        finally:
            with self._cv:
                self.runner = None
                self._cv.notify_all()


class TeacherAhead:
    """The teacher's side computed in a thread (:func:`teacher_ahead`); :meth:`started` waits until
    it is set up and returns it while its blocks still run (its streams wait for the thread),
    :meth:`result` waits for all of it (both None if it could not run ahead; the comparison then
    computes it itself)."""

    def __init__(self, start: Callable[[], _TeacherSide | None]):
        self._cancel = False
        self._started = concurrent.futures.Future()
        self._future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(start,), name="n2n-teacher-ahead", daemon=True)
        self._thread.start()

    def _run(self, start):
        try:
            side = start()
            if side is not None:
                side.runner = threading.current_thread()  # before anyone sees it: its streams wait for this thread
            self._started.set_result(side)
            if side is not None:
                side.run_all(lambda: self._cancel)
            self._future.set_result(None if self._cancel else side)
        except BaseException as e:  # noqa: BLE001 (raised again by started()/result(), in the caller's thread)
            if not self._started.done():
                self._started.set_exception(e)
            self._future.set_exception(e)

    def started(self) -> _TeacherSide | None:
        return self._started.result()

    def result(self) -> _TeacherSide | None:
        return self._future.result()

    def cancel(self) -> None:
        """Stop at the next block, wait, close the teacher's files (also when they were used)."""
        self._cancel = True
        self._thread.join()
        if self._started.exception() is None and self._started.result() is not None:
            self._started.result().t.close()


@contextlib.contextmanager
def teacher_ahead(teacher: Path, student_config: dict, *, mode: str = "auto", vocab: int, max_len: int, probes: int,
                  seed: int, device: torch.device, dtype: torch.dtype, budget: bool = False,
                  after: Callable[[], object] | None = None):
    """Yields a :class:`TeacherAhead` computing the teacher's side of :func:`compare_dirs` in a
    thread (while the student is being written: it does not depend on the student), or None when
    the comparison will not be blockwise. Pass it to :func:`compare` as ``ahead``; on leaving, a
    computation still running is stopped at the next block and its memory freed. ``after``: what
    the thread waits for first (another thread importing transformers: its import is not
    thread-safe, a second ``import transformers`` can return the module half-initialized)."""
    try:
        config = hf_io._read_config(Path(teacher))
    except Exception:
        config = {}
    if mode == "full" or not (_supported(config) and _supported(student_config)):
        yield None
        return
    max_len = min(max_len, hf_verify._max_tokens(teacher))  # as compare_dirs does

    def start() -> _TeacherSide | None:
        if after is not None:
            after()
        transformers = require_transformers()
        s_config = transformers.AutoConfig.for_model(student_config["model_type"],
                                                     **{k: v for k, v in student_config.items() if k != "model_type"})
        t = _Model(Path(teacher), dtype, device)
        long_len = hf_verify.long_probe_length(t.config, s_config)
        side = _TeacherSide(t, *_probes(t, s_config, vocab=vocab, max_len=max_len, probes=probes, seed=seed,
                                        budget=budget),
                            key=(Path(teacher), vocab, max_len, probes, seed, str(device), dtype, budget, long_len))
        if side.stream_bytes() > AHEAD_BYTES:
            t.close()
            return None
        return side

    ahead = TeacherAhead(start)
    try:
        yield ahead
    finally:
        ahead.cancel()


def _run(side: _TeacherSide, s: _Model, *, atol, rtol, seed, device, dtype, progress) -> StreamComparison:
    t = side.t
    T, S = t.arch.layers, s.arch.layers
    with torch.no_grad(), full_precision():
        state = []  # per batch: student stream, student masks, rope (the rest is the teacher side's)
        for ts in side.state:
            hs = s.embed(ts["ids"])
            state.append({"s": hs, "sm": s.masks(hs, ts["mask"], ts["pos"]), "spe": s.positions(hs, ts["pos"]),
                          "keep": ts["keep"], "pos": ts["pos"]})
        first, worst, compared, inserted, copied = None, 0.0, 0, [], []

        def check(k: int, where: str):
            nonlocal first, worst, compared
            a = torch.cat([_tile(h, st["s"].shape[-1])[st["keep"]] for h, st in zip(side.stream(k), state)]).double()
            b = torch.cat([st["s"][st["keep"]] for st in state]).double()
            finite = bool(torch.isfinite(b).all())
            err, ref = float((a - b).abs().max()) if finite else float("inf"), float(a.abs().max())
            ok = finite and err <= atol + rtol * ref
            worst = max(worst, err / ref if ref > 0 else (0.0 if err == 0 else float("inf")))
            compared += 1
            if not ok and first is None:
                first = (f"the residual stream differs {where}: the student's is not finite (NaN or Inf)" if not finite
                         else f"the residual stream differs {where}{DIVERGENCE_AMOUNT}{err:.3g} > atol {atol:g} + "
                              f"rtol {rtol:g} * {ref:.3g}")

        def same(a, b) -> bool:
            if a is None or b is None:
                return a is None and b is None
            if isinstance(a, (tuple, list)):
                return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
            return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)

        def copy_of_teacher(i: int, j: int) -> bool:
            """May student block j be skipped, its output taken from teacher block i's?

            Sound when (1) the block's tensors are byte-identical (names, dtypes, shapes, bytes),
            (2) both layers are built alike (:meth:`_Model.signature`: same config but the layer
            count and per-layer types, same module attributes but ``layer_idx``), and (3) every
            input of the forward is bitwise equal: the stream, the attention mask of this layer
            (which carries the sliding window of a per-layer type) and the position embeddings
            (the position ids are the same tensor). A block's forward is a function of exactly
            these, so the student's block computes bitwise what the teacher's block computes;
            running it again could only repeat the teacher's result. (A deepen whose inserted
            blocks leave the stream bitwise unchanged keeps (3) for every original block.)"""
            # the weights first: they do not wait for the teacher's side, which may still be
            # computing stream i in its thread
            tk, sk = t.block_keys(i), s.block_keys(j)
            if sorted(tk) != sorted(sk) or t.signature(i) != s.signature(j):
                return False
            if not all(_same_stored(t.source.raw(tk[name]), s.source.raw(sk[name])) for name in tk):
                return False
            return all(same(h, st["s"]) and same(ts["masks"](i), st["sm"](j)) and same(ts["pe"](i), st["spe"](j))
                       for h, ts, st in zip(side.stream(i), side.state, state))

        # the student's blocks run beside the teacher's thread when both sides' block buffers fit
        # in BESIDE_BYTES; else (a 7B model's block is 0.8 GB in float32) after it, one at a time
        beside = 2 * side.t.block_bytes() <= BESIDE_BYTES
        memory = _Memory(device, dtype) if beside else side.memory  # one after the other: the same buffers

        def run(j: int):
            if not beside:
                side.wait_runner()
            layer = s.block(j, memory)
            for st in state:
                out = layer(st["s"], attention_mask=st["sm"](j), position_embeddings=st["spe"](j), position_ids=st["pos"],
                            use_cache=False)
                st["s"] = out[0] if isinstance(out, tuple) else out
            del layer

        head_alike = t.same_head(s)  # the files only: compared before waiting for any teacher stream
        check(0, "after the embeddings")
        i = 0
        matched = 0  # the student block that ran teacher block i - 1

        def students(j: int) -> str:
            """The student blocks that may have made the stream differ by block j: teacher block
            i - 1's counterpart (unless it was a byte copy fed an equal stream) and the blocks
            inserted after it."""
            first = matched + 1 if matched in copied else matched
            if first >= j:
                return f"student block {j}" + (f", inserted after {matched}" if j in inserted else "")
            return f"student blocks {first}-{j}, inserted after {matched}"
        for j in range(S):
            if progress:
                progress("verifying (blockwise)", j, S)
            # an inserted block: all-zero outputs where the student has blocks to spare; one
            # facing an all-zero teacher block (a teacher deepened before) is that block's copy
            if i > 0 and (S - j > T - i) and s.zero_output(j) and not (i < T and t.zero_output(i)):
                run(j)  # the stream must come out unchanged
                inserted.append(j)
                continue
            if i > 0:
                check(i, f"after teacher block {i - 1} ({students(j - 1)})")
            matched = j
            if i < T:
                skip = copy_of_teacher(i, j)
                i += 1
                side.release(i)
                if skip:
                    for h, st in zip(side.stream(i), state):
                        st["s"] = h
                    copied.append(j)
                    continue
            run(j)
        # a student with fewer blocks: the teacher's rest runs too (the outputs will differ)
        check(T, f"after teacher block {T - 1} ({students(S - 1)})")
        if progress:
            progress("verifying (blockwise)", S, S)
        # the outputs compared in float64 a few positions at a time (the logits of every probe
        # position over a 32k vocabulary in float64 would be the largest thing in memory)
        parts = []
        head_copied = head_alike and all(same(h, st["s"]) for h, st in zip(side.stream(T), state))
        teacher_out = side.outputs()
        student_out = teacher_out if head_copied else kept_outputs(s, [st["s"] for st in state],
                                                                   [st["keep"] for st in state])
        for a_all, b_all in zip(teacher_out, student_out):
            for r in range(0, a_all.shape[0], COMPARE_ROWS):
                a, b = a_all[r:r + COMPARE_ROWS].to("cpu", torch.float64), b_all[r:r + COMPARE_ROWS].to("cpu", torch.float64)
                if not t.causal and b.shape[-1] != a.shape[-1]:
                    a = _tile(a, b.shape[-1])
                parts.append((len(a), compare_outputs(a, b, atol=atol, rtol=rtol, probes=0, seed=seed, device=device,
                                                      dtype=dtype)))
    c = _combine(parts, atol=atol, rtol=rtol, probes=side.sequences)
    if not t.causal:
        c.argmax_agreement = None
    if first is None and not c.passed:
        first = "the residual streams agree after every block; the final norm or the head differs"
    return StreamComparison(**c.to_dict(), first_divergence=first, blocks_compared=compared,
                            stream_max_rel_error=worst, student_blocks_inserted=inserted,
                            student_blocks_copied=copied, student_head_copied=head_copied)


def kept_outputs(m: _Model, streams: list[torch.Tensor], keep: list[torch.Tensor]) -> list[torch.Tensor]:
    """The outputs (:meth:`_Model.head`) at the kept positions of every probe batch, computed in
    one pass over the head (read and converted once, not once per batch; the final norm and the
    head act on each position alone, so only the kept positions are run)."""
    rows = [h[k] for h, k in zip(streams, keep)]
    return list(m.head(torch.cat(rows)).split([len(r) for r in rows]))


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
    ``hf_verify.outputs`` gives them from the full model): the teacher's side of a comparison
    (:class:`_TeacherSide`, probes laid out as :func:`_layout` lays them out) on its own, for
    checking it against transformers' model class."""
    m = _Model(Path(path), dtype, device)
    try:
        return torch.cat([o.to("cpu", torch.float64) for o in _TeacherSide(m, batches, None, None).outputs()])
    finally:
        m.close()


# --------------------------------------------------------------------------- choosing the mode

VERIFY_MODES = ("auto", "streaming", "full")


@dataclass
class FullComparison(Comparison):
    mode: str = "full"


def compare(teacher: Path, student: Path, *, mode: str = "auto",
            progress: Callable[[str, int, int], None] | None = None, budget: bool = False,
            ahead: TeacherAhead | None = None, **kw) -> Comparison:
    """Verify ``student`` against ``teacher`` blockwise (``streaming``: one block in memory), by
    loading both models whole with transformers (``full``), or (``auto``) blockwise whenever
    both directories are of a family the streaming verifier supports, else whole. ``budget``:
    the probes are the default ones, which a big model runs on a budget (:func:`probe_budget`);
    ``ahead``: the teacher's side, computed already (:func:`teacher_ahead`)."""
    from .errors import UserError

    if mode not in VERIFY_MODES:
        raise UserError(f"verify mode '{mode}' is not one of {', '.join(VERIFY_MODES)}")
    why = unsupported(teacher) or unsupported(student)
    able = why is None
    if mode == "streaming" and not able:
        raise UserError(f"blockwise verification cannot verify this model: {why}",
                        where=str(student), hint="Use --verify-mode full (loads both models whole).")
    if mode == "streaming" or (mode == "auto" and able):
        return compare_dirs(teacher, student, progress=progress, budget=budget, ahead=ahead, **kw)
    return FullComparison(**hf_verify.compare_dirs(teacher, student, **kw).to_dict())
