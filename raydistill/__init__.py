"""raydistill: knowledge distillation, pruning and quantization orchestrated with Ray."""

__version__ = "0.1.0"
