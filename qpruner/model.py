"""Load the model to compress: a hub id, a local Hugging Face folder, `builtin:tiny`, or a qpruner-pruned folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from qpruner.errors import ConfigError


def resolve_model(name: str, cache_dir: Optional[Path] = None) -> str:
    """`builtin:tiny` -> its folder (built on first use); anything else is returned unchanged."""
    if name == "builtin:tiny":
        from qpruner.builtin import ensure_tiny

        return str(ensure_tiny(cache_dir).model_dir)
    return name


def load_model(name: str, dtype: str = "float32", cache_dir: Optional[Path] = None,
               trust_remote_code: bool = False, device: Optional[str] = None):
    """Return (model in eval mode, tokenizer with a pad token); a model that cannot be found is one line."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name, cache_dir)
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ConfigError("model.name", f"folder {name!r} has no config.json; point at a Hugging Face model folder")
        if "qpruner_layers" in json.loads((local / "config.json").read_text()):
            from qpruner.prune import load_pruned

            return load_pruned(local, dtype=dtype, device=device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
        )
    except OSError as exc:
        raise ConfigError(
            "model.name",
            f"cannot load {name!r} ({str(exc).splitlines()[0][:160]}); give a local folder, 'builtin:tiny', "
            "or a hub id reachable from this machine (offline: download it first)",
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device:
        model.to(device)
    return model.eval(), tokenizer
