"""nn.MultiheadAttention beyond self-attention, for tests/test_graph_mha.py: cross-attention
(learned queries reading a memory of the same width, DETR-style), kdim/vdim (separate q, k, v
weights), add_bias_kv and add_zero_attn."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class CrossAttnNet(nn.Module):
    """Learned queries (a parameter) attend to a memory computed from patch tokens."""

    def __init__(self, dim=16, heads=2, queries=3, classes=5):
        super().__init__()
        self.embed = nn.Conv2d(3, 12, 4, 4)
        self.ctx = nn.Linear(12, dim)
        self.queries = nn.Parameter(torch.randn(1, queries, dim))
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 24), nn.GELU(), nn.Linear(24, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        mem = self.ctx(F.relu(self.embed(x).flatten(2).transpose(1, 2)))
        q = self.queries.expand(x.shape[0], -1, -1)
        h = q + self.attn(self.norm(q), mem, mem, need_weights=False)[0]
        h = h + self.mlp(h)
        return self.head(h.mean(1))


class KVDimNet(nn.Module):
    """Tokens attend to keys and values of their own widths (kdim=10, vdim=6)."""

    def __init__(self, dim=16, heads=2, classes=5):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.kin = nn.Linear(dim, 10)
        self.vin = nn.Linear(dim, 6)
        self.attn = nn.MultiheadAttention(dim, heads, kdim=10, vdim=6, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        h = t + self.attn(t, F.gelu(self.kin(t)), torch.tanh(self.vin(t)), need_weights=False)[0]
        return self.head(h.mean(1))


class BiasKVNet(nn.Module):
    """nn.MultiheadAttention(add_bias_kv=True, add_zero_attn=True): bias_k and bias_v follow the heads."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.attn = nn.MultiheadAttention(dim, heads, add_bias_kv=True, add_zero_attn=True, batch_first=True)
        self.head = nn.Linear(dim, 2)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        return self.head((t + self.attn(t, t, t, need_weights=False)[0]).mean(1))


class MemoryOfOtherWidth(nn.Module):
    """Packed cross-attention whose memory is the query stream of another branch: the two widths
    are one (its in_proj_weight reads both), so widening one widens the other."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.a = nn.Conv2d(3, dim, 4, 4)
        self.b = nn.Conv2d(3, dim, 4, 4)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Linear(dim, 2)

    def forward(self, x):
        ta = self.a(x).flatten(2).transpose(1, 2)
        tb = self.b(x).flatten(2).transpose(1, 2)
        return self.head(self.attn(ta, tb, tb, need_weights=False)[0].mean(1))


class MemoryConcat(nn.Module):
    """Packed cross-attention whose memory concatenates two linears (6 + 10 = embed_dim 16): the
    query stream would have to split into two regions, which its heads cannot tile as one."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.a = nn.Conv2d(3, dim, 4, 4)
        self.p = nn.Linear(dim, 6)
        self.q = nn.Linear(dim, 10)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Linear(dim, 2)

    def forward(self, x):
        t = self.a(x).flatten(2).transpose(1, 2)
        mem = torch.cat([self.p(t), self.q(t)], -1)
        return self.head(self.attn(t, mem, mem, need_weights=False)[0].mean(1))
