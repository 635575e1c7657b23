"""Does precision matter on the built-in tiny model? Uniform 4 / 8 / 16-bit trials of tune_configs/tiny.yaml
(issue 31: the default demo's front should show a trade-off), in two settings:

- rounding alone: no LoftQ correction (B = 0) and no training (1 step at lr 1e-9), so the score is the pruned
  model with its weights rounded to NF4 / LLM.int8 / kept, and nothing else;
- the trial as the demo runs it: LoftQ + 40 LoRA steps, at pruning ratios 0, 0.1 and 0.3 (the demo's), and at
  0.3 with two more fine-tuning seeds, to set precision against the spread that training alone gives.

    python -m benchmarks.tiny_precision      # about 10 minutes on 2 CPU cores -> results/tiny_precision.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from benchmarks.common import ROOT, write_result

ROUNDING_ONLY = ["finetune.steps=1", "finetune.lr=1e-9", "lora.loftq_iters=0", "finetune.report_every=1"]


def arms() -> list[tuple[str, dict, list[str]]]:
    out = []
    for ratio in (0.0, 0.3):
        for bits in (4, 8, 16):
            out.append((f"rounding only, ratio {ratio}, uniform-{bits}", {"setting": "rounding only", "ratio": ratio, "bits": bits},
                        [f"prune.ratio={ratio}", *ROUNDING_ONLY]))
    out.append(("rounding only, ratio 0.3, uniform-4 FP4", {"setting": "rounding only", "ratio": 0.3, "bits": 4, "quant_type": "fp4"},
                ["prune.ratio=0.3", "quant.quant_type=fp4", *ROUNDING_ONLY]))
    for ratio in (0.0, 0.1, 0.3):
        for bits in (4, 8, 16):
            out.append((f"trial, ratio {ratio}, uniform-{bits}", {"setting": "trial", "ratio": ratio, "bits": bits}, [f"prune.ratio={ratio}"]))
    for seed in (1, 2):
        for bits in (4, 8):
            out.append((f"trial, ratio 0.3, uniform-{bits}, finetune seed {seed}",
                        {"setting": "trial", "ratio": 0.3, "bits": bits, "finetune_seed": seed},
                        ["prune.ratio=0.3", f"finetune.seed={seed}"]))
    return out


def run_trial(bits: int, sets: list[str]) -> dict:
    argv = [sys.executable, "-m", "qpruner.trial", "--config", "tune_configs/tiny.yaml", "--bits", f"uniform:{bits}",
            "--set", "quant.bits=[4,8,16]"]
    for s in sets:
        argv += ["--set", s]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr[-2000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"accuracy": row["accuracy"], "accuracy_stderr": row["accuracy_stderr"], "task_acc": row["task_acc"],
            "weight_bytes": row["weight_bytes"], "memory_gb": row["memory_gb"], "seconds": round(time.perf_counter() - started, 1)}


def table(rows: list[dict]) -> str:
    lines = ["| arm | accuracy ± se | tiny_colour | tiny_home | tiny_food | weight bytes |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        t = r["task_acc"]
        lines.append(f"| {r['arm']} | {r['accuracy']:.3f} ± {r['accuracy_stderr']:.3f} | {t['tiny_colour']:.3f} | {t['tiny_home']:.3f} | "
                     f"{t['tiny_food']:.3f} | {r['weight_bytes']:,} |")
    return "\n".join(lines)


def main() -> None:
    rows = []
    for name, meta, sets in arms():
        row = {"arm": name, **meta, **run_trial(meta["bits"], sets)}
        print(f"{name}: {row['accuracy']:.3f} ± {row['accuracy_stderr']:.3f} ({row['seconds']:.0f} s)", flush=True)
        rows.append(row)
    write_result("tiny_precision", {"model": "builtin:tiny", "recipe": "tune_configs/tiny.yaml", "rows": rows})
    print(table(rows))


if __name__ == "__main__":
    main()
