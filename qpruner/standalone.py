"""Load a qpruner model with stock libraries only (torch, transformers, bitsandbytes, peft).

Stock transformers cannot express per-layer head counts and MLP sizes, so this file rebuilds them.
`qpruner.export` copies it beside every exported model as `load_qpruner.py`:

    from load_qpruner import load
    model, tokenizer = load("exported-folder")          # per-layer 4/8/16-bit base + trained LoRA
    model, tokenizer = load("exported-folder/merged")   # the --merge variant: one full-precision model

It must not import qpruner.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn


def _shrink(linear: nn.Linear, out_features: int, in_features: int) -> nn.Linear:
    if (linear.out_features, linear.in_features) == (out_features, in_features):
        return linear
    return nn.Linear(in_features, out_features, bias=linear.bias is not None, dtype=linear.weight.dtype)


def shape_layers(model, shapes: list[dict]) -> None:
    """Give each decoder layer its own head counts and MLP size (new Linears on the current device)."""
    hidden, head_dim = model.config.hidden_size, model.config.head_dim
    for layer, shape in zip(model.model.layers, shapes):
        q = shape["num_attention_heads"] * head_dim
        kv = shape["num_key_value_heads"] * head_dim
        inter = shape["intermediate_size"]
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj, attn.k_proj = _shrink(attn.q_proj, q, hidden), _shrink(attn.k_proj, kv, hidden)
        attn.v_proj, attn.o_proj = _shrink(attn.v_proj, kv, hidden), _shrink(attn.o_proj, hidden, q)
        mlp.gate_proj, mlp.up_proj = _shrink(mlp.gate_proj, inter, hidden), _shrink(mlp.up_proj, inter, hidden)
        mlp.down_proj = _shrink(mlp.down_proj, hidden, inter)


def build_pruned_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """The transformers CausalLM of config.json's model_type (LLaMA, Mistral, Qwen2, Qwen3) whose decoder
    layers take the shapes listed in its `qpruner_layers`, with the saved weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):  # no memory for the unpruned shapes: weights arrive with load_state_dict
        model = AutoModelForCausalLM.from_config(config).to(dtype)
        shape_layers(model, config.qpruner_layers)
    state = load_file(path / "model.safetensors")
    if "lm_head.weight" not in state and config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # its buffers are not in the state dict
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


@functools.lru_cache(maxsize=None)
def _int8_module():
    """bitsandbytes' Linear8bitLt that runs LLM.int8 (MatMul8bitLt) in training and evaluation alike.

    Stock Linear8bitLt takes, on CPU/XPU in train mode, a weight-only path (dequant(int8 W) @ x) and in
    eval mode LLM.int8: x quantized row-wise to int8 except the input columns with an |x| above the
    threshold, which multiply the dequantized weight in fp16. Its weights are frozen, so train mode means
    nothing else for it: this subclass stays in eval mode, and LoRA training sees the model evaluation
    scores (on CUDA bitsandbytes runs MatMul8bitLt in both modes anyway).
    """
    import logging

    import bitsandbytes as bnb

    # MatMul8bitLt logs "inputs will be cast to float16" at every forward of a float32 model: the cast is the
    # documented LLM.int8 numerics (activations quantized from fp16), not news after the first layer.
    logging.getLogger(bnb.autograd._functions.__name__).setLevel(logging.ERROR)

    class Int8Linear(bnb.nn.Linear8bitLt):
        def train(self, mode: bool = True):
            return super().train(False)

    return Int8Linear


def quantize_linear(linear: nn.Linear, bits: int, settings: dict, device: str) -> nn.Module:
    """The bitsandbytes module qpruner uses for a bit-width: NF4/FP4 Linear4bit, LLM.int8 Linear8bitLt
    (outlier threshold settings['int8_threshold'], 0 = no outlier columns), or as is."""
    import bitsandbytes as bnb

    compute = getattr(torch, settings.get("compute_dtype", "float32"))
    if bits == 16:
        return linear.to(device=device, dtype=compute)
    if bits == 4:
        new = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=compute,
            compress_statistics=settings.get("double_quant", True), quant_type=settings.get("quant_type", "nf4"),
            quant_storage=torch.uint8, device="meta",
        )
        new.weight = bnb.nn.Params4bit(
            linear.weight.data.to(compute), requires_grad=False, blocksize=settings.get("blocksize", 64),
            compress_statistics=settings.get("double_quant", True), quant_type=settings.get("quant_type", "nf4"),
        )
        # bitsandbytes' AVX512-BF16 CPU kernel repacks the weight (bf16 absmax) at the first no-grad forward and
        # fails on pruned widths (it needs out % 32 == 0, in % blocksize == 0): the plain kernel gives the same
        # numbers on every CPU and on CUDA, so trials and exported models score alike everywhere.
        new.support_avx512bf16_for_cpu = False
    elif bits == 8:
        new = _int8_module()(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            has_fp16_weights=False, threshold=float(settings.get("int8_threshold", 6.0)), device="meta",
        )
        new.eval()
        new.weight = bnb.nn.Int8Params(linear.weight.data.to(torch.float16), requires_grad=False, has_fp16_weights=False)
    else:
        raise ValueError(f"unsupported bit-width {bits}; qpruner uses 4, 8 or 16")
    if linear.bias is not None:
        new.bias = nn.Parameter(linear.bias.data.to(compute), requires_grad=False)
    return new.to(device)  # bitsandbytes quantizes when the weight moves to its device


def quantize_layers(model, bits: list[int], settings: dict, device: str) -> None:
    """Give every Linear of decoder layer i the precision bits[i], in place."""
    for layer, b in zip(model.model.layers, bits):
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, quantize_linear(child, b, settings, device))
    model.to(device)
    model.is_loaded_in_4bit = 4 in bits
    model.is_loaded_in_8bit = 8 in bits  # peft checks the flag, then each layer's type: mixed models need both


def load(path: str | Path, device: Optional[str] = None):
    """(model, tokenizer) from an exported folder (base/ + quantization.json + adapter/) or a merged one."""
    from transformers import AutoTokenizer

    path = Path(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if (path / "config.json").is_file():  # a plain pruned or merged model
        return build_pruned_model(path).to(device), AutoTokenizer.from_pretrained(path)
    from peft import PeftModel

    quant = json.loads((path / "quantization.json").read_text())
    model = build_pruned_model(path / "base", getattr(torch, quant["settings"].get("compute_dtype", "float32")))
    quantize_layers(model, quant["bits"], quant["settings"], device)
    model = PeftModel.from_pretrained(model, path / "adapter", is_trainable=False)
    return model.eval(), AutoTokenizer.from_pretrained(path / "base")
