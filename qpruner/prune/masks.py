"""Which weights a sparse pruning method zeros: the sparsity target and the per-block masks that SparseGPT-style
pruning (qpruner/prune/sparse.py) and APT (qpruner/prune/apt.py) both select with."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qpruner.config import PruneConfig

BLOCK = 128  # columns per mask-selection / update block (SparseGPT's and APT's block along the input dimension)


@dataclass(frozen=True)
class Sparsity:
    """What to zero: `fraction` of the weights; with m > 0, exactly m - n of every m consecutive inputs."""

    fraction: float
    n: int = 0
    m: int = 0

    @classmethod
    def of(cls, pcfg: PruneConfig) -> "Sparsity":
        return cls(*pcfg.sparsity_spec())


def split_count(total: int, parts: int, start: int, stop: int) -> int:
    """How many of `total` fall into parts [start, stop) when spread evenly; the counts add up to `total` exactly."""
    return round(total * stop / parts) - round(total * start / parts)


def lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k smallest scores (over the whole tensor)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.topk(scores.flatten(), k, largest=False).indices] = True
    return mask.view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mask of the m - n smallest scores in each group of m consecutive columns (width divisible by m)."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    idx = torch.topk(groups, m - n, dim=-1, largest=False).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True).reshape(rows, cols)


def block_mask(scores: torch.Tensor, spec: Sparsity, start: int, width: int) -> torch.Tensor:
    """Mask for the block of columns starting at `start` of a `width`-column Linear: N:M within it, or its
    exact share of the Linear's unstructured target (compared across all rows of the block)."""
    if spec.m:
        return nm_mask(scores, spec.n, spec.m)
    rows, cols = scores.shape
    total = round(spec.fraction * rows * width)
    return lowest(scores, split_count(total, width, start, start + cols))
