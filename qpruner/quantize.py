"""Per-layer mixed precision with real bitsandbytes modules: 4 -> NF4/FP4 Linear4bit, 8 -> LLM.int8
Linear8bitLt (row-wise int8 weights, outlier threshold quant.int8_threshold, default 6.0; see
qpruner.standalone._int8_module for why it runs the same numerics in training and evaluation), 16 -> the compute dtype. Embeddings, norms and lm_head stay
unquantized.

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

    if qcfg.quantize_embeddings or qcfg.quantize_lm_head:
        raise QPrunerError("quant.quantize_embeddings / quant.quantize_lm_head: not supported yet; set them to false")
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
