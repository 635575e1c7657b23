"""APT (arXiv 2410.15567, "Pruning Foundation Models for High Accuracy without Retraining"): per row,
remove a whole set of weights at once with the update that is optimal for that set (OBS generalised
from one weight to many), block by block along the input dimension, layer after layer.

The paper ships no code; the update below is derived here.

Derivation. A Linear row w (1 x d) sees calibration inputs X (tokens x d); changing it by delta
changes its outputs by X delta^T, so the output error is E(delta) = delta H delta^T with H = X^T X
(damped: H + lambda I, lambda = 1% of mean diag H, as SparseGPT and qpruner's SlimGPT do). Removing
the set S means the constraint (w + delta) E_S = 0, with E_S the d x |S| columns of the identity
that pick S. Minimise delta H delta^T subject to delta E_S = -w_S: the Lagrangian
delta H delta^T + 2 (delta E_S + w_S) mu^T is stationary at delta = -mu E_S^T H^-1; the constraint
gives mu (E_S^T H^-1 E_S) = w_S, i.e. mu = w_S (Hinv_SS)^-1. Hence

    delta = -w_S (Hinv_SS)^-1 Hinv_S:        error = w_S (Hinv_SS)^-1 w_S^T,

and |S| = 1 is OBS (delta = -w_q / Hinv_qq * Hinv_q:, error w_q^2 / Hinv_qq).

Blocks. Columns are taken in blocks B of 128. When block B = [i, i+128) is reached, the columns
before i are final, so only F = {i, ..., d-1} may move: the error of delta_F is delta_F H_FF
delta_F^T and the formula holds with Hinv = (H_FF)^-1. Each row chooses its own S inside B: N:M
keeps the N largest of each M by the OBS saliency w_j^2 / Hinv_jj, an unstructured target removes
the block's exact share of the smallest saliencies across all rows. Then every row gets its set
update at once (batched |S| x |S| Cholesky solves, padded to the largest set with identity rows, so
padding costs nothing), and the next block's inverse is the Schur complement
(H_F'F')^-1 = Hinv_F'F' - Hinv_F'B (Hinv_BB)^-1 Hinv_BF' for F' = F minus B, with no new inversion of H.

Versus SparseGPT (qpruner/prune/sparse.py): SparseGPT removes the block's weights one column at a
time and moves each error only onto later columns; here the row's whole set goes at once and its
error lands on all remaining columns of the block and beyond, the exact minimiser for that mask
given the finished columns.
"""

from __future__ import annotations

import torch

from qpruner.prune.masks import BLOCK, Sparsity, block_mask
from qpruner.prune.slimgpt import inverse_hessian


def set_update(w_block: torch.Tensor, hinv_rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """delta of every row for removing its masked block columns: -w_S (Hinv_SS)^-1 Hinv_S:.

    w_block: rows x b (the block's weights), hinv_rows: b x f (the block's rows of (H_FF)^-1, block
    first), mask: rows x b. Returns rows x f.
    """
    rows, b = mask.shape
    counts = mask.sum(1)
    s = int(counts.max()) if rows else 0
    if s == 0:
        return torch.zeros(rows, hinv_rows.shape[1], dtype=w_block.dtype, device=w_block.device)
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :s]  # each row's removed columns first
    valid = (torch.arange(s, device=mask.device) < counts[:, None]).to(w_block.dtype)
    hss = hinv_rows[:, :b][order[:, :, None], order[:, None, :]]
    hss = hss * valid[:, :, None] * valid[:, None, :] + torch.diag_embed(1 - valid)
    w_s = w_block.gather(1, order) * valid
    coef = torch.cholesky_solve(w_s.unsqueeze(-1), torch.linalg.cholesky(hss)).squeeze(-1) * valid
    return -torch.zeros_like(w_block).scatter_(1, order, coef) @ hinv_rows


def apt_prune(weight: torch.Tensor, gram: torch.Tensor, spec: Sparsity, block: int = BLOCK) -> torch.Tensor:
    """APT on one Linear: block by block, choose each row's set and apply its optimal multi-weight update."""
    w = weight.float().clone()
    hinv = inverse_hessian(gram)  # (H_FF)^-1 for F = the columns not yet finished
    cols = w.shape[1]
    for i in range(0, cols, block):
        b = min(block, cols - i)
        mask = block_mask(w[:, i:i + b].pow(2) / hinv.diagonal()[:b], spec, i, cols)
        w[:, i:] += set_update(w[:, i:i + b], hinv[:b], mask)
        w[:, i:i + b].masked_fill_(mask, 0)
        if i + b < cols:
            hbb = torch.linalg.cholesky(hinv[:b, :b])
            hinv = hinv[b:, b:] - hinv[b:, :b] @ torch.cholesky_solve(hinv[:b, b:], hbb)
    return w.to(weight.dtype)
