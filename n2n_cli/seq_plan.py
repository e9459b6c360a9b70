"""Growth planning for sequential YAML descriptions (``kind: sequential``, what checkpoints grown so
far carry): the description's layout (``model.compile_layout``: every tensor axis labelled with the
space of the producer it follows) is what the planner (``n2n_cli.planner``) widens; deepening
inserts an identity layer (+ batchnorm + activation) into the description and renumbers
``nn.Sequential`` names. The description after each step is kept (``Plan.model_after``), for
verification and for the output's metadata. No tensor is touched here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    import torch

from .errors import StepError
from .layers import ACTIVATIONS, NORMS, PRODUCERS, Conv2d, Linear, pair
from .model import INPUT_SPACE, ModelDescription
from .planner import (Created, Kept, Load, Mapping, Op, PlannedStep, RecipePlan, check_larger, new_layer_op, new_norm_op,
                      plan_steps, rebuild, widen_spaces)
from .spec import DeepenStep, StepEntry, WidenStep


@dataclass
class Plan(RecipePlan):
    """A sequential description's plan: the recipes, and the description before and after."""

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
    plan_steps(plan, steps, lambda p, i, e: (_plan_widen if e.widen else _plan_deepen)(p, i, e), _label,
               collect=collect, numbers=numbers)
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
    check_larger(new, old, f"width {old} of '{layer.name}'", step.factor if step.to is None else None, "width")
    field_name = "out_features" if layer.type == "linear" else "out_channels"
    layers = list(desc.layers)
    layers[i] = layer.model_copy(update={field_name: new})
    new_desc = ModelDescription(kind=desc.kind, input_shape=desc.input_shape, layers=layers)
    labels = {key: [(ax, a) for ax, a in enumerate(info.axes) if a is not None] for key, info in layout.tensors.items()}
    changes = widen_spaces(plan, index, labels, {space.name: Mapping("random", old, new, (plan.seed, index))},
                           method=step.method, noise=step.noise, noise_mode=step.noise_mode)
    exact = step.method == "net2wider" and (step.noise == 0 or step.noise_mode == "zero-sum")
    by = f"to {step.to}" if step.to is not None else f"by factor {step.factor:g}"
    noise = f", {step.noise_mode} noise {step.noise}" if step.noise else ""
    plan.steps.append(PlannedStep(
        index, entry, f"widen {layer.name} {old} -> {new} ({step.method}{noise}, {by})", exact, changes,
        desc.layout().num_parameters(), new_desc.layout().num_parameters()))
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
    inserted_names = {x.name for x in new_layers if x.parametric}
    origins = {}
    for key, info in new_layout.tensors.items():
        if old_key[key] in plan.recipes and info.layer not in inserted_names:
            origins[key] = Kept(old_key[key], f"renamed from {old_key[key]} (nn.Sequential numbering)"
                                if old_key[key] != key else None)
            continue
        attr = key.rsplit(".", 1)[1]
        if new_layers[0].name == info.layer:  # the inserted linear/conv
            op = new_layer_op(index, attr, info.shape, step.method, fan_in)
        else:  # its batchnorm: an identity in eval mode, or defaults
            op = new_norm_op(index, attr, info.shape, new_layers[1].eps, exact)
        origins[key] = Created(op, dtype if info.floating else _int64())
    changes = rebuild(plan, index, origins)
    changes = [c for c in changes if c.old_shape is None] + [c for c in changes if c.old_shape is not None]
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
