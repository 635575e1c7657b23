"""Per-layer mixed precision with real bitsandbytes modules: 4 -> NF4/FP4 Linear4bit, 8 -> LLM.int8
Linear8bitLt (row-wise int8 weights, outlier threshold quant.int8_threshold, default 6.0; see
qpruner.standalone._int8_module for why it runs the same numerics in training and evaluation), 16 -> the compute dtype.
Embeddings, norms and lm_head stay unquantized.

The module swap itself lives in `qpruner.standalone.quantize_layers`, the file copied beside every
exported model, so a trial and an exported model hold bit-identical base weights. bitsandbytes
quantizes a Params4bit / Int8Params when it is moved to a device (`.to("cpu")` included).
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence

from qpruner.config import ALLOWED_BITS, QuantConfig
from qpruner.config import LoraConfig as LoraSettings
from qpruner.errors import QPrunerError


def validate_bits(bits: Sequence[int], n_layers: int, allowed: Sequence[int]) -> list[int]:
    """One allowed bit-width per decoder layer, or a one-line QPrunerError saying what is wrong."""
    bits = list(bits)
    if len(bits) != n_layers:
        raise QPrunerError(f"bits: got {len(bits)} entries, the pruned model has {n_layers} decoder layers")
    for i, b in enumerate(bits):
        if isinstance(b, bool) or not isinstance(b, numbers.Real) or b != int(b) or int(b) not in allowed:
            raise QPrunerError(f"bits[{i}]={b} is not in quant.bits {sorted(allowed)}; add it there or choose from it")
    return [int(b) for b in bits]


def parse_bits(text: str, n_layers: int, allowed: Sequence[int]) -> list[int]:
    """'4,8,8,4' or 'uniform:4' -> a validated bit vector."""
    try:
        if text.strip().startswith("uniform:"):
            bits = [int(text.split(":", 1)[1])] * n_layers
        else:
            bits = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise QPrunerError(f"--bits {text!r}: give comma-separated integers such as 4,8,8,4 or uniform:4") from None
    return validate_bits(bits, n_layers, allowed)


def parse_ranks(text: str, n_layers: int) -> list[int]:
    """'8,8,16,4' -> one positive LoRA rank per decoder layer, or a one-line QPrunerError."""
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):
        raise QPrunerError(f"--ranks {text!r}: give comma-separated positive integers, one per decoder layer "
                           f"({n_layers}), e.g. {','.join(['8'] * n_layers)}")
    ranks = [int(p) for p in parts]
    if len(ranks) != n_layers:
        raise QPrunerError(f"--ranks: got {len(ranks)} entries, the pruned model has {n_layers} decoder layers")
    if min(ranks) < 1:
        raise QPrunerError(f"--ranks {text!r}: a LoRA rank must be >= 1 (layer {ranks.index(min(ranks))} has 0)")
    return ranks


def settings(qcfg: QuantConfig) -> dict:
    """The bitsandbytes settings that travel with an exported model (quantization.json)."""
    return {"compute_dtype": qcfg.compute_dtype, "blocksize": qcfg.blocksize,
            "double_quant": qcfg.double_quant, "quant_type": qcfg.quant_type,
            "int8_threshold": qcfg.int8_threshold}


def quantize_model(model, bits: Sequence[int], qcfg: QuantConfig, residual_weights: Optional[dict] = None,
                   device: Optional[str] = None) -> None:
    """Give every Linear of decoder layer i the precision bits[i], in place, on `device` (default cpu).

    With `residual_weights` ({module name: LoftQInit}), that Linear's base weight is quantized from its
    LoftQ residual (W minus the earlier low-rank part), so dequant(Q) + scaling * B A approximates W.
    Sets model.is_loaded_in_4bit / is_loaded_in_8bit: peft reads them to wrap the bnb modules in its
    own bnb LoRA layers (lora.bnb.Linear4bit / Linear8bitLt) instead of the generic one.
    """
    import torch

    from qpruner.standalone import quantize_layers

    bits = validate_bits(bits, len(model.model.layers), ALLOWED_BITS)
    for name, init in (residual_weights or {}).items():
        linear = model.get_submodule(name)
        with torch.no_grad():
            linear.weight.data = init.residual(linear.weight.data)
    quantize_layers(model, bits, settings(qcfg), device or "cpu")


def lora_config_for(lcfg: LoraSettings, model, ranks: Optional[Sequence[int]] = None):
    """The peft LoraConfig; per-layer ranks (RankAdaptor) go into rank_pattern, one regex per layer."""
    from peft import LoraConfig

    if ranks is not None and len(ranks) != len(model.model.layers):
        raise QPrunerError(f"ranks: got {len(ranks)} entries, the pruned model has {len(model.model.layers)} decoder layers")
    pattern = {rf"layers\.{i}\..*": int(r) for i, r in enumerate(ranks)} if ranks else {}
    return LoraConfig(
        r=lcfg.rank, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout, target_modules=list(lcfg.target_modules),
        rank_pattern=pattern, bias="none", task_type="CAUSAL_LM",
    )


def adaptable_modules(pruned_config: dict) -> dict[str, tuple[str, int, int]]:
    """{module name: (class name, out, in)} of the pruned model built on the meta device from its config.json
    (per-layer shapes in `qpruner_layers`): what lora.target_modules may name, and each one's width."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qpruner.standalone import shape_layers

    config = AutoConfig.for_model(**pruned_config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        if pruned_config.get("qpruner_layers"):
            shape_layers(model, pruned_config["qpruner_layers"])
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            out[name] = ("Linear", module.out_features, module.in_features)
        elif isinstance(module, torch.nn.Embedding):
            out[name] = ("Embedding", module.num_embeddings, module.embedding_dim)
        elif name:
            out[name] = (type(module).__name__, 0, 0)
    return out


def check_lora_fits(cfg, pruned_config: dict, ranks: Optional[Sequence[int]] = None, ranks_field: str = "--ranks") -> None:
    """Before any trial: every lora.target_modules entry names a Linear (or Embedding) of the model, as peft
    matches them (the full name or its last dotted parts), and no LoRA rank (lora.rank, search.ranks, or the
    per-layer `ranks`) exceeds an adapted layer's width, min(out, in) of the pruned shapes."""
    import difflib

    from qpruner.errors import ConfigError

    modules = adaptable_modules(pruned_config)
    leaves = sorted({n.rsplit(".", 1)[-1] for n, (kind, _, _) in modules.items() if kind in ("Linear", "Embedding")})
    targeted: dict[str, tuple[int, int]] = {}
    for entry in cfg.lora.target_modules:
        matched = {n: m for n, m in modules.items() if n == entry or n.endswith("." + entry)}
        if not matched:
            close = difflib.get_close_matches(entry, leaves, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError("lora.target_modules", f"{entry!r} names no module of the model; {hint}its Linear layers "
                              f"are {', '.join(leaves)}")
        odd = sorted({kind for kind, _, _ in matched.values() if kind not in ("Linear", "Embedding")})
        if odd:
            raise ConfigError("lora.target_modules", f"{entry!r} names {odd[0]} modules, which LoRA cannot adapt; name "
                              f"their Linear layers ({', '.join(leaves)})")
        targeted.update({n: (o, i) for n, (_, o, i) in matched.items()})
    layer_of = lambda name: int(name.split(".layers.")[1].split(".")[0]) if ".layers." in name else None  # noqa: E731
    search_ranks = getattr(cfg.search, "ranks", None)
    for name, (o, i) in sorted(targeted.items(), key=lambda item: (min(item[1]), item[0])):  # narrowest first
        width = min(o, i)
        if width == 0:
            continue  # a layer pruned to nothing: peft adapts it trivially
        layer = layer_of(name)
        if ranks is not None and layer is not None and layer < len(ranks):
            rank, field = int(ranks[layer]), f"{ranks_field} (layer {layer})"
        elif search_ranks and ranks is None:
            rank, field = max(search_ranks), "search.ranks"
        else:
            rank, field = cfg.lora.rank, "lora.rank"
        if rank > width:
            raise ConfigError(field, f"rank {rank} exceeds the width of {name} ({o} x {i}) in the pruned model; a LoRA "
                              f"rank can be at most min(out, in) = {width} there: lower it")
