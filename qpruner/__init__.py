"""qpruner: structured pruning + per-layer mixed-precision quantization + Bayesian search + LoRA recovery."""

__version__ = "0.1.0"
