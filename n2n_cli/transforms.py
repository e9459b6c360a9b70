"""Tensor transforms: one per kind of axis (out / in / norm), plus new-tensor initialisers.

Pure functions on tensors, computed in float32 or float64 by the caller. Randomness always comes
from an explicit ``torch.Generator`` so the same seed gives the same bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import torch

from .layers import Axis

PAD_STD = 0.1  # random-pad baseline (the seed experiment): N(0, 0.1) rows/columns, bias 0.1


def generator(*parts) -> torch.Generator:
    """A CPU generator seeded from ``parts`` (seed, step index, purpose, tensor key)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def make_mapping(m) -> torch.Tensor:
    """The index tensor g of a ``planner.Mapping``."""
    if m.kind == "random":
        extra = torch.randint(0, m.old, (m.new - m.old,), generator=generator(*m.seed, "mapping"))
        return torch.cat([torch.arange(m.old), extra])
    if m.kind == "tile":
        return torch.arange(m.new - m.pad) % m.old
    if m.kind == "spread":
        return torch.arange(m.new) * m.old // m.new
    if m.kind == "grouped":
        j = torch.arange(m.new)
        return make_mapping(m.base)[j // m.group] * m.group + j % m.group
    raise ValueError(f"unknown mapping kind {m.kind!r}")


def select_units(t: torch.Tensor, u: int, g: torch.Tensor) -> torch.Tensor:
    """``t.index_select(u, g)``, the same values, faster where it can: a tile mapping (``g`` =
    0..old-1 repeated) is a ``repeat`` (a copy of whole runs; 4x faster than a gather on an inner
    axis of a 2048 x 5632 bf16 matrix), an inner axis otherwise advanced indexing (1.6x faster
    than ``index_select`` there); the outer axis stays ``index_select`` (whole rows, fastest)."""
    old, new = t.shape[u], g.numel()
    if new % old == 0 and torch.equal(g, torch.arange(new, device=g.device) % old):
        reps = [1] * t.dim()
        reps[u] = new // old
        return t.repeat(reps)
    if u == 0:
        return t.index_select(0, g)
    return t[(slice(None),) * u + (g,)]


# the largest integer count a half dtype holds exactly (a divisor it can represent)
_EXACT_COUNTS = {torch.bfloat16: 256, torch.float16: 2048}


def _bshape(t: torch.Tensor, ax: int) -> list[int]:
    """Shape that broadcasts a vector along axis ``ax`` of ``t``."""
    shape = [1] * t.dim()
    shape[ax] = -1
    return shape


def widen_axis(t: torch.Tensor, ax: int, axis: Axis, g: torch.Tensor, *, method: str, noise: float,
               noise_mode: str, rng: torch.Generator, pad: int = 0, norm_scale: float = 1.0,
               work: torch.dtype | None = None, embed_scale: float = 1.0, last: bool = False) -> torch.Tensor:
    """Widen axis ``ax`` of ``t`` (which lives in ``axis.space``) from ``old`` units to len(g) + pad.

    The axis is viewed as (segments, units, block); units are what the space counts. Roles:
    ``out`` copies, ``in`` copies and divides by the copy count, ``norm`` copies and scales by
    ``norm_scale``, ``norm_in`` (a norm feeding a tied head) does both. ``pad`` zero units follow.
    With ``axis.span``, only that region of the axis (a concatenated tower) is widened.

    Arithmetic runs in ``work`` (default: ``t``'s dtype). Copies are exact in any dtype, so the
    units are selected in ``t``'s own dtype (half the bytes of float32 for bf16) and converted
    only when something is computed: the values are the same as converting first.

    ``last``: the caller rounds the result to ``t``'s dtype right after this axis (nothing but
    copies follows). Then a plain ``in`` division of a bfloat16/float16 tensor by float32 counts
    runs in the tensor's own dtype, which PyTorch computes as float32(x) / float32(c) rounded to
    float32 and then to the half dtype: the very roundings of converting, dividing in float32
    and converting back, so the same bytes (tests/test_transforms_bytes.py checks every bfloat16
    and float16 value), without two float32 copies of the tensor.
    """
    work = work or t.dtype
    if axis.span:
        whole = dataclasses.replace(axis, offset=0, span=0)
        mid = widen_axis(t.narrow(ax, axis.offset, axis.span), ax, whole, g, method=method, noise=noise,
                         noise_mode=noise_mode, rng=rng, pad=pad, norm_scale=norm_scale, work=work,
                         embed_scale=embed_scale)
        rest = t.shape[ax] - axis.offset - axis.span
        return torch.cat([t.narrow(ax, 0, axis.offset).to(mid.dtype), mid,
                          t.narrow(ax, axis.offset + axis.span, rest).to(mid.dtype)], dim=ax)
    if method == "random-pad" or (noise > 0 and axis.role == "in"):
        t = t.to(work)
    # the axis viewed as (segments, units, block); a plain axis (one segment, blocks of one) is
    # used as it is: index_select on an inner axis of the 3-D view is ~9x slower, same values
    flat = axis.segments == 1 and axis.block == 1
    if not flat:
        t = t.unflatten(ax, (axis.segments, t.shape[ax] // (axis.segments * axis.block), axis.block))
    u = ax if flat else ax + 1  # the units axis

    def done(x: torch.Tensor) -> torch.Tensor:
        return x if flat else x.flatten(ax, ax + 2)
    old, new = t.shape[u], g.numel()
    if method == "random-pad":
        shape = list(t.shape)
        shape[u] = new - old
        fill = {"normal": None, "bias": 0.1, "one": 1.0, "zero": 0.0}[axis.pad]
        extra = (torch.randn(shape, generator=rng, dtype=t.dtype).to(t.device) * PAD_STD if fill is None
                 else torch.full(shape, fill, dtype=t.dtype, device=t.device))
        return done(torch.cat([t, extra], dim=u))
    if method != "net2wider":
        raise ValueError(f"unknown widen method {method!r}")
    out = select_units(t, u, g)
    scaled = axis.role in ("norm", "norm_in") and norm_scale != 1.0
    embed = axis.role == "embed" and embed_scale != 1.0
    counts = torch.bincount(g, minlength=old) if axis.role in ("in", "norm_in") else None
    own = (last and axis.role == "in" and noise == 0 and work == torch.float32
           and counts.numel() and int(counts.max()) <= _EXACT_COUNTS.get(out.dtype, 0))
    if (scaled or embed or axis.role in ("in", "norm_in")) and not own:
        out = out.to(work)
    shift = axis.norm_shift if (scaled or axis.role == "norm_in") else 0.0
    if shift:
        out.add_(shift)  # the scale multiplies gamma = w + shift (Gemma: 1 + w), not the stored w
    if scaled:
        out.mul_(norm_scale)
    if embed:
        out.mul_(embed_scale)
    if axis.role == "norm_in" and embed_scale != 1.0:
        out.div_(embed_scale)  # a tied head reads the embedding scaled by embed_scale: undo it on the logits
    if axis.role in ("in", "norm_in"):
        counts = counts.to(out.dtype if own else work)
        out.div_(counts[g].reshape(_bshape(out, u)))
        if noise > 0 and axis.role == "in":
            std = float(t.cpu().std()) if t.numel() > 1 else 0.0  # on the CPU: the same bits on every device
            eps = torch.randn(out.shape, generator=rng, dtype=t.dtype).to(t.device) * (noise * std)
            if noise_mode == "zero-sum":
                # subtract each original unit's mean over its copies: the copies' noise sums to 0,
                # so the next layer still sees exactly the same sum (and single units get none)
                sums = torch.zeros_like(t).index_add_(u, g, eps)
                eps = eps - (sums / counts.reshape(_bshape(t, u))).index_select(u, g)
            elif noise_mode == "independent":
                keep = torch.arange(new, device=t.device) < old  # the Keras example: noise on the new copies only
                eps = eps * (~keep).to(t.dtype).reshape(_bshape(out, u))
            else:
                raise ValueError(f"unknown noise mode {noise_mode!r}")
            out = out + eps
    if shift:
        out.sub_(shift)
    if pad:
        shape = list(out.shape)
        shape[u] = pad
        out = torch.cat([out, out.new_zeros(shape)], dim=u)
    return done(out)


# --------------------------------------------------------------------------- new tensors


def init_tensor(init: str, shape: tuple[int, ...], *, dtype: torch.dtype, value: float = 0.0,
                fan_in: int = 1, rng: torch.Generator | None = None) -> torch.Tensor:
    """A new tensor for an inserted layer.

    identity: eye for linear (out, in), centred delta for conv (out, in, kh, kw);
    const: every entry ``value``; default: PyTorch's default Linear/Conv init, which for
    kaiming_uniform(a=sqrt(5)) and its bias is U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    """
    if init == "identity":
        t = torch.zeros(shape, dtype=dtype)
        idx = torch.arange(shape[0])
        if len(shape) == 2:
            t[idx, idx] = 1
        else:
            t[idx, idx, (shape[2] - 1) // 2, (shape[3] - 1) // 2] = 1
        return t
    if init == "const":
        return torch.full(shape, value, dtype=dtype)
    if init == "default":
        bound = 1.0 / math.sqrt(fan_in)
        return (torch.rand(shape, generator=rng, dtype=torch.float64) * 2 - 1).mul_(bound).to(dtype)
    if init == "normal":  # N(0, value^2): a small random router (dense-to-MoE upcycling)
        return (torch.randn(shape, generator=rng, dtype=torch.float64) * value).to(dtype)
    raise ValueError(f"unknown init {init!r}")


# --------------------------------------------------------------------------- checks


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``. One pass of ``aminmax`` in the tensor's own dtype (NaN propagates
    to min and max; an Inf is the max or the min), about 20x faster than ``isfinite(t).all()``,
    which converts and allocates a mask."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.reshape(-1))
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))
