"""Execute a plan tensor by tensor: each output tensor is computed from its recipe alone."""

from __future__ import annotations

import concurrent.futures
from functools import lru_cache

import torch

from .checkpoints import RawSpan, TensorSource
from .planner import Create, Load, RecipePlan, Scale, Widen
from .transforms import all_finite, generator, init_tensor, make_mapping, widen_axis


class NonFinite(Exception):
    """A source tensor read while materializing holds NaN or Inf (``Materializer(check=True)``)."""


class Materializer:
    """``get(key)`` computes one output tensor of ``plan`` from ``source`` (arithmetic in float32,
    or float64 for float64 tensors; cast back to the planned dtype; copies in the tensor's dtype). Nothing else is held in
    memory but the mappings g, so peak memory is a few times the largest tensor."""

    def __init__(self, plan: RecipePlan, source: TensorSource, check: bool = False, raw: bool = False,
                 device: torch.device | str = "cpu"):
        """Transforms run on ``device`` (``--device``); results come back to the CPU for writing,
        with the same bytes on every device (random draws and noise scales are taken on the CPU).
        With ``check``, every source tensor is checked for NaN/Inf the first time it is read
        (:class:`NonFinite` if bad), so the input is read once for checking and writing together;
        :attr:`checked` is the set of source keys checked so far. With ``raw``, ``get`` may return
        a :class:`RawSpan` (for :func:`checkpoints.write_safetensors`) instead of a tensor."""
        self.plan = plan
        self.source = source
        self.check, self.raw = check, raw
        self.checked: set[str] = set()
        self.device = torch.device(device)
        if self.device.type == "mps":  # no float64 there, and untested: MPS verifies, the CPU transforms
            self.device = torch.device("cpu")
        self._mapping = lru_cache(maxsize=None)(lambda m: make_mapping(m).to(self.device))
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: list[tuple[str, concurrent.futures.Future]] = []

    def get(self, key: str) -> torch.Tensor | RawSpan:
        """The tensor; or, for a tensor copied unchanged from a source that can say where its
        bytes lie (``source.raw``), those bytes' :class:`RawSpan`, for the writer to copy as they
        are (checked first, with ``check``). Same bytes either way."""
        recipe = self.plan.recipes[key]
        dtype = self.plan.dtypes[key]
        if self.raw and len(recipe) == 1 and isinstance(recipe[0], Load) and hasattr(self.source, "raw") \
                and self.source.dtype(recipe[0].key) == dtype:
            span = self.source.raw(recipe[0].key)
            if span is not None:
                if self.check and recipe[0].key not in self.checked:
                    # checked in a worker thread while the writer copies the span (both release
                    # the GIL); :meth:`finish` waits for the verdicts
                    if self._pool is None:
                        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
                    self._pending.append((recipe[0].key, self._pool.submit(span.all_finite)))
                    self.checked.add(recipe[0].key)
                return span
        return self.tensor(key)

    def finish(self) -> None:
        """Wait for the checks still running; :class:`NonFinite` for the first bad tensor."""
        try:
            for key, ok in self._pending:
                if not ok.result():
                    raise NonFinite(key)
        finally:
            self.close()

    def close(self) -> None:
        """Stop the checks (after an error elsewhere); raises nothing."""
        self._pending = []
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def tensor(self, key: str) -> torch.Tensor:
        """The output tensor ``key`` as a tensor."""
        recipe = self.plan.recipes[key]
        dtype = self.plan.dtypes[key]
        work = torch.float64 if dtype == torch.float64 else torch.float32
        t: torch.Tensor | None = None
        for op in recipe:
            if isinstance(op, Load):
                # kept in its own dtype: a tensor that is only copied (most of a deepen) is never
                # converted; widen_axis converts to ``work`` when it computes (same values)
                t = self.source.get(op.key)
                if self.check and op.key not in self.checked:
                    if not all_finite(t):
                        raise NonFinite(op.key)
                    self.checked.add(op.key)
            elif isinstance(op, Create):
                t = _create(op, dtype, work, generator(self.plan.seed, op.step, "init", key))
            elif isinstance(op, Widen):
                t = t.to(self.device)  # only computed tensors travel; copies stay where they are
                for k, (ax, axis, mapping) in enumerate(op.axes):
                    # nothing but copies after this axis, then the rounding to the output dtype
                    last = op is recipe[-1] and t.dtype == dtype and all(
                        a.role == "out" for _, a, _ in op.axes[k + 1:])
                    t = widen_axis(t, ax, axis, self._mapping(mapping), method=op.method, noise=op.noise,
                                   noise_mode=op.noise_mode, rng=generator(self.plan.seed, op.step, "widen", key, ax),
                                   pad=mapping.pad, norm_scale=mapping.norm_scale, embed_scale=mapping.embed_scale,
                                   work=work if t.is_floating_point() else None, last=last)
            elif isinstance(op, Scale):
                t = _scale(op, t.to(self.device), work, self.plan.seed)
        assert t is not None
        return t.to(dtype).cpu()


def _create(op: Create, dtype: torch.dtype, work: torch.dtype, rng: torch.Generator) -> torch.Tensor:
    """A new tensor; a constant that ``dtype`` holds exactly (the zeroed output projections of a
    deepen) is filled in ``dtype`` directly, which gives the same bytes as via ``work``."""
    if op.init == "const" and dtype.is_floating_point and float(torch.tensor(op.value, dtype=dtype)) == op.value \
            and float(torch.tensor(op.value, dtype=work)) == op.value:
        return torch.full(op.shape, op.value, dtype=dtype)
    return init_tensor(op.init, op.shape, dtype=work if dtype.is_floating_point else dtype, value=op.value,
                       fan_in=op.fan_in, rng=rng)



def _scale(op: Scale, t: torch.Tensor, work: torch.dtype, seed: int) -> torch.Tensor:
    """``factor`` x t plus this member's share of zero-sum noise (the draws of every member, minus
    their mean, generated one at a time so that memory stays at three tensors)."""
    t = t.to(work)
    out = t * op.factor if op.factor != 1.0 else t
    if op.noise > 0:
        std = float(t.cpu().std()) if t.numel() > 1 else 0.0  # on the CPU: the same bits on every device
        rng = generator(seed, op.step, "scale-noise", op.group)
        total, mine = torch.zeros_like(t), None
        for m in range(op.members):
            eps = torch.randn(t.shape, generator=rng, dtype=work).to(t.device) * (op.noise * std)
            total += eps
            if m == op.member:
                mine = eps
        out = out + (mine - total / op.members)
    return out
