"""Memory of a trial: exact quantized-weight bytes from the bit vector, LoRA bytes, an analytic
fine-tuning peak, and on CUDA the measured peak (the search minimises measured, else estimated)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from qpruner.config import Config, QuantConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class MemoryReport:
    weight_bytes: int
    lora_bytes: int
    peak_estimate_bytes: int
    peak_measured_bytes: Optional[int]

    @property
    def source(self) -> str:
        return "measured" if self.peak_measured_bytes else "estimated"

    @property
    def objective_bytes(self) -> int:
        return self.peak_measured_bytes or self.peak_estimate_bytes

    @property
    def objective_gb(self) -> float:
        return self.objective_bytes / 1024**3


def linear_bytes(out_features: int, in_features: int, bits: int, qcfg: QuantConfig) -> int:
    """Bytes bitsandbytes holds for one Linear weight, quantization constants included.

    4-bit: packed nibbles + per-block absmax (fp32, or with double quantization uint8 per block plus
    fp32 per 256 blocks, a 256-entry fp32 code and an fp32 offset) + the 16-entry fp32 code.
    8-bit: int8 weights + one fp32 scale per output row. 16: the compute dtype.
    """
    n = out_features * in_features
    if bits == 4:
        blocks = math.ceil(n / qcfg.blocksize)
        absmax = blocks + math.ceil(blocks / 256) * 4 + 256 * 4 + 4 if qcfg.double_quant else blocks * 4
        return math.ceil(n / 2) + absmax + 16 * 4
    if bits == 8:
        return n + out_features * 4
    return n * DTYPE_BYTES[qcfg.compute_dtype]




def weight_bytes(model, bits: Sequence[int], qcfg: QuantConfig) -> int:
    """Exact bytes of the quantized model: decoder Linears at their bits, everything else as stored."""
    base = getattr(model, "base_model", None)
    base = base.model if base is not None and hasattr(base, "model") else model
    layers = base.model.layers
    compute = DTYPE_BYTES[qcfg.compute_dtype]
    total = 0
    linear_params = set()
    for layer, b in zip(layers, bits):
        for name, module in layer.named_modules():
            is_base = isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")
            if not is_base or "lora_" in name or hasattr(module, "base_layer"):
                continue  # LoRA factors and peft wrappers: counted by lora_bytes / via their base layer
            total += linear_bytes(module.out_features, module.in_features, b, qcfg)
            linear_params.add(id(module.weight))
            if module.bias is not None:
                total += module.bias.numel() * compute
                linear_params.add(id(module.bias))
    for name, p in base.named_parameters():
        if id(p) not in linear_params and "lora_" not in name:
            total += p.numel() * compute
    return total


def lora_bytes(model) -> int:
    """Trainable (LoRA) parameters, stored in float32."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def peak_estimate(model, weights: int, lora: int, cfg: Config) -> int:
    """Analytic fine-tuning peak: weights + LoRA params, grads and two AdamW states (4x LoRA bytes) +
    activations kept for backward at micro batch x max length (no gradient checkpointing): per layer
    about 34*h + 5*heads*L bytes-per-token in 16-bit (Korthikanti et al. 2022) scaled to the compute
    dtype, with the MLP term from the layer's real intermediate size, plus the fp32 logits twice."""
    cfg_m = model.config
    b, L = cfg.finetune.micro_batch_size, cfg.finetune.max_length
    scale = DTYPE_BYTES[cfg.quant.compute_dtype] / 2
    base = getattr(model, "base_model", None)
    layers = (base.model if base is not None else model).model.layers
    acts = 0
    for layer in layers:
        inter = layer.mlp.down_proj.in_features
        heads = layer.self_attn.q_proj.out_features // cfg_m.head_dim
        per_token = 10 * cfg_m.hidden_size + 8 * inter + 2 * 3 * heads * cfg_m.head_dim + 5 * heads * L
        acts += b * L * per_token * scale
    logits = 2 * b * L * cfg_m.vocab_size * 4
    return int(weights + 4 * lora + acts + logits)


def memory_report(peft_model, bits: Sequence[int], cfg: Config, device: Optional[str] = None) -> MemoryReport:
    weights = weight_bytes(peft_model, bits, cfg.quant)
    lora = lora_bytes(peft_model)
    measured = torch.cuda.max_memory_allocated() if device == "cuda" and torch.cuda.is_available() else None
    return MemoryReport(weights, lora, peak_estimate(peft_model, weights, lora, cfg), measured or None)
