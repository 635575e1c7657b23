"""LLaMA family: Llama 1/2/3.x, Vicuna, SmolLM/SmolLM2, TinyLlama and the built-in tiny model."""

from qpruner.families.base import Family, config_biases


def _unsupported(config):
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "a llama with attention_bias/mlp_bias is not a supported variant (no checked checkpoint uses it)"
    return None


FAMILY = Family(
    name="llama",
    model_types=("llama",),
    examples="Llama 1/2/3.x, Vicuna, SmolLM2, TinyLlama",
    biases=config_biases,
    unsupported=_unsupported,
)
