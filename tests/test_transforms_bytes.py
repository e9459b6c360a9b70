"""Widening a half-precision tensor divides its ``in`` copies in the tensor's own dtype when the
result is rounded to that dtype right after (transforms.widen_axis ``last``), and gathers units
with ``repeat`` / advanced indexing (transforms.select_units): both must give exactly the bytes of
the float32 path they replace, for every value the dtype has."""

from __future__ import annotations

import pytest
import torch

from n2n_cli.layers import Axis
from n2n_cli.transforms import select_units, widen_axis


def every_value(dtype: torch.dtype) -> torch.Tensor:
    """Every bit pattern of a 16-bit float dtype but NaNs (n2n refuses non-finite teachers)."""
    t = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    return t[~torch.isnan(t)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 6, 7, 8, 11, 16, 100, 255, 256])
def test_own_dtype_division_matches_float32_path(dtype, count):
    x = every_value(dtype)
    counts = torch.full((x.numel(),), count, dtype=torch.int64)
    old = (x.to(torch.float32) / counts.to(torch.float32)).to(dtype)
    new = x / counts.to(dtype)
    assert torch.equal(old.view(torch.int16), new.view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ["tile", "random"])
@pytest.mark.parametrize("role", ["in", "out"])
def test_widen_axis_last_matches_float32_path(dtype, kind, role):
    g0 = torch.Generator().manual_seed(0)
    old_units, new_units = 37, 37 * 3 if kind == "tile" else 90
    # values over the whole range, tiny (subnormal after the division) and huge included
    t = (torch.randn(5, old_units, generator=g0) * torch.logspace(-40, 30, 5).unsqueeze(1)).to(dtype)
    g = (torch.arange(new_units) % old_units if kind == "tile"
         else torch.cat([torch.arange(old_units), torch.randint(0, old_units, (new_units - old_units,), generator=g0)]))
    axis = Axis("h", role)
    args = dict(method="net2wider", noise=0.0, noise_mode="zero-sum", rng=torch.Generator(), work=torch.float32)
    ref = widen_axis(t, 1, axis, g, **args).to(dtype)
    fast = widen_axis(t, 1, axis, g, last=True, **args)
    assert fast.dtype == dtype
    assert torch.equal(ref.view(torch.uint8) if dtype != torch.float32 else ref, fast.view(torch.uint8)
                       if dtype != torch.float32 else fast)


@pytest.mark.parametrize("shape,u", [((6, 10), 0), ((6, 10), 1), ((3, 10, 4, 2), 1), ((3, 4, 10), 2)])
def test_select_units_is_index_select(shape, u):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    old = shape[u]
    for g in (torch.arange(old * 2) % old, torch.arange(old * 3) % old, torch.tensor([0, 3, 3, 1, old - 1, old - 1, old - 1]),
              torch.cat([torch.arange(old), torch.arange(old)]).flip(0)):
        assert torch.equal(select_units(t, u, g), t.index_select(u, g))
