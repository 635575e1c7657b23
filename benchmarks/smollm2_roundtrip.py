"""SmolLM2-135M-Instruct, given as its GGUF file, through prune -> trial -> export -> reload.

The reload runs in a fresh Python process that cannot import qpruner (stock torch, transformers,
bitsandbytes, peft and lm-eval only) and must reproduce the trial's accuracy. Records wall time per
stage and peak RSS. Settings are small so it runs on a 2-core CPU in minutes: Taylor pruning at 20%
calibrated on a Gutenberg book, one mixed 4/8-bit trial of `--steps` LoRA steps on the shared Alpaca
sample, evaluation on the built-in tiny tasks (task-agnostic: what is checked is that the exported
model is the trial's model) unless `--tasks-from-shared` is given.

    python -m benchmarks.smollm2_roundtrip [--steps 10] [--limit 50]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import fresh_cache, peak_rss_mb, shared_data, smollm2_gguf, write_result

RELOAD = """
import json, sys, time
sys.modules["qpruner"] = None  # prove the export needs no qpruner
started = time.time()
sys.path.insert(0, sys.argv[1])
from load_qpruner import load
model, tok = load(sys.argv[1], device="cpu")
from lm_eval import evaluator
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
tasks = json.loads(sys.argv[3])
tm = TaskManager(include_path=sys.argv[2], include_defaults=False)
res = evaluator.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=16), tasks=tasks,
                                task_manager=tm, num_fewshot=0, limit=int(sys.argv[4]))
accs = [res["results"][t]["acc,none"] for t in tasks]
print(json.dumps({"accuracy": sum(accs) / len(accs), "seconds": time.time() - started}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--limit", type=int, default=50, help="documents per task")
    args = parser.parse_args()
    gguf, data = smollm2_gguf(), shared_data()

    from qpruner.builtin import ensure_tiny
    from qpruner.export import export_trial
    from qpruner.model import gguf_folder
    from qpruner.plan import resolved_config
    from qpruner.prune import load_pruned, prune_cached
    from qpruner.trial import run_trial

    tiny = ensure_tiny(progress=False)
    timings = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cache = fresh_cache(work / "cache")
        started = time.time()
        gguf_folder(gguf, cache)
        timings["gguf_convert_s"] = time.time() - started
        cfg = resolved_config({
            "model": {"name": str(gguf)},
            "prune": {"ratio": 0.2, "calibration": {"source": str(data / "text/gutenberg_1342/1342-0.txt"),
                                                    "n_samples": 8, "seq_len": 128}},
            "quant": {"bits": [4, 8]}, "lora": {"rank": 8},
            "finetune": {"data": str(data / "alpaca/alpaca_small.json"), "steps": args.steps,
                         "report_every": args.steps, "val_limit": 16, "max_length": 256},
            "eval": {"tasks": ["builtin"], "limit": args.limit, "batch_size": 16},
            "output": {"cache_dir": str(cache)},
        })
        t = time.time()
        pruned = prune_cached(cfg, progress=False)
        timings["prune_s"] = time.time() - t
        n_layers = len(load_pruned(pruned.path)[0].model.layers)
        bits = [4 if i % 3 else 8 for i in range(n_layers)]
        t = time.time()
        result = run_trial(cfg, pruned.path, bits, adapter_dir=work / "adapter")
        timings["trial_s"] = time.time() - t
        t = time.time()
        out = export_trial(cfg, pruned.path, work / "adapter", {**result, "trial_id": "smollm2"}, work / "export")
        timings["export_s"] = time.time() - t
        tasks = list(result["task_acc"])
        proc = subprocess.run([sys.executable, "-c", RELOAD, str(out), str(tiny.tasks_dir), json.dumps(tasks),
                               str(args.limit)], capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        reload = json.loads(proc.stdout.strip().splitlines()[-1])
        meta = json.loads((pruned.path / "qpruner_prune.json").read_text())
    write_result("smollm2_roundtrip", {
        "model": "SmolLM2-135M-Instruct", "model_source": meta["model_source"],
        "data": {"calibration": "text/gutenberg_1342/1342-0.txt (8 x 128 tokens)",
                 "finetune": "alpaca/alpaca_small.json", "eval": f"built-in tiny tasks, limit {args.limit} each"},
        "params": {"before": pruned.params_before, "after": pruned.params_after, "overall_ratio": pruned.overall_ratio},
        "bits": bits, "steps": args.steps,
        "trial_accuracy": result["accuracy"], "reloaded_accuracy": reload["accuracy"],
        "reproduced": abs(result["accuracy"] - reload["accuracy"]) < 1e-9,
        "timings_s": {**timings, "reload_and_eval_s": reload["seconds"], "trial_stages": {
            k: result[k] for k in ("loftq_s", "quantize_s", "finetune_s", "eval_s")}},
        "peak_rss_mb": {"driver": peak_rss_mb(), "note": "driver process (GGUF conversion, prune, trial, export)"},
    })


if __name__ == "__main__":
    main()
