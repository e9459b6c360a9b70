"""Growth planning for Hugging Face checkpoints: a step picks a mapping g for each affected space of
the family (``n2n_cli.hf``), and the planner (``n2n_cli.planner``) transforms every axis labelled
with that space, like for every other model; deepening copies blocks with zeroed output
projections (LLaMA Pro); dense-to-MoE upcycling is ``n2n_cli.hf_moe``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from .errors import StepError
from .hf import Arch
from .hf_moe import plan_upcycle
from .limits import MAX_LAYERS, MAX_PLANNED_BYTES, MAX_WIDTH as MAX_SIZE
from .planner import (Copied, Kept, Load, Mapping, Op, PlannedStep, RecipePlan, check_larger, plan_steps, rebuild,
                      widen_spaces)
from .spec import HFDeepenStep, HFStepEntry, HFWidenStep


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
