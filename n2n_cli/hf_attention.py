"""Transformers' own eager attention, run a slice of the queries at a time, for the blockwise
verifier: the long probes (past every attention window: thousands of tokens at 7B) would
otherwise hold a [heads, tokens, tokens] float32 matrix per layer (4.3 GB for 32 heads at 8208
tokens) and a [tokens, intermediate] one per MLP projection.

Each family's attention module calls ``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation,
eager_attention_forward)``; :data:`NAME` is registered there (and as a mask interface: boolean
masks, 1 byte per query/key pair instead of 4) so that the model's own ``eager_attention_forward``
(its soft-capping, scaling and dropout rules) runs on ``QUERY_BYTES``-sized slices of the queries:
softmax is taken over the keys of one query row, so a slice computes exactly what the same rows
of the whole matrix compute. A sequence short enough runs in one call, as eager attention.
:class:`TokenWise` does the same for the MLP (each token's output depends on that token only).
"""

from __future__ import annotations

import sys

import torch

NAME = "n2n_query_slices"
#: the attention weights of one slice of queries take at most this many bytes (all heads)
QUERY_BYTES = 64 * 2**20
#: the MLP runs this many tokens at a time (a [tokens, intermediate] float32 activation of a 7B
#: model's MLP is 59 MB at 1024 tokens)
MLP_TOKENS = 1024


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
    """The module's family's ``eager_attention_forward``, a slice of the queries at a time."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    batch, heads, q_len = query.shape[:3]
    rows = max(1, QUERY_BYTES // (batch * heads * key.shape[-2] * query.element_size()))
    if rows >= q_len:
        return eager(module, query, key, value, _float_mask(attention_mask, query.dtype), *args, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # repeated once here, not once per slice
        key, value = (x.repeat_interleave(groups, dim=1) for x in (key, value))
        module = _Expanded(module)
    outs = []
    for start in range(0, q_len, rows):
        mask = None if attention_mask is None else attention_mask[..., start:start + rows, :]
        out, _ = eager(module, query[:, :, start:start + rows].contiguous(), key, value, _float_mask(mask, query.dtype),
                       *args, **kwargs)
        outs.append(out)
    return torch.cat(outs, dim=1), None


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
        outs = [self.inner(h[:, s:s + MLP_TOKENS].contiguous(), *args, **kwargs) for s in range(0, h.shape[1], MLP_TOKENS)]
        if not all(isinstance(o, torch.Tensor) for o in outs):  # more than the tokens' outputs (router logits)
            return self.inner(h, *args, **kwargs)
        return torch.cat(outs, dim=1)
