"""The ``torch.nn.Module`` of a sequential model description (kept apart from ``model`` so that
reading descriptions and planning do not import torch)."""

from __future__ import annotations

import torch

from .layers import torch_layer
from .model import ModelDescription


class _Container(torch.nn.Module):
    pass


class SequentialNet(torch.nn.Module):
    """A ``torch.nn.Module`` for a description whose ``state_dict`` keys are the checkpoint's.

    >>> net = to_torch_module(desc); net.load_state_dict(safetensors.torch.load_file(path))
    """

    def __init__(self, desc: ModelDescription):
        super().__init__()
        shapes = desc.shapes()
        order = []
        stateless = torch.nn.ModuleList()
        for i, layer in enumerate(desc.layers):
            module = torch_layer(layer, shapes[i])
            if layer.parametric:
                *path, leaf = layer.name.split(".")
                parent: torch.nn.Module = self
                for part in path:
                    if not hasattr(parent, part):
                        parent.add_module(part, _Container())
                    parent = getattr(parent, part)
                parent.add_module(leaf, module)
            else:
                stateless.append(module)
            order.append(module)
        self._n2n_stateless = stateless  # registered so that .eval()/.to() reach dropout etc.
        self._n2n_order = order

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D401
        for module in self._n2n_order:
            x = module(x)
        return x
