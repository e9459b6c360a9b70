"""Hugging Face transformer checkpoints: families as data, and growth planning.

A family (``n2n_cli/families/*.yaml``) names every tensor by template and says which space
each axis lives in (hidden = the residual stream, mlp, heads, kv_heads; per layer for all
but hidden). A growth step picks a mapping g for each affected space, and every axis
labelled with that space is transformed by the same generic code as for MLP/CNNs.
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

from .errors import CheckpointError, ModelError, StepError
from .limits import MAX_LAYERS, MAX_PLANNED_BYTES, MAX_WIDTH as MAX_SIZE
from .layers import Axis
from .planner import (Copied, Kept, Load, Mapping, Op, PlannedStep, RecipePlan, check_larger, plan_steps, rebuild,
                      widen_spaces)
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
                     d.get("moe") or {}, tuple(d.get("eps_readers") or ()))
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


# ----------------------------------------------------------------------------- planning


@dataclass
class HFPlan(RecipePlan):
    """A Hugging Face model's plan: the recipes, and the architecture (and config) before and after."""

    seed: int
    config: dict
    arch_before: Arch
    arch_after: Arch
    steps: list[PlannedStep]
    recipes: dict[str, list[Op]]
    dtypes: dict[str, torch.dtype]
    shapes: dict[str, tuple[int, ...]]
    present_before: set[str]
    problems: list[tuple[int, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    config_out: dict | None = None  # the config a step rewrote (an upcycle changes the model type), else None
    mapping_of: dict[int, str] = field(default_factory=dict)  # step index -> intermediate_size mapping used

    @property
    def params_before(self) -> int:
        return self.arch_before.num_parameters(self.present_before)

    @property
    def params_after(self) -> int:
        return self.arch_after.num_parameters(set(self.recipes))

    def new_config(self) -> dict:
        return self.arch_after.to_config(self.config if self.config_out is None else self.config_out)

    def to_dict(self) -> dict:
        return {"seed": self.seed, "family": self.arch_before.family.name, "params_before": self.params_before,
                "params_after": self.params_after, "function_preserving": self.function_preserving,
                "config_changes": {k: v for k, v in self.new_config().items() if self.config.get(k) != v},
                "steps": [s.to_dict() for s in self.steps], **({"notes": self.notes} if self.notes else {})}


def build_hf_plan(config: dict, arch: Arch, header: dict, steps: list[HFStepEntry], seed: int, *,
                  collect: bool = False, numbers: list[int] | None = None) -> HFPlan:
    specs = arch.tensors()
    recipes = {k: [Load(k)] for k in specs if k in header}
    plan = HFPlan(seed, config, arch, arch, [], recipes, {k: header[k][0] for k in recipes},
                  {k: tuple(header[k][1]) for k in recipes}, set(recipes))
    plan_steps(plan, steps, _plan_step, lambda e: f"{e.kind} {_label(e)}", collect=collect, numbers=numbers)
    total = plan_bytes(plan)
    if total > MAX_PLANNED_BYTES and not plan.problems:
        err = StepError(f"the planned output is about {human_bytes(total)} ({total:,} bytes), beyond the "
                        f"{human_bytes(MAX_PLANNED_BYTES)} n2n writes", hint="Choose smaller sizes.")
        if not collect:
            raise err
        plan.problems.append((numbers[-1] if numbers else len(steps) - 1, err.message))
    dropped = arch.dropped
    if dropped:
        plan.notes.append(f"dropped {len(dropped)} tensor(s) that transformers ignores on load "
                          f"({', '.join(sorted({k.rsplit('.', 2)[-2] + '.' + k.rsplit('.', 1)[-1] for k in dropped}))}"
                          f", e.g. '{dropped[0]}'): not part of the grown checkpoint")
    if arch.renamed:
        new, old = min(arch.renamed.items())
        plan.notes.append(f"renamed {len(arch.renamed)} tensor(s) of an old checkpoint to the names transformers "
                          f"writes today ({', '.join(f'{o} -> {n}' for o, n in arch.family.renamed.items())}, e.g. "
                          f"'{old}' -> '{new}')")
    if "layer_types" in arch.per_layer and "layer_types" not in config:
        plan.notes.append("config.json has no layer_types: writing the per-layer attention types transformers "
                          "derives for the teacher, so the grown model keeps its attention windows")
    return plan


def _plan_step(plan: HFPlan, index: int, entry: HFStepEntry) -> None:
    if entry.upcycle:  # dense to mixture of experts
        from .hf_moe import plan_upcycle

        plan_upcycle(plan, index, entry)
    else:
        (_plan_widen if entry.widen else _plan_deepen)(plan, index, entry)


def plan_bytes(plan: HFPlan) -> int:
    """Bytes of tensor data the plan writes (safetensors headers aside)."""
    return sum(math.prod(plan.shapes[k]) * plan.dtypes[k].itemsize for k in plan.recipes)


def human_bytes(n: int) -> str:
    for unit, size in (("TB", 10 ** 12), ("GB", 10 ** 9), ("MB", 10 ** 6), ("KB", 10 ** 3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def _label(entry: HFStepEntry) -> str:
    s = entry.step
    if entry.upcycle:
        return f"to {s.experts} experts, top {s.top_k}"
    if entry.widen:
        return s.dim
    return f"to {s.layers} layers" if s.layers else f"after {s.after}"


def _plan_widen(plan: HFPlan, index: int, entry: HFStepEntry) -> None:
    step: HFWidenStep = entry.widen
    a = plan.arch_after
    fam, cname = a.family, a.family.config
    mappings: dict[str, Mapping] = {}
    if step.dim == "intermediate_size":
        new = step.new_size(a.intermediate)
        _check_larger(new, a.intermediate, cname["intermediate"], step.factor)
        kind = plan.mapping_of[index] = step.mapping or ("tile" if new % a.intermediate == 0 else "random")
        for i in range(a.layers):
            mappings[f"mlp@{i}"] = Mapping(kind, a.intermediate, new, (plan.seed, index, i) if kind == "random" else ())
            for e in range(a.experts):  # mixtures of experts: an independent mapping per expert
                mappings[f"mlp@{i}.{e}"] = Mapping(kind, a.intermediate, new,
                                                   (plan.seed, index, i, e) if kind == "random" else ())
        after = replace(a, intermediate=new)
        how = (f"tile mapping: every unit copied x{new // a.intermediate}" if kind == "tile" and new % a.intermediate == 0
               else f"{kind} mapping")
        summary = (f"intermediate_size {a.intermediate} -> {new} (Net2WiderNet on every "
                   + (f"expert's MLP, {a.experts} per layer, {cname['intermediate']}; routers unchanged"
                      if a.experts else "MLP") + f"; {how})")
    elif step.dim == "hidden_size":
        new = step.new_size(a.hidden)
        _check_larger(new, a.hidden, cname["hidden"], step.factor)
        r, pad = divmod(new, a.hidden)
        if pad and fam.pad_refused:
            raise StepError(f"to: {new} is not an integer multiple of hidden_size {a.hidden}; {fam.pad_refused}",
                            hint=f"Use a multiple of {a.hidden}, e.g. {2 * a.hidden}.", short="integer multiples only")
        readers = sorted({k.rsplit(".", 2)[-2] for k in plan.recipes if fam.eps_readers and k.endswith(fam.eps_readers)})
        if pad and readers:
            raise StepError(
                f"to: {new} is not an integer multiple of hidden_size {a.hidden}; a zero-padded stream needs RMSNorm's "
                f"{cname['eps']} scaled, but {' and '.join(readers)} (over head_dim) read the same {cname['eps']}, so "
                "padding cannot be exact", hint=f"Use a multiple of {a.hidden}, e.g. {2 * a.hidden}.",
                short="integer multiples only: per-head norms share the eps")
        if pad and (fam.norm_kind != "rms" or fam.head_dim_from_hidden or a.eps is None):
            raise StepError(
                f"to: {new} is not an integer multiple of hidden_size {a.hidden}; {fam.name} uses LayerNorm, whose "
                "mean over a zero-padded stream would change, so n2n widens its residual stream exactly only by "
                "tiling it an integer number of times", hint=f"Use a multiple of {a.hidden}, e.g. {2 * a.hidden}.",
                short="integer multiples only" + (": LayerNorm" if fam.norm_kind == "layer" else ""))
        if pad:
            # LEMON: stream [x, .., x, 0]; mean square shrinks by s = r*D/D', so RMSNorm's gamma
            # gets sqrt(s) and its eps gets s: exact
            s = r * a.hidden / new
            mappings["hidden"] = Mapping("tile", a.hidden, new, pad=pad, norm_scale=math.sqrt(s))
            after = replace(a, hidden=new, eps=a.eps * s)
            summary = (f"hidden_size {a.hidden} -> {new} (residual stream tiled x{r} plus {pad} zero units; "
                       f"RMSNorm gamma x sqrt({s:.4g}), {cname['eps']} {a.eps:g} -> {a.eps * s:.4g}")
        else:
            mappings["hidden"] = Mapping("tile", a.hidden, new)
            after = replace(a, hidden=new)
            summary = f"hidden_size {a.hidden} -> {new} (residual stream tiled x{r}"
        c = math.sqrt(a.hidden / new) if fam.embed_scale == "sqrt_hidden" else 1.0
        if c != 1.0:  # the model multiplies embeddings by sqrt(hidden_size): store them times sqrt(old/new)
            mappings["hidden"] = replace(mappings["hidden"], embed_scale=c)
            summary += f"; embeddings x sqrt({a.hidden}/{new}) against the sqrt(hidden_size) scale"
        if fam.head_dim_from_hidden:  # head_dim = hidden / heads: keep head_dim by tiling the heads too
            for i in range(a.layers):
                mappings[f"heads@{i}"] = Mapping("tile", a.heads, a.heads * r)
            after = replace(after, heads=a.heads * r, kv_heads=a.kv_heads * r)
            summary += f"; {cname['heads']} {a.heads} -> {a.heads * r} to keep head_dim {a.head_dim}"
        summary += ")"
        if a.tied and a.has_head:
            summary += f"; tied embeddings: final norm scaled by 1/{r}" + (f" and by sqrt({new}/{a.hidden})" if c != 1.0
                                                                          else "")
    elif step.dim == "num_attention_heads":
        if fam.head_dim_from_hidden:
            raise StepError(
                f"{fam.name}'s config ties the head count to the hidden size (head_dim = {cname['hidden']} / "
                f"{cname['heads']}), so heads cannot be added alone without changing head_dim",
                hint="Widen hidden_size by an integer factor instead: it adds heads by the same factor and keeps "
                     "head_dim.")
        new = step.new_size(a.heads)
        _check_larger(new, a.heads, cname["heads"], step.factor)
        g = a.heads // a.kv_heads
        if fam.projection_norms and new % a.heads:
            raise StepError(f"to: {new} is not a multiple of {cname['heads']} {a.heads}; {fam.projection_norms}",
                            hint=f"Use a multiple of {a.heads}, e.g. {2 * a.heads}.", short="whole multiples only")
        if new % g:
            raise StepError(f"to: {new} is not a multiple of the query group size {g} ({cname['heads']} "
                            f"{a.heads} / {cname['kv_heads']} {a.kv_heads}); heads are added in whole groups so "
                            "that every query head keeps reading the same key/value head",
                            hint=f"Use a multiple of {g}.")
        kv = Mapping("tile", a.kv_heads, new // g)
        for i in range(a.layers):
            mappings[f"kv_heads@{i}"] = kv
            mappings[f"heads@{i}"] = Mapping("grouped", a.heads, new, group=g, base=kv)
        after = replace(a, heads=new, kv_heads=new // g)
        summary = f"num_attention_heads {a.heads} -> {new}, num_key_value_heads {a.kv_heads} -> {new // g} " \
                  f"(whole heads copied, head_dim {a.head_dim} kept)"
    else:  # num_key_value_heads
        if "kv_heads" not in cname:
            raise StepError(f"{fam.name} has no separate key/value heads", hint="Use num_attention_heads.")
        new = step.new_size(a.kv_heads)
        _check_larger(new, a.kv_heads, cname["kv_heads"], step.factor)
        if new % a.kv_heads or a.heads % new:
            raise StepError(f"to: {new} must be a multiple of the current {a.kv_heads} key/value heads and divide "
                            f"{cname['heads']} {a.heads}, so that every query head keeps reading a copy of its "
                            "key/value head", hint="Choose a divisor of the query head count.")
        for i in range(a.layers):
            mappings[f"kv_heads@{i}"] = Mapping("spread", a.kv_heads, new)
        after = replace(a, kv_heads=new)
        summary = f"num_key_value_heads {a.kv_heads} -> {new} (each key/value head repeated)"
    before = plan.arch_after.num_parameters(set(plan.recipes))
    labels = {key: [(ax, part) for ax, axis in enumerate(spec.axes) if axis is not None for part in (axis.parts or (axis,))]
              for key, spec in a.tensors().items() if key in plan.recipes}
    changes = widen_spaces(plan, index, labels, mappings, noise=step.noise,
                           describe=lambda ax, axis: f"axis {ax}: {axis.space.split('@')[0]} {axis.role}")
    plan.steps.append(PlannedStep(index, entry, summary, True, changes, before, after.num_parameters(set(plan.recipes))))
    plan.arch_after = after

def _check_larger(new: int, old: int, name: str, factor: float | None = None) -> None:
    check_larger(new, old, f"{name} {old}", factor)
    if new > MAX_SIZE:
        raise StepError(f"{'to' if factor is None else 'factor'}: the new {name} {new:,} is beyond the "
                        f"{MAX_SIZE:,} n2n plans for", hint="Choose a realistic size.")


def _block_bytes(plan: HFPlan, layer: int) -> int:
    head = plan.arch_after.prefix + plan.arch_after.family.layer.format(i=layer)
    return sum(math.prod(plan.shapes[k]) * plan.dtypes[k].itemsize for k in plan.recipes if k.startswith(head))


def _check_depth(plan: HFPlan, layers: int) -> None:
    """Refuse absurd depths before any per-layer list is built, saying the planned output size."""
    if layers <= MAX_LAYERS:
        return
    a = plan.arch_after
    per_block = max(_block_bytes(plan, i) for i in range(a.layers))
    total = plan_bytes(plan) + (layers - a.layers) * per_block
    raise StepError(f"{layers:,} layers would make a checkpoint of about {human_bytes(total)} ({total:,} bytes: "
                    f"{human_bytes(per_block)} per block); n2n plans at most {MAX_LAYERS:,} layers",
                    hint="Choose a realistic number of layers.", short="too many layers")


def _plan_deepen(plan: HFPlan, index: int, entry: HFStepEntry) -> None:
    step: HFDeepenStep = entry.deepen
    a = plan.arch_after
    fam, L = a.family, a.layers
    exact = fam.norm == "pre"
    if not exact and not step.allow_approximate:
        raise StepError(
            f"{fam.name} is post-LN (LayerNorm after each residual add), so a block with zeroed output "
            "projections computes LayerNorm(h + 0), not h: deepening cannot be exact",
            hint="Add allow_approximate: true to the step to grow anyway; the deviation is measured and reported.",
            flags={"allow_approximate: true to the step": "--allow-approximate"})
    if plan.config.get("scale_attn_by_inverse_layer_idx"):
        raise StepError("scale_attn_by_inverse_layer_idx is set: attention scales depend on the layer index, so "
                        "inserting blocks would change the layers after them")
    if step.after is not None:
        bad = [i for i in step.after if not 0 <= i < L]
        if bad:
            raise StepError(f"after: layer indices {bad} are out of range 0..{L - 1}")
        _check_depth(plan, L + len(step.after))
        after = sorted(step.after)
    else:
        if step.layers <= L:
            raise StepError(f"layers: {step.layers} is not larger than the current {L} layers",
                            hint=f"Use a value above {L}.")
        _check_depth(plan, step.layers)
        m = step.layers - L
        # interleave: layer i gets floor((i+1)m/L) - floor(im/L) new blocks after it, i.e. one after
        # every L/m layers (LLaMA Pro); several after each layer when m > L
        after = ([i for i in range(L) for _ in range((i + 1) * m // L - i * m // L)]
                 if step.placement == "interleave" else [L - 1] * m)
    order: list[tuple[int, bool]] = []
    for i in range(L):
        order.append((i, False))
        order += [(i, True)] * after.count(i)
    new_arch = replace(a, layers=len(order),
                       per_layer={k: [v[i] for i, _ in order] for k, v in a.per_layer.items()})
    layer_key = a.prefix + fam.layer

    def block_key(i: int, name: str) -> str:
        return layer_key.format(i=i) + name

    block_names = a.block_names(fam.block)
    zeroed = set(a.block_names(fam.block_outputs))
    new_specs = new_arch.tensors()
    origins = {key: Kept(key) for key in new_specs  # tensors outside the blocks keep their recipes
               if key in plan.recipes and not key.startswith(layer_key.split("{")[0])}
    for n, (i, is_new) in enumerate(order):
        for name in block_names:
            src, dst = block_key(i, name), block_key(n, name)
            if src not in plan.recipes:
                continue
            origins[dst] = (Kept(src) if not is_new else
                            Copied(src, f"zero (output projection of a copy of layer {i})", zero=True) if name in zeroed
                            else Copied(src, f"copy of layer {i}"))
    before = plan.arch_after.num_parameters(set(plan.recipes))
    changes = rebuild(plan, index, {k: origins[k] for k in new_specs if k in origins})
    where = "interleaved" if step.layers and step.placement == "interleave" else "inserted"
    summary = (f"num_hidden_layers {L} -> {len(order)}: {len(order) - L} blocks {where} after layers {after}, "
               f"each a copy of the block before it with zeroed output projections"
               + ("" if exact else " (APPROXIMATE: post-LN)"))
    plan.steps.append(PlannedStep(index, entry, summary, exact, changes, before,
                                  new_arch.num_parameters(set(plan.recipes))))
    plan.arch_after = new_arch
