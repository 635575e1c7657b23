"""Post-training unstructured and N:M pruning, layer by layer: masks, the driver, and three baselines.

Every method zeroes weights of the decoder Linears (q, k, v, o, gate, up, down) in place; nothing is
reshaped, so the model is stored dense exactly like a structured one. Layers are pruned in order, each
on the calibration activations the already pruned layers before it produce (the harness of SparseGPT,
Wanda and APT). Within a layer, q/k/v are pruned on the layer's input, o_proj on the input its pruned
attention gives, gate/up after that, down_proj last. Which layers: all decoder layers (the
post-training pruning papers' choice), or the window prune.first_layer/last_layer when either is set.

Sparsity targets are exact per Linear: unstructured `p` zeroes round(p * out * in) weights; "N:M"
keeps exactly N weights in every M consecutive inputs of each row.

Baselines (APT itself is in qpruner/prune/apt.py):
- magnitude: smallest |w| over the whole Linear; no calibration;
- Wanda (arXiv 2306.11695): smallest |w| * ||x_j||_2 within each output row, no weight update;
- SparseGPT-style (arXiv 2301.00774): columns removed one at a time, each pruned weight's error spread
  over the later columns with the Cholesky row of H^-1 (sequential OBS), mask chosen block by block.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from qpruner.config import PruneConfig
from qpruner.errors import ConfigError
from qpruner.prune.apt import apt_prune
from qpruner.prune.masks import BLOCK, Sparsity, block_mask, nm_mask, split_count
from qpruner.prune.slimgpt import capture_layer_inputs, input_gram, inverse_hessian, run_layer
from qpruner.prune.taylor import prunable_layers

# Linears pruned together on one input, in forward order: (submodule, names).
LINEAR_GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("self_attn", ("o_proj",)),
                 ("mlp", ("gate_proj", "up_proj")), ("mlp", ("down_proj",)))


def magnitude_prune(weight: torch.Tensor, gram, spec: Sparsity) -> torch.Tensor:
    """Zero the smallest-magnitude weights of the whole Linear (N:M: of each group)."""
    mask = block_mask(weight.abs().float(), spec, 0, weight.shape[1])
    return weight.masked_fill(mask, 0)


def wanda_prune(weight: torch.Tensor, gram: torch.Tensor, spec: Sparsity) -> torch.Tensor:
    """Zero the smallest |w_ij| * ||x_j|| within each output row (Wanda's comparison group), no update."""
    scores = weight.abs().float() * gram.diagonal().clamp_min(0).sqrt()
    if spec.m:
        mask = nm_mask(scores, spec.n, spec.m)
    else:
        rows, cols = scores.shape
        total = round(spec.fraction * rows * cols)
        counts = torch.tensor([split_count(total, rows, r, r + 1) for r in range(rows)], device=scores.device)
        ranks = scores.argsort(dim=1).argsort(dim=1)
        mask = ranks < counts[:, None]
    return weight.masked_fill(mask, 0)


def sparsegpt_prune(weight: torch.Tensor, gram: torch.Tensor, spec: Sparsity, block: int = BLOCK) -> torch.Tensor:
    """SparseGPT's sequential OBS: per block, choose the mask by w^2 / U_jj^2 (N:M: every m columns, on the
    updated weights), then remove column by column, each error e = (w - q) / U_jj moved onto later columns
    along row j of U, the upper Cholesky factor of H^-1."""
    w = weight.float().clone()
    u = torch.linalg.cholesky(inverse_hessian(gram), upper=True)
    cols = w.shape[1]
    for i in range(0, cols, block):
        j = min(i + block, cols)
        ub, wb = u[i:j, i:j], w[:, i:j]  # views: updates land in w
        d = ub.diagonal()
        mask = None if spec.m else block_mask(wb.pow(2) / d.pow(2), spec, i, cols)
        err = torch.zeros_like(wb)
        for c in range(j - i):
            if spec.m and c % spec.m == 0:
                part = nm_mask(wb[:, c:c + spec.m].pow(2) / d[c:c + spec.m].pow(2), spec.n, spec.m)
                mask = part if c == 0 else torch.cat([mask, part], dim=1)
            q = wb[:, c].masked_fill(mask[:, c], 0)
            err[:, c] = (wb[:, c] - q) / d[c]
            wb[:, c:] -= err[:, c:c + 1] * ub[c:c + 1, c:]
            wb[:, c] = q
        w[:, j:] -= err @ u[i:j, j:]
    return w.to(weight.dtype)


def sparse_layers(model: nn.Module, pcfg: PruneConfig) -> list[int]:
    """All decoder layers, unless prune.first_layer / last_layer ask for a window."""
    n = model.config.num_hidden_layers
    if pcfg.first_layer is None and pcfg.last_layer is None:
        return list(range(n))
    return prunable_layers(n, pcfg)


def check_nm(model: nn.Module, spec: Sparsity) -> None:
    """N:M needs every pruned Linear's input width divisible by M (and BLOCK too, so blocks hold whole groups)."""
    if not spec.m:
        return
    widths = {lin.in_features for layer in model.model.layers for sub, names in LINEAR_GROUPS
              for lin in (getattr(getattr(layer, sub), name) for name in names)}
    bad = sorted(w for w in widths if w % spec.m)
    if bad or BLOCK % spec.m:
        raise ConfigError("prune.sparsity", f"'{spec.n}:{spec.m}' needs input widths divisible by {spec.m}, but this model "
                          f"has {bad or BLOCK}; choose '2:4' or '4:8' or an unstructured fraction")


def method_fn(method: str):
    """The per-Linear function of a sparse method: (weight, input gram or None, Sparsity) -> pruned weight."""
    return {"apt": apt_prune, "magnitude": magnitude_prune, "wanda": wanda_prune, "sparsegpt": sparsegpt_prune}[method]


@torch.no_grad()
def prune_sparse(model: nn.Module, batches: list[torch.Tensor], pcfg: PruneConfig, progress: bool = True) -> dict:
    """Zero weights in place with `pcfg.method` at `pcfg.sparsity`; returns the pruned model's metadata."""
    spec = Sparsity.of(pcfg)
    check_nm(model, spec)
    prune = method_fn(pcfg.method)
    chosen = sparse_layers(model, pcfg)
    calibrate = pcfg.calibrates
    model.eval()
    inputs = capture_layer_inputs(model, batches) if calibrate else []
    layers, seconds, zeros, weights = model.model.layers, [], [], []
    for i in tqdm(range(max(chosen) + 1), desc=f"{pcfg.method} (layer by layer)", disable=not progress):
        layer = layers[i]
        if i in chosen and spec.fraction > 0:
            started = time.perf_counter()
            for sub, names in LINEAR_GROUPS:
                linears = [getattr(getattr(layer, sub), name) for name in names]
                gram = input_gram(layer, linears[0], inputs) if calibrate else None
                for lin in linears:
                    lin.weight.data.copy_(prune(lin.weight.data, gram, spec))
            seconds.append(time.perf_counter() - started)
        if i in chosen:
            params = [getattr(getattr(layer, sub), name).weight for sub, names in LINEAR_GROUPS for name in names]
            zeros.append(sum(int((p == 0).sum()) for p in params))
            weights.append(sum(p.numel() for p in params))
        if calibrate:
            inputs = run_layer(layer, inputs)
    return {"layers": chosen, "block_ratio": sum(zeros) / sum(weights), "layer_importance": [],
            "sparsity": {"spec": pcfg.sparsity, "fraction": spec.fraction, "n": spec.n, "m": spec.m,
                         "zeros": sum(zeros), "weights": sum(weights), "per_layer_zeros": zeros,
                         "seconds_per_layer": [round(s, 4) for s in seconds], "storage": "dense"}}


def zero_count(model: nn.Module) -> int:
    """Weights exactly zero in all parameters (for the overall fraction)."""
    return sum(int((p == 0).sum()) for p in model.parameters())
