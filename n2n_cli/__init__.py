"""n2n: grow trained PyTorch checkpoints wider and deeper with function-preserving
transforms (Net2WiderNet / Net2DeeperNet), verified, into safetensors."""

__version__ = "0.1.0"
