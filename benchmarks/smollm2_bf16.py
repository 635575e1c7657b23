"""bf16 against fp32 on one SmolLM2-135M trial, side by side in one run (issue 27, item 1).

    python -m benchmarks.smollm2_bf16 [--threads 1]      # results/smollm2_bf16.json, resumable by cell

The trial is Table 1's QPruner-1 at its budget (Taylor 20%, uniform-4 NF4 + LoftQ, 20 LoRA steps x 8 Alpaca
records, the seven tasks on the first 100 documents, WikiText-2 40 x 512 tokens), run through qpruner's own
`run_trial` once per arm with quant.compute_dtype set:

- `float32`: the pruned model, the 4-bit layers' compute dtype, embeddings, norms and lm_head in fp32.
- `bfloat16`: all of those in bf16 (`load_pruned(dtype=quant.compute_dtype)`, bitsandbytes `compute_dtype`); peft
  upcasts the LoRA weights to fp32 (`get_peft_model(autocast_adapter_dtype=True)`, its default) and casts each
  LoRA input to them, so LoRA's master weights, gradients and AdamW state stay fp32. LoftQ's SVDs run in fp32 on
  the bf16 weight (the NF4 quantization itself reads the weight in the compute dtype, as the module does).
- `bfloat16 + bf16 LoRA`: the same with the LoRA weights cast to bf16 after peft builds them (so their
  gradients and AdamW state are bf16 too): what it costs to drop peft's upcast. Benchmark-only (a patched
  `peft.get_peft_model`), run after the two above.

Each trial gets a fresh LoftQ cache (the rest of the qpruner cache is shared through symlinks), so loftq_s is
the real SVD cost in both dtypes. `interleaved steps` times the stages that dominate a trial on the same
quantized models, alternating the arms round by round (the machine is shared, so the trials' own stage times
move with the load): one LoRA training micro-batch (4 x 256 tokens, forward + backward) and one no-grad
forward of a 512-token WikiText window, uniform 4 and uniform 8, and records each arm's tensor dtypes;
`interleaved evaluation` does the same for lm-eval's seven tasks on their first `--eval-docs` documents
(uniform 4, float32 and bfloat16): the trial's evaluation path, which the single forward does not cover.
Quality verdict: perplexity within 1% of float32's.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.smollm2_study import Study
from qpruner.prune import pruned_layer_count

ARMS = {"float32": ("float32", None), "bfloat16": ("bfloat16", None),
        "bfloat16 + bf16 LoRA": ("bfloat16", "bfloat16")}
STUDY = "smollm2_bf16"


@contextlib.contextmanager
def lora_dtype(dtype: str | None):
    """With a dtype, peft.get_peft_model casts the LoRA weights to it after building them (run_trial imports
    get_peft_model at call time, so it takes the patched one); None leaves peft's default (fp32 LoRA)."""
    import peft
    import torch

    if dtype is None:
        yield
        return
    original = peft.get_peft_model

    def patched(*args, **kwargs):
        model = original(*args, **kwargs)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(getattr(torch, dtype))
        return model

    peft.get_peft_model = patched
    try:
        yield
    finally:
        peft.get_peft_model = original


@contextlib.contextmanager
def fresh_loftq(cache: Path):
    """A qpruner cache that shares everything in `cache` (symlinks) except an empty loftq/ folder."""
    root = Path(tempfile.mkdtemp(prefix="qpruner-bf16-cache-"))
    try:
        for entry in cache.iterdir():
            if entry.name != "loftq":
                (root / entry.name).symlink_to(entry)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def arm_trial(study: Study, path: str, n: int, arm: str) -> dict:
    dtype, lora = ARMS[arm]
    with fresh_loftq(study.cache) as cache, lora_dtype(lora):
        row = study.trial(path, [4] * n, quant={"compute_dtype": dtype}, output={"cache_dir": str(cache)})
    return {"compute_dtype": dtype, "lora_dtype": lora or "float32 (peft autocast_adapter_dtype)", **row}


def build(path: str, bits: list[int], study: Study, dtype: str, lora: str | None):
    """The quantized peft model a trial trains (LoRA plain-initialised: speed does not depend on the init)."""
    import peft

    from qpruner.plan import resolved_config
    from qpruner.prune import load_pruned
    from qpruner.quantize import lora_config_for, quantize_model

    cfg = resolved_config(study.raw(quant={"compute_dtype": dtype}))
    model, tokenizer = load_pruned(path, dtype=dtype)
    quantize_model(model, bits, cfg.quant)
    with lora_dtype(lora):
        model = peft.get_peft_model(model, lora_config_for(cfg.lora, model))
    return model, tokenizer, cfg


def dtypes(model) -> dict:
    """Which dtype each part of a built trial model holds."""
    import torch

    base = model.base_model.model
    layer = base.model.layers[0].self_attn.q_proj
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    return {"embeddings": str(base.model.embed_tokens.weight.dtype), "lm_head": str(base.lm_head.weight.dtype),
            "norm": str(base.model.norm.weight.dtype), "base_layer": type(layer.base_layer).__name__,
            "base_compute_dtype": str(getattr(layer.base_layer, "compute_dtype", None)),
            "lora_weights": sorted({str(p.dtype) for p in lora}), "logits": str(logits.dtype)}


def interleaved_steps(study: Study, path: str, n: int, rounds: int) -> dict:
    """Per arm and bit-width: median seconds of one training micro-batch and one 512-token eval forward,
    the arms alternating within each round (the starting arm rotates)."""
    import torch

    from qpruner.finetune import collate, load_alpaca, response_loss, tokenize_dataset

    variants = {f"{arm}, uniform {b}": (arm, b) for b in (4, 8) for arm in ARMS if not (b == 8 and ARMS[arm][1])}
    built, info = {}, {}
    for name, (arm, b) in variants.items():
        dtype, lora = ARMS[arm]
        model, tok, cfg = build(path, [b] * n, study, dtype, lora)
        info[name] = dtypes(model)
        built[name] = model
    examples = tokenize_dataset(load_alpaca(cfg.finetune.data, max_examples=4), tok, 256)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batch = collate(examples[:4], pad)
    window = study.ids(tok)[:512].unsqueeze(0)
    times = {name: {"train_microbatch_s": [], "eval_forward_s": []} for name in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            model = built[name]
            model.train()
            t = time.perf_counter()
            response_loss(model, batch).backward()
            times[name]["train_microbatch_s"].append(time.perf_counter() - t)
            model.zero_grad(set_to_none=True)
            model.eval()
            with torch.no_grad():
                t = time.perf_counter()
                model(input_ids=window)
                times[name]["eval_forward_s"].append(time.perf_counter() - t)
        print(f"[{STUDY}] interleaved round {r + 1}/{rounds} done", flush=True)
    out = {name: {"dtypes": info[name], **{k: {"median": statistics.median(v), "values": [round(x, 3) for x in v]} for k, v in t.items()}}
           for name, t in times.items()}
    for b in (4, 8):
        base = out[f"float32, uniform {b}"]
        for name in (k for k in out if k.endswith(f"uniform {b}") and not k.startswith("float32")):
            out[name]["speedup_vs_float32"] = {k: base[k]["median"] / out[name][k]["median"] for k in ("train_microbatch_s", "eval_forward_s")}
    return {"rounds": rounds, "microbatch": "4 Alpaca records, <= 256 tokens, forward + backward", "eval_window": "512 tokens", **out}


def interleaved_eval(study: Study, path: str, n: int, rounds: int, docs: int) -> dict:
    """Seconds of one zero-shot pass (seven tasks, first `docs` documents, batch 16) per arm, alternating."""
    from benchmarks.smollm2 import zero_shot

    arms = ("float32", "bfloat16")
    built = {arm: build(path, [4] * n, study, ARMS[arm][0], None)[:2] for arm in arms}
    times, means = {arm: [] for arm in arms}, {}
    for r in range(rounds):
        for arm in (arms if r % 2 == 0 else arms[::-1]):
            model, tok = built[arm]
            model.eval()
            t = time.perf_counter()
            means[arm] = zero_shot(model, tok, study.inputs["files"], docs, cache=study.cache)["mean"]
            times[arm].append(time.perf_counter() - t)
        print(f"[{STUDY}] interleaved evaluation round {r + 1}/{rounds} done", flush=True)
    out = {arm: {"eval_pass_s": {"median": statistics.median(v), "values": [round(x, 2) for x in v]}, "mean_acc": means[arm]}
           for arm, v in times.items()}
    out["bfloat16"]["speedup_vs_float32"] = out["float32"]["eval_pass_s"]["median"] / out["bfloat16"]["eval_pass_s"]["median"]
    return {"rounds": rounds, "docs_per_task": docs, "model": "uniform 4, LoRA plain-initialised (untrained)", **out}


def verdict(cells: dict) -> dict:
    """bf16 against fp32: stage time ratios, perplexity change, accuracy difference; faster at equal quality?"""
    fp, bf = cells.get("float32"), cells.get("bfloat16")
    if not (fp and bf):
        return {}
    stages = ("loftq_s", "quantize_s", "finetune_s", "eval_s", "ppl_s", "wall_seconds")
    speed = {k: fp["seconds"][k] / bf["seconds"][k] for k in stages if fp["seconds"].get(k) and bf["seconds"].get(k)}
    ppl = bf["wikitext2_ppl"] / fp["wikitext2_ppl"] - 1
    out = {"speedup_fp32_over_bf16_time": speed, "ppl_change": ppl, "mean_acc_diff": bf["mean"] - fp["mean"],
           "mean_acc_se": (fp["mean_stderr"] ** 2 + bf["mean_stderr"] ** 2) ** 0.5,
           "equal_quality": abs(ppl) <= 0.01, "faster": speed.get("wall_seconds", 0) > 1}
    out["use_bf16"] = out["equal_quality"] and out["faster"]
    lo = cells.get("bfloat16 + bf16 LoRA")
    if lo:
        out["lora_bf16_ppl_change_vs_lora_fp32"] = lo["wikitext2_ppl"] / bf["wikitext2_ppl"] - 1
        out["lora_bf16_mean_acc_diff"] = lo["mean"] - bf["mean"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the interleaved step timing")
    parser.add_argument("--eval-docs", type=int, default=10, help="documents per task of the interleaved evaluation")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated trials to run, of {list(ARMS)}")
    parser.add_argument("--cache", default=None, help="qpruner cache (default ~/.cache/qpruner)")
    args = parser.parse_args()
    # Table 1's budget; the dtype is per cell
    args.limit, args.val_docs, args.steps, args.report_every, args.chunks, args.search_limit = 100, 16, 20, 10, 40, 0
    args.dtype = "per cell"
    import torch

    from qpruner.config import default_cache_dir

    torch.set_num_threads(args.threads)
    study = Study(STUDY, args, Path(args.cache) if args.cache else default_cache_dir(),
                  header={"arms": {k: {"compute_dtype": d, "lora_dtype": lo or "float32"} for k, (d, lo) in ARMS.items()},
                          "trial": "Table 1's QPruner-1: Taylor 20%, uniform-4 NF4 + LoftQ (fresh LoftQ cache per trial)"})
    pruned = study.prune(ratio=0.2)
    path, n = str(pruned.path), pruned_layer_count(pruned.path)
    stored = study.cells.run("pruned", lambda: {"path": pruned.key, "params_after": pruned.params_after})
    if stored["path"] != pruned.key:
        raise SystemExit(f"{study.cells.path} was measured on pruned model {stored['path']}, the code now prunes to {pruned.key}; "
                         f"move the file away to start afresh")
    study.cells.run("interleaved steps", lambda: interleaved_steps(study, path, n, args.rounds))
    study.cells.run("interleaved evaluation", lambda: interleaved_eval(study, path, n, 2, args.eval_docs))
    for arm in args.arms.split(","):
        study.cells.run(arm, lambda arm=arm: arm_trial(study, path, n, arm))
        study.cells.save(verdict=verdict(study.cells.payload["cells"]))
    study.cells.save(wanted=["interleaved steps", "interleaved evaluation", *ARMS], verdict=verdict(study.cells.payload["cells"]))
    print(study.cells.payload.get("verdict"), flush=True)


if __name__ == "__main__":
    main()
