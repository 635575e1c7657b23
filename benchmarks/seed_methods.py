"""Study 5: the seed methods against the defaults on the same model and budget.

- SlimGPT vs Taylor pruning at 30%: prune seconds, held-out perplexity and zero-shot accuracy before
  any fine-tuning, then accuracy after LoftQ + LoRA recovery at uniform 4 and uniform 8 bits (3 seeds).
  Calibration uses the corpus minus its last 128 documents, which are the held-out text.
- RankAdaptor ranks vs one fixed rank: the same tiny search (8 trials) with `search.ranks: [4, 8, 16]`
  and without, per search seed: best accuracy, front size and hypervolume (one shared reference point).

    python -m benchmarks.seed_methods [--seeds 3] [--search-seeds 2]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

from benchmarks.common import fresh_cache, mean_std, run_search, tiny_recipe, write_result


def pruning(work: Path, seeds: list[int]) -> dict:
    from qpruner.builtin import ensure_tiny
    from qpruner.evaluate import evaluate_model, perplexity
    from qpruner.plan import resolved_config
    from qpruner.prune import load_pruned, prune_cached
    from qpruner.trial import run_trial

    lines = ensure_tiny(progress=False).corpus_path.read_text().splitlines()
    docs, calib = lines[-128:], work / "calibration.txt"
    calib.write_text("\n".join(lines[:-128]) + "\n")
    cache = fresh_cache(work / "cache")
    out = {}
    for method in ("taylor", "slimgpt"):
        raw = tiny_recipe(prune={"method": method, "ratio": 0.3, "calibration": {"source": str(calib), "n_samples": 16, "seq_len": 64}},
                          output={"cache_dir": str(cache)})
        cfg = resolved_config(raw)
        pruned = prune_cached(cfg, progress=False)
        model, tok = load_pruned(pruned.path)
        before = evaluate_model(model, tok, cfg.eval, cache_dir=cfg.output.cache)
        arms = {}
        for bits in (4, 8):
            accs = [run_trial(resolved_config({**raw, "finetune": {**raw["finetune"], "seed": s}}), str(pruned.path),
                              [bits] * 6)["accuracy"] for s in seeds]
            arms[f"uniform-{bits} after recovery"] = mean_std(accs)
        out[method] = {"prune_seconds": pruned.seconds, "overall_ratio": pruned.overall_ratio,
                       "heldout_ppl_no_finetune": perplexity(model, tok, docs),
                       "accuracy_no_finetune": before["mean_acc"], **arms}
        print(f"[seed_methods] {method}: {out[method]}", flush=True)
    return out


def ranks(work: Path, search_seeds: list[int]) -> dict:
    from qpruner.pareto import hypervolume

    fronts = {}
    for label, extra in (("fixed rank 8", {}), ("ranks [4, 8, 16]", {"ranks": [4, 8, 16]})):
        for seed in search_seeds:
            raw = tiny_recipe(search={"seed": seed, "baselines": [], **extra})
            out = work / f"ranks-{len(extra)}-{seed}"
            seconds = run_search(raw, out)
            rows = [r for r in pq.read_table(out / "results.parquet").to_pylist() if r["status"] == "completed"]
            fronts.setdefault(label, []).append({"rows": rows, "seconds": seconds})
    every = [r for runs in fronts.values() for run in runs for r in run["rows"]]
    ref = (0.0, 1.1 * max(r["memory_bytes"] for r in every) / 1024**2)
    summary = {}
    for label, runs in fronts.items():
        hvs = [hypervolume([r["accuracy"] for r in run["rows"]], [r["memory_bytes"] / 1024**2 for r in run["rows"]], *ref)
               for run in runs]
        summary[label] = {"hypervolume_acc_x_mib": mean_std(hvs),
                          "best_accuracy": mean_std(max(r["accuracy"] for r in run["rows"]) for run in runs),
                          "search_seconds": mean_std(run["seconds"] for run in runs)}
    return {"reference_point": {"accuracy": ref[0], "memory_mib": ref[1]}, "arms": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--search-seeds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        result = {"model": "builtin:tiny", "pruning_30pct": pruning(work, list(range(1, args.seeds + 1))),
                  "ranks": ranks(work, list(range(args.search_seeds)))}
    write_result("seed_methods", result)


if __name__ == "__main__":
    main()
