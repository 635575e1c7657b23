"""Study 4 (GPU only): fine-tuning peak memory of a LLaMA-7B-shaped model pruned 20%, per precision.

Memory and speed do not depend on weight values, so the model has random weights in the pruned
shapes (heads and MLP channels as qpruner's planner removes them for ratio 0.2). For uniform 16-bit
LoRA, uniform 4-bit, uniform 8-bit and a mixed 4/8 configuration it runs real LoRA training steps
(micro batch 4 x 256 tokens, paged AdamW 32-bit) and records torch.cuda.max_memory_allocated, the
step time, and how many such trials would pack on this GPU (total // (the allocator's reserved peak + the paged
optimizer state, which lives in CUDA managed memory the allocator does not count, + the CUDA context)). This is the
standalone path; `python -m benchmarks.gpu_check` measures the same configurations through run_trial. The paper reports 35.06 GB (16-bit
LoRA) and 21.33 GB (4-bit LoftQ) for LLaMA-7B at 20%.

    python -m benchmarks.gpu_memory            # on a CUDA machine
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import write_result

PAPER_GB = {"uniform-16": 35.06, "uniform-4": 21.33}
LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, head_dim=128, max_position_embeddings=2048)


def pruned_shapes(ratio: float) -> list[dict]:
    """Per-layer shapes after qpruner's plan for this ratio (planned on a weightless meta model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qpruner.config import PruneConfig
    from qpruner.prune import plan_pruning

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_7B))
    plan = plan_pruning(model, PruneConfig(ratio=ratio, first_layer=4, last_layer=30))
    shapes = []
    for i in range(LLAMA_7B["num_hidden_layers"]):
        cut = i in plan.layers
        heads = LLAMA_7B["num_key_value_heads"] - (plan.groups if cut else 0)
        shapes.append({"num_attention_heads": heads, "num_key_value_heads": heads,
                       "intermediate_size": LLAMA_7B["intermediate_size"] - (plan.channels if cut else 0)})
    return shapes


def meta_peft_llama(shapes: list[dict], lora):
    """LLaMA-7B in these per-layer shapes on the meta device (no memory), wrapped with LoRA: for pricing
    weights and the fine-tuning peak from shapes alone."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from qpruner.standalone import shape_layers

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_7B, tie_word_embeddings=False)).to(torch.bfloat16)
        shape_layers(model, shapes)
        return get_peft_model(model, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))


def build(shapes: list[dict], folder) -> None:
    """Write a random-weight pruned model folder that qpruner.standalone can load."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(**LLAMA_7B, tie_word_embeddings=False)
    config.qpruner_layers = shapes
    config.save_pretrained(folder)
    hidden, hd = LLAMA_7B["hidden_size"], LLAMA_7B["head_dim"]
    state = {"model.embed_tokens.weight": torch.randn(32000, hidden, dtype=torch.bfloat16) * 0.02,
             "lm_head.weight": torch.randn(32000, hidden, dtype=torch.bfloat16) * 0.02,
             "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
    for i, s in enumerate(shapes):
        q, kv, inter = s["num_attention_heads"] * hd, s["num_key_value_heads"] * hd, s["intermediate_size"]
        p = f"model.layers.{i}."
        for name, shape in ((f"{p}self_attn.q_proj.weight", (q, hidden)), (f"{p}self_attn.k_proj.weight", (kv, hidden)),
                            (f"{p}self_attn.v_proj.weight", (kv, hidden)), (f"{p}self_attn.o_proj.weight", (hidden, q)),
                            (f"{p}mlp.gate_proj.weight", (inter, hidden)), (f"{p}mlp.up_proj.weight", (inter, hidden)),
                            (f"{p}mlp.down_proj.weight", (hidden, inter))):
            state[name] = torch.randn(*shape, dtype=torch.bfloat16) * 0.02
        state[f"{p}input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        state[f"{p}post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    save_file(state, str(folder / "model.safetensors"))


def measure(folder, bits: list[int], steps: int = 3) -> dict:
    """Peak memory and step time of LoRA training on this bit vector."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    from qpruner.memory import paged_optimizer_bytes
    from qpruner.standalone import build_pruned_model, quantize_layers

    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    context = total - free - torch.cuda.memory_reserved()  # the CUDA context (and anything else not torch's)
    torch.cuda.reset_peak_memory_stats()
    model = build_pruned_model(folder, torch.bfloat16)
    quantize_layers(model, bits, {"compute_dtype": "bfloat16", "blocksize": 64, "double_quant": True}, "cuda")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    weights = torch.cuda.memory_allocated()
    opt = bnb.optim.PagedAdamW32bit([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    batch = torch.randint(0, 32000, (4, 256), device="cuda")
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak, reserved, paged = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved(), paged_optimizer_bytes(opt)
    del model, opt
    need = reserved + paged + context  # what one more such process takes from the device
    return {"bits": bits, "weights_gb": weights / 1024**3, "peak_gb": peak / 1024**3, "reserved_peak_gb": reserved / 1024**3,
            "paged_optimizer_gb": paged / 1024**3, "context_gb": context / 1024**3, "footprint_gb": need / 1024**3,
            "step_s": sorted(times)[len(times) // 2], "trials_per_gpu": int(total // need)}


def main() -> None:
    import tempfile
    from pathlib import Path

    if not torch.cuda.is_available():
        write_result("gpu_memory", {"skipped": "no CUDA device on this machine; run on a GPU to fill this study"})
        return
    shapes = pruned_shapes(0.2)
    n = len(shapes)
    configs = {"uniform-16": [16] * n, "uniform-4": [4] * n, "uniform-8": [8] * n,
               "mixed-4/8 (8 on first/last 4)": [8] * 4 + [4] * (n - 8) + [8] * 4}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build(shapes, folder)
        rows = {name: measure(folder, bits) for name, bits in configs.items()}
    write_result("gpu_memory", {"model": "LLaMA-7B shape, random weights, 20% pruned (layers 4..30)",
                                "micro_batch": 4, "seq_len": 256, "results": rows, "paper_gb": PAPER_GB})


if __name__ == "__main__":
    main()
