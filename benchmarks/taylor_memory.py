"""Peak memory of Taylor pruning, before and after the gradient hooks (issue 25, item 1), side by side in one run.

Each measurement runs in its own Python process on the CPU: it builds a random LLaMA-shaped model (memory
does not depend on the weights' values), resets the process's peak resident memory (Linux: writing 5 to
/proc/self/clear_refs resets VmHWM), runs qpruner's prune_model at 20%, and reads VmHWM. "before" is the
computation qpruner used until this change, kept below as a benchmark-only reference (OLD_*): a backward
per micro-batch (or per sample) into every weight's .grad, then a full-size float32 score per weight.
"after" is qpruner.prune.taylor as it is now. Both orders, first and second.

The analytic part gives the same peak for LLaMA-7B in bfloat16 on a GPU (weights, what each path keeps, the
activations), and whether it fits 24 / 40 / 80 GB cards.

    python -m benchmarks.taylor_memory            # writes benchmarks/results/taylor_memory.json
    python -m benchmarks.taylor_memory --quick    # a small shape, seconds: the plumbing only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from benchmarks.common import write_result

SHAPE = dict(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=16, head_dim=64, max_position_embeddings=256)
QUICK = dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, head_dim=32, max_position_embeddings=128)
# What CUDA reports as total memory on the cards users rent (nvidia-smi, MiB): the "24 / 40 / 80 GB" classes.
CARDS_MIB = {"24 GB (A10G)": 23028, "40 GB (A100-40GB)": 40960, "80 GB (H100 SXM)": 81559}
LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, head_dim=128)


def old_weight_scores(model, batches, order, progress=False):
    """Benchmark-only reference: the pre-hook Taylor scores (qpruner before issue 25), full-size per weight.
    A backward per micro-batch (first) or per sample (second) accumulates every weight's gradient; the
    second order also keeps float32 sums of g and g^2 for every weight; then |w g| (- 1/2 w^2 F) in float32."""
    from qpruner.prune.taylor import MICRO_BATCH, _padded

    params = {n: p for n, p in model.named_parameters() if ".layers." in n and n.endswith("proj.weight")}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    second = order == "second"
    grad_sum = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()} if second else None
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()} if second else None
    model.eval()
    steps = [[b] for b in batches] if second else [batches[i : i + MICRO_BATCH] for i in range(0, len(batches), MICRO_BATCH)]
    for step in steps:
        model(**_padded(step)).loss.backward()
        if second:
            for n, p in params.items():
                g = p.grad.float()
                grad_sum[n] += g
                fisher[n] += g * g
                p.grad = None
    scores = {}
    for n, p in params.items():
        g = grad_sum[n] if second else p.grad.float()
        w = p.detach().float()
        s = w * (g / len(steps))
        if second:
            s = s - 0.5 * w * w * (fisher[n] / len(steps))
        scores[n] = s.abs()
        p.grad = None
        p.requires_grad_(False)
    return scores


def _vm(field: str) -> int:
    """A VmRSS/VmHWM figure of this process in bytes (Linux /proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(path: str, order: str, shape: dict, rows: int, tokens: int) -> dict:
    """In this process: prune a random model of `shape` by `path` ('before' or 'after'); its peak resident memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import qpruner.prune.taylor as taylor
    from qpruner.config import PruneConfig

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    batches = [torch.randint(0, shape["vocab_size"], (1, tokens)) for _ in range(rows)]
    if path == "before":  # the old full-size scores, reduced only where prune_model needs them
        taylor.weight_scores = lambda m, b, o, progress: {n: taylor.channel_sums(n, s) for n, s in old_weight_scores(m, b, o).items()}
    n = shape["num_hidden_layers"]
    pcfg = PruneConfig(ratio=0.2, first_layer=1, last_layer=n - 1, taylor_order=order, round_to=1)
    rss = _vm("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS := current RSS
    started = time.perf_counter()
    info = taylor.prune_model(model, batches, pcfg, progress=False)
    seconds = time.perf_counter() - started
    peak = _vm("VmHWM")
    return {"path": path, "order": order, "weights_mib": weights / 2**20, "rss_before_mib": rss / 2**20,
            "peak_mib": peak / 2**20, "peak_above_start_mib": (peak - rss) / 2**20,
            "peak_above_start_over_weights": (peak - rss) / weights, "seconds": seconds,
            "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "channels_removed": info["channels_removed"], "groups_removed": info["groups_removed"]}


def measure(path: str, order: str, shape: dict, rows: int, tokens: int) -> dict:
    """One child() in a fresh Python process, so that no measurement sees another's allocations."""
    args = [sys.executable, "-m", "benchmarks.taylor_memory", "--child", path, order, json.dumps(shape), str(rows), str(tokens)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{path}/{order} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def analytic_7b(rows: int = 10, tokens: int = 128, dtype_bytes: int = 2) -> dict:
    """Peak GPU memory of Taylor-pruning LLaMA-7B in bf16, before and after, from tensor sizes (GiB).

    T = rows * tokens, h hidden, i MLP width, V vocabulary, L layers, D = decoder projection parameters.
    after, first order: weights + every layer's input kept by the checkpoints (L*T*h*2) + one layer's saved
    activations recomputed and as much again for their gradients (2 * T*(28h + 8i) bytes: bf16 tensors, fp32
    RMSNorm inputs, SDPA's q/k/v/out, SiLU's gate, up and product) + logits (T*V: bf16, fp32 copy, fp32
    log-softmax, fp32 gradient = 14 bytes) + the hook's transient for the largest weight (bf16 grad, fp32 grad,
    fp32 weight, fp32 product = 14 bytes a parameter).
    after, second order: weights + the chunk's float32 g and g^2 sums (default budget D*2/4 bytes) + one
    sample's activations without checkpoints (L*tokens*(28h + 8i)) + logits + the hook's transient (18 B/param).
    before, first order: weights + every weight's bf16 gradient + all layers' activations of a micro-batch
    of 8 rows, then weights + full-size fp32 scores (4*D); the larger of the two.
    before, second order: weights + bf16 gradients + fp32 g and g^2 sums for every weight (8*D) + scores.
    The CUDA context (about 0.5 GiB) is added to each figure.
    """
    h, i, V, L = (LLAMA_7B[k] for k in ("hidden_size", "intermediate_size", "vocab_size", "num_hidden_layers"))
    D = L * (4 * h * h + 3 * h * i)
    params = D + 2 * V * h + (2 * L + 1) * h
    W, T = params * dtype_bytes, rows * tokens
    layer_acts = 28 * h + 8 * i  # bytes per token per layer
    largest = h * i
    context = 0.5 * 2**30
    logits = T * V * 14
    after_first = W + L * T * h * 2 + 2 * T * layer_acts + logits + 14 * largest + context
    after_second = W + D * dtype_bytes / 4 + L * tokens * layer_acts + tokens * V * 14 + 18 * largest + context
    before_first = max(W + D * dtype_bytes + L * min(rows, 8) * tokens * layer_acts + min(rows, 8) * tokens * V * 14,
                       W + 4 * D) + context
    before_second = W + D * dtype_bytes + 8 * D + 4 * largest + L * tokens * layer_acts + context
    gib = {"before_first": before_first, "after_first": after_first, "before_second": before_second,
           "after_second": after_second}
    return {"calibration": f"{rows} x {tokens} tokens", "dtype_bytes": dtype_bytes, "weights_gib": W / 2**30,
            **{f"{k}_gib": round(v / 2**30, 2) for k, v in gib.items()},
            "fits": {k: {card: v <= mib * 2**20 for card, mib in CARDS_MIB.items()} for k, v in gib.items()},
            "cards_mib": CARDS_MIB}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small shape: the plumbing, in seconds")
    parser.add_argument("--rows", type=int, default=16, help="calibration rows (prune.calibration.n_samples)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per row (prune.calibration.seq_len)")
    parser.add_argument("--orders", default="first,second")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        path, order, shape, rows, tokens = args.child
        print(json.dumps(child(path, order, json.loads(shape), int(rows), int(tokens))))
        return {}
    shape = QUICK if args.quick else SHAPE
    runs = [measure(path, order, shape, args.rows, args.tokens) for order in args.orders.split(",") for path in ("before", "after")]
    cpu = {"shape": shape, "dtype": "float32", "calibration": f"{args.rows} x {args.tokens} tokens", "runs": runs,
           "peak_above_start_ratio_after_over_before": {
               r["order"]: runs[k + 1]["peak_above_start_mib"] / r["peak_above_start_mib"]
               for k, r in enumerate(runs) if r["path"] == "before"}}
    result = {"cpu_measured": cpu, "llama7b_analytic_bf16": {"gpu_check_calibration": analytic_7b(10, 128),
                                                            "default_calibration": analytic_7b(16, 64)}}
    if args.quick:
        print(json.dumps(result, indent=1))
        return result
    write_result("taylor_memory", result)
    return result


if __name__ == "__main__":
    main()
