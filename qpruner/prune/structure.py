"""Coupled structures of a LLaMA decoder layer, and how removing them reshapes the Linear modules.

Attention: one group = a key/value head plus the query heads that share it (GQA), i.e. rows of
q/k/v and the matching columns of o_proj. Removing whole groups keeps num_key_value_groups constant,
so transformers' attention runs unchanged on smaller Linears. MLP: one channel = a row of gate/up
and a column of down_proj.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LayerShape:
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int


def layer_shape(layer: nn.Module, head_dim: int) -> LayerShape:
    attn, mlp = layer.self_attn, layer.mlp
    return LayerShape(
        num_attention_heads=attn.q_proj.out_features // head_dim,
        num_key_value_heads=attn.k_proj.out_features // head_dim,
        intermediate_size=mlp.gate_proj.out_features,
    )


def head_dim_of(model: nn.Module) -> int:
    cfg = model.config
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def group_rows(group: int, per_group_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(query rows, key/value rows) of one GQA group."""
    q = torch.arange(group * per_group_heads * head_dim, (group + 1) * per_group_heads * head_dim)
    kv = torch.arange(group * head_dim, (group + 1) * head_dim)
    return q, kv


def group_params(shape: LayerShape, head_dim: int, hidden: int) -> int:
    """Parameters in one attention group: q and o (per-group query heads) plus k and v (one head)."""
    per_group = shape.num_attention_heads // shape.num_key_value_heads
    return 2 * per_group * head_dim * hidden + 2 * head_dim * hidden


def channel_params(hidden: int) -> int:
    return 3 * hidden


def _keep_rows(linear: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    new = nn.Linear(linear.in_features, len(rows), bias=linear.bias is not None, dtype=linear.weight.dtype, device=linear.weight.device)
    with torch.no_grad():
        new.weight.copy_(linear.weight[rows])
        if linear.bias is not None:
            new.bias.copy_(linear.bias[rows])
    return new


def _keep_cols(linear: nn.Linear, cols: torch.Tensor) -> nn.Linear:
    new = nn.Linear(len(cols), linear.out_features, bias=linear.bias is not None, dtype=linear.weight.dtype, device=linear.weight.device)
    with torch.no_grad():
        new.weight.copy_(linear.weight[:, cols])
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    return new


def keep_groups(layer: nn.Module, groups: list[int], head_dim: int) -> None:
    """Keep only these GQA groups (sorted) in the layer's attention."""
    attn = layer.self_attn
    shape = layer_shape(layer, head_dim)
    per_group = shape.num_attention_heads // shape.num_key_value_heads
    q_rows, kv_rows = zip(*(group_rows(g, per_group, head_dim) for g in sorted(groups)))
    q_rows, kv_rows = torch.cat(q_rows), torch.cat(kv_rows)
    attn.q_proj = _keep_rows(attn.q_proj, q_rows)
    attn.k_proj = _keep_rows(attn.k_proj, kv_rows)
    attn.v_proj = _keep_rows(attn.v_proj, kv_rows)
    attn.o_proj = _keep_cols(attn.o_proj, q_rows)


def keep_channels(layer: nn.Module, channels: torch.Tensor) -> None:
    """Keep only these MLP intermediate channels (sorted)."""
    mlp = layer.mlp
    channels = torch.sort(channels).values
    mlp.gate_proj = _keep_rows(mlp.gate_proj, channels)
    mlp.up_proj = _keep_rows(mlp.up_proj, channels)
    mlp.down_proj = _keep_cols(mlp.down_proj, channels)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(channels)
