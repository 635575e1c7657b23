"""Qwen3 family (dense): per-head RMSNorm on queries and keys (q_norm/k_norm over head_dim)."""

from qpruner.families.base import Family, config_biases

FAMILY = Family(
    name="qwen3",
    model_types=("qwen3",),
    examples="Qwen3 dense (0.6B-32B)",
    biases=config_biases,
    head_norms=("q_norm", "k_norm"),
)
