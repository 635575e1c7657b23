"""Qwen2 family: Qwen2 and Qwen2.5 (q/k/v projections carry biases, o_proj and the MLP do not)."""

from qpruner.families.base import ATTENTION, MLP, Family

FAMILY = Family(
    name="qwen2",
    model_types=("qwen2",),
    examples="Qwen2, Qwen2.5 (dense)",
    biases=lambda config: {**{p: p != "o_proj" for p in ATTENTION}, **{p: False for p in MLP}},
)
