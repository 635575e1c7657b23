"""Structured pruning, run once: LLM-Pruner-style Taylor importance on coupled GQA groups and MLP channels."""

from qpruner.prune.store import (
    PruneResult,
    load_pruned,
    prune_cached,
    prune_with_ray,
    pruned_layer_count,
    save_pruned,
)
from qpruner.prune.taylor import plan_pruning, prunable_layers, prune_model

__all__ = [
    "PruneResult", "load_pruned", "prune_cached", "prune_with_ray", "pruned_layer_count", "save_pruned",
    "plan_pruning", "prune_model", "prunable_layers",
]
