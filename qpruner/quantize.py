"""Per-layer mixed precision with real bitsandbytes modules: 4 -> NF4 Linear4bit, 8 -> LLM.int8
Linear8bitLt, 16 -> the compute dtype. Embeddings and lm_head stay unquantized by default."""

from __future__ import annotations

from typing import Optional, Sequence

from qpruner.config import LoraConfig as LoraSettings
from qpruner.config import QuantConfig
from qpruner.errors import QPrunerError


def validate_bits(bits: Sequence[int], n_layers: int, allowed: Sequence[int]) -> list[int]:
    """One allowed bit-width per decoder layer, or a one-line error saying what is wrong."""
    bits = [int(b) for b in bits]
    if len(bits) != n_layers:
        raise QPrunerError(f"bits: got {len(bits)} entries, the pruned model has {n_layers} decoder layers")
    for i, b in enumerate(bits):
        if b not in allowed:
            raise QPrunerError(f"bits[{i}]={b} is not in quant.bits {list(allowed)}; add it there or choose from it")
    return bits


def parse_bits(text: str, n_layers: int, allowed: Sequence[int]) -> list[int]:
    """'4,8,8,4' or 'uniform:4' -> a validated bit vector."""
    try:
        if text.startswith("uniform:"):
            bits = [int(text.split(":", 1)[1])] * n_layers
        else:
            bits = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise QPrunerError(f"--bits {text!r}: give comma-separated integers such as 4,8,8,4 or uniform:4") from None
    return validate_bits(bits, n_layers, allowed)


def settings(qcfg: QuantConfig) -> dict:
    """The bitsandbytes settings that travel with an exported model (quantization.json)."""
    return {"compute_dtype": qcfg.compute_dtype, "blocksize": qcfg.blocksize,
            "double_quant": qcfg.double_quant, "quant_type": qcfg.quant_type}


def quantize_model(model, bits: Sequence[int], qcfg: QuantConfig, residual_weights: Optional[dict] = None,
                   device: Optional[str] = None) -> None:
    """Give every Linear of decoder layer i the precision bits[i], in place.

    With `residual_weights` (LoftQ inits by module name), a layer's quantized base weight is built from
    its LoftQ residual (W minus the earlier low-rank part), so Q + s*BA approximates W.
    """
    import torch

    from qpruner.standalone import quantize_layers

    if qcfg.quantize_embeddings or qcfg.quantize_lm_head:
        raise QPrunerError("quant.quantize_embeddings / quantize_lm_head: not supported yet; set them to false")
    for name, init in (residual_weights or {}).items():
        linear = model.get_submodule(name)
        with torch.no_grad():
            linear.weight.data = init.residual(linear.weight.data)
    quantize_layers(model, list(bits), settings(qcfg), device or "cpu")


def lora_config_for(lcfg: LoraSettings, model, ranks: Optional[Sequence[int]] = None):
    """The peft LoraConfig; per-layer ranks (RankAdaptor) go into rank_pattern."""
    from peft import LoraConfig

    pattern = {rf"layers\.{i}\..*": int(r) for i, r in enumerate(ranks)} if ranks else {}
    return LoraConfig(
        r=lcfg.rank, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout, target_modules=list(lcfg.target_modules),
        rank_pattern=pattern, bias="none", task_type="CAUSAL_LM",
    )
