"""Hugging Face transformer checkpoints: families as data, and one model's architecture.

A family (``n2n_cli/families/*.yaml``) names every tensor by template and says which space
each axis lives in (hidden = the residual stream, mlp, heads, kv_heads; per layer for all
but hidden). ``Arch`` is a family plus config.json's sizes; its ``tensors()`` are what the
planner widens (``n2n_cli.hf_plan``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    import torch

from .errors import CheckpointError, ModelError
from .limits import MAX_LAYERS
from .layers import Axis
from .spec import HFDeepenStep, HFGrowthSpec, HFStepEntry, HFWidenStep  # noqa: F401 (the steps' schema)

FAMILY_DIR = Path(__file__).parent / "families"
HF_DIMS = ("intermediate_size", "hidden_size", "num_attention_heads", "num_key_value_heads")


# ----------------------------------------------------------------------------- families


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    config: dict[str, object]
    defaults: dict[str, object]
    head_dim_from_hidden: bool
    norm: str  # pre | post: where the norm sits relative to the residual add
    norm_kind: str  # rms | layer
    prefixes: tuple[str, ...]
    anchor: str
    layer: str
    globals: dict[str, list[str]]
    block: dict[str, list[str]]
    head: dict[str, list[str]]
    head_architectures: tuple[str, ...]
    block_outputs: tuple[str, ...]
    derived_layer_types: dict[str, dict[str, str]] = field(default_factory=dict)
    dropped: tuple[str, ...] = ()
    # issue 9: the mechanisms of the families beyond LLaMA/GPT-2/BERT (all optional in the YAML)
    norm_offset: float = 0.0  # Gemma's RMSNorm scales by (1 + w): the stored weight is gamma - norm_offset
    embed_scale: str | None = None  # "sqrt_hidden": embeddings are multiplied by sqrt(hidden_size) (Gemma)
    pad_refused: str | None = None  # why hidden_size grows by integer multiples only (e.g. shared eps)
    projection_norms: str | None = None  # why heads grow by whole multiples only (OLMo 2's q/k norms)
    task_heads: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # architecture suffix: tensors
    renamed: dict[str, str] = field(default_factory=dict)  # old tensor name ending: the name written instead
    position_offset: int = 0  # RoBERTa: positions start at padding_idx + 1, so 2 positions are never probed
    derived_per_layer: dict[str, dict] = field(default_factory=dict)  # per-layer int lists from an interval
    moe: dict = field(default_factory=dict)  # mixtures of experts: config names, router rule, upcycling (hf_moe)
    eps_readers: tuple[str, ...] = ()  # norms over other axes (q_norm over head_dim) that read the stream norms' eps
    stream: dict = field(default_factory=dict)  # model_type: what its forward does around the blocks (hf_stream)


@lru_cache(maxsize=None)
def families() -> dict[str, Family]:
    """Every supported family, by config.json ``model_type``."""
    out = {}
    for path in sorted(FAMILY_DIR.glob("*.yaml")):
        d = _family_data(path.stem)
        fam = Family(d["family"], tuple(d["model_types"]), d["config"], d.get("defaults") or {},
                     bool(d["head_dim_from_hidden"]), d["norm"], d["norm_kind"], tuple(d["prefixes"]), d["anchor"], d["layer"],
                     d["globals"] or {}, d["block"] or {}, d["head"] or {}, tuple(d.get("head_architectures") or ()),
                     tuple(d["block_outputs"]), d.get("derived_layer_types") or {}, tuple(d.get("dropped") or ()),
                     float(d.get("norm_offset", 0.0)), d.get("embed_scale"), d.get("pad_refused"),
                     d.get("projection_norms"), d.get("task_heads") or {}, d.get("renamed") or {},
                     int(d.get("position_offset", 0)), d.get("derived_per_layer") or {},
                     d.get("moe") or {}, tuple(d.get("eps_readers") or ()), d.get("stream") or {})
        for mt in fam.model_types:
            out[mt] = fam
    return out


def _family_data(name: str) -> dict:
    """A family's YAML; ``extends: other`` starts from that family's data, and ``<key>_extra`` adds
    tensors to the base's ``<key>`` (globals, block, head...) instead of replacing it."""
    d = yaml.safe_load((FAMILY_DIR / f"{name}.yaml").read_text())
    if "extends" not in d:
        return d
    out = {**_family_data(d["extends"]), **{k: v for k, v in d.items() if not k.endswith("_extra")}}
    for k, v in d.items():
        if k.endswith("_extra"):
            out[k[: -len("_extra")]] = {**(out.get(k[: -len("_extra")]) or {}), **v}
    return out


def supported_model_types() -> list[str]:
    return sorted(families())


# ----------------------------------------------------------------------------- one concrete model


@dataclass(frozen=True)
class TensorSpec:
    key: str
    shape: tuple[int, ...] | None  # None: passed through as it is (a buffer)
    axes: tuple[Axis | None, ...]
    optional: bool


@dataclass(frozen=True)
class Arch:
    """A family plus the sizes read from config.json."""

    family: Family
    prefix: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    vocab: int
    positions: int = 0
    types: int = 0
    per_layer: dict[str, list] = field(default_factory=dict)
    eps: float | None = None
    has_head: bool = True  # False for base models (LlamaModel, GPT2Model): no lm_head, tied or not
    dropped: tuple[str, ...] = ()  # tensors of an old checkpoint that transformers ignores (family's ``dropped``)
    labels: int = 0  # a task head's number of labels (never grows)
    head_kind: str = ""  # the family's task head (``task_heads`` key: ForSequenceClassification...) in use
    renamed: dict[str, str] = field(default_factory=dict)  # output key: the old name it is read from
    experts: int = 0  # mixtures of experts: routed experts per layer ("{e}" in a tensor name), top-k, the
    top_k: int = 0  # shared expert's intermediate size (0: none)
    shared: int = 0

    # -- tensors

    def size(self, space: str) -> int:
        return {"hidden": self.hidden, "mlp": self.intermediate, "heads": self.heads * self.head_dim,
                "kv_heads": self.kv_heads * self.head_dim, "vocab": self.vocab, "positions": self.positions,
                "types": self.types, "head_dim": self.head_dim, "labels": self.labels,
                "experts": self.experts, "shared_mlp": self.shared}[space]

    def _axis(self, token: str, layer: int | None, expert: int | None = None) -> tuple[int | None, Axis | None]:
        if "+" in token:  # a fused axis of several spaces (Phi-3's q|k|v): each part at its offset
            parts, offset = [], 0
            for t in token.split("+"):
                n, ax = self._axis(t, layer, expert)
                parts.append(replace(ax, offset=offset, span=n))
                offset += n
            return offset, Axis("fused", "fused", parts=tuple(parts))
        if token.isdigit():
            return int(token), None
        if ":" not in token:
            return (None if token == "passthrough" else self.size(token)), None
        space, role = token.split(":")
        segments = 1
        if "*" in role:
            role, n = role.split("*")
            segments = int(n)
        if role == "final_norm":  # a tied head reads the final norm: scale it by 1/r there instead
            role = "norm_in" if self.tied and self.has_head else "norm"
        elif role == "head":
            role = ("embed" if self.family.embed_scale else "out") if self.tied else "in"
        block = self.head_dim if space in ("heads", "kv_heads") else 1
        sid = space if space == "hidden" or layer is None else f"{space}@{layer}"
        if expert is not None and space == "mlp":  # each expert's intermediate units are its own space
            sid += f".{expert}"
        shift = self.family.norm_offset if role in ("norm", "norm_in") else 0.0
        return self.size(space) * segments, Axis(sid, role, block, segments=segments, norm_shift=shift)

    def _spec(self, key: str, tokens: list[str], layer: int | None, optional: bool,
              expert: int | None = None) -> TensorSpec:
        dims = [self._axis(t, layer, expert) for t in tokens]
        shape = None if any(d is None for d, _ in dims) else tuple(d for d, _ in dims)
        return TensorSpec(key, shape, tuple(a for _, a in dims), optional)

    def tensors(self) -> dict[str, TensorSpec]:
        fam, out = self.family, {}

        def add(name: str, tokens: list[str], layer: int | None, prefix: str):
            optional = name.endswith("?")
            name = name.rstrip("?")
            if fam.moe.get("shared_names") and name.startswith(fam.moe["shared_names"]) and not self.shared:
                return  # no shared expert in this config
            for e in range(self.experts) if "{e}" in name else [None]:
                key = prefix + (fam.layer.format(i=layer) if layer is not None else "") + \
                    (name.replace("{e}", str(e)) if e is not None else name)
                out[key] = self._spec(key, tokens, layer, optional, e)

        for name, tokens in fam.globals.items():
            if not name.rstrip("?").startswith(("norm.", "ln_f.", "pooler.")):
                add(name, tokens, None, self.prefix)
        for i in range(self.layers):
            for name, tokens in fam.block.items():
                add(name, tokens, i, self.prefix)
        for name, tokens in fam.globals.items():
            if name.rstrip("?").startswith(("norm.", "ln_f.", "pooler.")):
                add(name, tokens, None, self.prefix)
        if self.has_head:  # a tied head's weight is the embedding: its own copy may be missing
            for name, tokens in fam.head.items():
                add(name + ("?" if self.tied and "hidden:head" in tokens else ""), tokens, None, "")
        for name, tokens in fam.task_heads.get(self.head_kind, {}).items():
            add(name, tokens, None, "")
        return out

    def block_names(self, names) -> list[str]:
        """Block tensor names (family templates, "?" stripped) with "{e}" expanded for every expert."""
        names = [n.rstrip("?") for n in names]
        return [n.replace("{e}", str(e)) if "{e}" in n else n
                for n in names for e in (range(self.experts) if "{e}" in n else [0])]

    def num_parameters(self, present: set[str] | None = None) -> int:
        return sum(math.prod(t.shape) for k, t in self.tensors().items() if t.shape is not None
                   and (present is None or k in present or not t.optional))

    # -- config

    def to_config(self, original: dict) -> dict:
        fam, cfg = self.family, dict(original)
        c = fam.config
        cfg[c["hidden"]] = self.hidden
        cfg[c["layers"]] = self.layers
        cfg[c["heads"]] = self.heads
        if original.get(c["intermediate"]) is not None or self.intermediate != _default_intermediate(fam, self.hidden):
            cfg[c["intermediate"]] = self.intermediate
        if "kv_heads" in c and (c["kv_heads"] in original or self.kv_heads != self.heads):
            cfg[c["kv_heads"]] = self.kv_heads
        if "head_dim" in c and (c["head_dim"] in original or self.head_dim * self.heads != self.hidden):
            cfg[c["head_dim"]] = self.head_dim
        for name, values in self.per_layer.items():
            cfg[name] = values
        rule = fam.derived_layer_types.get(original.get("model_type"))
        types = self.per_layer.get("layer_types")
        if rule and types and cfg.get(rule["enabled"]):
            # transformers before layer_types (< 4.53) assigns windows by from_layer alone: keep it
            # telling the same story where the list is full_attention for layers < k, sliding after
            k = next((i for i, t in enumerate(types) if t != "full_attention"), len(types))
            if all(t == "sliding_attention" for t in types[k:]):
                old = cfg.get(rule["from_layer"], (rule.get("defaults") or {}).get(rule["from_layer"]))
                cfg[rule["from_layer"]] = k if k < len(types) else max(old if isinstance(old, int) else 0, k)
        if self.eps is not None:
            cfg[c["eps"]] = self.eps
        moe = fam.moe
        if moe:
            names = moe["experts"]
            cfg[next((n for n in names if n in original), names[0])] = self.experts
            cfg[moe["top_k"]] = self.top_k
            if moe.get("shared") and self.shared:
                cfg[moe["shared"]] = self.shared
        return cfg


def _default_intermediate(fam: Family, hidden: int) -> int | None:
    f = fam.defaults.get("intermediate_factor")
    return f * hidden if f else None


def _show(v) -> str:
    """A config value for a message: short, whatever its type."""
    try:
        text = json.dumps(v)
    except (TypeError, ValueError, RecursionError):
        text = repr(type(v).__name__)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _layer_indices(keys: set[str], prefix: str, layer: str) -> set[int]:
    """The block indices present among ``keys`` (one regex pass over the names, no tensor data)."""
    head, tail = (prefix + layer).split("{i}")
    pat = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail))
    return {int(m.group(1)) for k in keys if (m := pat.match(k))}


def derive_layer_types(config: dict, fam: Family, layers: int, problems: list[str]) -> list[str] | None:
    """``layer_types`` as transformers derives it for a config.json without one (see the family's
    ``derived_layer_types``); None where the family has no such rule."""
    rule = fam.derived_layer_types.get(config.get("model_type"))
    if not rule:
        return None
    d = rule.get("defaults") or {}
    enabled, window, first = (config.get(rule[k], d.get(rule[k])) for k in ("enabled", "window", "from_layer"))
    if not isinstance(enabled, bool):
        problems.append(f"'{rule['enabled']}' must be true or false, got {_show(enabled)}")
    if window is not None and not (_is_int(window) and window > 0):
        problems.append(f"'{rule['window']}' must be a positive integer or null, got {_show(window)}")
    if not (_is_int(first) and first >= 0):
        problems.append(f"'{rule['from_layer']}' must be a non-negative integer, got {_show(first)}")
    if problems:
        return None
    return ["sliding_attention" if enabled and window is not None and i >= first else "full_attention"
            for i in range(layers)]


def arch_from_config(config: dict, keys: set[str], where: str) -> Arch:
    """Resolve a config.json (and the checkpoint's keys, for the prefix) into an ``Arch``.

    Every field n2n reads is type-checked here (a ModelError naming the field), and the layer
    count is checked against the blocks the checkpoint holds before anything per layer is built.
    """
    mt = config.get("model_type")
    fams = families()
    if not isinstance(mt, str):
        raise ModelError(f"config.json: 'model_type' must be a string naming the model family, got {_show(mt)}",
                         where=where, hint=f"Supported model types: {', '.join(supported_model_types())}.")
    if mt not in fams:
        raise ModelError(f"config.json: model_type {mt!r} is not supported", where=where,
                         hint=f"Supported model types: {', '.join(supported_model_types())}.")
    if config.get("quantization_config") is not None:
        raise ModelError("config.json has a 'quantization_config': quantized checkpoints cannot be grown exactly "
                         "(their weights are stored as codes and scales, not values); dequantize first",
                         where=where, hint="Load the model with transformers, dequantize it (e.g. "
                         "model.dequantize()), save_pretrained() it, and grow that directory.")
    fam = fams[mt]
    c = fam.config
    problems = []

    def get(q: str, default=None):
        name = c.get(q)
        v = config.get(name, default) if name else default
        if v is None and default is None and q not in ("intermediate", "kv_heads", "head_dim", "tie"):
            problems.append(f"config.json has no '{name}'")
        return v

    hidden, layers, heads = get("hidden"), get("layers"), get("heads")
    vocab = get("vocab")
    if problems:
        raise ModelError("inconsistent config", where=where, problems=problems)
    intermediate = get("intermediate")  # null (GPT-2's n_inner): the family's default; 0 is not null
    if intermediate is None and _is_int(hidden):
        intermediate = _default_intermediate(fam, hidden)
    kv_heads = get("kv_heads") or heads
    tied = get("tie", fam.defaults.get("tie", False))
    for name, v in ((c["hidden"], hidden), (c["layers"], layers), (c["heads"], heads), (c["vocab"], vocab),
                    (c["intermediate"], intermediate), (c.get("kv_heads", "kv heads"), kv_heads)):
        if not _is_int(v) or v < 1:
            problems.append(f"'{name}' must be a positive integer, got {_show(v)}")
    if not isinstance(tied, bool):
        problems.append(f"'{c['tie']}' must be true or false, got {_show(tied)}")
    head_dim = get("head_dim")
    if head_dim is not None and not (_is_int(head_dim) and head_dim > 0):
        problems.append(f"'{c['head_dim']}' must be a positive integer or null, got {_show(head_dim)}")
    for q in ("positions", "types"):
        v = get(q, 0)
        if not (_is_int(v) and v >= 0):
            problems.append(f"'{c[q]}' must be a positive integer, got {_show(v)}")
    eps = config.get(c["eps"]) if "eps" in c else None
    if eps is not None and not (_is_number(eps) and eps > 0):
        problems.append(f"'{c['eps']}' must be a positive number, got {_show(eps)}")
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        problems.append(f"'architectures' must be a list of class names (strings), got {_show(archs)}")
    if problems:
        raise ModelError("inconsistent config", where=where, problems=problems)
    if fam.head_dim_from_hidden or head_dim is None:
        if hidden % heads:
            problems.append(f"'{c['hidden']}' ({hidden}) is not divisible by '{c['heads']}' ({heads})")
        head_dim = hidden // heads
    if heads % kv_heads:
        problems.append(f"'{c['heads']}' ({heads}) is not divisible by '{c['kv_heads']}' ({kv_heads})")
    if problems:
        raise ModelError("inconsistent config", where=where, problems=problems)
    prefix = next((p for p in fam.prefixes if p + fam.anchor in keys), None)
    if prefix is None:
        raise CheckpointError(f"no '{fam.anchor}' tensor (with any of the prefixes "
                              f"{', '.join(repr(p) for p in fam.prefixes)}): not a {fam.name} checkpoint", where=where)
    found = _layer_indices(keys, prefix, fam.layer)
    if len(found) != layers or found != set(range(layers)):  # the length first: never build a huge range
        held = f"{len(found)} blocks" + (f" ({min(found)}..{max(found)})" if found else "")
        raise CheckpointError(f"config.json: '{c['layers']}' is {layers}, but the checkpoint holds {held}",
                              where=where, hint=f"Set '{c['layers']}' to the number of blocks the weights hold, "
                              "or use the config.json saved with these weights.")
    per_layer = {}
    for name in c.get("per_layer") or []:
        v = config.get(name)
        if v is not None:
            ints = name in fam.derived_per_layer  # SmolLM3's no_rope_layers holds 0/1 per layer
            if not isinstance(v, list) or len(v) != layers or not all(_is_int(x) if ints else isinstance(x, str)
                                                                      for x in v):
                problems.append(f"'{name}' must be a list of {layers} {'integers' if ints else 'strings'} (one per "
                                f"layer), got {_show(v)}")
            else:
                per_layer[name] = list(v)
        elif name in fam.derived_per_layer:  # SmolLM3's no_rope_layers: 0 every `interval` layers, as transformers
            rule = fam.derived_per_layer[name]  # derives it; written out so that deepening keeps each layer's own
            n = config.get(rule["interval"], rule["default"])
            if not (_is_int(n) and n > 0):
                problems.append(f"'{rule['interval']}' must be a positive integer, got {_show(n)}")
            else:
                per_layer[name] = [int((i + 1) % n != 0) for i in range(layers)]
    if "layer_types" not in per_layer:
        derived = derive_layer_types(config, fam, layers, problems)
        if derived is not None:
            per_layer["layer_types"] = derived
    experts, top_k, shared = moe_sizes(config, fam, problems) if fam.moe else (0, 0, 0)
    if problems:
        raise ModelError("inconsistent config", where=where, problems=problems)
    head_keys = set(fam.head)
    if archs:  # what transformers will build decides whether a (possibly tied) head reads the stream
        has_head = bool(head_keys) and any(a.endswith(fam.head_architectures) for a in archs)
    else:
        has_head = bool(head_keys) and (prefix != "" or any(k.rstrip("?") in keys for k in head_keys))
    head_kind = next((h for h in fam.task_heads if any(a.endswith(h) for a in archs or ())), "")
    labels = 0
    if head_kind:  # a task head: its rows are the labels (config.json's id2label, else num_labels, else 2)
        id2label = config.get("id2label")
        labels = len(id2label) if isinstance(id2label, dict) and id2label else config.get("num_labels", 2)
        if not (_is_int(labels) and labels > 0):
            raise ModelError("inconsistent config", where=where,
                             problems=[f"'num_labels' must be a positive integer, got {_show(labels)}"])
    renamed = {}  # old checkpoints (BERT's LayerNorm.gamma/beta): read under the old name, written under the new
    for k in keys:
        for old_end, new_end in fam.renamed.items():
            if k.endswith(old_end):
                renamed[k[: -len(old_end)] + new_end] = k
    return Arch(fam, prefix, hidden, intermediate, layers, heads, kv_heads, head_dim, tied, vocab,
                get("positions", 0), get("types", 0), per_layer, float(eps) if eps is not None else None, has_head,
                tuple(sorted(k for k in keys if fam.dropped and k.endswith(fam.dropped))), labels, head_kind,
                renamed, experts, top_k, shared)



def moe_sizes(config: dict, fam: Family, problems: list[str]) -> tuple[int, int, int]:
    """(experts, top-k, shared expert size) of a mixture-of-experts config (family ``moe``)."""
    moe = fam.moe
    name = next((n for n in moe["experts"] if config.get(n) is not None), moe["experts"][0])
    experts, top_k = config.get(name), config.get(moe["top_k"])
    shared = config.get(moe["shared"], 0) if moe.get("shared") else 0
    for n, v, least in ((name, experts, 1), (moe["top_k"], top_k, 1), (moe.get("shared"), shared, 0)):
        if n and not (_is_int(v) and v >= least):
            problems.append(f"'{n}' must be a {'positive' if least else 'non-negative'} integer, got {_show(v)}")
    if not problems and top_k > experts:
        problems.append(f"'{moe['top_k']}' ({top_k}) is larger than '{name}' ({experts})")
    if not problems and experts > MAX_LAYERS:
        problems.append(f"'{name}' ({experts}) is beyond the {MAX_LAYERS} experts n2n plans for")
    for n, want in (moe.get("requires") or {}).items():
        if config.get(n, want) != want:
            problems.append(f"'{n}' is {_show(config.get(n))}: n2n grows {fam.name} models only with every layer a "
                            f"mixture of experts ({', '.join(f'{k} {_show(v)}' for k, v in moe['requires'].items())})")
    return (experts, top_k, shared) if not problems else (0, 0, 0)


def check_hf_checkpoint(source, arch: Arch) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Every missing, unexpected or mis-shaped tensor at once; returns the header."""
    if arch.renamed:  # an old checkpoint's names (BERT's LayerNorm.gamma): read under today's names from here on
        source.rename(arch.renamed)
    expected, keys, problems = arch.tensors(), set(source.keys()), []
    for key, spec in expected.items():
        if key not in keys:
            if not spec.optional:
                problems.append(f"missing tensor '{key}'" + (f" (expected shape {list(spec.shape)})" if spec.shape else ""))
        elif spec.shape is not None and source.shape(key) != spec.shape:
            problems.append(f"tensor '{key}' has shape {list(source.shape(key))}, config.json implies {list(spec.shape)}")
    for key in sorted(keys - set(expected)):
        if key.endswith(arch.family.dropped):
            continue  # transformers ignores these on load (Arch.dropped); so does n2n
        problems.append(f"unexpected tensor '{key}' (shape {list(source.shape(key))}), not part of the "
                        f"{arch.family.name} layout")
    if problems:
        raise CheckpointError(f"the checkpoint does not match its config.json ({len(problems)} problem"
                              f"{'s' * (len(problems) > 1)})", where=str(source.path), problems=problems[:50])
    return {k: (source.dtype(k), source.shape(k)) for k in expected if k in keys}
