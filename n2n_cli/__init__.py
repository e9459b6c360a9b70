"""n2n: grow trained PyTorch checkpoints wider and deeper with function-preserving
transforms (Net2WiderNet / Net2DeeperNet), verified, into safetensors."""

__version__ = "0.1.0"


def load_grown(model, path):
    """Resize ``model`` (built by your own code, at the teacher's sizes) to the grown checkpoint
    at ``path``, as recorded in its tensors, and load the weights strictly. Returns the module."""
    from .graph_api import load_grown as _load_grown

    return _load_grown(model, path)
