"""Model families qpruner supports, one adapter module each (like peft's one folder per tuner).

Adding a family means adding a module with a `FAMILY = Family(...)` and listing it in FAMILIES.
Anything else (GPT-2, mixture-of-experts, encoder-decoder, multimodal) is refused before any work.
"""

from __future__ import annotations

import types

from qpruner.errors import ConfigError
from qpruner.families import llama, mistral, qwen2, qwen3
from qpruner.families.base import ATTENTION, MLP, Family

FAMILIES: tuple[Family, ...] = (llama.FAMILY, mistral.FAMILY, qwen2.FAMILY, qwen3.FAMILY)
BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}

__all__ = ["ATTENTION", "MLP", "FAMILIES", "Family", "family_of", "supported_summary"]


def supported_summary() -> str:
    """'llama (Llama 1/2/3.x, ...), mistral (...), ...' for error messages."""
    return ", ".join(f"{f.name} ({f.examples})" for f in FAMILIES)


def family_of(config, field: str = "model.name", name: str = "") -> Family:
    """The adapter for a transformers config, or a one-line ConfigError naming the model_type found."""
    if isinstance(config, dict):  # a config.json read as JSON
        config = types.SimpleNamespace(**config)
    model_type = getattr(config, "model_type", None)
    what = f"{name!r} is " if name else ""
    family = BY_TYPE.get(model_type)
    if family is None:
        raise ConfigError(field, f"{what}model_type {model_type!r}, which qpruner does not support; supported families: "
                          f"{supported_summary()}")
    reason = family.unsupported(config)
    if reason:
        raise ConfigError(field, f"{what}model_type {model_type!r}: {reason}; supported families: {supported_summary()}")
    return family
