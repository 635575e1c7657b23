"""The paper's claims on a real model: SmolLM2-135M-Instruct, the seven zero-shot tasks, Alpaca recovery.

One part per run, each resumable (every finished cell is written to its results file at once and a
rerun skips it), each sized to finish within about an hour on 2 CPU cores:

    python -m benchmarks.smollm2_study table1 --ratio 0.2     # results/smollm2_table1_20.json
    python -m benchmarks.smollm2_study table1 --ratio 0.5     # results/smollm2_table1_50.json
    python -m benchmarks.smollm2_study ablations              # results/smollm2_ablations.json
    python -m benchmarks.smollm2_study pruners                # results/smollm2_pruners.json
    python -m benchmarks.smollm2_study pricing                # results/smollm2_pricing.json (analytic)
    python -m benchmarks.smollm2_study grouped                # results/smollm2_table_grouped.json (many hours)

Table 1 rows on one pruned model (LLM-Pruner-style Taylor, calibrated on Pride and Prejudice):
the unpruned model; LLM-Pruner + LoRA at 16 bits; QPruner-1 = uniform 4-bit LoftQ; QPruner-2 = the
first MI-drawn mixed 4/8 configuration (qpruner.search.initial_configs on the measured MI, as the
search's first non-anchor point); QPruner-3 = the most accurate and the cheapest configuration on the
front of a qpruner search (TPE, importance init, ASHA; each trial scored on the --search-limit documents
after the scored ones, so that the pick is not chosen on the documents it is reported on), re-trained
once with the search's own fine-tuning seed and scored like the other rows, so that their perplexity is
measured too (a pick equal to a row above reuses that row). Per row: each task's paper metric (acc_norm
for HellaSwag, ARC-e/c, OBQA, PIQA; acc elsewhere) on the first `--limit` documents, lm-eval's
standard errors, WikiText-2 test perplexity (first `--chunks` windows of 512 tokens), exact weight
bytes and the estimated fine-tuning peak (measured on CUDA). Quick validation reads the last
`--val-docs` documents of each task file (eval.val_data), never the scored ones.

`grouped` is the ground truth a tabular search replay looks up: the 30 decoder layers of the Taylor 20% model
tied in 5 consecutive groups of 6, each group 4 or 8 bits, all 32 configurations trained and scored at this
budget, with every report's val_logprob (what ASHA sees) and each stage's seconds. It runs for hours: one cell per
configuration, most useful first (uniform 4, uniform 8, one group at 8, one group at 4, then two and three at 8),
`--commit-every N` commits the results file (only it) after every N new configurations.

`--dtype` is quant.compute_dtype (default: tune_configs/smollm2_prune20.yaml's); files written before the setting
existed were measured in float32, and a rerun in another dtype refuses to resume them.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.smollm2 import (
    MODEL,
    ORIGIN,
    TASKS,
    Cells,
    data_files,
    paper_mean_stderr,
    real_inputs,
    recipe,
    stderr,
    tokenized_wikitext,
    wikitext_ppl,
    zero_shot,
)
from qpruner.prune import pruned_layer_count

DTYPES = ("float32", "bfloat16")


def settings(args) -> dict:
    """The budget every row of a part shares, written into its results (a search's own settings are in its cell)."""
    return {"limit": args.limit, "val_docs": args.val_docs, "steps": args.steps, "batch_size": 8, "max_length": 256,
            "report_every": args.report_every, "lora_rank": 8, "ppl_windows": f"{args.chunks} x 512 tokens",
            "calibration": "gutenberg 1342, 10 x 128 tokens", "fewshot": 0, "compute_dtype": args.dtype,
            "threads": args.threads}


def row_files(inputs: dict, cache: Path, rows: slice, tag: str) -> dict[str, str]:
    """Rows `rows` of each task file as their own files (for eval.val_data, or a search's eval.local_data)."""
    from benchmarks.convert_data import write_if_changed

    out = cache / "task_rows"
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for task in TASKS:
        path = out / f"{task}-{tag}.jsonl"
        write_if_changed(path, "\n".join(Path(inputs["files"][task]).read_text().splitlines()[rows]) + "\n")
        files[task] = str(path)
    return files


def check_disjoint(rows: dict[str, int], args) -> None:
    """Scored rows (the first --limit), search rows (the next --search-limit) and validation rows (the last
    --val-docs) must not overlap in any task file ({task: rows}): exit in one line if they would."""
    need = args.limit + args.search_limit + args.val_docs
    for task, n in rows.items():
        if n < need:
            sys.exit(f"{task} has {n} rows: --limit {args.limit} scored, --search-limit {args.search_limit} searched and "
                     f"--val-docs {args.val_docs} validated would overlap; lower one of them")


class Study:
    """The shared state of one part: inputs, cache, recipe, tokenized WikiText-2 and the cells."""

    def __init__(self, name: str, args, cache: Path, header: dict | None = None):
        self.args, self.cache, self.inputs = args, cache, real_inputs()
        self.cells = Cells(name, {"model": MODEL, "model_origin": ORIGIN, "data": data_files(self.inputs),
                                  "settings": settings(args), **(header or {})})
        self.rows = {t: len(Path(self.inputs['files'][t]).read_text().splitlines()) for t in TASKS}
        check_disjoint(self.rows, args)
        self.val = row_files(self.inputs, cache, slice(-args.val_docs, None), f"last{args.val_docs}")
        self._ids = None

    def raw(self, **sections) -> dict:
        a = self.args
        base = recipe(self.inputs, self.cache, a.limit,
                      finetune={"steps": a.steps, "report_every": a.report_every, "val_limit": a.val_docs},
                      quant={"bits": [4, 8, 16], **({"compute_dtype": a.dtype} if a.dtype in DTYPES else {})}, search={"baselines": []},
                      resources={"cpu": a.threads, "threads": a.threads})
        base["eval"]["val_data"] = self.val
        for name, values in sections.items():
            base[name] = {**base.get(name, {}), **values}
        return base

    def ids(self, tokenizer):
        if self._ids is None:
            self._ids = tokenized_wikitext(tokenizer, self.inputs["wikitext"])
        return self._ids

    def ppl(self, model, tokenizer) -> dict:
        return {"wikitext2_ppl": wikitext_ppl(model, self.ids(tokenizer), 512, self.args.chunks)}

    def zero_shot_row(self, model, tokenizer) -> dict:
        return {**zero_shot(model, tokenizer, self.inputs["files"], self.args.limit, cache=self.cache),
                **self.ppl(model, tokenizer)}

    def prune(self, **prune) -> "object":
        from qpruner.plan import resolved_config
        from qpruner.prune import prune_cached

        return prune_cached(resolved_config(self.raw(prune=prune)), progress=False)

    def trial(self, pruned_path: str, bits: list[int], report=None, **sections) -> dict:
        """One qpruner trial (quantize, LoftQ, fine-tune, evaluate) plus perplexity; the row's figures.
        `report` is run_trial's: called at every report step (step, train_loss, val_logprob, ...)."""
        from qpruner.plan import resolved_config
        from qpruner.trial import run_trial

        cfg = resolved_config(self.raw(**sections))
        timed = {}

        def measure(model, tokenizer):
            started = time.perf_counter()
            out = self.ppl(model, tokenizer)
            timed["ppl_s"] = time.perf_counter() - started
            return out

        r = run_trial(cfg, pruned_path, bits, measure=measure, report=report)
        tasks = {}
        for t in TASKS:
            n = min(self.args.limit, self.rows[t])  # documents scored (the first ones)
            acc, norm = r["task_acc"][t], r["task_acc_norm"].get(t)
            tasks[t] = {"acc": acc, "acc_stderr": stderr(acc, n), "acc_norm": norm, "acc_norm_stderr": stderr(norm, n), "n_docs": n}
        return {"bits": r["bits"], "tasks": tasks, "mean": r["accuracy"], "mean_stderr": paper_mean_stderr(tasks),
                **r["measured"], "weight_bytes": r["weight_bytes"], "lora_bytes": r["lora_bytes"],
                "peak_estimate_bytes": r["peak_estimate_bytes"], "peak_measured_bytes": r["peak_measured_bytes"],
                "memory_source": r["memory_source"], "train_loss": r["train_loss"], "val_logprob": r.get("val_logprob"),
                "seconds": {k: round({**r, **timed}[k], 1) for k in ("loftq_s", "quantize_s", "finetune_s", "eval_s", "ppl_s", "wall_seconds")
                            if k in r or k in timed}}


def mi_first_mixed(study: Study, pruned, method: str = "mi") -> tuple[list[float], list[int]]:
    """The pruned model's layer importance and the search's first importance-drawn (non-anchor) configuration."""
    from qpruner.importance import pruned_importance
    from qpruner.memory import shapes_from_config, weight_bytes
    from qpruner.plan import resolved_config
    from qpruner.search import initial_configs

    cfg = resolved_config(study.raw(search={"importance": method}, quant={"bits": [4, 8]}))
    importance = pruned_importance(cfg, str(pruned.path))
    shapes = shapes_from_config(json.loads((Path(pruned.path) / "config.json").read_text()))
    configs = initial_configs(importance, cfg.quant.bits, cfg.search.n_init, cfg.search.temperature, cfg.search.seed,
                              weight_fn=lambda b: weight_bytes(shapes, b, cfg.quant)["total"])
    return importance, configs[2]


def search_picks(study: Study, ratio: float) -> dict:
    """A qpruner search on the pruned model; its trials and the mixed configurations the table re-trains."""
    import pyarrow.parquet as pq

    from benchmarks.common import run_search

    a = study.args  # the search scores rows no table row scores: limit .. limit + search_limit
    searched = row_files(study.inputs, study.cache, slice(a.limit, a.limit + a.search_limit), f"rows{a.limit}+{a.search_limit}")
    raw = study.raw(prune={"ratio": ratio}, quant={"bits": [4, 8]}, eval={"limit": a.search_limit, "local_data": searched},
                    search={"num_samples": study.args.trials, "n_init": 2, "concurrency": 1, "sampler": "tpe"})
    digest = hashlib.sha1(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:10]
    out = study.cache / "runs" / f"smollm2-search-{ratio}-{digest}"  # one folder per recipe: smoke runs do not clobber
    seconds = run_search(raw, out, env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    rows = pq.read_table(out / "results.parquet").to_pylist()
    front = pq.read_table(out / "pareto.parquet").to_pylist()
    trials = [{"bits": list(r["bits"]), "status": r["status"], "accuracy": r["accuracy"], "memory_gb": r["memory_gb"],
               "weight_bytes": r["weight_bytes"]} for r in rows]
    picks = {}  # whatever the front holds, mixed or uniform: a uniform pick reuses its row above
    if front:
        picks["QPruner-3 (most accurate on the front)"] = list(max(front, key=lambda r: r["accuracy"])["bits"])
        cheapest = list(min(front, key=lambda r: r["memory_bytes"])["bits"])
        if cheapest not in picks.values():
            picks["QPruner-3 (cheapest on the front)"] = cheapest
    return {"search_trials": a.trials, "search_limit": a.search_limit, "search_sampler": "tpe, importance init (mi), ASHA",
            "search_docs": f"rows {a.limit}-{a.limit + a.search_limit - 1} of each task (after the scored ones)",
            "seconds": seconds, "trials": trials, "front": [list(r["bits"]) for r in front], "picks": picks}


TABLE1_20 = "smollm2_table1_20.json"  # the Taylor 20% model every other study also trains on


def measured_elsewhere(study: Study, files: str, key: str, source: str | None = None, same: tuple[str, ...] | None = None,
                       bits: list[int] | None = None, pruned: str | None = None) -> dict | None:
    """Cell `source` (default `key`) of another result file matching `files` measured with the same settings `same`
    (default: all but threads), marked with where it came from; None if there is none.
    The unpruned row does not depend on the pruning ratio; a trial on the 20% Taylor model is the same
    cell in Table 1 at 20%, the ablations and the pruners. `bits` and the `pruned` model's key, if given,
    must match too, and so must the model and data files."""
    from benchmarks.common import RESULTS

    mine = study.cells.payload["settings"]
    same = same or tuple(k for k in mine if k not in Cells.FREE)
    for path in sorted(RESULTS.glob(files)):
        other = json.loads(path.read_text()) if path != study.cells.path else {}
        cell = other.get("cells", {}).get(source or key)
        theirs = {**Cells.LEGACY, **other.get("settings", {})}
        if cell and all(theirs.get(k) == mine.get(k) for k in same) and \
                (bits is None or cell.get("bits") == list(bits)) and \
                (pruned is None or other["cells"].get("pruned", {}).get("path") == pruned) and \
                all(other.get(k) == study.cells.payload.get(k) for k in ("model", "model_origin", "data")):
            return {**cell, "copied_from": f"{path.name}: {source or key}"}
    return None


def table1(args, cache: Path) -> None:
    from qpruner.model import load_model

    ratio = args.ratio
    study = Study(f"smollm2_table1_{round(ratio * 100)}", args, cache)
    cells = study.cells

    def unpruned():
        model, tok = load_model(str(study.inputs["gguf"]), "float32", cache)
        from qpruner.memory import weight_bytes
        from qpruner.plan import resolved_config

        n = model.config.num_hidden_layers
        return {**study.zero_shot_row(model, tok),
                "weight_bytes": weight_bytes(model, [16] * n, resolved_config(study.raw()).quant)["total"]}

    cells.run("unpruned", lambda: measured_elsewhere(study, "smollm2_table1_*.json", "unpruned", same=("limit", "ppl_windows")) or unpruned())
    pruned = study.prune(ratio=ratio)
    cells.run("pruned", lambda: {"path": pruned.key, "params_before": pruned.params_before, "params_after": pruned.params_after,
                                 "overall_ratio": pruned.overall_ratio, "prune_seconds": pruned.seconds})
    n = pruned_layer_count(pruned.path)
    path = str(pruned.path)
    cells.run("LLM-Pruner + LoRA (16-bit)", lambda: study.trial(path, [16] * n))
    cells.run("QPruner-1 (uniform 4-bit LoftQ)", lambda: study.trial(path, [4] * n))
    mi = cells.run("mi importance", lambda: dict(zip(("importance", "first_mixed"), mi_first_mixed(study, pruned))))
    cells.run("QPruner-2 (MI-initialised mixed 4/8)", lambda: study.trial(path, mi["first_mixed"]))
    if args.trials:
        search = cells.run("search", lambda: search_picks(study, ratio))
        done = {tuple(v["bits"]): {**v, "copied_from": f"{cells.path.name}: {k}"} for k, v in cells.payload["cells"].items()
                if isinstance(v, dict) and "bits" in v and "tasks" in v and "copied_from" not in v}
        for name, bits in search["picks"].items():
            cells.run(name, lambda bits=bits: done.get(tuple(bits)) or study.trial(path, bits))
    cells.save(complete=True)


def ablations(args, cache: Path) -> None:
    """Table 2 in spirit, at 20% on uniform 4 bits: NF4 vs FP4, LoftQ vs plain LoRA init, LoftQ 1 vs 4 iterations;
    and importance by MI vs quant_loss vs taylor, judged by the first configuration each draws."""
    study = Study("smollm2_ablations", args, cache)
    pruned = study.prune(ratio=0.2)
    n, path = pruned_layer_count(pruned.path), str(pruned.path)
    arms = {"NF4, LoftQ 1 iter": {}, "FP4, LoftQ 1 iter": {"quant": {"quant_type": "fp4"}},
            "NF4, plain LoRA (no LoftQ)": {"lora": {"loftq_iters": 0}}, "NF4, LoftQ 4 iters": {"lora": {"loftq_iters": 4}}}
    table1 = {"NF4, LoftQ 1 iter": "QPruner-1 (uniform 4-bit LoftQ)", "first configuration of mi": "QPruner-2 (MI-initialised mixed 4/8)"}
    for name, sections in arms.items():
        study.cells.run(name, lambda name=name, sections=sections: (
            measured_elsewhere(study, TABLE1_20, name, table1.get(name), bits=[4] * n, pruned=pruned.key)
            or {"settings": sections, **study.trial(path, [4] * n, **sections)}))
    for method in ("mi", "quant_loss", "taylor"):
        imp = study.cells.run(f"importance: {method}", lambda method=method: (
            (method == "mi" and measured_elsewhere(study, TABLE1_20, "importance: mi", "mi importance", pruned=pruned.key))
            or dict(zip(("importance", "first_mixed"), mi_first_mixed(study, pruned, method)))))
        name = f"first configuration of {method}"
        study.cells.run(name, lambda name=name, imp=imp: (
            measured_elsewhere(study, TABLE1_20, name, table1.get(name), bits=imp["first_mixed"], pruned=pruned.key)
            or study.trial(path, imp["first_mixed"])))
    study.cells.save(complete=True)


def pruners(args, cache: Path) -> None:
    """Taylor vs SlimGPT vs random groups (3 seeds) at 20%: perplexity and accuracy before and after recovery (uniform 4-bit)."""
    from qpruner.prune import load_pruned

    study = Study("smollm2_pruners", args, cache)
    calibration = study.raw()["prune"]["calibration"]  # random pruning draws from calibration.seed
    arms = {"taylor": {"method": "taylor"}, "slimgpt": {"method": "slimgpt"},
            **{f"random seed {s}": {"method": "random", "calibration": {**calibration, "seed": s}} for s in range(3)}}
    chosen = args.arms.split(",") if args.arms else list(arms)
    if unknown := set(chosen) - set(arms):
        sys.exit(f"--arms: unknown {sorted(unknown)}; choose from {list(arms)}")
    for name in chosen:
        prune = arms[name]
        pruned = study.prune(ratio=0.2, **prune)

        def before(pruned=pruned):
            model, tok = load_pruned(pruned.path)
            return {"params_after": pruned.params_after, "prune_seconds": pruned.seconds, **study.zero_shot_row(model, tok)}

        study.cells.run(f"{name}: before recovery", before)
        if not args.no_recovery:
            bits = [4] * pruned_layer_count(pruned.path)
            after = f"{name}: after recovery (uniform 4-bit LoftQ)"
            study.cells.run(after, lambda name=name, after=after, bits=bits, pruned=pruned: (
                (name == "taylor" and measured_elsewhere(study, TABLE1_20, after, "QPruner-1 (uniform 4-bit LoftQ)", bits=bits, pruned=pruned.key))
                or study.trial(str(pruned.path), bits)))
    wanted = [f"{a}: before recovery" for a in arms] + ([] if args.no_recovery else [f"{a}: after recovery (uniform 4-bit LoftQ)" for a in arms])
    study.cells.save(wanted=wanted)  # complete once every arm's cells are in, whichever process stored them


def pricing(args, cache: Path) -> None:
    """The bit patterns of the Table 1 files priced on LLaMA-7B shapes pruned like the paper (analytic)."""
    from benchmarks.common import RESULTS, write_result
    from benchmarks.paper_comparison import PAPER, llama7b_memory

    out = {}
    for ratio in (0.2, 0.5):
        path = RESULTS / f"smollm2_table1_{round(ratio * 100)}.json"
        if not path.is_file():
            continue
        cells = json.loads(path.read_text())["cells"]
        patterns = {k: v["bits"] for k, v in cells.items() if isinstance(v, dict) and "bits" in v and "tasks" in v
                    and "copied_from" not in v}  # a reused row is priced under its own name
        out[f"{ratio:.0%}"] = llama7b_memory(ratio, patterns)
    write_result("smollm2_pricing", {"model": "LLaMA-7B shapes (no weights) pruned as the paper prunes it; patterns from "
                                              "the SmolLM2 Table 1 files, stretched over 32 layers by depth",
                                     "paper": PAPER, "ratios": out})


GROUPS, GROUP_BITS = 5, (4, 8)
GROUPED = "smollm2_table_grouped"


def group_order(groups: int = GROUPS, low: int = GROUP_BITS[0], high: int = GROUP_BITS[1]) -> list[tuple[int, ...]]:
    """Every assignment of `low`/`high` to the groups, in an order where a partial table is already useful:
    uniform low, uniform high, one group high, one group low, then two and three high (by count of high groups
    from both ends)."""
    counts, lo, hi = [], 0, groups
    while lo <= hi:
        counts += [lo] if lo == hi else [lo, hi]
        lo, hi = lo + 1, hi - 1
    combos = list(itertools.product((low, high), repeat=groups))
    return [c for k in counts for c in combos if c.count(high) == k]


def expand_groups(group_bits, n_layers: int) -> list[int]:
    """Per-layer bits from one bit-width per group of consecutive layers (the first n % groups groups one layer
    longer when the layers do not divide evenly)."""
    g = len(group_bits)
    sizes = [n_layers // g + (1 if i < n_layers % g else 0) for i in range(g)]
    return [b for b, size in zip(group_bits, sizes) for _ in range(size)]


def code_version() -> dict:
    """The commit a cell was measured at, and whether qpruner/ had uncommitted changes then."""
    from benchmarks.common import ROOT

    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"), "qpruner_dirty": bool(git("status", "--porcelain", "--", "qpruner"))}


def commit_results(path: Path, done: int, total: int) -> None:
    """Commit only the results file (git commit --only semantics: others' staged changes stay staged); a failure
    (another git process holds the index lock) is printed and retried at the next commit point. git runs in the
    results file's own folder, so a table run from a snapshot worktree (QPRUNER_BENCH_RESULTS pointing into the
    main checkout) commits into the checkout that holds the file."""
    message = (f"SmolLM2 grouped table: {done}/{total} configurations measured; committed by the running table "
               f"process so that a lost machine loses only the configurations since")
    add = subprocess.run(["git", "add", "--", str(path)], cwd=path.parent, capture_output=True, text=True)
    run = add if add.returncode else subprocess.run(["git", "commit", "-q", "-m", message, "--", str(path)], cwd=path.parent,
                                                    capture_output=True, text=True)
    print(f"[grouped] commit {'done' if run.returncode == 0 else 'failed: ' + (run.stderr or run.stdout).strip()[:200]}", flush=True)


def grouped_pruned(study: Study) -> tuple[Path, str]:
    """The pruned model the table was started on (its cache folder, whatever the pruning code's key is now),
    else the Taylor 20% model of the current code. Exits if the table holds cells of a model no longer there."""
    from qpruner.prune.store import is_complete

    stored = study.cells.get("pruned")
    if stored and is_complete(study.cache / "pruned" / stored["path"]):
        return study.cache / "pruned" / stored["path"], stored["path"]
    pruned = study.prune(ratio=0.2)
    if stored and stored["path"] != pruned.key:
        sys.exit(f"{study.cells.path} was measured on pruned model {stored['path']}, which is not in {study.cache / 'pruned'}, "
                 f"and the current code prunes to {pruned.key}; restore that folder or move the file away to start afresh")
    meta = json.loads((Path(pruned.path) / "qpruner_prune.json").read_text())
    layers = json.loads((Path(pruned.path) / "config.json").read_text())["qpruner_layers"]
    study.cells.run("pruned", lambda: {"path": pruned.key, "params_before": pruned.params_before, "params_after": pruned.params_after,
                                       "overall_ratio": pruned.overall_ratio, "prune_seconds": pruned.seconds,
                                       "prune_settings": meta.get("prune"), "mlp_widths": [s["intermediate_size"] for s in layers]})
    return Path(pruned.path), pruned.key


def grouped(args, cache: Path) -> None:
    """Every configuration of 5 groups x {4, 8} bits on the Taylor 20% model, one cell each (see the module docstring)."""
    import gc

    study = Study(GROUPED, args, cache, header={
        "groups": {"count": GROUPS, "bits": list(GROUP_BITS), "layout": "consecutive decoder layers, equal sizes"}})
    cells = study.cells
    path, key = grouped_pruned(study)
    n = pruned_layer_count(path)
    order = group_order()
    names = ["-".join(map(str, g)) for g in order]
    print(f"[grouped] {sum(cells.get(k) is not None for k in names)}/{len(order)} configurations already in {cells.path}; "
          f"pruned model {key}, {n} layers, compute dtype {args.dtype}, {args.threads} thread(s)", flush=True)
    uncommitted = 0
    for i, (g, name) in enumerate(zip(order, names)):
        if cells.get(name) is not None:
            continue
        bits = expand_groups(g, n)

        def one(name=name, bits=bits, g=g):
            reused = measured_elsewhere(study, TABLE1_20, name, "QPruner-1 (uniform 4-bit LoftQ)", bits=bits, pruned=key) \
                if set(g) == {4} else None
            if reused and reused.get("history"):  # identical settings, dtype and model, and the reports ASHA needs
                return reused
            history, started = [], time.time()

            def report(m: dict) -> None:
                history.append({**{k: m.get(k) for k in ("step", "train_loss", "val_logprob", "val_acc", "memory_gb", "memory_bytes")},
                                "seconds": round(time.time() - started, 1)})

            return {"group_bits": list(g), **study.trial(str(path), bits, report=report), "history": history, "code": code_version()}

        row = cells.run(name, one)
        done = sum(cells.get(k) is not None for k in names)
        print(f"[grouped] {done}/{len(order)} done; #{i + 1} {name}: ppl {row['wikitext2_ppl']:.1f}, mean {row['mean']:.3f} "
              f"± {row['mean_stderr']:.3f}, weights {row['weight_bytes'] / 2**20:.0f} MiB, {row.get('cell_seconds', 0):.0f} s "
              f"({time.strftime('%H:%M')})", flush=True)
        uncommitted += 1
        if args.commit_every and (uncommitted >= args.commit_every or done == len(order)):
            commit_results(cells.path, done, len(order))
            uncommitted = 0
        gc.collect()
    cells.save(wanted=names)
    if args.commit_every and uncommitted:
        commit_results(cells.path, sum(cells.get(k) is not None for k in names), len(order))


def recipe_dtype() -> str:
    """quant.compute_dtype of tune_configs/smollm2_prune20.yaml: what the SmolLM2 recipe and the studies use."""
    import yaml

    from benchmarks.common import ROOT

    return yaml.safe_load((ROOT / "tune_configs" / "smollm2_prune20.yaml").read_text())["quant"].get("compute_dtype", "float32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["table1", "ablations", "pruners", "pricing", "grouped"])
    parser.add_argument("--ratio", type=float, default=0.2, help="table1: pruning ratio of all parameters")
    parser.add_argument("--limit", type=int, default=100, help="scored documents per task (the first ones)")
    parser.add_argument("--val-docs", type=int, default=16, help="quick-validation documents per task (the last ones)")
    parser.add_argument("--steps", type=int, default=20, help="LoRA steps of 8 Alpaca records")
    parser.add_argument("--report-every", type=int, default=None, help="steps between validations (default 10; grouped: 5, "
                        "the recipe's, so that a replay's ASHA has rungs at 5, 10 and 15)")
    parser.add_argument("--dtype", default=None, choices=DTYPES,
                        help="quant.compute_dtype (default: tune_configs/smollm2_prune20.yaml's)")
    parser.add_argument("--commit-every", type=int, default=0, help="grouped: git-commit the results file after every N new configurations")
    parser.add_argument("--chunks", type=int, default=40, help="WikiText-2 windows of 512 tokens")
    parser.add_argument("--trials", type=int, default=6, help="table1: trials of the search (0 = no QPruner-3 rows)")
    parser.add_argument("--search-limit", type=int, default=50,
                        help="table1: documents per task each search trial scores, after the --limit scored ones (its picks are re-scored on those)")
    parser.add_argument("--arms", default=None, help="pruners: comma-separated subset (two processes may share the file)")
    parser.add_argument("--no-recovery", action="store_true", help="pruners: only the before-recovery rows")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (and CPUs of each search trial)")
    parser.add_argument("--cache", default=None, help="qpruner cache (default ~/.cache/qpruner)")
    args = parser.parse_args()
    args.report_every = args.report_every or (5 if args.part == "grouped" else 10)
    args.dtype = args.dtype or recipe_dtype()
    import torch

    from qpruner.config import default_cache_dir

    torch.set_num_threads(args.threads)

    cache = Path(args.cache) if args.cache else default_cache_dir()
    {"table1": table1, "ablations": ablations, "pruners": pruners, "pricing": pricing, "grouped": grouped}[args.part](args, cache)


if __name__ == "__main__":
    main()
