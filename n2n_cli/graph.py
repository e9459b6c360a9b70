"""Trace the user's module (torch.fx) and find its spaces: groups of tensor axes that must be
widened together with one mapping g.

A space is born at each conv/linear output (its out-channels / out-features). Per-channel ops
(norms, activations, pooling, dropout, depthwise convs) carry it; a residual add merges the
spaces of its operands (union-find); a concat on the feature axis makes a value whose feature
axis is a list of segments (a space each, at an offset); flatten/view over (C, H, W) gives
channel-major blocks of H*W features. Each conv/linear reading a value is a reader of its
spaces (the ``in`` role: copies divided by the copy count). An add whose operands are segmented
differently (a conv's output plus a concatenation) refines the spaces into common pieces, so
each region of the conv follows its tower. Norms that compute statistics over the widened axis
(LayerNorm, GroupNorm, their functional forms) allow only an integer factor, every segment by the
same one (``ties``); GroupNorm keeps num_groups, so each channel is repeated in place ("spread").
Anything the tracer cannot see through freezes the spaces it touches, with the reason, so a widen
there is refused.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field, replace

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from .errors import UserError
from .layers import Axis


class TraceError(UserError):
    """The model cannot be traced with torch.fx (or run on the example input)."""


# ----------------------------------------------------------------------------- what carries a space

CARRY_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Hardswish,
                 nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity,
                 nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                 nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Upsample)
NORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d)
CARRY_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.gelu, F.silu, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh,
                   F.hardtanh, F.leaky_relu, F.elu, F.hardswish, F.mish, F.dropout, F.max_pool2d, F.avg_pool2d,
                   F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.adaptive_avg_pool1d,
                   F.interpolate, torch.clone, torch.abs, torch.sqrt, torch.rsqrt, torch.pow, operator.pow,
                   torch.exp, operator.neg, torch.neg, torch.square}
CARRY_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "float", "detach", "abs", "to", "expand",
                 "pow", "sqrt", "rsqrt", "exp", "neg", "square", "type_as"}
BINARY_FUNCTIONS = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
                    operator.truediv, torch.add, torch.sub, torch.mul, torch.div}
BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
REDUCE = {"mean", "sum", "amax"}


@dataclass
class Use:
    """One tensor axis (or a region of it, for concatenated features) that lives in a space."""

    key: str
    ax: int
    role: str  # out | in | norm
    block: int = 1
    offset: int = 0  # in elements along the axis
    span: int = 0  # elements; 0: the whole axis
    segments: int = 1  # fused q|k|v: the axis holds 3 copies of the space

    def axis(self, space: str) -> Axis:
        pad = "normal" if self.role != "norm" else ("one" if self.key.endswith((".weight", ".running_var")) else "zero")
        if self.role == "out" and self.key.endswith(".bias"):
            pad = "bias"
        return Axis(space, self.role, self.block, pad=pad, segments=self.segments, offset=self.offset, span=self.span)


@dataclass
class Space:
    id: int
    width: int
    producers: list[str] = field(default_factory=list)  # modules whose output this is (conv/linear)
    readers: list[str] = field(default_factory=list)
    followers: list[str] = field(default_factory=list)  # norms and depthwise convs
    uses: list[Use] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)  # why it cannot be widened
    tile_only: list[str] = field(default_factory=list)  # why only integer factors (tiling) are exact: LayerNorm
    spread_only: list[str] = field(default_factory=list)  # why each unit must be repeated in place: GroupNorm
    ties: list[int] = field(default_factory=list)  # spaces that widen with it by the same integer factor


@dataclass(frozen=True)
class Seg:
    space: int
    block: int = 1


@dataclass(frozen=True)
class Feat:
    """The feature axis of a traced value: dim, and its segments (concatenated spaces)."""

    dim: int
    segs: tuple[Seg, ...]


class SpaceGraph:
    """Union-find over spaces, filled by ``trace_spaces``."""

    def __init__(self):
        self.spaces: dict[int, Space] = {}
        self.parent: dict[int, int] = {}
        self.module_out: dict[str, int] = {}  # producer module -> its output space
        self.producer_modules: dict[str, str] = {}  # module name -> type name
        self.heads: dict[str, int] = {}  # attention module name -> its heads space (units: heads)
        self.heads_refusal: dict[str, str] = {}  # attention module -> why its heads cannot be widened alone
        self.tuple_outs: dict = {}  # fx node of nn.MultiheadAttention -> the features of its output [0]
        self.split: dict[int, list[int]] = {}  # a space refined into consecutive pieces (see ``refine``)

    def new(self, width: int, producer: str | None = None, frozen: str | None = None) -> int:
        i = len(self.parent)
        self.parent[i] = i
        self.spaces[i] = Space(i, width, [producer] if producer else [], frozen=[frozen] if frozen else [])
        return i

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def space(self, i: int) -> Space:
        return self.spaces[self.find(i)]

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        if b < a:
            a, b = b, a
        sa, sb = self.spaces[a], self.spaces.pop(b)
        self.parent[b] = a
        for name in ("producers", "readers", "followers", "uses", "frozen", "tile_only", "spread_only", "ties"):
            getattr(sa, name).extend(x for x in getattr(sb, name) if x not in getattr(sa, name))

    def freeze(self, feat: "Feat | None", why: str) -> None:
        if feat is None:
            return
        for s in self.resolve(feat).segs:
            sp = self.space(s.space)
            if why not in sp.frozen:
                sp.frozen.append(why)

    def pieces(self, i: int) -> list[int]:
        """The root spaces that space ``i`` is made of now: itself, or its pieces once refined."""
        r = self.find(i)
        return [q for p in self.split[r] for q in self.pieces(p)] if r in self.split else [r]

    def resolve(self, feat: "Feat | None") -> "Feat | None":
        """``feat`` with every refined space replaced by its pieces (a value traced before the refinement)."""
        if feat is None or not any(self.find(s.space) in self.split for s in feat.segs):
            return feat
        return Feat(feat.dim, tuple(Seg(p, s.block) for s in feat.segs for p in self.pieces(s.space)))

    def refine(self, i: int, widths: list[int]) -> bool:
        """Split space ``i`` into consecutive pieces of ``widths`` units: a producer whose output is added
        to a concatenation widens each region with that tower's mapping. Every use of the space becomes
        one use per piece, at the piece's offset. False (nothing done) where a use cannot be split."""
        r = self.find(i)
        sp = self.spaces[r]
        assert sum(widths) == sp.width and len(widths) > 1
        if sp.ties or any(u.segments > 1 for u in sp.uses) or any(self.find(h) == r for h in self.heads.values()):
            return False
        ids = [self.new(w) for w in widths]
        start = 0
        for p, w in zip(ids, widths):
            q = self.spaces[p]
            for name in ("producers", "readers", "followers", "frozen", "tile_only", "spread_only"):
                setattr(q, name, list(getattr(sp, name)))
            q.uses = [replace(u, offset=u.offset + start * u.block, span=w * u.block) for u in sp.uses]
            start += w
        if sp.tile_only:  # a norm over the whole space: its pieces grow by one factor together
            for p in ids[1:]:
                self.spaces[ids[0]].ties.append(p)
                self.spaces[p].ties.append(ids[0])
        del self.spaces[r]
        self.split[r] = ids
        return True

    def roots(self) -> list[Space]:
        return [self.spaces[i] for i in sorted(self.spaces)]

    def width(self, seg: Seg) -> int:
        return sum(self.spaces[p].width for p in self.pieces(seg.space)) * seg.block


# ----------------------------------------------------------------------------- tracing


@dataclass(frozen=True)
class AttentionParts:
    """A multi-head attention module n2n knows the layout of (traced as one leaf).

    kind ``mha``: ``nn.MultiheadAttention`` (packed ``in_proj_weight`` q|k|v, ``out_proj``; its
    heads x head_dim is its embed_dim, so its heads only grow with the stream it reads).
    kind ``fused``: a user module with an int ``num_heads`` and two Linear children, qkv
    (out = 3 x inner, laid out (3, heads, head_dim)) and the output projection (in = inner).
    kind ``split``: ``num_heads`` and four Linear children, q, k, v (out = inner, laid out
    (heads, head_dim)) and the output projection.
    """

    kind: str
    qkv: tuple[str, ...]  # relative names of the input projections ('' + in_proj_* for mha)
    proj: str
    heads: int
    head_dim: int


def attention_parts(mod: nn.Module) -> AttentionParts | None:
    if isinstance(mod, nn.MultiheadAttention):  # add_bias_kv: bias_k/bias_v (1, 1, E) follow the heads
        if not mod._qkv_same_embed_dim:  # kdim/vdim: q, k and v have their own weights (E x E, E x kdim, E x vdim)
            return AttentionParts("mha", ("q_proj_weight", "k_proj_weight", "v_proj_weight"), "out_proj",
                                  mod.num_heads, mod.head_dim)
        return AttentionParts("mha", ("",), "out_proj", mod.num_heads, mod.head_dim)
    heads = getattr(mod, "num_heads", None)
    if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
        return None
    kids = list(mod.named_children())
    if not kids or not all(isinstance(m, nn.Linear) for _, m in kids):
        return None
    if len(kids) == 2:
        (a, la), (b, lb) = kids
        inner = lb.in_features
        if la.out_features == 3 * inner and inner % heads == 0:
            return AttentionParts("fused", (a,), b, heads, inner // heads)
    if len(kids) == 4:
        *qkv, (b, lb) = kids
        inner = lb.in_features
        if all(m.out_features == inner for _, m in qkv) and inner % heads == 0:
            return AttentionParts("split", tuple(n for n, _ in qkv), b, heads, inner // heads)
    return None


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with known attention modules kept as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return attention_parts(m) is not None or super().is_leaf_module(m, qualname)


def trace(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """torch.fx symbolic trace plus shapes from one forward on ``example``."""
    model.eval()  # growth and verification are in eval mode (batchnorm running statistics, no dropout)
    try:
        tracer = _Tracer()
        graph = tracer.trace(model)
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as e:
        raise TraceError(f"torch.fx cannot trace the model: {type(e).__name__}: {str(e).splitlines()[0]}",
                         hint="Data-dependent control flow (if/for on tensor values) cannot be traced: move it into "
                              "a submodule, or write the forward without it.") from None
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example)
    except Exception as e:
        raise TraceError(f"the model does not run on an example input of shape {list(example.shape)}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0]}",
                         hint="Give the input shape: example_input: {shape: [1, C, H, W]} in the spec, or "
                              "--example-input 1,C,H,W.") from None
    return gm


def _shape(node) -> tuple[int, ...] | None:
    tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def _nodes(arg) -> list[fx.Node]:
    out = []
    fx.node.map_arg(arg, out.append)
    return out


def _dims(arg, ndim: int) -> list[int]:
    dims = arg if isinstance(arg, (list, tuple)) else [arg]
    return [d % ndim for d in dims]


class _Feats(dict):
    """fx node -> its features, read back with refined spaces replaced by their pieces."""

    def __init__(self, g: SpaceGraph):
        super().__init__()
        self.g = g

    def get(self, key, default=None):
        return self.g.resolve(super().get(key, default))


def trace_spaces(model: nn.Module, gm: fx.GraphModule) -> SpaceGraph:
    g = SpaceGraph()
    modules = dict(model.named_modules())
    feats = _Feats(g)
    in_axes: dict[tuple[str, int], Feat] = {}  # a weight axis already read: a second call must agree

    def record(key: str, ax: int, role: str, feat: Feat, who: str) -> None:
        feat = g.resolve(feat)
        prev = in_axes.get((key, ax))
        if prev is not None:
            _align(g, prev, feat, f"module '{who}' is called on differently shaped features")
            return
        in_axes[(key, ax)] = feat
        total = sum(g.width(s) for s in feat.segs)
        offset = 0
        for s in feat.segs:
            w = g.width(s)
            sp = g.space(s.space)
            sp.uses.append(Use(key, ax, role, s.block, offset if len(feat.segs) > 1 else 0,
                               w if len(feat.segs) > 1 else 0))
            lst = {"in": sp.readers, "norm": sp.followers, "out": sp.followers}[role]
            if who not in lst:
                lst.append(who)
            offset += w
        assert offset == total

    for node in gm.graph.nodes:
        shape = _shape(node)
        args = node.args
        first = feats.get(args[0]) if args and isinstance(args[0], fx.Node) else None
        what = _describe(node, modules)
        if node.op == "placeholder":
            feats[node] = Feat(1, (Seg(g.new(shape[1], frozen="these are the network's input channels")),)) \
                if shape and len(shape) >= 2 else None
        elif node.op == "get_attr":  # a parameter read in forward (class token, position embedding, ...)
            feats[node] = None
            if shape and shape[-1] > 1 and node.users and isinstance(_attr(model, node.target), nn.Parameter):
                feats[node] = Feat(len(shape) - 1, (Seg(g.new(shape[-1])),))
                record(node.target, len(shape) - 1, "out", feats[node], node.target)
        elif node.op == "output":
            for n in _nodes(args):
                g.freeze(feats.get(n), "its output reaches the network output")
        elif node.op == "call_module" and attention_parts(modules[node.target]) is not None:
            feats[node] = _attention(g, node, modules[node.target], node.target, first, feats, record, what)
        elif node.op == "call_module":
            feats[node] = _module(g, node, modules[node.target], node.target, first, shape, record, what)
            for n in _nodes(args)[1:]:
                g.freeze(feats.get(n), f"its output is an extra input of {what}, which n2n cannot see through")
        else:
            feats[node] = _function(g, node, first, shape, feats, what)
    return g


def _attr(model: nn.Module, target: str):
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _attention(g: SpaceGraph, node, mod: nn.Module, name: str, feat: Feat | None, feats, record, what) -> Feat | None:
    """A known attention leaf: reads the stream (q, k, v projections), has a heads space
    (units: heads, blocks of head_dim) and writes a new space (the output projection)."""
    parts = attention_parts(mod)
    if parts.kind == "mha":
        return _mha(g, node, mod, name, parts, feats, record, what)
    tensors = [n for n in _nodes(node.args) + _nodes(node.kwargs) if _shape(n) is not None or n in feats]
    ins = [a for a in node.args if isinstance(a, fx.Node)] + [v for v in node.kwargs.values() if isinstance(v, fx.Node)]
    self_attention = len(set(ins)) == 1
    x = ins[0] if ins else None
    in_shape = _shape(x)
    if not self_attention or feat is None or in_shape is None or feat.dim != len(in_shape) - 1 or len(feat.segs) != 1:
        why = (f"{what} is not self-attention on one input" if not self_attention else
               f"{what} reads features n2n does not track on its last axis")
        for n in tensors:
            g.freeze(feats.get(n), why)
        feat = None
    heads = g.new(parts.heads)
    g.heads[name] = heads
    hd = parts.head_dim
    ndim = len(in_shape)
    sp = g.space(heads)
    for q in parts.qkv:
        lin = getattr(mod, q)
        if feat is not None:
            record(f"{name}.{q}.weight", 1, "in", feat, f"{name}.{q}")
        segs = 3 if parts.kind == "fused" else 1
        sp.uses.append(Use(f"{name}.{q}.weight", 0, "out", hd, segments=segs))
        if lin.bias is not None:
            sp.uses.append(Use(f"{name}.{q}.bias", 0, "out", hd, segments=segs))
    sp.uses.append(Use(f"{name}.{parts.proj}.weight", 1, "in", hd))
    sp.producers.append(name)
    sp.readers.append(f"{name}.{parts.proj}")
    proj = getattr(mod, parts.proj)
    out = Feat(ndim - 1, (Seg(g.new(proj.out_features, producer=f"{name}.{parts.proj}")),))
    record(f"{name}.{parts.proj}.weight", 0, "out", out, f"{name}.{parts.proj}")
    if proj.bias is not None:
        record(f"{name}.{parts.proj}.bias", 0, "out", out, f"{name}.{parts.proj}")
    g.module_out[f"{name}.{parts.proj}"] = out.segs[0].space
    g.producer_modules[f"{name}.{parts.proj}"] = "Linear"
    return out


def _mha(g: SpaceGraph, node, mod: nn.MultiheadAttention, name: str, parts: AttentionParts, feats, record,
         what) -> None:
    """nn.MultiheadAttention(query, key, value): its heads x head_dim is its embed_dim, the width of
    the query stream and of its output, so the three grow together (heads tiled, head_dim kept).
    Packed (in_proj_weight q|k|v reads one width): key and value are the query's features
    (self-attention, or cross-attention on a memory of the same features: the spaces are one).
    With kdim/vdim (q_proj_weight, k_proj_weight, v_proj_weight): key and value are read like a
    linear reads its input, so their widths grow freely."""
    names = ("query", "key", "value")
    a = dict(zip(names, node.args))
    a.update({k: v for k, v in node.kwargs.items() if k in names})
    q, k, v = (a.get(n) for n in names)
    qkv = [n for n in (q, k, v) if isinstance(n, fx.Node)]
    for n in _nodes(node.args) + _nodes(node.kwargs):  # masks: no features to follow
        if n not in qkv:
            g.freeze(feats.get(n), f"it is a mask of {what}")
    in_shape = _shape(q)
    fq, fk, fv = (feats.get(n) if isinstance(n, fx.Node) else None for n in (q, k, v))
    packed = parts.qkv == ("",)
    why = None
    last = (lambda f, n: f is not None and _shape(n) is not None and f.dim == len(_shape(n)) - 1)
    if len(qkv) != 3 or in_shape is None:
        why = f"{what} is not called as (query, key, value) on tensors"
    elif not last(fq, q) or len(fq.segs) != 1:
        why = f"{what} reads query features n2n does not track on its last axis"
    elif packed and not (all(last(f, n) for f, n in ((fk, k), (fv, v))) and
                         all(_align(g, fq, f, f"{what} reads key/value features that are not its query's")
                             for f in dict.fromkeys((fk, fv)) if f is not fq)):
        why = (f"{what} reads key/value features that are not its query's: its packed in_proj_weight reads one "
               "width (nn.MultiheadAttention with kdim/vdim keeps them apart)")
    if why is None and len(feats.get(q).segs) != 1:  # the query was split to match a concatenated key/value
        why = (f"{what} reads keys/values that concatenate several widths, so its query stream (embed_dim) is no "
               "longer one width that its heads can tile")
    feat = None
    if why is not None:
        for f in (fq, fk, fv):
            g.freeze(f, why)
    else:
        feat = feats.get(q)
    heads = g.new(parts.heads)
    g.heads[name] = heads
    hd = parts.head_dim
    sp = g.space(heads)
    if packed:
        if feat is not None:
            record(f"{name}.in_proj_weight", 1, "in", feat, name)
        sp.uses.append(Use(f"{name}.in_proj_weight", 0, "out", hd, segments=3))
    else:
        for w, f, n in zip(parts.qkv, (feat, fk, fv), (q, k, v)):
            if why is None and f is not None and last(f, n):
                record(f"{name}.{w}", 1, "in", f, name)
            elif why is None:
                g.freeze(f, f"{what} reads {w[0]} features n2n does not track on its last axis")
            sp.uses.append(Use(f"{name}.{w}", 0, "out", hd))
    if mod.in_proj_bias is not None:
        sp.uses.append(Use(f"{name}.in_proj_bias", 0, "out", hd, segments=3))
    for b in ("bias_k", "bias_v"):
        if getattr(mod, b) is not None:
            sp.uses.append(Use(f"{name}.{b}", 2, "out", hd))
    sp.uses.append(Use(f"{name}.out_proj.weight", 1, "in", hd))
    sp.followers.append(name)
    out = Feat(len(in_shape) - 1 if in_shape else 0, (Seg(g.new(mod.out_proj.out_features, producer=f"{name}.out_proj")),))
    record(f"{name}.out_proj.weight", 0, "out", out, f"{name}.out_proj")
    if mod.out_proj.bias is not None:
        record(f"{name}.out_proj.bias", 0, "out", out, f"{name}.out_proj")
    g.module_out[f"{name}.out_proj"] = out.segs[0].space
    g.producer_modules[f"{name}.out_proj"] = "Linear"
    # embed_dim is the query stream read, the heads x head_dim and the output: they grow together
    for s in ([feat.segs[0].space] if feat is not None else []) + [out.segs[0].space]:
        g.space(s).ties.append(heads)
        sp.ties.append(s)
    if feat is None:
        sp.frozen.append(why)
        g.freeze(out, f"{why}, and its embed_dim is its output's width")
    g.heads_refusal[name] = (f"nn.MultiheadAttention '{name}' has heads x head_dim = embed_dim, the width of the "
                             "query stream it reads and of its output, so heads cannot be added alone")
    g.tuple_outs[node] = out


def _describe(node: fx.Node, modules) -> str:
    if node.op == "call_module":
        return f"module '{node.target}' ({type(modules[node.target]).__name__})"
    stack = node.meta.get("nn_module_stack") or {}
    inside = f" in module '{next(reversed(stack))}' ({stack[next(reversed(stack))][1].__name__})" if stack else ""
    if node.op == "call_method":
        return f".{node.target}() (node '{node.name}'{inside})"
    name = getattr(node.target, "__name__", str(node.target))
    return f"{name}() (node '{node.name}'{inside})"


def _align(g: SpaceGraph, a: Feat | None, b: Feat | None, why: str) -> bool:
    """Merge two values that must hold the same features (operands of an add). Where their segments
    differ (a conv's output added to a concatenation), the spaces are refined to common pieces."""
    a, b = g.resolve(a), g.resolve(b)
    if a is None or b is None:
        g.freeze(a, why)
        g.freeze(b, why)
        return False
    if a.dim == b.dim and sum(g.width(x) for x in a.segs) == sum(g.width(y) for y in b.segs) and \
            len({x.block for x in a.segs + b.segs}) == 1:
        a, b = _refine(g, a, b)
    ok = a.dim == b.dim and len(a.segs) == len(b.segs) and all(
        x.block == y.block and g.width(x) == g.width(y) for x, y in zip(a.segs, b.segs))
    if not ok:
        g.freeze(a, why)
        g.freeze(b, why)
        return False
    for x, y in zip(a.segs, b.segs):
        g.union(x.space, y.space)
    return True


def _same(g: SpaceGraph, a: int, b: int) -> None:
    """Spaces ``a`` and ``b`` are one (a module called twice), piece by piece if ``a`` was refined."""
    if g.find(a) != g.find(b):
        _align(g, Feat(0, (Seg(a),)), Feat(0, (Seg(b),)), "a module called twice writes features that differ")


def _refine(g: SpaceGraph, a: Feat, b: Feat) -> tuple[Feat, Feat]:
    """Split the spaces of ``a`` and ``b`` (same blocks, same total) until their segments line up."""
    def bounds(f: Feat) -> list[tuple[int, int, int]]:  # (start, width, space) in units
        out, at = [], 0
        for x in f.segs:
            w = g.space(x.space).width
            out.append((at, w, x.space))
            at += w
        return out

    for _ in range(sum(g.space(x.space).width for x in a.segs) + 1):  # each round splits one space
        ba, bb = bounds(a), bounds(b)
        cuts = {s + w for s, w, _ in ba + bb}
        todo = next(((i, [q - p for p, q in zip([0] + inner, inner + [w])]) for s, w, i in ba + bb
                     if (inner := sorted(c - s for c in cuts if s < c < s + w))), None)
        if todo is None or not g.refine(*todo):
            break
        a, b = g.resolve(a), g.resolve(b)
    return a, b


def _module(g: SpaceGraph, node, mod: nn.Module, name: str, feat: Feat | None, shape, record, what) -> Feat | None:
    params = dict(mod.named_parameters(recurse=False))
    buffers = dict(mod.named_buffers(recurse=False))
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d)):
        transposed = isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d))
        if feat is not None and feat.dim != 1:
            g.freeze(feat, f"{what} reads an axis that is not the channel axis")
            feat = None
        depthwise = mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels and not transposed
        if depthwise:
            if feat is None:
                return None
            record(f"{name}.weight", 0, "out", feat, name)
            if mod.bias is not None:
                record(f"{name}.bias", 0, "out", feat, name)
            return feat
        out = Feat(1, (Seg(g.new(mod.out_channels, producer=name)),))
        if mod.groups > 1:
            g.freeze(feat, f"{what} is a grouped conv (groups={mod.groups}): its groups would not follow a mapping")
            g.freeze(out, f"{what} is a grouped conv (groups={mod.groups}): its groups would not follow a mapping")
        else:
            if feat is not None:
                record(f"{name}.weight", 0 if transposed else 1, "in", feat, name)
            record(f"{name}.weight", 1 if transposed else 0, "out", out, name)
            if mod.bias is not None:
                record(f"{name}.bias", 0, "out", out, name)
        g.module_out.setdefault(name, out.segs[0].space)
        _same(g, g.module_out[name], out.segs[0].space)  # a module called twice has one output space
        g.producer_modules[name] = type(mod).__name__
        return out
    if isinstance(mod, nn.Linear):
        ndim = len(shape)
        if feat is not None and feat.dim != ndim - 1:
            g.freeze(feat, f"{what} reads an axis that is not the feature axis")
            feat = None
        if feat is not None:
            record(f"{name}.weight", 1, "in", feat, name)
        out = Feat(ndim - 1, (Seg(g.new(mod.out_features, producer=name)),))
        record(f"{name}.weight", 0, "out", out, name)
        if mod.bias is not None:
            record(f"{name}.bias", 0, "out", out, name)
        g.module_out.setdefault(name, out.segs[0].space)
        _same(g, g.module_out[name], out.segs[0].space)
        g.producer_modules[name] = type(mod).__name__
        return out
    if isinstance(mod, NORM_MODULES):
        if feat is None or feat.dim != 1:
            g.freeze(feat, f"{what} normalises an axis n2n does not track")
            return None if feat is None or feat.dim != 1 else feat
        for k in ("weight", "bias", "running_mean", "running_var"):
            if (params.get(k) if k in params else buffers.get(k)) is not None:
                record(f"{name}.{k}", 0, "norm", feat, name)
        return feat
    if isinstance(mod, CARRY_MODULES):
        return feat
    if isinstance(mod, nn.Flatten):
        return _flatten(g, feat, _shape(node.args[0]), mod.start_dim, mod.end_dim, what)
    if isinstance(mod, nn.LayerNorm):
        if feat is None or shape is None:
            return feat
        k = len(mod.normalized_shape)
        if feat.dim < len(shape) - k:  # normalised over other axes: each feature on its own
            return feat
        if mod.weight is None:
            g.freeze(feat, f"{what} normalises over these features but has no weight: its normalized_shape "
                           f"{tuple(mod.normalized_shape)} is not a tensor n2n can resize (elementwise_affine=False)")
            return None
        for key in ("weight", "bias"):
            if params.get(key) is not None:
                record(f"{name}.{key}", feat.dim - (len(shape) - k), "norm", feat, name)
        _statistics(g, feat, f"{what} normalises over these features: its mean and variance stay the same only "
                              "when every feature is copied the same number of times (an integer factor)")
        return feat
    if isinstance(mod, nn.GroupNorm):
        if feat is None:
            return None
        if feat.dim != 1 or any(s.block != 1 for s in feat.segs):
            g.freeze(feat, f"{what} normalises groups of an axis n2n does not track as channels")
            return None
        for key in ("weight", "bias"):
            if params.get(key) is not None:
                record(f"{name}.{key}", 0, "norm", feat, name)
        _statistics(g, feat, f"{what} normalises {mod.num_groups} groups of channels: with num_groups kept, "
                              "each group stays the same only when every channel is repeated the same number "
                              "of times in place (an integer factor)", spread=True)
        return feat
    # a leaf module n2n does not know (attention, a user's custom leaf): opaque
    g.freeze(feat, f"{what} is opaque to n2n (it cannot see how it mixes features)")
    return None


def _statistics(g: SpaceGraph, feat: Feat, why: str, spread: bool = False) -> None:
    """A norm computes statistics over ``feat``: its spaces grow only by one integer factor, all
    together (a concatenation tiled region by region keeps each feature's share of the statistics),
    by tiling, or by repeating each unit in place (``spread``: a GroupNorm's groups stay whole)."""
    spaces = list(dict.fromkeys(g.find(s.space) for s in feat.segs))
    for i in spaces:
        sp = g.spaces[i]
        for reasons in ([sp.tile_only, sp.spread_only] if spread else [sp.tile_only]):
            if why not in reasons:
                reasons.append(why)
    for i in spaces[1:]:
        g.spaces[spaces[0]].ties.append(i)
        g.spaces[i].ties.append(spaces[0])


def _flatten(g: SpaceGraph, feat: Feat | None, in_shape, start: int, end: int, what: str) -> Feat | None:
    if feat is None or in_shape is None:
        return None
    nd = len(in_shape)
    start, end = start % nd, end % nd
    d = feat.dim
    if d < start:
        return feat
    if d > end:
        return Feat(d - (end - start), feat.segs)
    if start < d:
        g.freeze(feat, f"{what} flattens the feature axis into an axis before it")
        return None
    block = math.prod(in_shape[d + 1:end + 1])
    return Feat(start, tuple(Seg(s.space, s.block * block) for s in feat.segs))


def _function(g: SpaceGraph, node: fx.Node, first: Feat | None, shape, feats, what) -> Feat | None:
    t, args, kw = node.target, node.args, node.kwargs
    tensor_args = [a for a in _nodes(args) + _nodes(kw) if _shape(a) is not None]
    if shape is None and (node.op == "call_method" and t in ("size", "dim") or node.op == "call_function" and
                          t is getattr and args[1] in ("shape", "dtype", "device", "ndim")):
        return None  # a size or a dtype, not features
    is_fn, is_m = node.op == "call_function", node.op == "call_method"
    if (is_fn and t in CARRY_FUNCTIONS) or (is_m and t in CARRY_METHODS):
        for n in tensor_args[1:] if not (is_m and t in ("type_as", "to")) else []:  # x.type_as(y): y's dtype only
            g.freeze(feats.get(n), f"its output is an extra operand of {what}")
        return first
    if (is_fn and t in BINARY_FUNCTIONS) or (is_m and t in BINARY_METHODS):
        ops = [a for a in args[:2] if isinstance(a, fx.Node) and _shape(a) is not None]
        if len(ops) == 2:
            a, b = feats.get(ops[0]), feats.get(ops[1])
            sa, sb = _shape(ops[0]), _shape(ops[1])
            if a is not None and b is not None and len(sa) != len(sb) and a.dim - len(sa) == b.dim - len(sb):
                # broadcast over leading axes (w[:, None, None] * x, x * weight): same features, counted from the end
                nd = max(len(sa), len(sb))
                at = a.dim - len(sa)
                why = f"{what} combines it with features n2n does not track"
                if sa[at] == sb[at] and _align(g, Feat(nd + at, a.segs), Feat(nd + at, b.segs), why):
                    return g.resolve(Feat(nd + at, a.segs))
                g.freeze(a, why)
                g.freeze(b, why)
                return None
            if a is not None and b is not None and len(sa) == len(sb) and a.dim == b.dim and \
                    (sa[a.dim] == 1) != (sb[b.dim] == 1):  # one side broadcasts over the features
                return a if sb[b.dim] == 1 else b
            if a is not None and b is None and (len(sb) < len(sa) - a.dim or sb[a.dim - len(sa)] == 1):
                return a  # b broadcasts over the features (a scalar tensor, a per-sample gate)
            if b is not None and a is None and (len(sa) < len(sb) - b.dim or sa[b.dim - len(sb)] == 1):
                return b
            return first if _align(g, a, b, f"{what} combines it with features n2n does not track "
                                            "(or that are concatenated differently)") else None
        return feats.get(ops[0]) if ops else None
    if is_fn and t is torch.cat:
        parts = args[0]
        dim = args[1] if len(args) > 1 else kw.get("dim", 0)
        pf = [feats.get(p) for p in parts]
        dim = dim % len(shape)
        if all(f is not None for f in pf) and all(f.dim == dim for f in pf):
            return Feat(dim, tuple(s for f in pf for s in f.segs))
        if all(f is not None and f.dim != dim for f in pf):  # concatenating tokens/positions: same features
            for f in pf[1:]:
                _align(g, pf[0], f, f"{what} concatenates values whose features differ")
            return pf[0]
        for f in pf:
            g.freeze(f, f"{what} concatenates its output with features n2n does not track")
        return None
    if (is_fn and t is torch.flatten) or (is_m and t == "flatten"):
        start = args[1] if len(args) > 1 else kw.get("start_dim", 0)
        end = args[2] if len(args) > 2 else kw.get("end_dim", -1)
        return _flatten(g, first, _shape(args[0]), start, end, what)
    if is_m and t in ("view", "reshape") or is_fn and t is torch.reshape:
        in_shape = _shape(args[0])
        if first is None:
            return None
        d = first.dim
        if tuple(shape) == tuple(in_shape):
            return first
        if tuple(shape) == tuple(in_shape[:d]) + (math.prod(in_shape[d:]),):
            return _flatten(g, first, in_shape, d, -1, what)
        g.freeze(first, f"{what} reshapes the features in a way n2n does not follow (only flattening "
                        "(C, H, W) is)")
        return None
    if is_m and t in ("transpose", "permute") or is_fn and t in (torch.transpose, torch.permute):
        if first is None:
            return None
        nd = len(shape)
        if t in ("transpose", torch.transpose):
            a, b = (x % nd for x in args[1:3])
            d = b if first.dim == a else a if first.dim == b else first.dim
        else:
            perm = [x % nd for x in (args[1] if isinstance(args[1], (list, tuple)) else args[1:])]
            d = perm.index(first.dim)
        return Feat(d, first.segs)
    if (is_m and t in REDUCE) or (is_fn and t in (torch.mean, torch.sum, torch.amax)):
        if first is None:
            return None
        in_shape = _shape(args[0])
        dims = args[1] if len(args) > 1 else kw.get("dim")
        keep = kw.get("keepdim", args[2] if len(args) > 2 else False)
        if dims is None:
            g.freeze(first, f"{what} reduces over every axis, the features too")
            return None
        dims = _dims(dims, len(in_shape))
        if first.dim in dims and (t in ("amax", torch.amax)):
            return None  # a maximum over copies is the maximum: no constraint, and no features left
        if first.dim in dims and (t in ("mean", torch.mean)):  # a statistic (hand-written LayerNorm, RMSNorm)
            _statistics(g, first, f"{what} averages over these features: the mean stays the same only when every "
                                  "feature is copied the same number of times (an integer factor)")
            return None
        if first.dim in dims:
            g.freeze(first, f"{what} sums over the features (a sum over channels changes with copies)")
            return None
        return Feat(first.dim - (0 if keep else sum(1 for x in dims if x < first.dim)), first.segs)
    if is_fn and t in (F.layer_norm, F.group_norm):
        return _functional_norm(g, node, first, shape, feats, what)
    if is_fn and t is operator.getitem and args[0] in g.tuple_outs:  # nn.MultiheadAttention(...)[0]
        return g.tuple_outs[args[0]] if args[1] == 0 else None
    if is_fn and t is operator.getitem and first is not None:
        idx = args[1] if isinstance(args[1], tuple) else (args[1],)
        if Ellipsis not in idx and all(i is None or isinstance(i, (int, slice)) for i in idx):
            used = [k for k, i in enumerate(idx) if i is not None]  # entries that consume an input axis
            k = used[first.dim] if first.dim < len(used) else len(idx)
            at = idx[k] if k < len(idx) else slice(None)
            if at == slice(None):  # None adds an output axis, an int removes one
                out = sum(1 for i in idx[:k] if not isinstance(i, int)) + max(0, first.dim - len(used))
                return Feat(out, first.segs)
    for n in tensor_args:
        g.freeze(feats.get(n), f"{what} is an op n2n cannot see through; make it a leaf module or "
                               "use plain tensor ops")
    return None


def _functional_norm(g: SpaceGraph, node: fx.Node, feat: Feat | None, shape, feats, what) -> Feat | None:
    """``F.layer_norm(x, normalized_shape, weight, bias)`` / ``F.group_norm(x, num_groups, weight, bias)``
    seen in the trace: like the modules, and the weight and bias (parameters read in forward) hold
    the same features. A size written into the call as a constant cannot follow a wider axis."""
    layer = node.target is F.layer_norm
    names = ("input", "normalized_shape" if layer else "num_groups", "weight", "bias")
    a = dict(zip(names, node.args))
    a.update({k: v for k, v in node.kwargs.items() if k in names})
    w, b = a.get("weight"), a.get("bias")
    params = [p for p in (w, b) if isinstance(p, fx.Node)]
    if feat is None or shape is None:
        for p in params:
            g.freeze(feats.get(p), f"its features are the weight of {what}, which reads features n2n does not track")
        return None
    nd = len(shape)

    def refuse(why: str) -> None:
        g.freeze(feat, why)
        for p in params:
            g.freeze(feats.get(p), why)

    if layer:
        ns = a.get("normalized_shape")
        if isinstance(ns, fx.Node):
            k = len(_shape(w)) if isinstance(w, fx.Node) and _shape(w) else _shape_slice_len(ns, nd)
            entries = None
        else:
            entries = list(ns) if isinstance(ns, (list, tuple)) else [ns]
            k = len(entries)
        if k is None:
            refuse(f"{what} is given a normalized_shape n2n cannot read; pass x.shape[-1:] or a tuple")
            return None
        if feat.dim < nd - k:
            return feat  # normalised over other axes: each feature on its own
        at = feat.dim - (nd - k)
        if entries is not None and not isinstance(entries[at], fx.Node):
            refuse(f"{what} is given the constant normalized_shape {tuple(entries)}: after widening it would still "
                   f"normalise over {entries[at]} features; pass a shape read from the tensor (x.shape[-1:]) or "
                   "the weight (weight.shape)")
            return None
        if params and at != k - 1:
            refuse(f"{what} normalises features that are not the last axis of its weight")
            return None
        why = (f"{what} normalises over these features: its mean and variance stay the same only when every "
               "feature is copied the same number of times (an integer factor)")
        spread = False
    else:
        if isinstance(a.get("num_groups"), fx.Node):
            refuse(f"{what} computes num_groups in forward: n2n keeps the groups by repeating each channel in "
                   "place, which needs num_groups to stay; pass a constant")
            return None
        if feat.dim != 1 or any(s.block != 1 for s in feat.segs):
            refuse(f"{what} normalises groups of an axis n2n does not track as channels")
            return None
        why = (f"{what} normalises {a.get('num_groups')} groups of channels: with num_groups kept, each group stays "
               "the same only when every channel is repeated the same number of times in place (an integer factor)")
        spread = True
    for p in params:
        pf = feats.get(p)
        if pf is None or not _align(g, Feat(pf.dim, feat.segs), pf,
                                    f"{what} reads a weight or bias that does not hold its input's features"):
            refuse(f"{what} reads a weight or bias that is not a parameter of its input's width")
            return None
    _statistics(g, feat, why, spread=spread)
    return feat


def _shape_slice_len(node: fx.Node, nd: int) -> int | None:
    """``x.shape[a:]`` (or ``x.size()[a:]``) traced: how many trailing axes it names."""
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], slice) \
            and node.args[1].stop is None and node.args[1].step is None and isinstance(node.args[1].start, int):
        src = node.args[0]
        if isinstance(src, fx.Node) and (src.op == "call_function" and src.target is getattr and src.args[1] == "shape"
                                         or src.op == "call_method" and src.target == "size" and len(src.args) == 1):
            return nd - node.args[1].start % nd
    return None
