"""SlimGPT (arXiv 2412.18110): layer-wise structured pruning in the Optimal Brain Surgeon framework, no gradients.

Layer by layer, on the calibration activations that the already pruned earlier layers produce:
- attention: collect H = X^T X of o_proj's input, remove whole GQA groups one at a time, choosing the
  group whose removal costs least (OBS error of all groups at once, one batched Cholesky of the
  H^-1 diagonal blocks), compensate the remaining o_proj columns with the OBS update, then drop the
  group's q/k/v rows;
- MLP: the same on down_proj's input channels, removing channels in shrinking groups (half of what
  is left at each step: "dynamic group size"), then drop the matching gate/up rows.
Per-layer ratios grow logarithmically with depth ("incremental pruning ratio") while the whole model
loses `prune.ratio` of its parameters, as with the Taylor pruner.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from tqdm.auto import tqdm

from qpruner.config import PruneConfig
from qpruner.errors import ConfigError
from qpruner.prune.structure import (
    channel_params,
    group_params,
    group_rows,
    head_dim_of,
    keep_channels,
    keep_groups,
    layer_shape,
)
from qpruner.prune.taylor import aligned, channel_options, prunable_layers

DAMP = 0.01  # added to H's diagonal, as a fraction of its mean, so H is invertible


def layer_ratios(n: int, mean_ratio: float) -> list[float]:
    """n per-layer ratios rising like log(1 + depth) from shallow to deep, averaging `mean_ratio`."""
    weights = [math.log(2 + j) for j in range(n)]
    scale = mean_ratio * n / sum(weights)
    return [w * scale for w in weights]


def plan_layers(model: nn.Module, pcfg: PruneConfig) -> dict[int, tuple[int, int]]:
    """{layer: (groups to remove, channels to remove)} so the whole model loses `ratio` of its parameters."""
    total = sum(p.numel() for p in model.parameters())
    layers = prunable_layers(model.config.num_hidden_layers, pcfg)
    hidden, head_dim = model.config.hidden_size, head_dim_of(model)
    block = {i: sum(p.numel() for p in model.model.layers[i].parameters()) for i in layers}
    target = pcfg.ratio * total
    mean_ratio = target / sum(block.values())
    plan, removed = {}, 0
    for i, ratio in zip(layers, layer_ratios(len(layers), mean_ratio)):
        shape = layer_shape(model.model.layers[i], head_dim)
        per_group, per_channel = group_params(shape, head_dim, hidden), channel_params(hidden)
        max_groups = shape.num_key_value_heads - 1 if pcfg.prune_attention else 0
        max_channels = shape.intermediate_size - 1 if pcfg.prune_mlp else 0
        want = min(ratio, 0.95) * block[i]
        groups = round(ratio * shape.num_key_value_heads) if pcfg.prune_mlp else round(want / per_group)
        groups = max(0, min(groups, max_groups))
        channels = min(max(round((want - groups * per_group) / per_channel), 0), max_channels)
        if pcfg.prune_mlp and pcfg.round_to > 1:  # the multiple that keeps the running total closest to the target
            done = removed + groups * per_group
            aim = target * (len(plan) + 1) / len(layers)
            options = [c for c in channel_options(shape.intermediate_size, channels, pcfg.round_to)
                       if aligned(shape.intermediate_size, c, pcfg.round_to)]
            channels = min(options or [channels], key=lambda c: abs(done + c * per_channel - aim))
        plan[i] = (groups, channels)
        removed += groups * per_group + channels * per_channel
    if abs(removed - target) > 0.01 * total and pcfg.round_to > 1:  # the ratio comes first: widths as they fall
        return plan_layers(model, dataclasses.replace(pcfg, round_to=1))
    if abs(removed - target) > 0.02 * total:
        raise ConfigError(
            "prune.ratio",
            f"{pcfg.ratio} cannot be reached by SlimGPT's depth-increasing ratios on layers {layers[0]}..{layers[-1]} "
            f"(it removes {removed / total:.3f}); change the ratio or widen prune.first_layer/last_layer",
        )
    return plan


class _Stop(Exception):
    """Raised by the hook that captures layer 0's inputs, to skip the rest of the forward pass."""


def capture_layer_inputs(model: nn.Module, batches: list[torch.Tensor]) -> list[tuple[torch.Tensor, dict]]:
    """(hidden states, keyword args) that decoder layer 0 receives for each calibration row."""
    captured = []

    def hook(_module, args, kwargs):
        captured.append((args[0] if args else kwargs.pop("hidden_states"), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Stop

    handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def input_gram(layer: nn.Module, linear: nn.Linear, inputs: list[tuple[torch.Tensor, dict]]) -> torch.Tensor:
    """H = sum over calibration tokens of x x^T for the input x of `linear`, in float32."""
    gram = torch.zeros(linear.in_features, linear.in_features, device=linear.weight.device)

    def hook(_module, args):
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        gram.addmm_(x.T, x)

    handle = linear.register_forward_pre_hook(hook)
    try:
        run_layer(layer, inputs)
    finally:
        handle.remove()
    return gram


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: list[tuple[torch.Tensor, dict]]) -> list[tuple[torch.Tensor, dict]]:
    """The layer's outputs for each calibration row, paired with the same keyword args (next layer's inputs)."""
    out = []
    for hidden, kwargs in inputs:
        y = layer(hidden, **kwargs)
        out.append((y[0] if isinstance(y, tuple) else y, kwargs))
    return out


def inverse_hessian(gram: torch.Tensor) -> torch.Tensor:
    """(H + damping)^-1 through a Cholesky factorisation."""
    h = gram.clone()
    h.diagonal().add_(DAMP * h.diagonal().mean().clamp_min(1e-8))
    return torch.cholesky_inverse(torch.linalg.cholesky(h))


def obs_remove(weight: torch.Tensor, hinv: torch.Tensor, cols: torch.Tensor) -> None:
    """Zero `cols` of weight and move their contribution onto the other columns (OBS), in place; hinv too.

    delta W = -W[:, S] (Hinv_SS)^-1 Hinv_S:, and Hinv loses S the same way (Schur complement).
    """
    block_inv = torch.linalg.inv(hinv[cols][:, cols])
    weight -= weight[:, cols] @ block_inv @ hinv[cols]
    hinv -= hinv[:, cols] @ block_inv @ hinv[cols]
    weight[:, cols] = 0
    hinv[cols] = 0
    hinv[:, cols] = 0
    hinv[cols, cols] = 1  # keeps later block inverses of untouched sets well defined


def group_errors(weight: torch.Tensor, hinv: torch.Tensor, groups: list[torch.Tensor]) -> torch.Tensor:
    """OBS error of removing each column group: trace(W_S (Hinv_SS)^-1 W_S^T), all groups in one batched Cholesky."""
    blocks = torch.stack([hinv[g][:, g] for g in groups])
    inv = torch.cholesky_inverse(torch.linalg.cholesky(blocks))
    w = torch.stack([weight[:, g] for g in groups])  # (G, out, |S|)
    return torch.einsum("gos,gst,got->g", w, inv, w)


def prune_heads(layer: nn.Module, gram: torch.Tensor, n_remove: int, head_dim: int) -> None:
    """Batched greedy removal of `n_remove` GQA groups via o_proj's input columns, with OBS compensation."""
    shape = layer_shape(layer, head_dim)
    per_group = shape.num_attention_heads // shape.num_key_value_heads
    o = layer.self_attn.o_proj
    weight, hinv = o.weight.data.float().clone(), inverse_hessian(gram)
    cols = [group_rows(g, per_group, head_dim)[0].to(weight.device) for g in range(shape.num_key_value_heads)]
    alive = list(range(shape.num_key_value_heads))
    for _ in range(n_remove):
        errors = group_errors(weight, hinv, [cols[g] for g in alive])
        worst = alive.pop(int(errors.argmin()))
        obs_remove(weight, hinv, cols[worst])
    o.weight.data.copy_(weight.to(o.weight.dtype))
    keep_groups(layer, alive, head_dim)


def prune_channels(layer: nn.Module, gram: torch.Tensor, n_remove: int) -> None:
    """Remove `n_remove` MLP channels via down_proj's input columns in halving groups, with OBS compensation."""
    down = layer.mlp.down_proj
    weight, hinv = down.weight.data.float().clone(), inverse_hessian(gram)
    alive = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    left = n_remove
    while left > 0:
        size = max(1, math.ceil(left / 2))
        errors = weight.pow(2).sum(0) / hinv.diagonal().clamp_min(1e-12)
        errors[~alive] = math.inf
        chosen = torch.topk(errors, size, largest=False).indices
        obs_remove(weight, hinv, chosen)
        alive[chosen] = False
        left -= size
    down.weight.data.copy_(weight.to(down.weight.dtype))
    keep_channels(layer, alive.nonzero().flatten())


@torch.no_grad()
def prune_slimgpt(model: nn.Module, batches: list[torch.Tensor], pcfg: PruneConfig, progress: bool = True) -> dict:
    """Prune in place with SlimGPT; returns what happened, for the pruned model's metadata."""
    plan = plan_layers(model, pcfg)
    head_dim = head_dim_of(model)
    model.eval()
    inputs = capture_layer_inputs(model, batches)
    layers = model.model.layers
    block_before = sum(p.numel() for i in plan for p in layers[i].parameters())
    for i in tqdm(range(max(plan) + 1), desc="SlimGPT (layer by layer)", disable=not progress):
        groups, channels = plan.get(i, (0, 0))
        if groups:
            prune_heads(layers[i], input_gram(layers[i], layers[i].self_attn.o_proj, inputs), groups, head_dim)
        if channels:
            prune_channels(layers[i], input_gram(layers[i], layers[i].mlp.down_proj, inputs), channels)
        inputs = run_layer(layers[i], inputs)
    block_after = sum(p.numel() for i in plan for p in layers[i].parameters())
    return {"layers": sorted(plan), "block_ratio": 1 - block_after / block_before, "groups_removed": [plan[i][0] for i in sorted(plan)],
            "channels_removed": [plan[i][1] for i in sorted(plan)], "layer_importance": [],
            "round_to_met": all(layers[i].mlp.gate_proj.out_features % pcfg.round_to == 0 for i in plan if plan[i][1])}
