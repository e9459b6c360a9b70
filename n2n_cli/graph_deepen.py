"""Deepen a model built by the user's own code: insert modules into the user's module tree.

Two steps, both planned as recipes (Load / Create ops) like every other growth:

- ``after: M``: an identity layer (conv with a centred delta kernel, or linear eye) after M. Where M
  sits in an ``nn.Sequential`` the new layers are inserted into that Sequential right after M and
  the BatchNorm / activation modules that follow it (conv + identity BatchNorm in eval mode + the
  same activation), exactly like the sequential YAML path; the Sequential is renumbered ``0, 1, ...``
  so the checkpoint loads into the user's own container. Elsewhere (M is an attribute used by a
  hand-written forward) M is replaced by ``nn.Sequential(M, new...)`` under the same name: M's keys
  become ``M.0.*`` and the new layers ``M.1``, ... (a leaf conv/linear gets the identity layer alone,
  right after it and before whatever the user's forward does next, so it is exact whatever follows).
  A container M (a ConvBN unit, a tower) gets conv + BN (if M uses BatchNorm) + M's final activation.
  Exact when that activation is idempotent (ReLU, ReLU6, or none); refused otherwise.
- ``after_block: B``: a copy of residual block B (traced: its output is ``x + f(x)``, maybe followed
  by ReLU) inserted right after it, with the last BatchNorm (gamma and beta) or conv/linear of its
  branch zeroed, so the copy computes act(x + 0). Exact when act is none, or ReLU and B's input is
  provably non-negative (it comes from a ReLU).

Each insertion is recorded as plain data (an edit) in the output's ``n2n_model_code`` metadata;
``apply_edits`` replays them on a module freshly built by the user's code (``load_grown``, chained
growth), before its tensors are resized to the checkpoint's shapes.
"""

from __future__ import annotations

import copy
import difflib
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .errors import StepError, UserError
from .graph import attention_parts

BN = nn.modules.batchnorm._BatchNorm
IDEMPOTENT_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Identity)
ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU,
               nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Softplus)
RELU_FUNCTIONS = {F.relu: "ReLU", torch.relu: "ReLU", F.relu6: "ReLU6"}
OTHER_ACT_FUNCTIONS = {F.gelu: "GELU", F.silu: "SiLU", torch.sigmoid: "Sigmoid", F.sigmoid: "Sigmoid",
                       torch.tanh: "Tanh", F.tanh: "Tanh", F.leaky_relu: "LeakyReLU", F.elu: "ELU",
                       F.hardswish: "Hardswish", F.mish: "Mish"}
POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
         nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout2d, nn.Identity, nn.Flatten)
POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.max_pool1d,
                  F.avg_pool1d, F.dropout, torch.flatten}
ADDS = {operator.add, operator.iadd, torch.add}


# ----------------------------------------------------------------------------- module tree surgery (replayable)


def _get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def _split(name: str) -> tuple[str, str]:
    parent, _, leaf = name.rpartition(".")
    return parent, leaf


def _numbered(seq: nn.Sequential) -> bool:
    return list(seq._modules) == [str(i) for i in range(len(seq._modules))]


def _build(model: nn.Module, spec: dict) -> nn.Module:
    if "copy" in spec:
        return copy.deepcopy(_get(model, spec["copy"]))
    cls = getattr(nn, spec.get("type", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise UserError(f"a recorded insertion names an unknown module type '{spec.get('type')}'")
    return cls(**spec.get("args", {}))


def apply_edit(model: nn.Module, edit: dict) -> list[nn.Module]:
    """Apply one recorded insertion to ``model`` in place; returns the new modules.

    ``{"op": "insert", "parent": P, "index": i, "modules": [...]}``: into nn.Sequential P at
    position i (renumbered 0, 1, ... when P is numbered; else named ``<previous>_deeper``);
    ``{"op": "wrap", "target": M, "modules": [...]}``: M becomes nn.Sequential(M, *modules).
    A module is ``{"type": "Conv2d", "args": {...}}`` (a torch.nn class) or ``{"copy": NAME}``."""
    new = [_build(model, m) for m in edit["modules"]]
    if edit["op"] == "insert":
        seq = _get(model, edit["parent"])
        if not isinstance(seq, nn.Sequential):
            raise UserError(f"a recorded insertion: '{edit['parent']}' is not an nn.Sequential in this model")
        children = list(seq._modules.items())
        at = edit["index"]
        if _numbered(seq):
            items = [(None, m) for _, m in children[:at]] + [(None, m) for m in new] + \
                [(None, m) for _, m in children[at:]]
            items = [(str(i), m) for i, (_, m) in enumerate(items)]
        else:
            base = children[at - 1][0] + "_deeper" if at else "deeper"
            items = children[:at] + [(base if k == 0 else f"{base}_{k}", m) for k, m in enumerate(new)] + children[at:]
        seq._modules.clear()
        for k, m in items:
            seq._modules[k] = m
    elif edit["op"] == "wrap":
        parent, leaf = _split(edit["target"])
        owner = _get(model, parent)
        setattr(owner, leaf, nn.Sequential(getattr(owner, leaf), *new))
    else:
        raise UserError(f"a recorded insertion has an unknown op '{edit['op']}'")
    return new


def apply_edits(model: nn.Module, edits: list[dict]) -> nn.Module:
    for e in edits:
        apply_edit(model, e)
    return model


# ----------------------------------------------------------------------------- reading the trace


def _inside(node: fx.Node, name: str) -> bool:
    if node.op == "call_module" and (node.target == name or node.target.startswith(name + ".")):
        return True
    return any(k.split("@")[0] == name for k in node.meta.get("nn_module_stack", {}))


def _region(gm: fx.GraphModule, name: str):
    """Module ``name``'s nodes; its inputs (nodes outside it that it reads); its outputs."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr") and _inside(n, name)]
    inside = set(nodes)
    inputs, outputs = [], []
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside and a not in inputs and a.op != "get_attr":
                inputs.append(a)
        if any(u not in inside for u in n.users) and n not in outputs:
            outputs.append(n)
    return nodes, inputs, outputs


def _act_of(node, modules: dict) -> tuple[str | None, nn.Module | None, bool]:
    """(name, a module computing it, idempotent) when ``node`` is an activation, else (None, None, False)."""
    if not isinstance(node, fx.Node):
        return None, None, False
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, ACT_MODULES):
            ok = isinstance(m, IDEMPOTENT_MODULES) and not (type(m) is nn.Hardtanh and m.min_val > 0)
            return type(m).__name__, m, ok
    elif node.op == "call_function":
        if node.target in RELU_FUNCTIONS:
            name = RELU_FUNCTIONS[node.target]
            return name, getattr(nn, name)(), True
        if node.target in OTHER_ACT_FUNCTIONS:
            return OTHER_ACT_FUNCTIONS[node.target], None, False
    elif node.op == "call_method":
        if node.target in ("relu", "relu_"):
            return "ReLU", nn.ReLU(), True
        if node.target in ("sigmoid", "tanh"):
            return node.target, None, False
    return None, None, False


def _what(node, modules) -> str:
    if node is None:
        return "nothing"
    if node.op == "call_module":
        return f"module '{node.target}' ({type(modules[node.target]).__name__})"
    if node.op == "placeholder":
        return "the network input"
    return f"{getattr(node.target, '__name__', node.target)}() (node '{node.name}')"


def _module_spec(m: nn.Module) -> dict:
    if isinstance(m, nn.Conv2d):
        return {"type": "Conv2d", "args": {"in_channels": m.in_channels, "out_channels": m.out_channels,
                                           "kernel_size": list(m.kernel_size), "padding": list(m.padding),
                                           "bias": m.bias is not None}}
    if isinstance(m, nn.Linear):
        return {"type": "Linear", "args": {"in_features": m.in_features, "out_features": m.out_features,
                                           "bias": m.bias is not None}}
    if isinstance(m, BN):
        return {"type": type(m).__name__, "args": {"num_features": m.num_features, "eps": m.eps,
                                                   "momentum": m.momentum}}
    if isinstance(m, (nn.ReLU, nn.ReLU6)):
        return {"type": type(m).__name__, "args": {"inplace": bool(m.inplace)}}
    if type(m) is nn.Hardtanh:
        return {"type": "Hardtanh", "args": {"min_val": m.min_val, "max_val": m.max_val}}
    if isinstance(m, nn.Identity):
        return {"type": "Identity"}
    raise UserError(f"n2n cannot record a new {type(m).__name__}")


# ----------------------------------------------------------------------------- planning an insertion


class Insertion:
    """One deepen step on the module tree, before any tensor: the edit to record, whether it is
    exact, and for a block copy which module it copies and which of the copy's tensors are zeroed."""

    def __init__(self, edit: dict, summary: str, exact: bool, *, copy_of: str | None = None,
                 zeroed: tuple[str, ...] = ()):
        self.edit, self.summary, self.exact, self.copy_of, self.zeroed = edit, summary, exact, copy_of, zeroed


def _find(model: nn.Module, name: str, what: str) -> nn.Module:
    modules = dict(model.named_modules())
    if not name or name not in modules:
        close = difflib.get_close_matches(name, [n for n in modules if n], n=3)
        raise StepError(f"{what}: the model has no module '{name}'",
                        hint=f"Did you mean: {', '.join(close)}?" if close else "See n2n inspect for the names.")
    return modules[name]


def _where_to_insert(model: nn.Module, target: str) -> tuple[str, int | None]:
    """(parent Sequential, index right after ``target``), or (target, None): wrap it."""
    parent, leaf = _split(target)
    owner = _get(model, parent)
    if isinstance(owner, nn.Sequential) and leaf in owner._modules:
        return parent, list(owner._modules).index(leaf) + 1
    return target, None


def _single_output(outputs, name: str, what: str) -> fx.Node:
    if not outputs:
        raise StepError(f"{what}: '{name}' is not used by the model's forward", hint="Choose a module the forward calls.")
    if len(outputs) > 1:
        raise StepError(f"{what}: '{name}' is called more than once, or returns several values",
                        hint="Choose a module called once, or a module around it.")
    out = outputs[0]
    if any(u.op == "output" for u in out.users):
        raise StepError(f"{what}: the output of '{name}' is the network's output: a layer after it would only "
                        "re-map the predictions", hint="Deepen after a hidden module.", short="network output")
    return out


def _refuse_act(name: str, act: str) -> None:
    raise StepError(f"'{name}' is followed by {act}, which is not idempotent ({act}({act}(x)) != {act}(x)), so an "
                    "identity layer after it (with its own activation) would change the function",
                    hint="Deepen after a module followed by ReLU/ReLU6 (or by no activation), or after the conv/linear "
                         "itself, or use method: random-init (not function-preserving).",
                    short=f"{act} is not idempotent")


def _edit(parent_or_target: str, index: int | None, modules: list[dict]) -> dict:
    if index is None:
        return {"op": "wrap", "target": parent_or_target, "modules": modules}
    return {"op": "insert", "parent": parent_or_target, "index": index, "modules": modules}


def plan_after(model: nn.Module, gm: fx.GraphModule, name: str, *, method: str,
               kernel_size: int | None) -> tuple[Insertion, list[nn.Module]]:
    """``deepen {after: name}`` (see the module docstring): the insertion and its new modules
    (constructed, default-initialised; their tensors are planned by the caller)."""
    target = _find(model, name, "after")
    modules = dict(model.named_modules())
    where, index = _where_to_insert(model, name)
    leaf = isinstance(target, (nn.Conv2d, nn.Linear))
    last, norm, act = name, None, None
    if index is not None and leaf:  # ..., M, BN?, act?, ... inside the user's nn.Sequential
        kids = list(_get(model, where)._modules.items())
        if index < len(kids) and isinstance(kids[index][1], BN):
            norm, index = kids[index][1], index + 1
        if index < len(kids) and isinstance(kids[index][1], ACT_MODULES):
            act, index = kids[index][1], index + 1
        last = f"{where}.{kids[index - 1][0]}" if where else kids[index - 1][0]
    _, _, outputs = _region(gm, last)
    out = _single_output(outputs, last, "after")
    tm = out.meta.get("tensor_meta")
    shape = tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None
    act_copy = None
    if act is not None:
        act_name, _, ok = _act_of(out, modules)
        if not ok and method == "net2deeper":
            _refuse_act(name, act_name or type(act).__name__)
        act_copy = copy.deepcopy(act)
    elif not leaf:  # a container: its final activation, and BatchNorm if it uses one
        act_name, act_copy, ok = _act_of(out, modules)
        if act_name is not None and not ok:
            if method == "net2deeper":
                _refuse_act(name, act_name)
            act_copy = None
        norm = next((m for m in target.modules() if isinstance(m, BN)), None)
    if shape is None or len(shape) not in (2, 3, 4):
        raise StepError(f"after: the output of '{last}' is not a (N, C, H, W) feature map or (N, [T,] F) features",
                        hint="Deepen after a conv or linear layer.")
    width = shape[1] if len(shape) == 4 else shape[-1]
    bias = norm is None and (not leaf or target.bias is not None)
    if len(shape) == 4:
        if kernel_size is None:
            kernel_size = target.kernel_size if isinstance(target, nn.Conv2d) else 3
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        if kh % 2 == 0 or kw % 2 == 0:
            src = "kernel_size" if not isinstance(target, nn.Conv2d) or kernel_size != target.kernel_size else \
                f"the new conv copies kernel_size from '{name}'"
            raise StepError(f"{src}: {kh}x{kw} is even, and an even kernel cannot be a same-size identity "
                            "(its centre is off the grid)", hint="Set kernel_size (odd, e.g. 3) in the deepen step.",
                            short=f"even kernel {kh}x{kw}")
        layer = nn.Conv2d(width, width, (kh, kw), padding=(kh // 2, kw // 2), bias=bias)
        new_norm = nn.BatchNorm2d(width, eps=norm.eps) if isinstance(norm, nn.BatchNorm2d) else None
    else:
        if kernel_size is not None:
            raise StepError(f"kernel_size: the output of '{last}' is not a feature map, so the new layer is linear "
                            "and has no kernel", hint="Drop kernel_size.")
        layer = nn.Linear(width, width, bias=bias)
        new_norm = nn.BatchNorm1d(width, eps=norm.eps) if isinstance(norm, nn.BatchNorm1d) and len(shape) == 2 else None
    new = [m for m in (layer, new_norm, act_copy) if m is not None]
    desc = " + ".join(type(m).__name__ + (f"({width}, {kh}x{kw})" if isinstance(m, nn.Conv2d) else
                                          f"({width})" if isinstance(m, (nn.Linear, BN)) else "") for m in new)
    loc = (f"into {where or 'the model'} at index {index}" if index is not None
           else f"as '{name}.1' ('{name}' becomes '{name}.0')")
    ins = Insertion(_edit(where, index, [_module_spec(m) for m in new]),
                    f"deepen after {name}: insert identity {desc} {loc} ({method})", method == "net2deeper")
    return ins, new


def _nonneg(node, modules: dict, upper6: bool = False, depth: int = 0) -> bool:
    """Is ``node`` >= 0 (and <= 6 with ``upper6``) by construction?"""
    if not isinstance(node, fx.Node) or depth > 50:
        return False
    name, _, _ = _act_of(node, modules)
    if name == "ReLU6" or (name == "ReLU" and not upper6):
        return True
    if (node.op == "call_module" and isinstance(modules[node.target], POOLS)) or \
            (node.op == "call_function" and node.target in POOL_FUNCTIONS) or \
            (node.op == "call_method" and node.target in ("flatten", "view", "reshape", "contiguous")):
        return _nonneg(node.args[0], modules, upper6, depth + 1)
    if node.op == "call_function" and node.target is torch.cat:
        return all(_nonneg(a, modules, upper6, depth + 1) for a in node.args[0])
    return False


def _zero_point(node, modules: dict, block: str) -> str:
    """The module whose parameters, zeroed, make the residual branch's output zero."""
    while isinstance(node, fx.Node):
        if node.op == "call_module":
            m = modules[node.target]
            if (isinstance(m, BN) and m.affine) or isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                return node.target
            if isinstance(m, (nn.Dropout, nn.Identity, nn.ReLU)):
                node = node.args[0]
                continue
            parts = attention_parts(m)
            if parts is not None:  # its output projection, zeroed, makes it output 0
                return f"{node.target}.{parts.proj}"
        elif node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0 and \
                isinstance(node.args[0], fx.Node) and node.args[0].op == "call_module" and \
                isinstance(modules[node.args[0].target], nn.MultiheadAttention):
            node = node.args[0]
            continue
        elif node.op == "call_function" and node.target in (F.dropout, F.relu, torch.relu):
            node = node.args[0]
            continue
        break
    raise StepError(f"after_block: the residual branch of '{block}' ends in {_what(node, modules)}, which n2n "
                    "cannot zero (it zeroes a last BatchNorm's gamma and beta, or a last conv/linear)",
                    hint="Choose a block whose branch ends in a BatchNorm, conv or linear.", short="branch not zeroable")


def plan_block(model: nn.Module, gm: fx.GraphModule, name: str, *, method: str) -> Insertion:
    """``deepen {after_block: name}``: a copy of residual block ``name`` with its branch zeroed."""
    block = _find(model, name, "after_block")
    modules = dict(model.named_modules())
    _, inputs, outputs = _region(gm, name)
    out = _single_output(outputs, name, "after_block")
    tensors = [n for n in inputs if n.meta.get("tensor_meta") is not None]
    kind = type(block).__name__
    if len(tensors) != 1:
        raise StepError(f"after_block: '{name}' ({kind}) reads {len(tensors)} tensors; a residual block reads one",
                        hint="Choose a block whose forward(x) returns x + f(x).", short="not a residual block")
    x = tensors[0]
    act_name, _, ok = _act_of(out, modules)
    add = out.args[0] if act_name is not None else out
    is_add = isinstance(add, fx.Node) and ((add.op == "call_function" and add.target in ADDS) or
                                           (add.op == "call_method" and add.target in ("add", "add_")))
    if not is_add:
        raise StepError(f"after_block: '{name}' ({kind}) is not a residual block: its output is not x + f(x) "
                        f"(torch.fx sees it end in {_what(out, modules)})",
                        hint="Choose a block whose forward returns x + f(x) (or relu(x + f(x))), or use after: M "
                             "to insert an identity layer.", short="not a residual block")
    operands = [a for a in add.args[:2] if isinstance(a, fx.Node)]
    branches = []  # a pre-norm transformer block adds twice: x1 = x + f(x); out = x1 + g(x1): zero f and g
    while len(operands) == 2 and x not in operands and operands[0] is not operands[1]:
        inner = [a for a in operands if a.op == "call_function" and a.target in ADDS and _inside(a, name)
                 and len(a.users) >= 2]
        if len(inner) != 1:
            break
        branches.append(operands[1] if operands[0] is inner[0] else operands[0])
        operands = [a for a in inner[0].args[:2] if isinstance(a, fx.Node)]
    if len(operands) != 2 or x not in operands or operands[0] is operands[1]:
        added = " and ".join(_what(a, modules) for a in operands) or "no tensors"
        raise StepError(f"after_block: the shortcut of '{name}' ({kind}) is not its input (it adds {added}, "
                        "neither of which is the block's input): a copy placed after it would get other shapes or a projection, "
                        "so it cannot be an identity", hint="Choose a block whose shortcut is its input (not the first "
                        "block of a stage with a downsample).", short="projection shortcut")
    points = [_zero_point(b, modules, name) for b in [operands[1] if operands[0] is x else operands[0], *branches]]
    if act_name is not None:
        if not ok:
            raise StepError(f"after_block: '{name}' ends in {act_name} after the add: {act_name}(x + 0) != x, so a "
                            "zeroed copy would change the function", hint="Choose a block with no activation "
                            "after the add, or ReLU.", short=f"{act_name} after the add")
        if not _nonneg(x, modules, upper6=act_name != "ReLU"):
            raise StepError(f"after_block: '{name}' ends in {act_name} after the add, and its input ("
                            f"{_what(x, modules)}) is not the output of a {act_name}, so {act_name}(x + 0) may differ "
                            "from x", hint="Blocks whose input comes from a ReLU (such as every block after the first "
                            "of a ResNet) are exact.", short=f"{act_name} after the add")
    where, index = _where_to_insert(model, name)
    rels = [z[len(name) + 1:] for z in points]
    zkeys = tuple(f"{rel}.{k}" for z, rel in zip(points, rels) for k, _ in modules[z].named_parameters(recurse=False))
    whose = "branches'" if len(points) > 1 else "branch's"
    what = " and ".join(f"{type(modules[z]).__name__} ({rel})" for z, rel in zip(points, rels))
    return Insertion(_edit(where, index, [{"copy": name}]),
                     f"deepen after_block {name}: insert a copy of {kind} '{name}' whose "
                     f"{whose} last {what} {'are' if len(points) > 1 else 'is'} zeroed, "
                     f"so {'each adds' if len(points) > 1 else 'it adds'} 0 ({method})",
                     method == "net2deeper", copy_of=name, zeroed=zkeys)
