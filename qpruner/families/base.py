"""What qpruner needs to know about a decoder-only model family, in one place per family.

An adapter names the family's transformers `model_type`s, where each decoder layer keeps its
attention and MLP projections, which of them carry biases, which norms sit inside attention, and which
variants it cannot handle. Loading refuses what no adapter accepts; memory accounting reads the
biases from it. Rebuilding a pruned model uses transformers' own class for the model_type
(`AutoModelForCausalLM.from_config`) with each layer's Linears resized (qpruner.standalone).

The supported families are transformers' LLaMA descendants and share its layout: decoder layers at
`model.model.layers`, each with `self_attn.{q,k,v,o}_proj` and `mlp.{gate,up,down}_proj` as
separate Linears. A family with fused projections (GPT-2's c_attn, Phi-3's qkv_proj) would need
the pruning structure (qpruner.prune.structure) to split them, which is why it is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    """One model family's adapter (see the module docstring)."""

    name: str
    model_types: tuple[str, ...]
    examples: str  # checkpoints users bring, for the README and error messages
    # (config) -> {projection: has a bias}; the projections are ATTENTION + MLP
    biases: Callable[[object], dict[str, bool]]
    # (config) -> why this variant is refused, or None when supported
    unsupported: Callable[[object], Optional[str]] = lambda config: None
    # norms inside attention that act per head on head_dim (Qwen3's q_norm/k_norm): removing whole
    # heads leaves them unchanged, so pruning never resizes them
    head_norms: tuple[str, ...] = field(default_factory=tuple)


def config_biases(config, attention_key: str = "attention_bias", mlp_key: str = "mlp_bias") -> dict[str, bool]:
    """Biases as LLaMA-style configs declare them: one flag for all attention projections, one for the MLP."""
    attn, mlp = bool(getattr(config, attention_key, False)), bool(getattr(config, mlp_key, False))
    return {**{p: attn for p in ATTENTION}, **{p: mlp for p in MLP}}
