"""Small models whose norms normalise over a widened axis (GroupNorm, LayerNorm, F.layer_norm,
F.group_norm), for tests/test_graph_norms.py. Built by the user's code (--model-code)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class GNBlock(nn.Module):
    """conv-GN-relu-conv-GN + shortcut (a ResNet-GN basic block)."""

    def __init__(self, c, groups):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(groups, c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.gn2 = nn.GroupNorm(groups, c)

    def forward(self, x):
        return F.relu(x + self.gn2(self.conv2(F.relu(self.gn1(self.conv1(x))))))


class GNNet(nn.Module):
    """GroupNorm everywhere: a stem (4 groups of 2), a residual block, two towers concatenated and
    normalised together (GroupNorm over the concatenation), a GroupNorm without affine parameters,
    a per-channel GroupNorm (num_groups == channels) and one group (num_groups == 1)."""

    def __init__(self, width=8, classes=3):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.gn0 = nn.GroupNorm(4, width)
        self.block = GNBlock(width, 2)
        self.a = nn.Conv2d(width, 4, 1)
        self.b = nn.Conv2d(width, 6, 3, padding=1)
        self.gn_cat = nn.GroupNorm(5, 10)
        self.c = nn.Conv2d(10, 6, 1)
        self.gn_plain = nn.GroupNorm(3, 6, affine=False)
        self.d = nn.Conv2d(6, 5, 1)
        self.gn_chan = nn.GroupNorm(5, 5)
        self.e = nn.Conv2d(5, 4, 1)
        self.gn_one = nn.GroupNorm(1, 4)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        h = self.block(F.relu(self.gn0(self.stem(x))))
        h = F.relu(self.gn_cat(torch.cat([self.a(h), self.b(h)], 1)))
        h = F.silu(self.gn_plain(self.c(h)))
        h = F.relu(self.gn_chan(self.d(h)))
        h = self.gn_one(self.e(h))
        return self.fc(h.mean((2, 3)))


class LNMLP(nn.Module):
    """An MLP with LayerNorm after a hidden linear, a LayerNorm over the concatenation of two
    linears, and a pre-norm residual MLP block (the stream normalised, then added to)."""

    def __init__(self, inp=6, hidden=12, classes=3):
        super().__init__()
        self.fc1 = nn.Linear(inp, hidden)
        self.ln1 = nn.LayerNorm(hidden)
        self.p = nn.Linear(hidden, 5)
        self.q = nn.Linear(hidden, 7)
        self.ln_cat = nn.LayerNorm(12)
        self.ln_res = nn.LayerNorm(12)
        self.up = nn.Linear(12, 16)
        self.down = nn.Linear(16, 12)
        self.head = nn.Linear(12, classes)

    def forward(self, x):
        h = F.gelu(self.ln1(self.fc1(x)))
        h = self.ln_cat(torch.cat([self.p(h), self.q(h)], -1))
        h = h + self.down(F.gelu(self.up(self.ln_res(h))))
        return self.head(h)


class ChannelsFirstLN(nn.Module):
    """LayerNorm in a CNN: ConvNeXt's channels-last LayerNorm (permute, LayerNorm, permute back),
    a LayerNorm over (C, H, W) and one over (H, W) only (each channel on its own)."""

    def __init__(self, width=6, classes=3):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.ln = nn.LayerNorm(width)
        self.conv = nn.Conv2d(width, 5, 3, padding=1)
        self.ln_chw = nn.LayerNorm([5, 6, 6])
        self.conv2 = nn.Conv2d(5, 4, 1)
        self.ln_hw = nn.LayerNorm([6, 6])
        self.fc = nn.Linear(4 * 36, classes)

    def forward(self, x):
        h = self.ln(self.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        h = F.relu(self.ln_chw(self.conv(F.gelu(h))))
        h = self.ln_hw(self.conv2(h))
        return self.fc(h.flatten(1))


class FunctionalNorms(nn.Module):
    """F.layer_norm with a shape read from the tensor and the module's own weight and bias,
    F.layer_norm without a weight, and F.group_norm with a constant num_groups."""

    def __init__(self, width=8, hidden=10, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.gn_w = nn.Parameter(torch.ones(width))
        self.gn_b = nn.Parameter(torch.zeros(width))
        self.fc1 = nn.Linear(width, hidden)
        self.ln_w = nn.Parameter(torch.ones(hidden))
        self.ln_b = nn.Parameter(torch.zeros(hidden))
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        h = F.relu(F.group_norm(self.conv(x), 4, self.gn_w, self.gn_b))
        h = self.fc1(h.mean((2, 3)))
        h = F.gelu(F.layer_norm(h, h.shape[-1:], self.ln_w, self.ln_b))
        h = self.fc2(h)
        h = F.layer_norm(h, (h.shape[-1],))
        return self.head(h)


class ConstantLN(nn.Module):
    """F.layer_norm given a constant normalized_shape: the grown module would still normalise over
    the old width, so n2n refuses to widen what it normalises."""

    def __init__(self, hidden=8):
        super().__init__()
        self.hidden = hidden
        self.fc1 = nn.Linear(4, hidden)
        self.fc2 = nn.Linear(hidden, 2)

    def forward(self, x):
        return self.fc2(F.layer_norm(self.fc1(x), (self.hidden,)))


class PlainLN(nn.Module):
    """nn.LayerNorm(elementwise_affine=False): no tensor records its width."""

    def __init__(self, hidden=8):
        super().__init__()
        self.fc1 = nn.Linear(4, hidden)
        self.ln = nn.LayerNorm(hidden, elementwise_affine=False)
        self.fc2 = nn.Linear(hidden, 2)

    def forward(self, x):
        return self.fc2(self.ln(self.fc1(x)))


class ComputedGroups(nn.Module):
    """F.group_norm with num_groups computed from the input in forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        h = self.conv(x)
        return self.fc(F.group_norm(h, h.shape[1] // 4).mean((2, 3)))


class NormedPlusConcat(nn.Module):
    """A LayerNorm'd linear added to a concatenation of two linears: the normalised space is split
    into one region per tower, and both must grow by the same factor."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 9)
        self.ln = nn.LayerNorm(9)
        self.p = nn.Linear(6, 4)
        self.q = nn.Linear(6, 5)
        self.head = nn.Linear(9, 3)

    def forward(self, x):
        return self.head(F.gelu(self.ln(self.lin(x)) + torch.cat([self.p(x), self.q(x)], -1)))


class LayerNorm2d(nn.Module):
    """ConvNeXt's channels-first LayerNorm, written out: mean and variance over the channels."""

    def __init__(self, c, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class RMSNorm(nn.Module):
    """LLaMA's RMSNorm, as its reference code writes it (computed in float32, cast back with type_as)."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        return self._norm(x.float()).type_as(x) * self.weight


class HandWrittenNorms(nn.Module):
    """Norms written with tensor ops in the user's forward: a channels-first LayerNorm2d in a CNN and
    an RMSNorm in the MLP head (a mean over the features is kept by copying every feature equally)."""

    def __init__(self, width=6, hidden=10, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.norm = LayerNorm2d(width)
        self.conv2 = nn.Conv2d(width, 8, 1)
        self.fc = nn.Linear(8, hidden)
        self.rms = RMSNorm(hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        h = self.conv2(F.gelu(self.norm(self.conv(x))))
        return self.head(F.silu(self.rms(self.fc(h.amax((2, 3))))))


class ChannelSum(nn.Module):
    """A sum over the channels: it changes with every copy, so the channels it sums cannot grow."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(36, 2)

    def forward(self, x):
        return self.fc(self.conv(x).sum(1).flatten(1))
