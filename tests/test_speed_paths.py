"""The fast paths of growth (issue 8) compute the same thing as the slow ones."""

from __future__ import annotations

import pytest
import torch

from n2n_cli.transforms import all_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n", [1, 7, 1000, 100003])
def test_all_finite_finds_every_nan_and_inf(dtype, n):
    for pos in (0, n // 2, n - 1):
        for v in (float("nan"), float("inf"), -float("inf")):
            x = torch.randn(n).to(dtype)
            assert all_finite(x)
            x[pos] = v
            assert not all_finite(x.reshape(1, -1)) and not all_finite(x)
    assert all_finite(torch.empty(0, dtype=dtype)) and all_finite(torch.arange(5))
