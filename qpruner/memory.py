"""Memory of a trial: exact quantized-weight bytes from the bit vector, LoRA bytes, an analytic
fine-tuning peak, and on CUDA the measured fine-tuning peak (the search minimises measured, else estimated):
the allocator's peak over the training steps alone (TrainingPeak) plus the paged optimizer state.

Weight bytes are computed from shapes alone, so they are known before a model is quantized:
`model_shapes(model)` works on a full-precision, a quantized or a peft-wrapped model alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch

from qpruner.config import Config, QuantConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
NF4_CODE = 16  # fp32 entries of the 4-bit code table every QuantState holds
BLOCKWISE_CODE = 256  # fp32 entries of the 8-bit dynamic code used for double quantization
DOUBLE_QUANT_BLOCK = 256  # absmax values per second-level block (bitsandbytes' fixed choice)


@dataclass
class ModelShapes:
    """What weight bytes depend on: each decoder layer's Linears (out, in, has_bias) and the other bytes."""

    layers: list[list[tuple[int, int, bool]]]
    other_bytes: int  # embeddings, norms, lm_head, as stored


@dataclass
class MemoryReport:
    weight_bytes: int
    lora_bytes: int
    peak_estimate_bytes: int
    peak_measured_bytes: Optional[int]
    source: Literal["measured", "estimated"]
    measured: str = ""  # what peak_measured_bytes counts (finetune_window_source), "" when estimated

    @classmethod
    def from_cuda(cls, weight_bytes: int, lora_bytes: int, peak_estimate_bytes: int) -> "MemoryReport":
        """Report with torch.cuda.max_memory_allocated as the measured peak when CUDA is present."""
        measured = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
        return cls(weight_bytes, lora_bytes, peak_estimate_bytes, measured or None, "measured" if measured else "estimated")

    @property
    def objective_bytes(self) -> int:
        return self.peak_measured_bytes or self.peak_estimate_bytes

    @property
    def objective_gb(self) -> float:
        return self.objective_bytes / 1024**3

    def objective(self, kind: str = "finetune_peak") -> int:
        """Bytes of the configured memory objective (`search.memory_objective`): the fine-tuning peak
        (measured where there is a measurement) or the quantized weights alone."""
        return self.weight_bytes if kind == "weights" else self.objective_bytes


def linear_bytes(out_features: int, in_features: int, bits: int, qcfg: QuantConfig) -> int:
    """Bytes bitsandbytes holds for one Linear weight (bias excluded), quantization constants included.

    4-bit: packed nibbles + the 16-entry fp32 code + per-block absmax: fp32 per block, or with double
    quantization uint8 per block + fp32 absmax per 256 blocks + the 256-entry fp32 code + an fp32 offset.
    8-bit: int8 weights + one fp32 scale (SCB) per output row; LLM.int8's outlier columns add no stored
    weights (they use the same int8 weight, dequantized per forward). 16: the compute dtype.
    """
    n = out_features * in_features
    if bits == 4:
        blocks = math.ceil(n / qcfg.blocksize)
        if qcfg.double_quant:
            absmax = blocks + 4 * (math.ceil(blocks / DOUBLE_QUANT_BLOCK) + BLOCKWISE_CODE + 1)
        else:
            absmax = 4 * blocks
        return math.ceil(n / 2) + absmax + 4 * NF4_CODE
    if bits == 8:
        return n + 4 * out_features
    if bits == 16:
        return n * DTYPE_BYTES[qcfg.compute_dtype]
    raise ValueError(f"unsupported bit-width {bits}; qpruner uses 4, 8 or 16")


def _unwrap(model):
    """The transformers CausalLM inside a peft model (or the model itself)."""
    base = getattr(model, "base_model", None)
    return base.model if base is not None and hasattr(base, "peft_config") else model


def model_shapes(model) -> ModelShapes:
    """Decoder Linear shapes and the bytes of everything else, skipping LoRA factors and peft wrappers."""
    base = _unwrap(model)
    counted = set()
    layers = []
    for layer in base.model.layers:
        shapes = []
        for name, module in layer.named_modules():
            if not isinstance(module, torch.nn.Linear) or "lora_" in name:
                continue  # bnb Linear4bit / Linear8bitLt are nn.Linear subclasses; peft wrappers are not
            shapes.append((module.out_features, module.in_features, module.bias is not None))
            counted.update(id(p) for p in module.parameters(recurse=False))
        layers.append(shapes)
    other = sum(p.numel() * p.element_size() for n, p in base.named_parameters()
                if id(p) not in counted and "lora_" not in n)
    return ModelShapes(layers, other)


def shapes_from_config(config: dict) -> ModelShapes:
    """ModelShapes of a pruned model from its config.json (`qpruner_layers`), without loading weights;
    `other_bytes` is left 0 (it does not depend on the bits)."""
    from types import SimpleNamespace

    from qpruner.families import family_of

    hidden, head_dim = config["hidden_size"], config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    bias = family_of(config).biases(SimpleNamespace(**config))
    layers = []
    for shape in config["qpruner_layers"]:
        q, kv = shape["num_attention_heads"] * head_dim, shape["num_key_value_heads"] * head_dim
        inter = shape["intermediate_size"]
        dims = {"q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q),
                "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
        layers.append([(*dims[name], bias[name]) for name in dims])
    return ModelShapes(layers, 0)


def weight_bytes(model_or_shapes, bits: Sequence[int], qcfg: QuantConfig) -> dict:
    """Exact bytes of the quantized model: {"layers": per-layer bytes, "other": unquantized rest, "total"}.

    Decoder Linears at their layer's bits (biases in the compute dtype), the rest as stored.
    """
    shapes = model_or_shapes if isinstance(model_or_shapes, ModelShapes) else model_shapes(model_or_shapes)
    if len(bits) != len(shapes.layers):
        raise ValueError(f"{len(bits)} bit-widths for {len(shapes.layers)} decoder layers")
    compute = DTYPE_BYTES[qcfg.compute_dtype]
    per_layer = [sum(linear_bytes(o, i, b, qcfg) + (o * compute if bias else 0) for o, i, bias in layer)
                 for layer, b in zip(shapes.layers, bits)]
    return {"layers": per_layer, "other": shapes.other_bytes, "total": sum(per_layer) + shapes.other_bytes}


def lora_bytes(model) -> int:
    """Bytes of the trainable (LoRA) parameters as stored."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def activation_bytes(model, cfg: Config) -> int:
    """Activations autograd keeps for one micro-batch (no gradient checkpointing, eager attention).

    Per token and decoder layer, in compute-dtype elements: 2 RMSNorm inputs/outputs (4h), q, k, v
    and their RoPE copies (2q + 3kv), attention output (q), MLP gate, up, act(gate), product (4I),
    the attention probabilities (heads * L), and with LoRA dropout one dropped copy of each adapted
    Linear's input. Plus fp32 logits and their log-softmax (2 * V * 4 bytes per token).
    """
    base = _unwrap(model)
    config = base.config
    b, seq = cfg.finetune.micro_batch_size, cfg.finetune.max_length
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    h = config.hidden_size
    elements = 0
    for layer in base.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        q, kv, inter = attn.q_proj.out_features, attn.k_proj.out_features, mlp.gate_proj.out_features
        heads = q // head_dim
        per_token = 4 * h + 3 * q + 3 * kv + 4 * inter + heads * seq
        if cfg.lora.dropout > 0:
            per_token += sum(m.in_features for n, m in layer.named_modules()
                             if n.split(".")[-1] in cfg.lora.target_modules and hasattr(m, "in_features"))
        elements += per_token
    logits = 2 * config.vocab_size * 4
    return b * seq * (elements * DTYPE_BYTES[cfg.quant.compute_dtype] + logits)


def finetune_peak_estimate(model, weights: int, lora: int, cfg: Config) -> int:
    """Analytic fine-tuning peak: weights + LoRA params + their grads + AdamW's two fp32 states
    (lora + lora + 2 * 4 bytes per trainable param) + activation_bytes. Ignores allocator slack,
    dequantization scratch and the CUDA context, so measured peaks run somewhat higher."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return int(weights + 2 * lora + 8 * trainable + activation_bytes(model, cfg))


def memory_report(peft_model, bits: Sequence[int], cfg: Config, device: Optional[str] = None, finetune=None) -> MemoryReport:
    """Weights, LoRA, the estimated peak and, on CUDA after fine-tuning (`finetune`, a FinetuneResult), the
    measured fine-tuning peak: the allocator's peak over the training steps plus the paged optimizer state.

    Before fine-tuning there is nothing to measure yet (the allocator's peak then holds LoftQ's SVDs and
    the quantization, not training), so the report is the estimate.
    """
    weights = weight_bytes(peft_model, bits, cfg.quant)["total"]
    lora = lora_bytes(peft_model)
    estimate = finetune_peak_estimate(peft_model, weights, lora, cfg)
    window = getattr(finetune, "peak_allocated_bytes", None)
    if device == "cuda" and window is not None:
        paged = finetune.paged_optimizer_bytes
        return MemoryReport(weights, lora, estimate, window + paged, "measured", finetune_window_source(paged))
    return MemoryReport(weights, lora, estimate, None, "estimated")


def finetune_window_source(paged_bytes: int) -> str:
    """What a measured fine-tuning peak counts, for the trial's `memory_measured`."""
    return ("torch.cuda.max_memory_allocated over the fine-tuning steps (reset right before fine-tuning, paused "
            f"while validating) + {paged_bytes} bytes of paged optimizer state (CUDA managed memory, from tensor sizes)")


def paged_optimizer_bytes(optimizer) -> int:
    """Bytes of optimizer state bitsandbytes keeps in CUDA managed memory (its paged optimizers page state
    tensors of at least 1e5 elements, marked `is_paged`). torch's allocator never sees cudaMallocManaged, so
    max_memory_allocated misses them while the analytic estimate counts them: they are added from sizes."""
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if torch.is_tensor(t) and getattr(t, "is_paged", False))


class TrainingPeak:
    """torch.cuda.max_memory_allocated over the training steps only: reset when fine-tuning starts, paused
    around each validation (lm-eval's batches are no training memory) and read when fine-tuning ends.
    Off the GPU there is no allocator counter: read() gives None."""

    def __init__(self, device: torch.device):
        self.cuda, self.peak = device.type == "cuda", 0
        self.resume()

    def pause(self) -> None:
        """Fold the peak so far into the window's maximum (before something that is not training)."""
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = max(self.peak, torch.cuda.max_memory_allocated())

    def resume(self) -> None:
        """Start counting again from what is allocated now."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def read(self) -> Optional[int]:
        self.pause()
        return self.peak if self.cuda else None


def weight_storage(pruned_path) -> str:
    """How the pruned weights are stored, so memory figures say what they count: "dense" (structured
    pruning, or unstructured / N:M zeros kept as dense values: they take as many bytes as any weight);
    qpruner uses no sparse tensor format, so zeros save nothing here."""
    import json
    from pathlib import Path

    meta = Path(pruned_path) / "qpruner_prune.json"
    sparsity = json.loads(meta.read_text()).get("sparsity") if meta.is_file() else None
    return f"dense (sparsity {sparsity['spec']}: zeros stored)" if sparsity else "dense"
