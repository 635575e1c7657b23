"""qpruner: structured pruning + per-layer mixed-precision quantization + Bayesian search + LoRA recovery."""

from qpruner import noise

__version__ = "0.1.0"

noise.install()  # every process that imports qpruner, Ray workers included (see qpruner/noise.py)
