"""Study 3: what qpruner costs besides the trials themselves, and what its caches save.

- orchestration overhead: a search with one trial at a time; the span from the first trial's start
  to the last one's end minus the trials' own seconds, as a fraction of that span (goal <= 5%) and
  per trial (a fixed cost: a fresh Ray worker imports torch, transformers, peft and lm-eval), and
  the same for the whole CLI run (Ray start, pruning, importance, reports included);
- fractional packing: trials per hour with 1, 2 and 4 trials sharing the device (here the 2 CPU
  cores, resources.cpu = 2 / concurrency; on a GPU the same recipe with resources.gpu = 1 / c);
- prune once: the prune task's seconds against the whole search, and a second run's prune cost;
- LoftQ cache: quantize + LoftQ seconds of the first trial (empty cache) against later trials;
- the search's own cost per suggestion: Optuna's GP and TPE samplers at the paper's scale (32
  layers, 40 finished trials, two objectives), seconds and peak Python memory per ask.

Every search here starts from an empty qpruner cache (the built-in model is linked in, not rebuilt).

    python -m benchmarks.overheads [--trials 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import pyarrow.parquet as pq

from benchmarks.common import fresh_cache, run_search, tiny_recipe, write_result


def search(work: Path, name: str, trials: int, concurrency: int, cache: Path) -> dict:
    """A tiny search with `concurrency` trials sharing the 2 cores; its timings from results.parquet."""
    raw = tiny_recipe(search={"num_samples": trials, "concurrency": concurrency, "asha": {"enabled": False}, "baselines": []},
                      resources={"cpu": 2 / concurrency}, output={"cache_dir": str(cache)})
    out = work / name
    wall = run_search(raw, out, env={"QPRUNER_CACHE": str(cache)})
    rows = sorted((r for r in pq.read_table(out / "results.parquet").to_pylist() if r["status"] == "completed"),
                  key=lambda r: r["started_at"])
    first, last = rows[0]["started_at"], max(r["started_at"] + r["wall_seconds"] for r in rows)
    return {"cli_wall_s": wall, "trials_span_s": last - first, "trial_seconds": [r["wall_seconds"] for r in rows],
            "loftq_s": [r["loftq_s"] for r in rows], "quantize_s": [r["quantize_s"] for r in rows],
            "trials_per_hour": len(rows) / (last - first) * 3600, "run": out}


def prune_seconds(run: Path) -> tuple[float, float]:
    """(seconds the prune task took when it built the model, seconds a cache hit takes now)."""
    import json

    from qpruner.config import load_config
    from qpruner.prune import prune_cached

    built = json.loads((Path(json.loads((run / "run.json").read_text())["pruned_path"]) / "qpruner_prune.json").read_text())
    started = time.perf_counter()
    hit = prune_cached(load_config(run / "config.yaml"), progress=False)
    assert hit.cached
    return built["seconds"], time.perf_counter() - started


def suggestion_cost(sampler_name: str, n_layers: int = 32, history: int = 40, asks: int = 5) -> dict:
    """Seconds and peak traced memory of one ask() after `history` finished two-objective trials."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    samplers = {"gp": lambda: optuna.samplers.GPSampler(seed=0, n_startup_trials=10),
                "tpe": lambda: optuna.samplers.TPESampler(seed=0, multivariate=True, n_startup_trials=10)}
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=samplers[sampler_name]())
    space = {f"b{i}": optuna.distributions.CategoricalDistribution([4, 8]) for i in range(n_layers)}

    def finish(trial) -> None:
        bits = [trial.params[f"b{i}"] for i in range(n_layers)]
        eights = sum(b == 8 for b in bits)
        study.tell(trial, [0.5 + 0.01 * eights + 0.01 * (bits[0] == 8), 2.0 + 0.1 * eights])

    for _ in range(history):
        finish(study.ask(space))
    seconds, peaks = [], []
    for _ in range(asks):
        tracemalloc.start()
        started = time.perf_counter()
        trial = study.ask(space)
        seconds.append(time.perf_counter() - started)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        finish(trial)
    return {"seconds_median": statistics.median(seconds), "peak_mb_median": statistics.median(peaks) / 1024**2,
            "n_layers": n_layers, "history": history}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        runs = {c: search(work, f"c{c}", args.trials, c, fresh_cache(work / f"cache{c}")) for c in (1, 2, 4)}
        one = runs[1]
        pruned_s, hit_s = prune_seconds(one["run"])
    own = sum(one["trial_seconds"])
    result = {
        "model": "builtin:tiny, tiny.yaml trial settings, ASHA off",
        "orchestration": {
            "trials_span_s": one["trials_span_s"], "trial_seconds_sum": own,
            "overhead_fraction_of_span": (one["trials_span_s"] - own) / one["trials_span_s"],
            "per_trial_overhead_s": (one["trials_span_s"] - own) / len(one["trial_seconds"]),
            "median_trial_s": statistics.median(one["trial_seconds"]),
            "cli_wall_s": one["cli_wall_s"], "overhead_fraction_of_cli_run": (one["cli_wall_s"] - own) / one["cli_wall_s"],
        },
        "packing": {f"{c} per device": {"trials_per_hour": r["trials_per_hour"],
                                        "median_trial_s": statistics.median(r["trial_seconds"])} for c, r in runs.items()},
        "prune_once": {"prune_task_s": pruned_s, "search_cli_wall_s": one["cli_wall_s"],
                       "fraction_of_search": pruned_s / one["cli_wall_s"], "second_run_prune_s": hit_s},
        "loftq_cache": {"first_trial_loftq_s": one["loftq_s"][0], "later_trials_loftq_s": one["loftq_s"][1:],
                        "first_trial_quantize_s": one["quantize_s"][0], "later_trials_quantize_s": one["quantize_s"][1:]},
        "suggestion_cost": {"paper_gp": {"seconds": 7.0, "memory_mb": 187},
                            "gp": suggestion_cost("gp"), "tpe": suggestion_cost("tpe")},
        "cpu_cores": os.cpu_count(),
    }
    write_result("overheads", result)


if __name__ == "__main__":
    main()
