"""Plan growth of a traced user model into the same recipe ops (Load / Widen with Axis and
Mapping) that the Materializer and the safetensors writer execute for every other model.

Each step re-traces the module at its current sizes, so offsets of concatenated towers are
always those of the tensors the step's Widen op is applied to.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from .errors import StepError, UserError
from .graph import SpaceGraph, attention_parts, trace, trace_spaces
from .planner import (Copied, Created, Kept, Load, Mapping, Op, PlannedStep, RecipePlan, new_layer_op, new_norm_op,
                      plan_steps, rebuild, widen_spaces)
from .spec import StepEntry


# ----------------------------------------------------------------------------- resizing modules


def _set_sizes(mod: nn.Module) -> None:
    """Make a module's size attributes agree with its (resized) tensors."""
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        depthwise = mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
        mod.out_channels = mod.weight.shape[0]
        mod.in_channels = mod.weight.shape[1] * (mod.out_channels if depthwise else mod.groups)
        if depthwise:
            mod.groups = mod.out_channels
    elif isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d)):
        mod.in_channels = mod.weight.shape[0]
        mod.out_channels = mod.weight.shape[1] * mod.groups
    elif isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = mod.weight.shape
    elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
        mod.num_features = mod.running_mean.shape[0] if mod.running_mean is not None else mod.weight.shape[0]
    elif isinstance(mod, nn.LayerNorm) and mod.weight is not None:
        mod.normalized_shape = tuple(mod.weight.shape)
    elif isinstance(mod, nn.GroupNorm) and mod.weight is not None:
        mod.num_channels = mod.weight.shape[0]  # num_groups is kept: each channel is repeated in place


def resize_module(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> nn.Module:
    """Resize ``model``'s parameters and buffers in place to ``shapes`` (key -> shape); values are
    zeros until a state dict is loaded. Raises UserError for a module n2n cannot resize."""
    modules = dict(model.named_modules())
    touched = {}
    attention = {n: p for n, m in modules.items() if (p := attention_parts(m)) is not None}  # head_dim is kept
    for key, shape in shapes.items():
        owner, _, attr = key.rpartition(".")
        mod = modules.get(owner)
        if mod is None:
            raise UserError(f"tensor '{key}' has no module '{owner}' in the model")
        cur = getattr(mod, attr, None)
        if not isinstance(cur, torch.Tensor):
            raise UserError(f"tensor '{key}' is not a parameter or buffer of module '{owner}'")
        if tuple(cur.shape) == tuple(shape):
            continue
        new = torch.zeros(shape, dtype=cur.dtype, device=cur.device)
        if isinstance(cur, nn.Parameter):
            setattr(mod, attr, nn.Parameter(new, requires_grad=cur.requires_grad))
        else:
            mod._buffers[attr] = new
        touched[owner] = mod
    for mod in touched.values():
        _set_sizes(mod)
    for name, parts in attention.items():  # heads follow the resized projections, head_dim stays
        mod = modules[name]
        if parts.kind == "mha" and mod._qkv_same_embed_dim:
            e = mod.in_proj_weight.shape[1]
            mod.embed_dim = mod.kdim = mod.vdim = e
            mod.num_heads = e // parts.head_dim
        elif parts.kind == "mha":  # kdim/vdim: q, k, v weights of their own
            mod.embed_dim, mod.kdim, mod.vdim = (mod.q_proj_weight.shape[1], mod.k_proj_weight.shape[1],
                                                 mod.v_proj_weight.shape[1])
            mod.num_heads = mod.q_proj_weight.shape[0] // parts.head_dim
        else:
            mod.num_heads = getattr(mod, parts.proj).in_features // parts.head_dim
    return model


# ----------------------------------------------------------------------------- the plan


@dataclass
class GraphPlan(RecipePlan):
    """A traced model's plan: the recipes, and the module insertions to replay."""

    seed: int
    steps: list[PlannedStep]
    recipes: dict[str, list[Op]]
    dtypes: dict[str, torch.dtype]
    shapes: dict[str, tuple[int, ...]]
    params_before: int = 0
    param_keys: frozenset = frozenset()  # parameters (not buffers such as running statistics)
    problems: list[tuple[int, str]] = field(default_factory=list)
    edits: list[dict] = field(default_factory=list)  # module insertions (graph_deepen), replayed by load_grown

    @property
    def params_after(self) -> int:
        return sum(_numel(s) for k, s in self.shapes.items() if k in self.param_keys)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def widenable(g: SpaceGraph) -> dict[str, str]:
    """Each conv/linear: 'yes', or 'no: why' (the first reason its output space is frozen)."""
    out = {}
    for name in g.module_out:
        why = next((g.spaces[p].frozen[0] for p in g.pieces(g.module_out[name]) if g.spaces[p].frozen), None)
        out[name] = "yes" if why is None else f"no: {why}"
    return out


def find_module_space(g: SpaceGraph, model: nn.Module, name: str, field_name: str = "layer"):
    if name in g.heads:
        if name in g.heads_refusal:
            raise StepError(f"{field_name}: {g.heads_refusal[name]}",
                            hint="Widen the stream it reads by an integer factor (layer: any module writing it, "
                                 "e.g. the patch embedding, factor: 2): its heads are tiled with it, head_dim kept.",
                            short="nn.MultiheadAttention heads follow embed_dim")
        return [g.space(g.heads[name])]
    if name not in g.module_out:
        names = dict(model.named_modules())
        producers = sorted(g.module_out)
        if name in names:
            raise StepError(f"{field_name}: '{name}' is a {type(names[name]).__name__}; only conv and linear modules "
                            "(outside attention) can be widened", hint=f"Choose one of: {', '.join(producers)}.",
                            short="not a conv/linear")
        close = difflib.get_close_matches(name, producers, n=3)
        raise StepError(f"{field_name}: the model has no module '{name}'",
                        hint=(f"Did you mean: {', '.join(close)}?" if close else
                              f"Conv/linear modules: {', '.join(producers)}."))
    return [g.spaces[p] for p in g.pieces(g.module_out[name])]


def _shares(widths: list[int], new: int) -> list[int]:
    """``new`` units over pieces of ``widths`` in proportion (largest remainders first, then order):
    a factor multiplies every piece."""
    old = sum(widths)
    out = [w * new // old for w in widths]
    for i in sorted(range(len(widths)), key=lambda i: (-(widths[i] * new % old), i))[:new - sum(out)]:
        out[i] += 1
    return out


def plan_graph(model: nn.Module, header: dict[str, tuple[torch.dtype, tuple[int, ...]]], steps: list[StepEntry],
               seed: int, example: torch.Tensor, *, collect: bool = False) -> GraphPlan:
    """Plan ``steps`` on the user's ``model`` (teacher-shaped; it is resized in place as steps go)."""
    recipes: dict[str, list[Op]] = {k: [Load(k)] for k in header}
    plan = GraphPlan(seed, [], recipes, {k: d for k, (d, _) in header.items()},
                     {k: tuple(s) for k, (_, s) in header.items()},
                     param_keys=frozenset(k for k, _ in model.named_parameters()))
    plan.params_before = plan.params_after
    plan_steps(plan, steps, lambda p, i, e: (_plan_widen(p, i, e, model, example) if e.widen else
                                             _plan_deepen(p, i, e, model, example)), _label, collect=collect)
    return plan


def _label(entry: StepEntry) -> str:
    s = entry.step
    return f"widen {s.layer}" if entry.widen else (f"deepen after {s.after}" if s.after else
                                                    f"deepen after_block {s.after_block}")


def _plan_widen(plan: GraphPlan, index: int, entry: StepEntry, model: nn.Module, example: torch.Tensor) -> None:
    step = entry.widen
    g = trace_spaces(model, trace(model, example))
    pieces = find_module_space(g, model, step.layer)  # several: a conv added to a concatenation (one per tower)
    space = pieces[0]
    frozen = next((sp for sp in pieces if sp.frozen), None)
    if frozen is not None:
        producers = list(dict.fromkeys(p for sp in pieces for p in sp.producers))
        raise StepError(f"'{step.layer}' cannot be widened exactly: {frozen.frozen[0]}",
                        hint=("Coupled with: " + ", ".join(producers) + ". " if len(producers) > 1 else "")
                        + ("Widen a hidden layer whose output is read by other convs/linears."
                           if "network output" in frozen.frozen[0] else ""),
                        short=frozen.frozen[0])
    if len({sp.id for sp in pieces}) < len(pieces):
        raise StepError(f"'{step.layer}' cannot be widened: its output is added to a concatenation that holds the "
                        "same features twice, so its regions would have to grow together",
                        hint="Widen the module that writes the repeated features instead.", short="repeated features")
    old = sum(sp.width for sp in pieces)
    new = step.new_width(old)
    heads = step.layer in g.heads
    unit = "heads" if heads else "width"
    if new <= old:
        raise StepError(f"the new {unit} {new} is not larger than the current {unit} {old} of '{step.layer}'",
                        hint=f"Use a {unit} above {old}.")
    mappings, group, tile_why, spread, r = {}, [], [], False, 1
    for space, piece_new in zip(pieces, _shares([sp.width for sp in pieces], new)):
        if piece_new == space.width:
            continue
        tied = _tied(g, space)
        why = [w for sp in tied for w in sp.tile_only] + (
            ["it is the embed_dim of nn.MultiheadAttention, whose heads (head_dim kept) are tiled with it"]
            if len(tied) > 1 else [])
        for sp in tied[1:]:
            if sp.frozen:
                raise StepError(f"'{step.layer}' cannot be widened exactly: a space that must grow with it cannot: "
                                f"{sp.frozen[0]}", short=sp.frozen[0])
        if why and piece_new % space.width:
            raise StepError(f"to: {new} is not an integer multiple of the current width {old} of '{step.layer}': "
                            f"{why[0]}", hint=f"Use a multiple of {old} (e.g. factor: 2, to: {2 * old}).",
                            short="integer multiples only: norm statistics" if space.tile_only else "integer multiples only")
        r = piece_new // space.width
        kind = "spread" if any(sp.spread_only for sp in tied) else "tile"  # spread: GroupNorm keeps num_groups
        mappings[space.id] = Mapping(kind, space.width, piece_new) if why else \
            Mapping("random", space.width, piece_new, (plan.seed, index) + ((space.id,) if len(pieces) > 1 else ()))
        for sp in tied[1:]:
            mappings[sp.id] = Mapping(kind, sp.width, sp.width * r)
        group += tied
        tile_why += why
        spread = spread or kind == "spread"
    labels: dict[str, list] = {}
    for sp in group:
        for u in sp.uses:
            labels.setdefault(u.key, []).append((u.ax, u.axis(f"space {sp.id}")))
    before = plan.params_after
    changes = widen_spaces(plan, index, {k: labels[k] for k in plan.recipes if k in labels},
                           {f"space {i}": m for i, m in mappings.items()}, method=step.method, noise=step.noise,
                           noise_mode=step.noise_mode)
    resize_module(model, {k: plan.shapes[k] for k in labels})
    exact = step.method == "net2wider" and (step.noise == 0 or step.noise_mode == "zero-sum")
    coupled = list(dict.fromkeys(p for sp in pieces if sp.id in mappings for p in sp.producers if p != step.layer))
    summary = f"widen {step.layer} {unit} {old} -> {new} ({step.method}" + (
        ", whole heads copied, head_dim kept" if heads else "") + (
        (f", each unit repeated x{r} in place" if spread else f", tiled x{r}") if tile_why else "") + ")" + (
        f"; coupled: {', '.join(coupled)}" if coupled else "")
    tied = [n for n, h in g.heads.items() if any(g.find(h) == sp.id for sp in group[1:])]
    if tied:
        summary += f"; heads tiled x{r} (head_dim kept) in {', '.join(tied)}"
    along = [p for sp in group if sp.id not in {q.id for q in pieces} for p in sp.producers
             if p != step.layer and p not in coupled and not any(p.startswith(n + ".") for n in tied)]
    if along:
        summary += f"; x{r} with it (normalised together): {', '.join(dict.fromkeys(along))}"
    plan.steps.append(PlannedStep(index, entry, summary, exact, changes, before, plan.params_after))


def _tied(g: SpaceGraph, space) -> list:
    """``space`` and every space that must grow with it by the same integer factor."""
    out, todo, seen = [], [space.id], set()
    while todo:
        i = g.find(todo.pop(0))
        if i in seen:
            continue
        seen.add(i)
        out.append(g.spaces[i])
        todo.extend(g.spaces[i].ties)
    return out


def _plan_deepen(plan: GraphPlan, index: int, entry: StepEntry, model: nn.Module, example: torch.Tensor) -> None:
    """Insert modules into ``model`` (in place) and plan every tensor of the new state dict: the
    old tensors under their (maybe renumbered) names, the new ones as Create ops or copies."""
    from .graph_deepen import apply_edit, plan_after, plan_block

    step = entry.deepen
    if step.name is not None:
        raise StepError("name: inserted modules of a --model-code model are named by their position (nn.Sequential "
                        "numbering, or '<after>.1')", hint="Drop name.")
    gm = trace(model, example)
    if step.after_block is not None:
        if step.kernel_size is not None:
            raise StepError("kernel_size: after_block copies the block as it is", hint="Drop kernel_size.")
        ins = plan_block(model, gm, step.after_block, method=step.method)
    else:
        ins, _ = plan_after(model, gm, step.after, method=step.method, kernel_size=step.kernel_size)
    before = plan.params_after
    old_names = {id(m): n for n, m in model.named_modules()}
    created = apply_edit(model, ins.edit)
    names = {id(m): n for n, m in model.named_modules()}
    origin: dict[str, tuple] = {}  # new module name -> ("old", old name) | ("new", k, relative name)
    for n, m in model.named_modules():
        if id(m) in old_names:
            origin[n] = ("old", old_names[id(m)])
    for k, root in enumerate(created):
        for rel, sub in root.named_modules():
            origin[f"{names[id(root)]}.{rel}" if rel else names[id(root)]] = ("new", k, rel)
    anchor = step.after_block or step.after
    float_dtype = next((plan.dtypes[k] for k in plan.recipes if k.startswith(anchor + ".")
                        and plan.dtypes[k].is_floating_point), None) or \
        next(d for d in plan.dtypes.values() if d.is_floating_point)
    origins = {}
    for key, t in model.state_dict(keep_vars=True).items():
        owner, _, attr = key.rpartition(".")
        o = origin[owner]
        if o[0] == "old":
            old_key = f"{o[1]}.{attr}" if o[1] else attr
            origins[key] = Kept(old_key, f"renamed from {old_key}" if old_key != key else None)
        elif ins.copy_of is not None:
            rel_key = f"{o[2]}.{attr}" if o[2] else attr
            src = f"{ins.copy_of}.{rel_key}"
            origins[key] = (Copied(src, f"zero (the copy of {src}: the branch adds 0)", zero=True)
                            if rel_key in ins.zeroed else Copied(src, f"copy of {src}"))
        else:
            mod, shape = created[o[1]], tuple(t.shape)
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                op = new_layer_op(index, attr, shape, step.method, int(mod.weight[0].numel()))
            else:  # BatchNorm
                op = new_norm_op(index, attr, shape, mod.eps, step.method == "net2deeper")
            origins[key] = Created(op, float_dtype if t.is_floating_point() else torch.int64)
    changes = rebuild(plan, index, origins)
    plan.param_keys = frozenset(k for k, _ in model.named_parameters())
    plan.edits.append(ins.edit)
    plan.steps.append(PlannedStep(index, entry, ins.summary, ins.exact, changes, before, plan.params_after))


# ----------------------------------------------------------------------------- running the user's module


def flat_output(out) -> torch.Tensor:
    """Every tensor of a model's output (tensor, tuple, dict), as one (N, -1) float64 matrix."""
    parts: list[torch.Tensor] = []

    def walk(o):
        if isinstance(o, torch.Tensor):
            parts.append(o.reshape(o.shape[0], -1).to("cpu", torch.float64))
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)

    walk(out)
    if not parts:
        raise UserError("the model's output holds no tensors to compare")
    return torch.cat(parts, dim=1)


def run_model(model: nn.Module, x: torch.Tensor, device: torch.device, dtype: torch.dtype,
              batch: int = 16) -> torch.Tensor:
    from .verify import full_precision

    model = model.to(device=device, dtype=dtype).eval()
    outs = []
    with torch.no_grad(), full_precision():
        for i in range(0, x.shape[0], batch):
            outs.append(flat_output(model(x[i:i + batch].to(device=device, dtype=dtype))))
    return torch.cat(outs)


def load_tensors(model: nn.Module, get: Callable[[str], torch.Tensor]) -> nn.Module:
    sd = {}
    for k, t in model.state_dict().items():
        v = get(k)
        sd[k] = v.to(t.dtype) if v.is_floating_point() else v
    model.load_state_dict(sd, strict=True)
    return model
