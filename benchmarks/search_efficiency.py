"""Study 2: how fast each search strategy finds the accuracy/memory front, with and without ASHA.

A tabular replay. Phase 1 runs every bit vector of the tiny model (2^6 = 64 at 4/8 bits, 30% Taylor
pruning, tiny.yaml's trial settings) once for real and records its validation curve, final test
accuracy, memory and the seconds each report took (benchmarks/results/search_table_tiny.json; reused
unless --rebuild). Phase 2 runs each arm as a real Ray Tune + OptunaSearch (+ ASHA) search whose
trainable replays the recorded trial, so arms differ only in what they choose and when they stop;
a trial's compute is the recorded seconds up to where it stopped.

Arms (3 seeds each, with and without ASHA): the performance-model sampler (qpruner.predict: the
sensitivity table's front first, then Thompson sampling on the fitted model; the table's measured cost
is charged to it before its first trial), importance-aware init + GP (qpruner), random init + GP (the
paper's protocol: 10 random points, then BO), importance init + TPE, and random search.
Memory objective: the exact weight bytes (--memory weights, default), which dominate a 7B model's
fine-tuning peak; on the tiny model the estimated peak is 99% activations, so it barely varies
between bit patterns (--memory peak uses it anyway). Hypervolume: accuracy above the table's worst
final accuracy, memory below 1.1 x its largest.

    python -m benchmarks.search_efficiency [--trials 20] [--seeds 3] [--rebuild]
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, mean_std, tiny_recipe, write_result

TABLE = RESULTS / "search_table_tiny.json"
ARMS = {  # name: (sampler, init, n_init)
    "model sampler": ("model", "table", 4),
    "importance+GP": ("gp", "importance", 4),
    "random-init+GP": ("gp", "random", 10),
    "importance+TPE": ("tpe", "importance", 4),
    "random search": ("random", "none", 0),
}


def build_table(raw: dict) -> dict:
    """Run all 2^L bit vectors for real; keep each one's report curve and final result."""
    from tqdm.auto import tqdm

    from qpruner.importance import pruned_importance
    from qpruner.plan import resolved_config
    from qpruner.prune import prune_cached, pruned_layer_count

    cfg = resolved_config(raw)
    pruned = prune_cached(cfg, progress=False)
    n = pruned_layer_count(pruned.path)
    rows = {}
    for bits in tqdm(list(itertools.product(*[cfg.quant.bits] * n)), desc="phase 1: every configuration"):
        rows[",".join(map(str, bits))] = run_recorded(cfg, str(pruned.path), list(bits))
    return {"n_layers": n, "importance": pruned_importance(cfg, str(pruned.path)),
            "max_steps": cfg.finetune.steps, "rows": rows}


def run_recorded(cfg, pruned_path: str, bits: list[int]) -> dict:
    from qpruner.trial import run_trial

    curve, started = [], time.perf_counter()

    def report(metrics: dict) -> None:
        curve.append({"step": metrics["step"], "val_logprob": metrics["val_logprob"], "val_acc": metrics["val_acc"],
                      "seconds": time.perf_counter() - started})

    result = run_trial(cfg, pruned_path, bits, report=report)
    return {"curve": curve, "accuracy": result["accuracy"], "memory_gb": result["memory_gb"],
            "memory_bytes": result["memory_bytes"], "seconds": time.perf_counter() - started}


def add_weight_bytes(table: dict, raw: dict) -> None:
    """Every row's exact weight bytes, from the pruned model's shapes (no trial needed)."""
    from qpruner.memory import shapes_from_config, weight_bytes
    from qpruner.plan import resolved_config
    from qpruner.prune import prune_cached

    cfg = resolved_config(raw)
    config = json.loads((prune_cached(cfg, progress=False).path / "config.json").read_text())
    shapes = shapes_from_config(config)
    for key, row in table["rows"].items():
        row["weight_bytes"] = weight_bytes(shapes, [int(b) for b in key.split(",")], cfg.quant)["total"]


def use_memory(table: dict, which: str) -> None:
    """Make `which` (weights or peak) the memory objective the replayed trials report."""
    for row in table["rows"].values():
        if "peak_bytes" not in row:
            row["peak_bytes"] = row["memory_bytes"]
        row["memory_bytes"] = row["weight_bytes"] if which == "weights" else row["peak_bytes"]
        row["memory_gb"] = row["memory_bytes"] / 1024**3


def replay(config: dict, table: dict) -> None:
    """Tune trainable: report the recorded curve of this configuration, then its final result."""
    from ray import tune

    from qpruner.search import bits_from_config

    row = table["rows"][",".join(map(str, bits_from_config(config, table["n_layers"])))]
    for point in row["curve"]:  # as run_trial reports: accuracy is the final test accuracy only
        tune.report({"val_logprob": point["val_logprob"], "accuracy": None, "memory_gb": row["memory_gb"],
                     "seconds": point["seconds"], "step": point["step"], "final": False})
    tune.report({"val_logprob": row["curve"][-1]["val_logprob"] if row["curve"] else 0.0, "accuracy": row["accuracy"],
                 "memory_gb": row["memory_gb"], "seconds": row["seconds"], "step": table["max_steps"], "final": True})


def sensitivity_units(raw: dict) -> tuple[object, dict]:
    """The tiny pruned model's sensitivity table per layer (qpruner.predict) and its cost beside one real trial's,
    both measured now in this process, in that order, as a model-sampler run starts: in a fresh cache (the
    built-in tiny model linked in), so neither reads a cached table or LoftQ factors the other did not make.
    {"table_s", "trial_s", "tokens"}."""
    import tempfile

    from qpruner.plan import resolved_config
    from qpruner.predict import UnitTable, sensitivity_table
    from qpruner.prune import load_pruned, prune_cached, pruned_layer_count
    from qpruner.trial import run_trial

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "builtin").symlink_to(resolved_config(raw).output.cache / "builtin")
        cfg = resolved_config({**raw, "output": {**raw.get("output", {}), "cache_dir": tmp}})
        pruned = prune_cached(cfg, progress=False)
        model, tokenizer = load_pruned(str(pruned.path), dtype=cfg.quant.compute_dtype)
        sens = sensitivity_table(model, tokenizer, cfg, pruned.path.name)
        started = time.perf_counter()
        run_trial(cfg, str(pruned.path), [min(cfg.quant.bits)] * pruned_layer_count(pruned.path))
        cost = {"table_s": sens.seconds, "trial_s": time.perf_counter() - started, "tokens": sens.tokens}
    return UnitTable.from_table(sens, len(sens.kl), cfg.search.sensitivity), cost


def tune_search(trainable, cfg, n_units: int, configs: list[dict], trials: int, storage: Path, name: str, asha: bool,
                model_sampler=None):
    """One real Ray Tune search as qpruner.tune.build_tuner builds it (make_searcher over param_space, ASHA on
    val_logprob with the recipe's grace period, reduction factor and asha_max_t), over a replay trainable; the
    ResultGrid. Shared with benchmarks.search_replay_smollm2."""
    from ray import tune

    from qpruner.search import make_searcher, param_space
    from qpruner.tune import asha_max_t

    scheduler = None
    if asha:  # as the search runs it: no rung at or after the last training step, survivors run to the end
        scheduler = tune.schedulers.ASHAScheduler(metric="val_logprob", mode="max", time_attr="training_iteration",
                                                  max_t=asha_max_t(cfg), grace_period=cfg.search.asha.grace_period,
                                                  reduction_factor=cfg.search.asha.reduction_factor, stop_last_trials=False)
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(n_units, cfg.quant.bits),
        tune_config=tune.TuneConfig(search_alg=make_searcher(cfg, n_units, configs, model_sampler=model_sampler),
                                    scheduler=scheduler, num_samples=trials),
        run_config=tune.RunConfig(storage_path=str(storage), name=name, verbose=0),
    )
    return tuner.fit()


def creation_index(result) -> int:
    """A Tune trial's place in the order the searcher proposed it. With a search algorithm Tune's trial ids are
    random hex (SearchGenerator: Trial.generate_id), so sorting by id shuffles the trials; the experiment tag
    "<counter>_<params>" carries the counter (in every result, and in the trial folder's name
    "<trainable>_<id>_<counter>_..." for a trial that errored before reporting)."""
    import re

    tag = (result.metrics or {}).get("experiment_tag")
    if tag:
        return int(str(tag).split("_", 1)[0])
    found = re.search(r"_[0-9a-f]{8}_(\d+)_", Path(result.path).name)
    if found is None:
        raise ValueError(f"no trial counter in {result.path}")
    return int(found.group(1))


def search_arm(table: dict, arm: str, asha: bool, seed: int, trials: int, storage: Path, units=None) -> list[dict]:
    """One real Tune + Optuna search over the recorded table; the trials in creation order (creation_index)."""
    from ray import tune

    from qpruner.plan import resolved_config
    from qpruner.search import bits_from_config, config_from_bits, initial_configs, random_configs

    sampler_name, init, n_init = ARMS[arm]
    sampler = None  # the model sampler's instance (the others are built by make_searcher from their name)
    n = table["n_layers"]
    cfg = resolved_config(tiny_recipe(search={"sampler": sampler_name, "seed": seed, "n_init": n_init,
                                               "init": "random" if init == "random" else "importance"}))
    if init == "importance":  # as qpruner.tune.first_configs: memory budgets in the pruned layers' weight bytes
        points = initial_configs(table["importance"], cfg.quant.bits, n_init, cfg.search.temperature, seed,
                                 weight_fn=lambda b: table["rows"][",".join(map(str, b))]["weight_bytes"])
    elif init == "random":
        points = random_configs(n, cfg.quant.bits, n_init, seed)
    elif init == "table":  # as qpruner.tune.first_configs with search.sampler: model
        from qpruner.predict import ModelSampler, first_points

        points = [[p[f"b{i}"] for i in range(n)] for p in first_points(units, n_init)]
        sampler = ModelSampler(units, seed=seed, max_memory_gb=cfg.search.max_memory_gb)
    else:
        points = []
    name = f"{arm}-{asha}-{seed}".replace(" ", "_").replace("+", "_")
    grid = tune_search(tune.with_parameters(replay, table=table), cfg, n, [config_from_bits(b) for b in points], trials,
                       storage, name, asha, model_sampler=sampler)
    out = []
    for result in grid:
        m = result.metrics
        out.append({"trial_id": m["trial_id"], "bits": bits_from_config(result.config, n), "final": bool(m.get("final")),
                    "accuracy": m["accuracy"], "memory_bytes": int(m["memory_gb"] * 1024**3), "seconds": m["seconds"],
                    "steps": m["step"], "order": creation_index(result)})
    return [{k: v for k, v in r.items() if k != "order"} for r in sorted(out, key=lambda r: r["order"])]


def default_run_fronts(table: dict, seeds: int, storage: Path) -> dict:
    """tune_configs/tiny.yaml's own search (its sampler, first points, trial count, concurrency and ASHA) replayed
    for `seeds` search seeds on the fine-tuning peak, as the default run minimises it: front size, trials
    completed, repeated configurations."""
    from qpruner.pareto import pareto_mask
    from qpruner.plan import resolved_config

    cfg = resolved_config(tiny_recipe())
    use_memory(table, "peak")
    out = []
    for seed in range(seeds):
        trials = search_arm(table, "importance+TPE", cfg.search.asha.enabled, seed, cfg.search.num_samples, storage)
        done = [t for t in trials if t["final"]]
        front = sum(pareto_mask([t["accuracy"] for t in done], [t["memory_bytes"] for t in done]))
        out.append({"seed": seed, "front": int(front), "completed": len(done), "stopped": len(trials) - len(done),
                    "distinct_configs": len({tuple(t["bits"]) for t in trials}), "trials": len(trials)})
        print(f"[search_efficiency] tiny.yaml replay seed {seed}: {out[-1]}", flush=True)
    return {"runs": out, "min_front": min(r["front"] for r in out), "settings": tiny_recipe()["search"]}


def hv_curve(trials: list[dict], ref: tuple[float, float], overhead_s: float = 0.0, value: str = "accuracy",
             seconds: str = "seconds") -> list[tuple[int, float, float]]:
    """(trials done, trial compute seconds so far, hypervolume of the completed ones) after each trial;
    `overhead_s` is compute spent before the first trial (the model sampler's sensitivity table). Each trial
    gives its objective under `value` (higher is better), its memory under "memory_bytes" (in the reference
    point's unit) and its compute under `seconds`."""
    from qpruner.pareto import hypervolume

    curve, spent, acc, mem = [], overhead_s, [], []
    for i, t in enumerate(trials, 1):
        spent += t[seconds]
        if t["final"]:
            acc.append(t[value])
            mem.append(t["memory_bytes"])
        curve.append((i, spent, hypervolume(acc, mem, *ref)))
    return curve


def seconds_to_reach(curve, target: float):
    return next((s for _, s, hv in curve if hv >= target - 1e-12), None)


def plot(summary: dict, best_hv: float, path: Path) -> None:
    """Hypervolume (as a fraction of the best possible) against trials and against trial compute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    colours = dict(zip(ARMS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for (arm, asha), runs in summary.items():
        curves = np.array([[hv / best_hv for _, _, hv in c] for c in runs["curves"]])
        secs = np.array([[s for _, s, _ in c] for c in runs["curves"]]).mean(0) / 60
        trials = np.arange(1, curves.shape[1] + 1)
        kw = dict(color=colours[arm], ls="-" if asha else "--", label=f"{arm}{' + ASHA' if asha else ''}")
        for ax, x in ((axes[0], trials), (axes[1], secs)):
            ax.plot(x, curves.mean(0), **kw)
            if not asha:
                ax.fill_between(x, curves.min(0), curves.max(0), color=colours[arm], alpha=0.08)
    for ax in axes:
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("hypervolume / hypervolume of all 64 configurations")
    axes[0].set_xlabel("trials finished")
    axes[1].set_xlabel("trial compute (minutes, mean over seeds)")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("Search efficiency on builtin:tiny (30% pruned, 4/8 bits per layer): mean of seeds, band = min..max without ASHA")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rebuild", action="store_true", help="re-run phase 1 even if the table exists")
    parser.add_argument("--memory", choices=["weights", "peak"], default="weights", help="the memory objective")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of: {', '.join(ARMS)}")
    parser.add_argument("--name", default="search_efficiency", help="results/<name>.json and <name>.png (a subset of arms: "
                        "another name keeps the full run's file)")
    parser.add_argument("--default-seeds", type=int, default=0,
                        help="only replay tiny.yaml's own search for this many seeds (front sizes) and stop")
    args = parser.parse_args()
    arms = [a.strip() for a in args.arms.split(",")]
    if any(a not in ARMS for a in arms):
        parser.error(f"--arms: use a subset of {', '.join(ARMS)}")
    stale = TABLE.is_file() and "val_logprob" not in next(iter(json.loads(TABLE.read_text())["rows"].values()))["curve"][0]
    if args.rebuild or stale or not TABLE.is_file():
        TABLE.parent.mkdir(parents=True, exist_ok=True)
        TABLE.write_text(json.dumps(build_table(tiny_recipe()), indent=0))
    table = json.loads(TABLE.read_text())
    add_weight_bytes(table, tiny_recipe())
    if args.default_seeds:
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
        with tempfile.TemporaryDirectory() as tmp:
            write_result("search_default_run", {"model": "builtin:tiny (tabular replay of search_table_tiny.json)",
                                                **default_run_fronts(table, args.default_seeds, Path(tmp))})
        ray.shutdown()
        return
    use_memory(table, args.memory)
    rows = list(table["rows"].values())
    ref = (min(r["accuracy"] for r in rows), 1.1 * max(r["memory_bytes"] for r in rows) / 1024**3)
    from qpruner.pareto import hypervolume

    best_hv = hypervolume([r["accuracy"] for r in rows], [r["memory_gb"] for r in rows], *ref)
    to_gb = lambda trials: [{**t, "memory_bytes": t["memory_bytes"] / 1024**3} for t in trials]  # noqa: E731

    units, cost = sensitivity_units(tiny_recipe())
    # the table's cost in the recorded trials' seconds: measured beside one trial now, scaled to the table's trials
    table_s = cost["table_s"] / cost["trial_s"] * float(np.mean([r["seconds"] for r in rows]))
    print(f"[search_efficiency] sensitivity table {cost}: charged {table_s:.1f} recorded-trial seconds", flush=True)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    summary = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arm, asha in itertools.product(arms, (False, True)):
            curves, saved = [], []
            for seed in range(args.seeds):
                trials = search_arm(table, arm, asha, seed, args.trials, Path(tmp), units=units)
                curves.append(hv_curve(to_gb(trials), ref, table_s if ARMS[arm][0] == "model" else 0.0))
                saved.append(sum(table["max_steps"] - t["steps"] for t in trials if not t["final"]))
            summary[(arm, asha)] = {"curves": curves, "steps_saved": saved}
            print(f"[search_efficiency] {arm} asha={asha}: final hv / best {[round(c[-1][2] / best_hv, 3) for c in curves]}", flush=True)
    ray.shutdown()

    results = {}
    for (arm, asha), runs in summary.items():
        results[f"{arm}{' + ASHA' if asha else ''}"] = {
            "final_hypervolume": mean_std(c[-1][2] for c in runs["curves"]),
            "trial_compute_s": mean_std(c[-1][1] for c in runs["curves"]),
            "fraction_of_best_hv": mean_std(c[-1][2] / best_hv for c in runs["curves"]),
            "asha_steps_saved": mean_std(runs["steps_saved"]),
            "curves": [[list(p) for p in c] for c in runs["curves"]],
        }
    claims = {}
    for asha, arm in itertools.product((False, True), [a for a in arms if a != "random-init+GP"]):
        suffix = " + ASHA" if asha else ""
        if f"random-init+GP{suffix}" not in results:
            break
        target = results[f"random-init+GP{suffix}"]["final_hypervolume"]["mean"]
        full = results[f"random-init+GP{suffix}"]["trial_compute_s"]["mean"]
        reach = [seconds_to_reach(c, target) for c in summary[(arm, asha)]["curves"]]
        claims[f"{arm}{suffix} compute to reach random-init+GP final hv"] = {
            "seconds": reach, "random_init_total_s": full,
            "fraction": [None if s is None else s / full for s in reach],
            "at_most_half": all(s is not None and s <= 0.5 * full for s in reach),
            "at_most_third": all(s is not None and s <= full / 3 for s in reach)}
    png = RESULTS / f"{args.name}.png"
    plot(summary, best_hv, png)
    write_result(args.name, {
        "model": "builtin:tiny, 30% Taylor pruning, bits {4, 8} per layer (64 configurations)",
        "memory_objective": args.memory,
        "trials_per_search": args.trials, "seeds": args.seeds, "reference_point": {"accuracy": ref[0], "memory_gb": ref[1]},
        "hypervolume_all_configs": best_hv, "table_seconds": sum(r["seconds"] for r in rows),
        "sensitivity_table": {**cost, "charged_recorded_trial_s": table_s},
        "arms": results, "claims": claims, "plot": png.name})


if __name__ == "__main__":
    main()
