"""Transformers' own layers run in bounded memory, for the blockwise verifier: the long probes
(past every attention window: thousands of tokens at 7B) would otherwise hold a [heads, tokens,
tokens] float32 matrix per layer (4.3 GB for 32 heads at 8208 tokens) and a [tokens,
intermediate] one per MLP projection, and a 7B block's weights in float32 take 0.87 GB.

Each family's attention module calls ``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation,
eager_attention_forward)``; :data:`NAME` is registered there (and as a mask interface: boolean
masks, 1 byte per query/key pair instead of 4) so that the model's own ``eager_attention_forward``
(its soft-capping, scaling and dropout rules) runs on slices: the query heads that share one
key/value head, ``QUERY_BYTES`` of their scores at a time. Softmax is taken over the keys of one
query row of one head, so a slice computes exactly what the same rows of the whole matrix
compute. A sequence short enough runs in one call, as eager attention. :class:`TokenWise` does
the same for the MLP (each token's output depends on that token only); :class:`Widened` keeps a
big block's bfloat16 projections out of memory until each one runs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

NAME = "n2n_query_slices"
#: the attention weights of one slice of queries take at most this many bytes (its heads' scores;
#: eager attention holds two or three such matrices at once: scaled, masked, softmaxed)
QUERY_BYTES = 32 * 2**20
#: the MLP runs this many tokens at a time (a [tokens, intermediate] float32 activation of a 7B
#: model's MLP is 29 MB at 512 tokens; the MLP holds four at once)
MLP_TOKENS = 512


class _Expanded:
    """The attention module, as seen by ``eager_attention_forward`` once its grouped keys and
    values are already repeated for every query head (``repeat_kv`` by 1 is the identity)."""

    num_key_value_groups = 1

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True: attend) as eager attention adds it: 0 or the dtype's minimum."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.where(mask, torch.zeros((), dtype=dtype, device=mask.device), torch.finfo(dtype).min)


def attention(module, query, key, value, attention_mask, *args, **kwargs):
    """The module's family's ``eager_attention_forward``, on slices of the queries: a group of
    query heads (those sharing one key/value head) and a run of query rows at a time, each slice's
    output written in place into the whole output (no list of slices concatenated: at 4,112
    tokens of a 7B model each copy of the output is 67 MB). Every family's eager attention treats
    heads on their own (a head's scores, mask, soft-capping and softmax involve that head only),
    as it treats query rows."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    batch, heads, q_len = query.shape[:3]
    k_len, kv_heads = key.shape[-2], key.shape[1]
    if QUERY_BYTES // (batch * heads * k_len * query.element_size()) >= q_len:
        return eager(module, query, key, value, _float_mask(attention_mask, query.dtype), *args, **kwargs)
    group = heads // kv_heads  # query heads per key/value head (1: every head has its own)
    rows = max(1, QUERY_BYTES // (batch * group * k_len * query.element_size()))
    inner = _Expanded(module) if group > 1 else module
    out = query.new_empty(batch, q_len, heads, value.shape[-1])
    for g in range(kv_heads):
        heads_g = slice(g * group, (g + 1) * group)
        # this key/value head repeated for its query heads: once per group, not once per slice
        k, v = (x[:, g:g + 1] if group == 1 else x[:, g:g + 1].repeat_interleave(group, dim=1) for x in (key, value))
        for start in range(0, q_len, rows):
            stop = min(q_len, start + rows)
            mask = attention_mask
            if mask is not None:
                mask = mask[:, heads_g] if mask.dim() == 4 and mask.shape[1] == heads else mask
                mask = _float_mask(mask[..., start:stop, :], query.dtype)
            o, _ = eager(inner, query[:, heads_g, start:stop].contiguous(), k, v, mask, *args, **kwargs)
            out[:, start:stop, heads_g] = o
            del o
    return out, None


def _mask(*args, **kwargs):
    """Transformers' boolean (SDPA) mask, always built (never skipped as "plain causal")."""
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    kwargs.pop("dtype", None)
    return sdpa_mask(*args, **kwargs)


def register() -> str:
    """Register :data:`NAME` with transformers (idempotent); the name to set as the config's
    ``_attn_implementation``, or "eager" where this transformers has no such registries."""
    try:
        from transformers.masking_utils import AttentionMaskInterface
        from transformers.modeling_utils import AttentionInterface
    except ImportError:
        return "eager"
    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, _mask)
    return NAME


class Widened(torch.nn.Linear):
    """A linear layer whose weight is stored narrower (bfloat16) than the input's dtype and
    widened for each call into a buffer shared by the block's layers (``scratch(n)``: the same
    memory each time, so one projection is widened at a time): read from the file's pages
    (``span``, a ``RawSpan``: mapped for the call only, so the stored weight does not stay in
    memory; the parameter itself is then on the meta device) or else from ``weight``. Computes
    exactly what the layer computes with its weight converted beforehand: widening is exact."""

    scratch: Callable[[int], torch.Tensor]
    span: object | None

    @classmethod
    def adopt(cls, module: torch.nn.Linear, scratch: Callable[[int], torch.Tensor], span=None) -> None:
        module.__class__ = cls
        module.scratch, module.span = scratch, span

    def forward(self, x):
        w = self.weight
        if self.span is not None:
            with self.span.mapped() as raw:
                w = self.scratch(w.numel()).view(w.shape).copy_(raw.view(self.span.dtype).view(w.shape))
        elif w.dtype != x.dtype:
            w = self.scratch(w.numel()).view(w.shape).copy_(w)
        return torch.nn.functional.linear(x, w, self.bias)


class TokenWise(torch.nn.Module):
    """``module`` (an MLP: [batch, tokens, width] in and out, each token on its own) run
    ``MLP_TOKENS`` tokens at a time. A wrapping module, not a patched ``forward``: a closure over
    the module's own bound method would make a reference cycle, and every block built would stay
    in memory until Python's cycle collector ran (150 MB more peak RSS at 1B)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.inner = module

    def forward(self, h, *args, **kwargs):
        if h.dim() != 3 or h.shape[1] <= MLP_TOKENS:
            return self.inner(h, *args, **kwargs)
        out = None
        for s in range(0, h.shape[1], MLP_TOKENS):
            o = self.inner(h[:, s:s + MLP_TOKENS].contiguous(), *args, **kwargs)
            if not isinstance(o, torch.Tensor):  # more than the tokens' outputs (router logits)
                return self.inner(h, *args, **kwargs)
            if out is None:  # written in place, chunk by chunk: no list of chunks concatenated
                out = o.new_empty(h.shape[0], h.shape[1], *o.shape[2:])
            out[:, s:s + o.shape[1]] = o
        return out
