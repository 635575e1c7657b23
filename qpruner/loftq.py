"""LoftQ initialisation at each layer's own bit-width, device-agnostic, cached per (layer, bits).

For a weight W at b bits and rank r, alternate T times:  Q_t = quant_b(W - B_{t-1} A_{t-1}),
(B_t, A_t) = rank-r SVD of W - dequant(Q_t).  The trial quantizes the residual W - B_{T-1} A_{T-1}
(W itself when T = 1) and starts LoRA from (B_T / s, A_T), s = alpha / r, so Q + s*BA ~ W.
Quantization uses the same bitsandbytes functions the Linear4bit / Linear8bitLt modules use.
A (layer, bits) result does not depend on other layers, so later trials reuse it from disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from qpruner.config import Config, QuantConfig


@dataclass
class LoftQInit:
    lora_A: torch.Tensor  # (r, in)
    lora_B: torch.Tensor  # (out, r), already divided by the LoRA scaling
    prev_B: Optional[torch.Tensor] = None  # B_{T-1} A_{T-1}: subtracted from W before quantizing
    prev_A: Optional[torch.Tensor] = None

    def residual(self, weight: torch.Tensor) -> torch.Tensor:
        if self.prev_B is None:
            return weight
        return (weight.float() - self.prev_B.to(weight.device) @ self.prev_A.to(weight.device)).to(weight.dtype)


@dataclass
class LoftQStats:
    svds: int = 0
    hits: int = 0
    computed: list[str] = field(default_factory=list)


def quant_dequant(weight: torch.Tensor, bits: int, qcfg: QuantConfig) -> torch.Tensor:
    """What the bitsandbytes module at this bit-width will hold, dequantized back to float32."""
    import bitsandbytes.functional as F

    if bits == 4:
        packed, state = F.quantize_4bit(
            weight.to(getattr(torch, qcfg.compute_dtype)), blocksize=qcfg.blocksize,
            compress_statistics=qcfg.double_quant, quant_type=qcfg.quant_type,
        )
        return F.dequantize_4bit(packed, state).float()
    if bits == 8:
        q, scales, _ = F.int8_vectorwise_quant(weight.half())
        return F.int8_vectorwise_dequant(q, scales).float()
    return weight.float()


def loftq_matrix(weight: torch.Tensor, bits: int, rank: int, iters: int, qcfg: QuantConfig, scaling: float,
                 stats: Optional[LoftQStats] = None) -> LoftQInit:
    """LoftQ for one matrix (see module docstring); SVD in float32 on the weight's device."""
    w = weight.float()
    rank = min(rank, *w.shape)
    b = torch.zeros(w.shape[0], rank, device=w.device)
    a = torch.zeros(rank, w.shape[1], device=w.device)
    prev = (b, a)
    for _ in range(iters):
        prev = (b, a)
        q = quant_dequant(w - b @ a, bits, qcfg)
        u, s, vh = torch.linalg.svd(w - q, full_matrices=False)
        root = s[:rank].sqrt()
        b, a = u[:, :rank] * root, root[:, None] * vh[:rank]
        if stats is not None:
            stats.svds += 1
    has_prev = iters > 1
    return LoftQInit(lora_A=a, lora_B=b / scaling, prev_B=prev[0] if has_prev else None, prev_A=prev[1] if has_prev else None)


def _cache_file(cache_dir: Path, model_key: str, name: str, bits: int, rank: int, iters: int, qcfg: QuantConfig) -> Path:
    key = json.dumps([name, bits, rank, iters, qcfg.blocksize, qcfg.double_quant, qcfg.quant_type, qcfg.compute_dtype])
    return Path(cache_dir) / "loftq" / model_key / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".safetensors")


def _load(path: Path, scaling: float) -> Optional[LoftQInit]:
    from safetensors.torch import load_file

    try:
        t = load_file(path)
    except Exception:  # missing or unreadable: recompute
        return None
    return LoftQInit(t["A"], t["B"] / scaling, t.get("prev_B"), t.get("prev_A"))


def _save(path: Path, init: LoftQInit, scaling: float) -> None:
    """Atomic: write a temp file in the same folder, then rename (scaling-free factors are stored)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"A": init.lora_A.contiguous().cpu(), "B": (init.lora_B * scaling).contiguous().cpu()}
    if init.prev_B is not None:
        tensors.update(prev_B=init.prev_B.contiguous().cpu(), prev_A=init.prev_A.contiguous().cpu())
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file(tensors, tmp)
    os.replace(tmp, path)


def target_linears(model, target_modules: Sequence[str]):
    """(layer index, full module name, Linear) for every LoRA target inside the decoder layers."""
    for i, layer in enumerate(model.model.layers):
        for sub, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear) and sub.split(".")[-1] in target_modules:
                yield i, f"model.layers.{i}.{sub}", module


def loftq_for_model(model, bits: Sequence[int], cfg: Config, cache_dir: Path, model_key: str,
                    ranks: Optional[Sequence[int]] = None, device: Optional[str] = None) -> tuple[dict, LoftQStats]:
    """LoftQ inits for every quantized LoRA target ({module name: LoftQInit}), from cache where possible."""
    stats = LoftQStats()
    iters = cfg.lora.loftq_iters
    if iters == 0:
        return {}, stats
    inits = {}
    for i, name, linear in target_linears(model, cfg.lora.target_modules):
        if bits[i] == 16:
            continue  # no quantization error to absorb: plain LoRA init
        rank = int(ranks[i]) if ranks else cfg.lora.rank
        scaling = cfg.lora.alpha / rank
        path = _cache_file(cache_dir, model_key, name, bits[i], rank, iters, cfg.quant)
        init = _load(path, scaling) if path.is_file() else None
        if init is None:
            weight = linear.weight.data.to(device) if device else linear.weight.data
            init = loftq_matrix(weight, bits[i], rank, iters, cfg.quant, scaling, stats)
            init = LoftQInit(*(t.cpu() if t is not None else None for t in (init.lora_A, init.lora_B, init.prev_B, init.prev_A)))
            _save(path, init, scaling)
            stats.computed.append(name)
        else:
            stats.hits += 1
        inits[name] = init
    return inits, stats


def apply_loftq_adapters(peft_model, inits: dict, lora_cfg=None, ranks=None) -> None:
    """Copy the LoftQ factors into the peft LoRA layers (adapter 'default')."""
    for name, init in inits.items():
        module = peft_model.base_model.model.get_submodule(name)
        with torch.no_grad():
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            a.copy_(init.lora_A.to(a.device, a.dtype))
            b.copy_(init.lora_B.to(b.device, b.dtype))
