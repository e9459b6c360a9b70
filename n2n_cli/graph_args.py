"""Constructor arguments that reproduce a grown model: ``NAME(**student_args)`` loads the student
with plain ``load_state_dict``.

n2n grows the user's module by resizing and inserting modules; whether the user's own constructor
can build the grown shapes directly depends on its signature. This module searches a small,
bounded space of keyword arguments: the integer (and list-of-integer) parameters of NAME's
signature, each moved to the values the growth implies (scaled by a widening ratio seen in the
tensors, increased by a widening difference, or by the number of inserted modules for depths),
one parameter at a time and then two at a time. Each candidate is built on the meta device (no
memory) and accepted only when its state dict has exactly the student's keys and shapes; the
first such candidate is then built for real, loaded strictly with the student's weights and run
on the example input: it must compute what the student computes (equal shapes are not enough: a
``head_dim=16`` and a ``num_heads=6`` can give the same tensors and different functions).
"""

from __future__ import annotations

import inspect as pyinspect
import json
from dataclasses import dataclass, field
from itertools import combinations

import torch

from .usercode import import_target

MAX_TRIES = 300
MAX_MOVES_PER_PARAM = 16


@dataclass
class ArgsSearch:
    name: str
    student_args: dict | None = None
    tried: int = 0
    params: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)  # shape matches that computed another function

    @property
    def found(self) -> bool:
        return self.student_args is not None

    def line(self) -> str:
        if self.found:
            return (f"load with: {self.name}(**{json.dumps(self.student_args, sort_keys=True)})"
                    ".load_state_dict(load_file(path))")
        what = ", ".join(self.params) if self.params else "no integer or list-of-integer parameters in its signature"
        extra = f"; shape matches that compute another function: {'; '.join(self.rejected)}" if self.rejected else ""
        return (f"load with n2n_cli.load_grown(model, path): no constructor arguments reproduce the grown shapes "
                f"(tried {self.tried} argument sets over {what}{extra})")

    def to_dict(self) -> dict:
        return {"how": "load_state_dict" if self.found else "load_grown", "student_args": self.student_args,
                "tried": self.tried, "params": self.params, "rejected": self.rejected, "line": self.line()}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_int_list(v) -> bool:
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(_is_int(e) for e in v)


def _params(target, args: dict) -> dict[str, object]:
    """NAME's keyword parameters with integer or list-of-integer values (recorded args over defaults)."""
    try:
        sig = pyinspect.signature(target)
    except (TypeError, ValueError):
        return {}
    out = {}
    for p in sig.parameters.values():
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            continue
        v = args.get(p.name, p.default)
        if _is_int(v) or _is_int_list(v):
            out[p.name] = list(v) if isinstance(v, (list, tuple)) else v
    return out


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(t.shape) for k, t in model.state_dict().items()}


def _int_values(v: int, pairs: set[tuple[int, int]], inserted: int) -> list[int]:
    """Values an integer size ``v`` may take after the growth: scaled by a ratio s/t or shifted by
    s - t of a widened dimension (t -> s), or increased by up to ``inserted`` (depths)."""
    vals = set()
    for t, s in pairs:
        if (v * s) % t == 0:
            vals.add(v * s // t)
        vals.add(v + s - t)
    vals.update(v + k for k in range(1, inserted + 1))
    return sorted(x for x in vals if x > 0 and x != v)


def _moves(value, pairs, inserted) -> list:
    """Alternative values of one parameter, bounded; the simplest first."""
    if _is_int(value):
        return _int_values(value, pairs, inserted)[:MAX_MOVES_PER_PARAM]
    moves = []
    ratios = sorted({(s, t) for t, s in pairs})
    for s, t in ratios:  # every element scaled (stage widths widened uniformly)
        if all((e * s) % t == 0 for e in value):
            moves.append([e * s // t for e in value])
    singles = [(i, x) for i, e in enumerate(value) for x in _int_values(e, pairs, inserted)]
    for i, x in singles:  # one element changed (one stage deeper or wider)
        moves.append([x if j == i else e for j, e in enumerate(value)])
    for (i, x), (j, y) in combinations(singles, 2):  # two elements changed
        if i != j:
            moves.append([x if k == i else y if k == j else e for k, e in enumerate(value)])
    out = []
    for m in moves:
        if m != value and m not in out:
            out.append(m)
    return out[:MAX_MOVES_PER_PARAM * 4]


def find_student_args(ref: str, args: dict, student: torch.nn.Module, x: torch.Tensor | None,
                      inserted: int) -> ArgsSearch:
    """Keyword arguments under which ``NAME(**args)`` has exactly ``student``'s state-dict keys and
    shapes and computes what ``student`` computes on ``x`` (``student``: the user's module, resized
    and loaded, as load_grown builds it). ``inserted``: how many module insertions were recorded."""
    target = import_target(ref)
    student = student.to(device="cpu", dtype=torch.float32)  # verification may have moved it to its device
    search = ArgsSearch(ref.rpartition(":")[2])
    want = _shapes(student)
    params = _params(target, args)
    search.params = sorted(params)

    def build(kw: dict, device: str):
        with torch.device(device):
            m = target(**kw)
        return m if isinstance(m, torch.nn.Module) else None

    def distance(kw: dict) -> int | None:
        """0 when NAME(**kw) has exactly the student's keys and shapes; else how far it is (a key
        missing or extra counts 2, a shape differing 1); None when it cannot be built."""
        search.tried += 1
        try:
            m = build(kw, "meta")
        except Exception:
            try:  # code that cannot build on the meta device (e.g. .item() in __init__): a real build
                m = build(kw, "cpu")
            except Exception:
                return None
        if m is None:
            return None
        got = _shapes(m)
        return 2 * len(got.keys() ^ want.keys()) + sum(got[k] != want[k] for k in got.keys() & want.keys())

    def same_function(kw: dict) -> bool:
        try:
            m = build(kw, "cpu").eval()
            m.load_state_dict(student.state_dict(), strict=True)
            if x is None:
                return True
            student.eval()
            with torch.no_grad():
                a, b = m(x), student(x)
            return isinstance(a, torch.Tensor) and a.shape == b.shape and torch.allclose(a, b, rtol=1e-6, atol=0)
        except Exception:
            return False

    def accept(kw: dict) -> int | None:
        """The candidate's distance; sets student_args when it reproduces the student."""
        d = distance(kw)
        if d != 0:
            return d
        if same_function(kw):
            search.student_args = json.loads(json.dumps(kw))
            return 0
        search.rejected.append(json.dumps({k: kw[k] for k in kw if kw[k] != args.get(k)}, sort_keys=True))
        return None

    base = json.loads(json.dumps(args))
    start = accept(base)
    if search.found or start is None:
        return search
    try:
        teacher_like = build(base, "meta")
    except Exception:
        return search
    have = _shapes(teacher_like)
    pairs = set()
    for k, s in want.items():
        t = have.get(k)
        if t is not None and len(t) == len(s):
            pairs.update((a, b) for a, b in zip(t, s) if a != b and a > 0)
    if not pairs and not inserted:
        return search
    moves = {p: _moves(v, pairs, inserted) for p, v in params.items()}
    closer = []  # (distance, parameter, value): single moves that bring the shapes closer to the student's
    for p in sorted(moves):  # one parameter
        for m in moves[p]:
            if search.tried >= MAX_TRIES:
                return search
            d = accept({**base, p: m})
            if search.found:
                return search
            if d is not None and d < start:
                closer.append((d, p, m))
    closer.sort(key=lambda c: (c[0], c[1], json.dumps(c[2])))
    # two parameters: only moves that each bring the shapes closer, the closest pairs first
    two = sorted(((a, b) for a, b in combinations(closer, 2) if a[1] != b[1]),
                 key=lambda ab: (ab[0][0] + ab[1][0], ab[0][1], ab[1][1]))
    for (_, p, m), (_, q, n) in two:
        if search.tried >= MAX_TRIES:
            return search
        accept({**base, p: m, q: n})
        if search.found:
            return search
    return search
