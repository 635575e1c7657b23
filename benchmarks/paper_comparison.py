"""Study 1: the paper's motivating comparison on one pruned model, at 20% and 50% pruning.

Arms: LoRA at uniform 16 bits, LoftQ at uniform 4 and uniform 8 bits, and the best mixed 4/8
configurations a qpruner search found (its most accurate mixed point and its cheapest mixed point
on the front). Each arm is re-trained and evaluated with fresh fine-tuning seeds (not the search's),
so picking the mixed points does not bias their scores. Weights are exact bytes; the fine-tuning
peak is qpruner's estimate (measured only on GPU, see gpu_memory.py). The same bit patterns are
also priced on a LLaMA-7B-shaped model pruned as the paper prunes it (shapes only, no weights).

Model: builtin:tiny (no pretrained model is provided in ../shared/). At 50% all six layers are
prunable (layers 1..4 alone cannot lose half the model).

    python -m benchmarks.paper_comparison [--seeds 3] [--ratios 0.2 0.5]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

from benchmarks.common import mean_std, run_search, tiny_recipe, write_result

PAPER = {"lora16_gb": 35.06, "loftq4_gb": 21.33, "model": "LLaMA-7B, 20% pruned"}


def recipe(ratio: float) -> dict:
    prune = {"ratio": ratio, **({"first_layer": 0, "last_layer": 6} if ratio >= 0.4 else {})}
    # no ASHA: the mixed picks must be completed trials; the arms below are the baselines
    return tiny_recipe(prune=prune, search={"baselines": [], "asha": {"enabled": False}})


def mixed_picks(search_out: Path) -> dict[str, list[int]]:
    """The search's most accurate mixed configuration and its cheapest mixed one on the front."""
    front = [r for r in pq.read_table(search_out / "pareto.parquet").to_pylist() if len(set(r["bits"])) > 1]
    done = [r for r in pq.read_table(search_out / "results.parquet").to_pylist()
            if r["status"] == "completed" and len(set(r["bits"])) > 1]
    picks = {}
    if done:
        picks["mixed (most accurate)"] = list(max(done, key=lambda r: r["accuracy"])["bits"])
    if front:
        cheapest = list(min(front, key=lambda r: r["memory_bytes"])["bits"])
        if cheapest not in picks.values():
            picks["mixed (cheapest on front)"] = cheapest
    return picks


def run_arm(raw: dict, pruned_path: str, bits: list[int], seeds: list[int]) -> dict:
    """Train + evaluate one bit vector once per fine-tuning seed; accuracy spread and memory."""
    from qpruner.plan import resolved_config
    from qpruner.trial import run_trial

    runs = []
    for seed in seeds:
        cfg = resolved_config({**raw, "finetune": {**raw["finetune"], "seed": seed},
                                "quant": {**raw["quant"], "bits": [4, 8, 16]}})  # 16 is outside the search space
        runs.append(run_trial(cfg, pruned_path, bits))
    tasks = sorted(runs[0]["task_acc"])
    return {
        "bits": bits,
        "accuracy": mean_std(r["accuracy"] for r in runs),
        "task_acc": {t: mean_std(r["task_acc"][t] for r in runs) for t in tasks},
        "weight_bytes": runs[0]["weight_bytes"],
        "lora_bytes": runs[0]["lora_bytes"],
        "peak_estimate_bytes": runs[0]["peak_estimate_bytes"],
        "trial_seconds": mean_std(r["wall_seconds"] for r in runs),
    }


def llama7b_memory(ratio: float, patterns: dict[str, list[int]]) -> dict:
    """Weights and estimated fine-tuning peak (micro batch 4 x 256, bf16, LoRA r=8) of each pattern on
    LLaMA-7B pruned like the paper (layers 4..30); a tiny pattern is stretched over 32 layers by depth."""
    from benchmarks.gpu_memory import meta_peft_llama, pruned_shapes
    from qpruner.memory import finetune_peak_estimate, lora_bytes, weight_bytes
    from qpruner.plan import resolved_config

    cfg = resolved_config({"quant": {"compute_dtype": "bfloat16"}, "lora": {"dropout": 0.05},
                            "finetune": {"micro_batch_size": 4, "max_length": 256}})
    model = meta_peft_llama(pruned_shapes(ratio), cfg.lora)
    out = {}
    for name, bits in patterns.items():
        stretched = [bits[min(len(bits) - 1, i * len(bits) // 32)] for i in range(32)]
        weights = weight_bytes(model, stretched, cfg.quant)["total"]
        lora = lora_bytes(model)
        out[name] = {"weights_gb": weights / 1024**3,
                     "peak_estimate_gb": finetune_peak_estimate(model, weights, lora, cfg) / 1024**3}
    return out


def claims(arms: dict) -> dict:
    """The paper's two claims, checked on the measured means."""
    u4, u8, u16 = arms["LoftQ uniform-4"], arms["LoftQ uniform-8"], arms["LoRA uniform-16"]
    mixed = {k: v for k, v in arms.items() if k.startswith("mixed")}
    out = {
        "uniform4_vs_lora16_accuracy_gap": u16["accuracy"]["mean"] - u4["accuracy"]["mean"],
        "uniform4_vs_lora16_memory_ratio": u4["peak_estimate_bytes"] / u16["peak_estimate_bytes"],
        "uniform4_vs_lora16_weight_ratio": u4["weight_bytes"] / u16["weight_bytes"],
    }
    for name, arm in mixed.items():
        span = u8["weight_bytes"] - u4["weight_bytes"]
        out[name] = {
            "accuracy_minus_uniform4": arm["accuracy"]["mean"] - u4["accuracy"]["mean"],
            "accuracy_minus_uniform8": arm["accuracy"]["mean"] - u8["accuracy"]["mean"],
            "weights_position_between_u4_and_u8": (arm["weight_bytes"] - u4["weight_bytes"]) / span,
            "at_or_above_uniform4": arm["accuracy"]["mean"] >= u4["accuracy"]["mean"],
        }
    return out


def study_ratio(ratio: float, seeds: list[int], work: Path) -> dict:
    from qpruner.plan import resolved_config
    from qpruner.prune import prune_cached, pruned_layer_count

    raw = recipe(ratio)
    raw["output"]["dir"] = str(work / f"search-{ratio}")
    search_out = work / f"search-{ratio}"
    search_seconds = run_search(raw, search_out)
    pruned = prune_cached(resolved_config(raw), progress=False)
    n = pruned_layer_count(pruned.path)
    patterns = {"LoRA uniform-16": [16] * n, "LoftQ uniform-4": [4] * n, "LoftQ uniform-8": [8] * n,
                **mixed_picks(search_out)}
    arms = {}
    for name, bits in patterns.items():
        arms[name] = run_arm(raw, str(pruned.path), bits, seeds)
        print(f"[paper_comparison] {ratio:.0%} {name} {bits}: acc {arms[name]['accuracy']['mean']:.3f} "
              f"+- {arms[name]['accuracy']['std']:.3f}, weights {arms[name]['weight_bytes'] / 1024:.0f} KiB", flush=True)
    return {"ratio": ratio, "overall_ratio": pruned.overall_ratio, "search_seconds": search_seconds,
            "arms": arms, "claims": claims(arms), "llama7b_memory": llama7b_memory(ratio, patterns)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    args = parser.parse_args()
    seeds = list(range(1, args.seeds + 1))  # the search itself fine-tunes with seed 0
    with tempfile.TemporaryDirectory() as tmp:
        studies = [study_ratio(r, seeds, Path(tmp)) for r in args.ratios]
    write_result("paper_comparison", {"model": "builtin:tiny (1.3M params, synthetic world)", "seeds": seeds,
                                      "paper": PAPER, "ratios": studies})


if __name__ == "__main__":
    main()
