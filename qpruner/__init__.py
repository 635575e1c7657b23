"""qpruner: structured pruning + per-layer mixed-precision quantization + Bayesian search + LoRA recovery."""

import os

from qpruner import noise

__version__ = "0.1.0"

# OpenMP threads that spin while they wait for each other collapse on a busy machine: on 2 cores under load
# (load average 10) one training step of the tiny model took 5.6-8.5 s with torch's 2 threads spinning and 0.86 s
# with them sleeping (1 thread: 0.6 s), so the tiny model's first build went from about 2 minutes to about an hour.
# Read when torch loads OpenMP, so set before any import of torch; a value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

noise.install()  # every process that imports qpruner, Ray workers included (see qpruner/noise.py)
