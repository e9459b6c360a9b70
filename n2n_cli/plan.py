"""Plan before data: resolve a model description, a checkpoint header and growth steps into
plain data that says, for every output tensor, how to compute it. No tensor is touched here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    import torch

from .errors import StepError
from .layers import ACTIVATIONS, NORMS, PRODUCERS, Conv2d, Linear, pair
from .model import INPUT_SPACE, ModelDescription
from .planner import Create, Load, Mapping, Op, PlannedStep, TensorChange, Widen
from .spec import DeepenStep, StepEntry, WidenStep


@dataclass
class Plan:
    seed: int
    model_before: ModelDescription
    model_after: ModelDescription
    steps: list[PlannedStep]
    recipes: dict[str, list[Op]]  # final key -> how to compute it, in output order
    dtypes: dict[str, torch.dtype]
    shapes: dict[str, tuple[int, ...]]
    problems: list[tuple[int, str]] = field(default_factory=list)

    @property
    def params_before(self) -> int:
        return self.model_before.layout().num_parameters()

    @property
    def params_after(self) -> int:
        return self.model_after.layout().num_parameters()

    @property
    def function_preserving(self) -> bool:
        return all(s.function_preserving for s in self.steps)

    def entries(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        return [(k, self.dtypes[k], self.shapes[k]) for k in self.recipes]

    def to_dict(self) -> dict:
        return {"seed": self.seed, "params_before": self.params_before, "params_after": self.params_after,
                "function_preserving": self.function_preserving,
                "steps": [s.to_dict() for s in self.steps]}


# ----------------------------------------------------------------------------- planning


def build_plan(desc: ModelDescription, header: dict[str, tuple[torch.dtype, tuple[int, ...]]] | None,
               steps: list[StepEntry], seed: int, *, collect: bool = False, numbers: list[int] | None = None) -> Plan:
    """Plan ``steps`` on ``desc``. ``header`` maps the checkpoint's keys to (dtype, shape) and
    must already match the description (see ``check_checkpoint``); None plans in float32.

    With ``collect``, a step that cannot be applied is recorded in ``plan.problems`` as
    (step number, message) and skipped, so that every problem is reported at once; otherwise
    StepError is raised. ``numbers`` are the steps' numbers in the spec, for messages.
    """
    import torch  # here, not at the top: validating a spec against a description needs no torch

    layout = desc.layout()
    if header is None:
        header = {k: (torch.float32 if t.floating else torch.int64, t.shape) for k, t in layout.tensors.items()}
    recipes: dict[str, list[Op]] = {k: [Load(k)] for k in layout.tensors}
    dtypes = {k: header[k][0] for k in layout.tensors}
    shapes = {k: tuple(header[k][1]) for k in layout.tensors}
    plan = Plan(seed, desc, desc, [], recipes, dtypes, shapes)
    for i, entry in enumerate(steps):
        try:
            if entry.widen:
                _plan_widen(plan, i, entry)
            else:
                _plan_deepen(plan, i, entry)
        except StepError as e:
            n = numbers[i] if numbers else i
            if not collect:
                raise StepError(f"steps[{n}] ({_label(entry)}): {e.message}", hint=e.hint, short=e.short,
                                flags=e.flags) from None
            plan.problems.append((n, f"steps[{n}] ({_label(entry)}): {e.message}" + (f" {e.hint}" if e.hint else "")))
    return plan


def _label(entry: StepEntry) -> str:
    s = entry.step
    return f"widen {s.layer}" if entry.widen else f"deepen after {s.after or s.after_block}"


def _producer_names(desc: ModelDescription) -> list[str]:
    return [layer.name for layer in desc.layers if layer.type in PRODUCERS]


def _find_producer(desc: ModelDescription, name: str, field_name: str):
    i = desc.index_of(name)
    if i is None:
        raise StepError(f"{field_name}: unknown layer '{name}'",
                        hint=f"Linear and conv2d layers here: {', '.join(_producer_names(desc))}.")
    layer = desc.layers[i]
    if layer.type not in PRODUCERS:
        raise StepError(f"{field_name}: '{name}' is a {layer.type}; only linear and conv2d layers can be "
                        f"{'widened' if field_name == 'layer' else 'deepened after'}",
                        hint=f"Choose one of: {', '.join(_producer_names(desc))}.")
    return i, layer


def _plan_widen(plan: Plan, index: int, entry: StepEntry) -> None:
    step: WidenStep = entry.widen
    desc = plan.model_after
    i, layer = _find_producer(desc, step.layer, "layer")
    layout = desc.layout()
    space = layout.spaces[layer.name]
    if not space.readers:
        widenable = [s.name for s in layout.spaces.values() if s.readers and s.name != INPUT_SPACE]
        raise StepError(f"'{layer.name}' is the output layer: widening it would change what the network "
                        f"outputs ({space.width} values)",
                        hint=f"Widen a hidden layer instead: {', '.join(widenable) or 'none'}.", short="output layer")
    old = space.width
    new = step.new_width(old)
    if new <= old:
        if step.to is not None:
            raise StepError(f"to: {step.to} is not larger than the current width {old} of '{layer.name}'",
                            hint=f"Use a width above {old}.", flags={"to: ": "--to "})
        least = math.ceil((old + 1) / old * 1000) / 1000  # the smallest factor (3 decimals) that grows old by one
        raise StepError(f"factor: {step.factor:g} rounds {old} to {new}, which is not larger than the current width "
                        f"{old} of '{layer.name}'", hint=f"Use a factor of at least {least:g}, or to: {old + 1} or more.",
                        flags={"factor: ": "--factor ", "to: ": "--to "})
    field_name = "out_features" if layer.type == "linear" else "out_channels"
    layers = list(desc.layers)
    layers[i] = layer.model_copy(update={field_name: new})
    new_desc = ModelDescription(kind=desc.kind, input_shape=desc.input_shape, layers=layers)
    changes = []
    for key, info in layout.tensors.items():
        axes = tuple((ax, a) for ax, a in enumerate(info.axes) if a is not None and a.space == space.name)
        if not axes:
            continue
        old_shape = plan.shapes[key]
        new_shape = list(old_shape)
        for ax, a in axes:
            new_shape[ax] = new_shape[ax] // old * new
        how = ", ".join(f"axis {ax}: {a.role}" + (f" (blocks of {a.block})" if a.block > 1 else "") for ax, a in axes)
        mapping = Mapping("random", old, new, (plan.seed, index))
        plan.recipes[key].append(Widen(index, tuple((ax, a, mapping) for ax, a in axes), step.method, step.noise,
                                       step.noise_mode))
        plan.shapes[key] = tuple(new_shape)
        changes.append(TensorChange(key, old_shape, tuple(new_shape), how))
    exact = step.method == "net2wider" and (step.noise == 0 or step.noise_mode == "zero-sum")
    by = f"to {step.to}" if step.to is not None else f"by factor {step.factor:g}"
    noise = f", {step.noise_mode} noise {step.noise}" if step.noise else ""
    plan.steps.append(PlannedStep(
        index, entry, f"widen {layer.name} {old} -> {new} ({step.method}{noise}, {by})", exact, changes,
        desc.layout().num_parameters(), new_desc.layout().num_parameters(), space.name, old, new))
    plan.model_after = new_desc


def _unique_name(desc: ModelDescription, base: str, taken: set[str]) -> str:
    names = set(desc.layer_names()) | taken
    name, k = base, 2
    while name in names or any(n.startswith(name + ".") or name.startswith(n + ".") for n in names):
        name, k = f"{base}_{k}", k + 1
    return name


_NUMBER = re.compile(r"0|[1-9][0-9]*")


def _split_name(name: str) -> tuple[str, str]:
    """'features.3' -> ('features.', '3'); '3' -> ('', '3')."""
    head, dot, leaf = name.rpartition(".")
    return head + dot, leaf


def _sequential_groups(desc: ModelDescription) -> dict[str, int]:
    """Prefixes whose layers are numbered like ``nn.Sequential`` children: every parametric
    layer named ``<prefix><n>`` with n = its position in the list minus one constant offset
    (stateless layers such as relu take numbers too). Maps prefix -> offset."""
    offsets: dict[str, set[int | None]] = {}
    for pos, layer in enumerate(desc.layers):
        if layer.parametric:
            prefix, leaf = _split_name(layer.name)
            offsets.setdefault(prefix, set()).add(pos - int(leaf) if _NUMBER.fullmatch(leaf) else None)
    return {p: next(iter(o)) for p, o in offsets.items() if len(o) == 1 and None not in o}


def _renumber(desc: ModelDescription, i: int, j: int, layers: list, count: int) -> tuple[list, dict[str, str]]:
    """Name the ``count`` layers inserted at position ``j`` (after layer ``i``) and renumber the
    later ones when layer ``i`` belongs to an ``nn.Sequential``-numbered group, so the grown
    checkpoint loads into the user's own ``nn.Sequential`` with the new modules in place.
    Returns the new list and {new name: old name} for renamed existing layers."""
    prefix, _ = _split_name(desc.layers[i].name)
    offset = _sequential_groups(desc).get(prefix)
    if offset is None:
        return layers, {}
    out, renamed = [], {}
    for pos, layer in enumerate(layers):
        new = j <= pos < j + count
        if layer.parametric and (new or (pos >= j + count and _split_name(layer.name)[0] == prefix)):
            name = f"{prefix}{pos - offset}"
            if not new and name != layer.name:
                renamed[name] = layer.name
            layer = layer.model_copy(update={"name": name})
        out.append(layer)
    return out, renamed


def _plan_deepen(plan: Plan, index: int, entry: StepEntry) -> None:
    step: DeepenStep = entry.deepen
    desc = plan.model_after
    if step.after is None:
        raise StepError("after_block: a description's layers have no residual blocks",
                        hint="after_block is for models built by --model-code; use after: LAYER here.")
    i, layer = _find_producer(desc, step.after, "after")
    j = i + 1
    norm = desc.layers[j] if j < len(desc.layers) and desc.layers[j].type in NORMS else None
    j += norm is not None
    act = desc.layers[j] if j < len(desc.layers) and desc.layers[j].type in ACTIVATIONS else None
    j += act is not None
    if act is not None and step.method == "net2deeper" and not ACTIVATIONS[act.type].idempotent:
        raise StepError(
            f"'{layer.name}' is followed by {act.type}, which is not idempotent "
            f"({ACTIVATIONS[act.type].why}), so an identity layer after it would change the function",
            hint="Deepen after a layer followed by relu (or by no activation), or use method: random-init "
                 "(not function-preserving).", short=f"{act.type} is not idempotent")
    if step.name is not None:
        clash = [n for n in desc.layer_names() if n == step.name or n.startswith(step.name + ".")
                 or step.name.startswith(n + ".")]
        if clash:
            raise StepError(f"name: '{step.name}' is already used (or clashes with '{clash[0]}')",
                            hint="Choose a new layer name.")
        name = step.name
    else:
        name = _unique_name(desc, f"{layer.name}_deeper", set())
    width = desc.shapes()[i + 1][0]
    dtype = plan.dtypes[f"{layer.name}.weight"]
    exact = step.method == "net2deeper"
    new_layers = []
    if layer.type == "linear":
        if step.kernel_size is not None:
            raise StepError(f"kernel_size: '{layer.name}' is a linear layer, so the new layer is linear too and "
                            "has no kernel", hint="Drop kernel_size, or deepen after a conv2d layer.")
        new = Linear(type="linear", name=name, out_features=width, bias=layer.bias)
        fan_in = width
    else:
        kh, kw = pair(step.kernel_size or layer.kernel_size)
        if kh % 2 == 0 or kw % 2 == 0:
            source = "kernel_size" if step.kernel_size else f"the new conv copies kernel_size from '{layer.name}'"
            raise StepError(
                f"{source}: {kh}x{kw} is even, and an even kernel cannot be a same-size identity (its centre is "
                "off the grid)", hint="Set kernel_size (odd, e.g. 3) in the deepen step.", short=f"even kernel {kh}x{kw}")
        d = pair(layer.dilation)
        new = Conv2d(type="conv2d", name=name, out_channels=width, kernel_size=(kh, kw), stride=1,
                     padding=(d[0] * (kh - 1) // 2, d[1] * (kw - 1) // 2), dilation=d, bias=layer.bias)
        fan_in = width * kh * kw
    new_layers.append(new)
    if norm is not None:
        bn_name = _unique_name(desc, f"{name}_bn", {name})
        new_layers.append(norm.model_copy(update={"name": bn_name}))
    if act is not None:
        new_layers.append(act)
    layers = list(desc.layers)
    layers[j:j] = new_layers
    renamed: dict[str, str] = {}  # new layer name -> old name, when nn.Sequential numbering shifts
    if step.name is None:
        layers, renamed = _renumber(desc, i, j, layers, len(new_layers))
        new_layers = layers[j:j + len(new_layers)]
    new_desc = ModelDescription(kind=desc.kind, input_shape=desc.input_shape, layers=layers)
    new_layout = new_desc.layout()
    old_key = {key: f"{renamed[info.layer]}.{key.rsplit('.', 1)[1]}" if info.layer in renamed else key
               for key, info in new_layout.tensors.items()}
    # new tensors, in the new layout's order (the recipes dict is rebuilt to follow it)
    changes = []
    created: dict[str, list[Op]] = {}
    new_dtypes: dict[str, torch.dtype] = {}
    new_shapes: dict[str, tuple[int, ...]] = {}
    for key, info in new_layout.tensors.items():
        if old_key[key] in plan.recipes and info.layer not in {x.name for x in new_layers if x.parametric}:
            continue
        suffix = key.rsplit(".", 1)[1]
        if new_layers[0].name == info.layer:  # the inserted linear/conv
            if exact:
                op = Create(index, info.shape, "identity" if suffix == "weight" else "const", 0.0)
            else:
                op = Create(index, info.shape, "default", fan_in=fan_in)
        else:  # its batchnorm: an identity in eval mode (running 0/1, gamma sqrt(1+eps)) or defaults
            eps = new_layers[1].eps
            value = {"weight": math.sqrt(1 + eps) if exact else 1.0, "bias": 0.0, "running_mean": 0.0,
                     "running_var": 1.0, "num_batches_tracked": 0.0}[suffix]
            op = Create(index, info.shape, "const", value)
        created[key] = [op]
        new_dtypes[key] = dtype if info.floating else _int64()
        new_shapes[key] = info.shape
        how = {"identity": "identity", "const": f"constant {op.value:g}", "default": "PyTorch default init"}[op.init]
        changes.append(TensorChange(key, None, info.shape, how))
    plan.recipes = {k: created[k] if k in created else plan.recipes[old_key[k]] for k in new_layout.tensors}
    plan.dtypes = {k: new_dtypes[k] if k in created else plan.dtypes[old_key[k]] for k in new_layout.tensors}
    plan.shapes = {k: new_shapes[k] if k in created else plan.shapes[old_key[k]] for k in new_layout.tensors}
    changes += [TensorChange(k, plan.shapes[k], plan.shapes[k], f"renamed from {old_key[k]} (nn.Sequential numbering)")
                for k in new_layout.tensors if old_key[k] != k]
    inserted = " + ".join(x.describe() for x in new_layers)
    plan.steps.append(PlannedStep(
        index, entry, f"deepen after {layer.name}: insert {inserted} ({step.method})", exact, changes,
        desc.layout().num_parameters(), new_layout.num_parameters()))
    plan.model_after = new_desc


def _int64():
    import torch

    return torch.int64


def exact_counterpart(steps: list[StepEntry]) -> list[StepEntry] | None:
    """The same steps without noise and with the function-preserving methods (same seed, same
    mapping g), which is what verification checks when noise or a baseline method is used."""
    return [StepEntry(**{e.kind: e.step.exact_counterpart()}) for e in steps]
