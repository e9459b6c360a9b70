"""Optimizer state that follows the weights: grow a PyTorch optimizer ``state_dict()`` along a plan.

The moments of Adam and its relatives are running averages of gradients (``exp_avg``) and of
squared gradients (``exp_avg_sq``), so they must be mapped the way the *gradients* map at the
grown point, not the way the weights map. Growth is linear per tensor: the student weight unit
j is ``a_j * W[g(j)]`` (``a = 1`` for a producer row, ``1/c`` for a consumer column, the norm
scale ``s`` for a norm parameter, ``s/c`` for a norm feeding a tied head), and the student
computes the teacher's function for every teacher weight (F'(T(w)) = F(w)). Differentiating,
``G[k] = sum over the copies j of k of a_j G'[j]``, and the copies of a unit are symmetric
(swapping them leaves the student and its input unchanged), so every copy has the same gradient:

    G'[j] = G[g(j)] / (c * a_j)

per widened axis, multiplied over a tensor's axes: a producer row's gradient is divided by its
copy count (the consumers divided the columns), a consumer column's is copied (it reads the same
activation), a norm parameter's is divided by c*s, a tied head's final norm divided by s; zero
padding units (LEMON) have zero gradient. Averages of gradients map the same way; averages of
squared gradients with the factor squared. The rule is exact without noise; with zero-sum noise
the copies' consumer columns differ and so do their gradients (measured in the tests).

Deepening: the original tensors see the same stream and the same gradients (their moments are
copied, renamed if renumbered). An inserted tensor has no history: it gets a fresh state (zero
moments and step 0, exactly what the optimizer would create for a new parameter). Note that its
gradient at the grown point is not zero for the zeroed output projections, so the student's own
moments there would not be zero; nothing in the teacher's state can say what they would be.

The mapping walks the plan's recipes (Load / Widen / Create), the same ones that compute the
weights: no second planner. Parameters are matched to the state's integer keys by position, in
the order of ``model.parameters()`` (the order ``optimizer.state_dict()`` numbers them when the
optimizer was built from ``model.parameters()``, in one or several consecutive groups).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .errors import OutputError, UserError
from .layers import Axis
from .planner import Load, Widen
from .transforms import make_mapping

# state entries that are running averages of gradients (power 1) or of squared gradients (power 2);
# every growth factor is positive, so |g| (Adamax's exp_inf) maps like g
MOMENTS = {"exp_avg": 1, "momentum_buffer": 1, "grad_avg": 1, "exp_inf": 1,
           "exp_avg_sq": 2, "max_exp_avg_sq": 2, "sum": 2, "square_avg": 2}
# per-parameter scalars (kept as they are)
SCALARS = {"step", "mu_product", "eta", "mu"}
# states n2n refuses, by a key that identifies them
REFUSED = {
    "exp_avg_sq_row": "Adafactor (factored second moment: row and column statistics, not per-weight moments)",
    "exp_avg_sq_col": "Adafactor (factored second moment: row and column statistics, not per-weight moments)",
    "row_var": "Adafactor (factored second moment: row and column statistics, not per-weight moments)",
    "col_var": "Adafactor (factored second moment: row and column statistics, not per-weight moments)",
    "exp_avg_res_row": "CAME / Adafactor-style factored statistics",
    "preconditioners": "Shampoo (Kronecker-factored preconditioners: matrices over each axis, not per-weight)",
    "factor_matrices": "Shampoo (Kronecker-factored preconditioners)",
    "ax": "ASGD (its 'ax' is an average of the weights, not of gradients)",
    "prev": "Rprop (per-weight step sizes and previous-gradient signs)",
    "step_size": "Rprop (per-weight step sizes and previous-gradient signs)",
}
SUPPORTED = ("Adam, AdamW (amsgrad too), NAdam, RAdam, Adamax, Adagrad, RMSprop without momentum, "
             "SGD with momentum, Lion")


# --------------------------------------------------------------------------- the gradient rule


def moment_axis(t: torch.Tensor, ax: int, axis: Axis, g: torch.Tensor, *, power: int, method: str = "net2wider",
                pad: int = 0, norm_scale: float = 1.0) -> torch.Tensor:
    """The gradient-rule variant of ``transforms.widen_axis``: widen axis ``ax`` of a moment
    tensor ``t`` (float32 or float64) the way the gradients of the weight tensor widen.

    Each new unit j takes unit g(j) times ``(1 / (c * a_j)) ** power`` where ``a_j`` is the weight
    rule's multiplier for the axis role (out 1, in 1/c, norm s, norm_in s/c); ``pad`` zero units
    follow. ``random-pad`` (a baseline) keeps the old units and gives the new ones zeros.
    """
    if axis.span:
        whole = dataclasses.replace(axis, offset=0, span=0)
        mid = moment_axis(t.narrow(ax, axis.offset, axis.span), ax, whole, g, power=power, method=method, pad=pad,
                          norm_scale=norm_scale)
        rest = t.shape[ax] - axis.offset - axis.span
        return torch.cat([t.narrow(ax, 0, axis.offset), mid, t.narrow(ax, axis.offset + axis.span, rest)], dim=ax)
    t = t.unflatten(ax, (axis.segments, t.shape[ax] // (axis.segments * axis.block), axis.block))
    u = ax + 1
    old, new = t.shape[u], g.numel()
    shape = [1] * t.dim()
    shape[u] = -1
    if method == "random-pad":
        extra = list(t.shape)
        extra[u] = new - old
        return torch.cat([t, t.new_zeros(extra)], dim=u).flatten(ax, ax + 2)
    counts = torch.bincount(g, minlength=old).to(torch.float64)[g]
    a = {"out": torch.ones_like(counts), "in": 1 / counts, "norm": torch.full_like(counts, norm_scale),
         "norm_in": norm_scale / counts}[axis.role]
    factor = (1 / (counts * a)) ** power
    out = t.index_select(u, g)
    if not bool((factor == 1).all()):
        out = out * factor.to(t.dtype).reshape(shape)
    if pad:
        extra = list(out.shape)
        extra[u] = pad
        out = torch.cat([out, out.new_zeros(extra)], dim=u)
    return out.flatten(ax, ax + 2)


def _map_tensor(t: torch.Tensor, recipe: list, power: int, mappings) -> torch.Tensor:
    work = torch.float64 if t.dtype == torch.float64 else torch.float32
    out = t.to(work)
    for op in recipe[1:]:
        if isinstance(op, Widen):
            for ax, axis, m in op.axes:
                out = moment_axis(out, ax, axis, mappings(m), power=power, method=op.method, pad=m.pad,
                                  norm_scale=m.norm_scale)
    return out.to(t.dtype)


# --------------------------------------------------------------------------- the state dict


def _where(path) -> str | None:
    return str(path) if path is not None else None


def check_state(state: dict, names: list[str], shapes: dict[str, tuple[int, ...]], where=None) -> list[int]:
    """Check an optimizer ``state_dict()`` against the teacher's parameters (``names`` in
    ``model.parameters()`` order, ``shapes`` by name). Returns the group of each parameter.
    Raises UserError naming the first mismatches or the optimizer n2n cannot map."""
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict) \
            or not isinstance(state.get("param_groups"), list):
        raise UserError("not an optimizer state dict: expected {'state': {...}, 'param_groups': [...]} as saved by "
                        "torch.save(optimizer.state_dict(), PATH)", where=_where(where))
    ids, group_of = [], []
    for gi, group in enumerate(state["param_groups"]):
        params = group.get("params") if isinstance(group, dict) else None
        if not isinstance(params, list):
            raise UserError(f"param_groups[{gi}] has no 'params' list", where=_where(where))
        ids += params
        group_of += [gi] * len(params)
    if len(ids) != len(names):
        raise UserError(f"the optimizer state holds {len(ids)} parameters but the checkpoint's model has "
                        f"{len(names)} (model.parameters())", where=_where(where),
                        hint="Save the state of an optimizer built from model.parameters() of this checkpoint's model.")
    problems, refused = [], {}
    position = {pid: i for i, pid in enumerate(ids)}
    for pid, entry in state["state"].items():
        if pid not in position:
            problems.append(f"state key {pid!r} is in no param group")
            continue
        name = names[position[pid]]
        if not isinstance(entry, dict):
            problems.append(f"state[{pid}] ({name}) is not a dict")
            continue
        if "square_avg" in entry and "momentum_buffer" in entry:
            refused.setdefault("RMSprop with momentum (its buffer holds past updates g/sqrt(v), not gradients)", pid)
        for k, v in entry.items():
            if k in REFUSED:
                refused.setdefault(REFUSED[k], pid)
            elif k in MOMENTS:
                if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(shapes[name]):
                    got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                    problems.append(f"state[{pid}]['{k}'] has shape {got}, but parameter {pid} ({name}) has shape "
                                    f"{tuple(shapes[name])}")
            elif k not in SCALARS and isinstance(v, torch.Tensor) and v.dim() > 0:
                refused.setdefault(f"an optimizer with per-weight state '{k}'", pid)
    if refused:
        what, pid = next(iter(refused.items()))
        raise UserError(f"n2n cannot grow the state of {what} (state[{pid}])", where=_where(where),
                        hint=f"n2n maps the moments of: {SUPPORTED}. Start the grown model with a fresh optimizer.")
    if problems:
        raise UserError(f"the optimizer state does not match the checkpoint ({len(problems)} mismatch"
                        f"{'es' * (len(problems) > 1)}; parameters are numbered in model.parameters() order)",
                        where=_where(where), problems=problems[:10])
    return group_of


def grow_state(plan, state: dict, teacher_names: list[str], student_names: list[str],
               teacher_shapes: dict[str, tuple[int, ...]], *, where=None) -> dict:
    """The student's optimizer state dict: ``state`` (the teacher's, numbered like ``teacher_names``,
    whose checkpoint shapes are ``teacher_shapes``) mapped along ``plan.recipes``; numbered like
    ``student_names``; the same param_groups settings."""
    missing = [n for n in teacher_names if n not in teacher_shapes]
    if missing:
        raise UserError(f"the model's parameters {', '.join(missing[:5])} are not in the checkpoint",
                        where=_where(where))
    shapes = {n: tuple(teacher_shapes[n]) for n in teacher_names}
    group_of = check_state(state, teacher_names, shapes, where)
    ids = [pid for group in state["param_groups"] for pid in group["params"]]
    by_name = {n: (ids[i], group_of[i]) for i, n in enumerate(teacher_names)}
    cache: dict = {}

    def mapping(m):
        if m not in cache:
            cache[m] = make_mapping(m)
        return cache[m]

    missing = [n for n in student_names if n not in plan.recipes]
    if missing:
        raise UserError(f"the grown model has parameters the plan does not compute: {', '.join(missing[:5])}",
                        where=_where(where))
    seen: set[str] = set()
    new_state, groups = {}, []
    for j, name in enumerate(student_names):
        recipe = plan.recipes[name]
        src = recipe[0].key if isinstance(recipe[0], Load) and recipe[0].key not in seen else None
        if isinstance(recipe[0], Load):
            seen.add(recipe[0].key)
        if src is not None and src not in by_name:
            raise UserError(f"'{src}' is a checkpoint tensor but not a parameter of the model "
                            "(model.parameters())", where=_where(where))
        group = by_name[src][1] if src is not None else (groups[-1] if groups else 0)
        groups.append(group)
        entry = state["state"].get(by_name[src][0]) if src is not None else None
        if entry is not None:
            new_state[j] = {k: (_map_tensor(v, recipe, MOMENTS[k], mapping) if k in MOMENTS
                                else v.clone() if isinstance(v, torch.Tensor) else v) for k, v in entry.items()}
        elif src is None and state["state"]:
            new_state[j] = _fresh_entry(next(iter(state["state"].values())), plan.shapes[name])
    if any(b < a for a, b in zip(groups, groups[1:])):
        raise UserError("the optimizer's parameter groups are not consecutive runs of model.parameters(), so the "
                        "grown parameters cannot be numbered the way the grown model's optimizer will number them",
                        where=_where(where), hint="Use one parameter group, or groups that are consecutive runs.")
    param_groups = []
    for gi, group in enumerate(state["param_groups"]):
        g = dict(group)
        g["params"] = [j for j, k in enumerate(groups) if k == gi]
        param_groups.append(g)
    return {"state": new_state, "param_groups": param_groups}


def _fresh_entry(example: dict, shape) -> dict:
    """What the optimizer creates for a new parameter: zero moments, step 0, other scalars kept."""
    out = {}
    for k, v in example.items():
        if k in MOMENTS:
            out[k] = torch.zeros(shape, dtype=v.dtype)
        elif k == "step":
            out[k] = torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0
        elif k == "mu_product":
            out[k] = torch.ones_like(v) if isinstance(v, torch.Tensor) else 1.0
        else:
            out[k] = v.clone() if isinstance(v, torch.Tensor) else v
    return out


# --------------------------------------------------------------------------- parameter names


def sequential_names(desc) -> list[str]:
    from .model import to_torch_module

    return [n for n, _ in to_torch_module(desc).named_parameters()]


def hf_names(config: dict, keys) -> list[str]:
    """``model.parameters()`` names of the transformers model ``config`` describes (built on the
    meta device: no memory), matched to checkpoint ``keys`` (a saved base model lacks the
    head's prefix)."""
    from .hf_verify import require_transformers

    transformers = require_transformers()
    cfg = dict(config)
    model_type = cfg.pop("model_type")
    conf = transformers.AutoConfig.for_model(model_type, **cfg)
    archs = conf.architectures or []
    heads = {"ForCausalLM": "AutoModelForCausalLM", "LMHeadModel": "AutoModelForCausalLM",
             "ForMaskedLM": "AutoModelForMaskedLM", "ForPreTraining": "AutoModelForPreTraining"}
    auto = next((cls for suffix, cls in heads.items() if any(a.endswith(suffix) for a in archs)), "AutoModel")
    with torch.device("meta"):
        model = getattr(transformers, auto).from_config(conf)
    keys = set(keys)
    out = []
    for n, _ in model.named_parameters():
        if n not in keys:
            alt = [k for k in keys if k.endswith("." + n) or n.endswith("." + k)]
            n = alt[0] if len(alt) == 1 else n
        out.append(n)
    return out


# --------------------------------------------------------------------------- files


def load_state(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError("no such file", where=str(path), hint="--optimizer-state takes a file saved by "
                        "torch.save(optimizer.state_dict(), PATH).")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors have many types
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot read an optimizer state from it: {cause}", where=str(path),
                        hint="Save it with torch.save(optimizer.state_dict(), PATH).") from None


def save_state(state: dict, path: str | Path, *, force: bool = False) -> None:
    """Write atomically beside ``path``; never over a file that appeared meanwhile (without
    ``force``), and with ``force`` only over a file ``torch.save`` wrote (a zip archive)."""
    from .checkpoints import place_file
    from .fsutil import temp_beside

    path = Path(path)
    if path.exists() and not force:
        raise UserError("already exists", where=f"--optimizer-state-out {path}",
                        hint="Choose another path or pass --force.")
    with temp_beside(path, "tmp") as tmp:
        torch.save(state, tmp)
        place_file(tmp, path, force=force, replaceable=check_replaceable_state)


def check_replaceable_state(path: Path) -> None:
    import zipfile

    if not path.is_file() or not zipfile.is_zipfile(path):
        raise OutputError("exists and is not a saved optimizer state (torch.save); --force replaces only one",
                          where=f"--optimizer-state-out {path}", hint="Move it away or choose another path.")


def inexact(plan, student_names: list[str]) -> dict[str, str]:
    """Student parameters whose mapped moments are not those the student would accumulate, and why."""
    out = {}
    for name in student_names:
        for op in plan.recipes.get(name, [])[1:]:
            if not isinstance(op, Widen):
                continue
            if op.method != "net2wider":
                out[name] = f"{op.method} (the new units are not copies)"
            elif op.noise:
                out[name] = "symmetry-breaking noise (the copies' gradients differ a little)"
            elif any(m.kind == "spread" and axis.space.startswith("kv_heads") for _, axis, m in op.axes):
                out[name] = ("key/value heads repeated: each copy is read by part of the query group, so its "
                             "gradient is a part of the teacher's; the copies get the mean (their first moments "
                             "sum to the teacher's)")
    return out


def summary(state: dict, approximate: dict[str, str] | None = None) -> dict:
    n = sum(len(g["params"]) for g in state["param_groups"])
    return {"parameters": n, "with_state": len(state["state"]),
            **({"approximate": approximate} if approximate else {}),
            "inserted_fresh": sum(1 for e in state["state"].values()
                                  if isinstance(e.get("step"), torch.Tensor) and float(e["step"]) == 0
                                  or e.get("step") == 0),
            "rule": "moments follow the gradients at the grown point (exp_avg like g, exp_avg_sq like g^2); "
                    "inserted tensors start fresh (zero moments, step 0)"}


def prepare(path, out, plan, header, force: bool, names):
    """The grown optimizer state and what in it is approximate (None without --optimizer-state),
    checked before anything is written; ``names()`` gives the teacher's and the student's
    parameter names in ``model.parameters()`` order."""
    if path is None and out is None:
        return None
    if path is None or out is None:
        raise UserError("give both --optimizer-state (the teacher's) and --optimizer-state-out (where to write the "
                        "grown one)")
    if Path(out).exists() and not force:
        raise UserError("already exists", where=f"--optimizer-state-out {out}",
                        hint="Choose another path or pass --force.")
    if Path(out).exists():  # refused now, not after the checkpoint is written
        check_replaceable_state(Path(out))
    state = load_state(path)
    teacher_names, student_names = names()
    grown = grow_state(plan, state, teacher_names, student_names,
                       {k: tuple(shape) for k, (_, shape) in header.items()}, where=path)
    return grown, inexact(plan, student_names)
