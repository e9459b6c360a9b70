"""Execute a plan tensor by tensor: each output tensor is computed from its recipe alone."""

from __future__ import annotations

from functools import lru_cache

import torch

from .checkpoints import TensorSource
from .plan import Create, Load, Plan, Widen
from .transforms import generator, init_tensor, make_mapping, widen_axis


class Materializer:
    """``get(key)`` computes one output tensor of ``plan`` from ``source`` (in float32, or
    float64 for float64 tensors; cast back to the planned dtype). Nothing else is held in
    memory but the mappings g, so peak memory is a few times the largest tensor."""

    def __init__(self, plan: Plan, source: TensorSource):
        self.plan = plan
        self.source = source
        self._mapping = lru_cache(maxsize=None)(make_mapping)

    def get(self, key: str) -> torch.Tensor:
        recipe = self.plan.recipes[key]
        dtype = self.plan.dtypes[key]
        work = torch.float64 if dtype == torch.float64 else torch.float32
        t: torch.Tensor | None = None
        for op in recipe:
            if isinstance(op, Load):
                t = self.source.get(op.key)
                if t.is_floating_point():
                    t = t.to(work)
            elif isinstance(op, Create):
                t = init_tensor(op.init, op.shape, dtype=work if dtype.is_floating_point else dtype, value=op.value, fan_in=op.fan_in,
                                rng=generator(self.plan.seed, op.step, "init", key))
            elif isinstance(op, Widen):
                for ax, axis, mapping in op.axes:
                    t = widen_axis(t, ax, axis, self._mapping(mapping), method=op.method, noise=op.noise,
                                   noise_mode=op.noise_mode, rng=generator(self.plan.seed, op.step, "widen", key, ax),
                                   pad=mapping.pad, norm_scale=mapping.norm_scale)
        assert t is not None
        return t.to(dtype)

