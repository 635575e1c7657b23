"""LoftQ initialisation at each layer's own bit-width, device-agnostic, cached on disk per (layer, bits).

For a weight W at b bits and rank r, alternate T = lora.loftq_iters times (B_0 A_0 = 0):
    Q_t = quant_b(W - B_{t-1} A_{t-1}),    (B_t, A_t) = rank-r SVD of W - dequant(Q_t)
The trial quantizes the residual W - B_{T-1} A_{T-1} (W itself when T = 1), which gives exactly Q_T,
and starts LoRA from lora_A = A_T, lora_B = B_T / s where s is peft's scaling (alpha / r), so
dequant(Q_T) + s * lora_B @ lora_A ~ W. quant_b uses the same bitsandbytes functions the modules use.
A (layer, bits) result does not depend on the other layers, so later trials load it from disk.
16-bit layers have no quantization error and keep peft's plain init (B = 0); so does T = 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from qpruner.config import Config, QuantConfig
from qpruner.errors import QPrunerError

CACHE_VERSION = 3  # bump when the stored factors change meaning


@dataclass
class LoftQInit:
    """Low-rank factors of one Linear: B @ A ~ W - dequant(Q); prev_* (T > 1) are subtracted before quantizing."""

    lora_A: torch.Tensor  # (r, in), A_T
    lora_B: torch.Tensor  # (out, r), B_T without the LoRA scaling (apply_loftq_adapters divides by it)
    prev_B: Optional[torch.Tensor] = None  # B_{T-1}
    prev_A: Optional[torch.Tensor] = None  # A_{T-1}

    def residual(self, weight: torch.Tensor) -> torch.Tensor:
        """The matrix to quantize: W - B_{T-1} A_{T-1}, in W's dtype and device."""
        if self.prev_B is None:
            return weight
        low_rank = self.prev_B.to(weight.device, torch.float32) @ self.prev_A.to(weight.device, torch.float32)
        return (weight.float() - low_rank).to(weight.dtype)


@dataclass
class LoftQStats:
    """What one loftq_for_model call did: SVDs run, cache hits, and the module names it computed."""

    svds: int = 0
    hits: int = 0
    computed: list[str] = field(default_factory=list)


def quant_dequant(weight: torch.Tensor, bits: int, qcfg: QuantConfig) -> torch.Tensor:
    """What the bitsandbytes module at this bit-width will hold, dequantized back to float32."""
    import bitsandbytes.functional as F

    if bits == 4:  # Params4bit._quantize: quantize_4bit on the weight in the compute dtype
        packed, state = F.quantize_4bit(
            weight.to(getattr(torch, qcfg.compute_dtype)).contiguous(), blocksize=qcfg.blocksize,
            compress_statistics=qcfg.double_quant, quant_type=qcfg.quant_type,
        )
        return F.dequantize_4bit(packed, state).float()
    # 8 bits: Int8Params._quantize, row-wise absmax int8 of the fp16 weight. LLM.int8 multiplies the same
    # dequantized weight in its outlier columns (fp16 activations) and elsewhere (int8 activations), so the
    # weight-side error is exactly this; the activation rounding is per token and no weight correction can
    # absorb it, so LoftQ leaves it alone (the LoRA path itself runs on the unquantized input).
    if bits == 8:
        q, scales, _ = F.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
        return F.int8_vectorwise_dequant(q, scales).float()
    if bits == 16:
        return weight.float()
    raise ValueError(f"unsupported bit-width {bits}; qpruner uses 4, 8 or 16")


def loftq_matrix(weight: torch.Tensor, bits: int, rank: int, iters: int, qcfg: QuantConfig,
                 stats: Optional[LoftQStats] = None) -> LoftQInit:
    """LoftQ for one matrix (module docstring), float32 SVD on the weight's device; iters >= 1."""
    if iters < 1:
        raise ValueError("loftq_matrix needs iters >= 1; iters = 0 means plain LoRA init")
    w = weight.float()
    keep = min(rank, *w.shape)  # a rank above min(out, in) gets zero padding
    b = torch.zeros(w.shape[0], rank, device=w.device)
    a = torch.zeros(rank, w.shape[1], device=w.device)
    prev_b, prev_a = b, a
    for _ in range(iters):
        prev_b, prev_a = b, a
        error = w - quant_dequant(w - b @ a, bits, qcfg)
        u, s, vh = torch.linalg.svd(error, full_matrices=False)
        root = s[:keep].sqrt()
        b, a = torch.zeros_like(b), torch.zeros_like(a)
        b[:, :keep] = u[:, :keep] * root
        a[:keep] = root[:, None] * vh[:keep]
        if stats is not None:
            stats.svds += 1
    if iters == 1:
        return LoftQInit(lora_A=a, lora_B=b)
    return LoftQInit(lora_A=a, lora_B=b, prev_B=prev_b, prev_A=prev_a)


def approximation(weight: torch.Tensor, init: LoftQInit, bits: int, qcfg: QuantConfig) -> torch.Tensor:
    """dequant(Q_T) + B_T A_T in float32: what the LoRA-adapted quantized Linear computes with at step 0."""
    quantized = quant_dequant(init.residual(weight), bits, qcfg)
    return quantized + init.lora_B.to(quantized.device).float() @ init.lora_A.to(quantized.device).float()


def target_linears(model, target_modules: Sequence[str]) -> Iterator[tuple[int, str, torch.nn.Linear]]:
    """(layer index, full module name, Linear) for every LoRA target inside the decoder layers."""
    for i, layer in enumerate(model.model.layers):
        for sub, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear) and sub.split(".")[-1] in target_modules:
                yield i, f"model.layers.{i}.{sub}", module


def cache_file(cache_dir: Path, model_key: str, name: str, shape: tuple, bits: int, rank: int, iters: int,
               qcfg: QuantConfig) -> Path:
    """Where one (module, bits, rank, iters, quant settings) result lives: <cache>/loftq/<model_key>/<hash>."""
    key = json.dumps([CACHE_VERSION, name, list(shape), bits, rank, iters, qcfg.blocksize, qcfg.double_quant,
                      qcfg.quant_type, qcfg.compute_dtype])
    return Path(cache_dir) / "loftq" / model_key / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".safetensors")


def _load(path: Path, shape: tuple, rank: int) -> Optional[LoftQInit]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        t = load_file(path)
    except (OSError, SafetensorError):  # missing, half-written by a killed writer, or unreadable: recompute
        return None
    if t["A"].shape != (rank, shape[1]) or t["B"].shape != (shape[0], rank):
        return None
    return LoftQInit(t["A"], t["B"], t.get("prev_B"), t.get("prev_A"))


def _save(path: Path, init: LoftQInit) -> None:
    """Atomic: write a temp file in the same folder, then rename over the final name."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"A": init.lora_A, "B": init.lora_B}
    if init.prev_B is not None:
        tensors.update(prev_B=init.prev_B, prev_A=init.prev_A)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def loftq_for_model(model, bits: Sequence[int], cfg: Config, cache_dir: Path, model_key: str,
                    ranks: Optional[Sequence[int]] = None, device: Optional[str] = None) -> tuple[dict, LoftQStats]:
    """LoftQ inits ({module name: LoftQInit}, on cpu) for every LoRA target below 16 bits, plus stats.

    Entries already on disk under `cache_dir` are loaded (no SVD); missing ones are computed on `device`
    (default: where the weight is) and stored. Call it on the full-precision model, before quantize_model.
    """
    stats = LoftQStats()
    iters = cfg.lora.loftq_iters
    if iters == 0:
        return {}, stats
    if ranks is not None and len(ranks) != len(bits):
        raise QPrunerError(f"ranks: got {len(ranks)} entries for {len(bits)} decoder layers")
    inits = {}
    for i, name, linear in target_linears(model, cfg.lora.target_modules):
        if bits[i] == 16:
            continue
        rank = int(ranks[i]) if ranks is not None else cfg.lora.rank
        shape = tuple(linear.weight.shape)
        path = cache_file(cache_dir, model_key, name, shape, bits[i], rank, iters, cfg.quant)
        init = _load(path, shape, rank) if path.is_file() else None
        if init is None:
            weight = linear.weight.data.to(device) if device else linear.weight.data
            init = loftq_matrix(weight, bits[i], rank, iters, cfg.quant, stats)
            init = LoftQInit(*(t.cpu() if t is not None else None for t in (init.lora_A, init.lora_B, init.prev_B, init.prev_A)))
            _save(path, init)
            stats.computed.append(name)
        else:
            stats.hits += 1
        inits[name] = init
    return inits, stats


def apply_loftq_adapters(peft_model, inits: dict, lora_cfg=None, ranks: Optional[Sequence[int]] = None,
                         adapter: str = "default") -> None:
    """Copy LoftQ factors into peft's lora_A / lora_B, dividing B by the layer's own peft scaling.

    With `lora_cfg` (and per-layer `ranks`), also checks that peft built each adapter at the rank the
    factors were computed for, so a LoraConfig / ranks mismatch fails loudly instead of silently.
    """
    base = peft_model.base_model.model
    for name, init in inits.items():
        module = base.get_submodule(name)
        a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        if lora_cfg is not None:
            layer = int(name.split(".layers.")[1].split(".")[0])
            want = int(ranks[layer]) if ranks is not None else lora_cfg.rank
            if a.shape[0] != want:
                raise QPrunerError(f"{name}: peft built rank {a.shape[0]} but LoftQ used rank {want}; pass the same ranks to lora_config_for")
        if a.shape != init.lora_A.shape or b.shape != init.lora_B.shape:
            raise QPrunerError(f"{name}: LoRA shapes {tuple(b.shape)}x{tuple(a.shape)} do not match the LoftQ factors; recompute them for this model")
        with torch.no_grad():
            a.copy_(init.lora_A.to(a.device, a.dtype))
            b.copy_((init.lora_B / module.scaling[adapter]).to(b.device, b.dtype))
