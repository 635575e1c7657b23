"""Mistral family: Mistral-7B v0.1-v0.3 and its fine-tunes (LLaMA layout, GQA, no biases)."""

from qpruner.families.base import Family, config_biases

FAMILY = Family(
    name="mistral",
    model_types=("mistral",),
    examples="Mistral-7B v0.1-v0.3, Zephyr",
    biases=lambda config: config_biases(config, attention_key="_none", mlp_key="_none"),
)
