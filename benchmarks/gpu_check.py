"""The GPU check (issue 25): what qpruner's CUDA path costs on a real GPU, in one command.

Parts (each writes benchmarks/results/gpu_<part>.json):

- `taylor`: the peak GPU memory of Taylor-pruning a LLaMA-7B-shaped model (random weights; memory does not
  depend on their values) with qpruner.prune.taylor.prune_model as it is, at 20%, 10 calibration rows of
  128 tokens, in bf16 (and the seconds it takes). Its committed result (gpu_taylor.json, 37.5 GiB) was
  measured before the pruning-memory work, when the backward pass held every decoder weight's gradient
  and a float32 |w g| score per weight; a rerun measures the streaming scores (analytic: 15.0 GiB).
- `memory`: the fine-tuning memory study of benchmarks/gpu_memory.py (uniform 16 / 4 / 8 and a mixed
  pattern on the pruned LLaMA-7B shape, against the paper's 35.06 / 21.33 GB). It uses qpruner.standalone's
  loader and bitsandbytes + peft directly, not run_trial (that is still to do, issue 25).

`--dry-run` runs the same code on the CPU with a small LLaMA shape in seconds, to check the plumbing.
On the GPU machine, bitsandbytes and peft travel as wheels (see benchmarks/README.md); Ray is not needed.

    python -m benchmarks.gpu_check --parts taylor,memory
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import write_result
from benchmarks.gpu_memory import LLAMA_7B

SMALL = dict(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, head_dim=64, max_position_embeddings=256)


def taylor_peak(shape: dict, device: str, dtype: torch.dtype, rows: int = 10, tokens: int = 128) -> dict:
    """Prune a random model of this shape by first-order Taylor at 20%, as qpruner's prune task does; the
    device's peak memory (CUDA) and the seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qpruner.config import PruneConfig
    from qpruner.prune.taylor import prune_model

    torch.manual_seed(0)
    n = shape["num_hidden_layers"]
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape)).to(dtype)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    batches = [torch.randint(0, shape["vocab_size"], (1, tokens), device=device) for _ in range(rows)]
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    first, last = (4, 30) if n == 32 else (1, n - 1)  # LLM-Pruner's layers 4..30 of LLaMA-7B
    info = prune_model(model, batches, PruneConfig(ratio=0.2, first_layer=first, last_layer=last), progress=False)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {"shape": shape, "dtype": str(dtype).removeprefix("torch."), "calibration": f"{rows} x {tokens} tokens",
            "weights_gib": weights / 1024**3, "peak_gib": None if peak is None else peak / 1024**3,
            "peak_over_weights": None if peak is None else peak / weights, "seconds": seconds,
            "layers_pruned": len(info["layers"]), "channels_removed": info["channels_removed"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="taylor,memory")
    parser.add_argument("--dry-run", action="store_true", help="a small shape on the CPU: the plumbing only")
    args = parser.parse_args()
    parts = args.parts.split(",")
    cuda = torch.cuda.is_available() and not args.dry_run
    device = "cuda" if cuda else "cpu"
    gpu = torch.cuda.get_device_name(0) if cuda else None
    if "taylor" in parts:
        result = taylor_peak(LLAMA_7B if cuda else SMALL, device, torch.bfloat16)
        if cuda:
            total = torch.cuda.get_device_properties(0).total_memory / 1024**3
            result["fits"] = {f"{gb} GB": result["peak_gib"] * 1024**3 <= gb * 1e9 for gb in (24, 40, 80)}
            result["device_total_gib"] = total
        print(result, flush=True)
        if not args.dry_run:
            write_result("gpu_taylor", {"gpu": gpu, "taylor_20pct": result})
    if "memory" in parts and cuda:
        from benchmarks import gpu_memory

        gpu_memory.main()


if __name__ == "__main__":
    main()
