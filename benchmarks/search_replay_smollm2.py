"""Study 12: every search strategy replayed on the SmolLM2 grouped ground-truth table (issue 27, item 4).

The ground truth is benchmarks/results/smollm2_table_grouped.json (`python -m benchmarks.smollm2_study grouped`):
SmolLM2-135M-Instruct pruned 20% with Taylor, its 30 decoder layers tied in 5 groups of 6 consecutive layers, each
group at 4 or 8 bits, all 32 configurations fine-tuned (20 steps, a report every 5) and scored once, with every
report's val_logprob (what ASHA sees) and each stage's seconds. Each arm here is a real Ray Tune + OptunaSearch
(+ ASHA) search, built as qpruner builds its own (`search.layer_groups: 5`, make_searcher, param_space, ASHA from
tune_configs/smollm2_prune20.yaml, first configurations as qpruner.tune.first_configs makes them from the
importance or the sensitivity table), whose trainable replays
the recorded trial: the reports at steps 5, 10, 15, 20, then the final result. Arms differ only in what they
propose and when ASHA stops them.

Arms (as benchmarks.search_efficiency; 3 seeds, 12 trials each, with and without ASHA): the performance-model
sampler (the cached sensitivity table of the same pruned model, summed per group with UnitTable as a grouped run
does; its measured cost is charged before its first trial), importance init + GP, random init + GP (the paper's
protocol: 10 random points, then BO), importance init + TPE, random search. Importance is qpruner's own for the
recipe (`search.importance: mi`) on the table's pruned model, computed once and kept in this study's results file.

Objectives, each its own set of searches (`search.objective`): accuracy (the cell's mean over the 7 tasks, max)
and perplexity (the cell's WikiText-2 perplexity, 40 x 512-token windows, min); memory is the exact weight bytes
(the table's weight_bytes) in both. Hypervolume: the objective above the table's worst value, memory below 1.1 x
its largest, as a fraction of the hypervolume of all 32 configurations (the true front).

Compute: a trial costs what the table recorded up to where it stopped ("recorded"), or, for the headline
figures, the same stages from a noise-free cost model fitted on the table ("modelled": setup + fine-tuning
seconds per step, a robust Theil-Sen line in the number of 8-bit groups, x steps run + the evaluation's median
seconds if it finished). The table was measured on a shared 2-core machine where one cell took 12x its
neighbours; recorded seconds would make an arm's compute depend on whether it drew that cell.

The table must hold all 32 configurations; `--allow-partial` replays whatever it holds for a smoke test: a
proposal of a configuration not yet measured fails at once (Tune error, Optuna FAIL, which no sampler learns
from), costs nothing and adds no hypervolume, and the true front is the front of the cells present. A partial
run writes nothing into benchmarks/results (set QPRUNER_BENCH_RESULTS).

    python -m benchmarks.search_replay_smollm2 [--trials 12] [--seeds 3] [--objectives accuracy,perplexity]
    QPRUNER_BENCH_RESULTS=/tmp/replay python -m benchmarks.search_replay_smollm2 --allow-partial --seeds 1 --trials 6
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, ROOT, mean_std, write_result
from benchmarks.search_efficiency import ARMS, creation_index, hv_curve, seconds_to_reach, tune_search

NAME = "search_replay_smollm2"
TABLE = ROOT / "benchmarks" / "results" / "smollm2_table_grouped.json"  # the live table, whatever QPRUNER_BENCH_RESULTS says
GROUPS, BITS = 5, (4, 8)
OBJECTIVES = {  # search.objective (the Tune metric the trainable reports): (the table cell's field, +1 max / -1 min)
    "accuracy": ("mean", 1.0),
    "perplexity": ("wikitext2_ppl", -1.0),
}
REFERENCE_ARMS = ("random search", "random-init+GP")  # compute to reach their final hypervolume


class MissingCell(RuntimeError):
    """--allow-partial: the search proposed a configuration the table does not hold yet."""


# ---------------------------------------------------------------------------------------------
# The table


def cell_name(group_bits) -> str:
    return "-".join(str(int(b)) for b in group_bits)


def read_table(path: Path) -> tuple[dict, dict, list[str]]:
    """(the table's header, {name: cell} of the configurations measured, every configuration's name)."""
    table = json.loads(path.read_text())
    cells = {k: v for k, v in table.get("cells", {}).items()
             if k != "pruned" and isinstance(v, dict) and "wikitext2_ppl" in v and v.get("history")}
    names = [cell_name(g) for g in itertools.product(BITS, repeat=GROUPS)]
    return table, cells, names


def cost_model(cells: dict, steps: int) -> dict:
    """Per-stage seconds of a trial, fitted robustly on the table: setup (load, LoftQ, quantize: the median of
    cell_seconds minus fine-tuning and evaluation), fine-tuning seconds per step = a + b x (8-bit groups) by
    Theil-Sen (8-bit layers train slower), evaluation (lm-eval + perplexity) the median."""
    from scipy.stats import theilslopes

    rows = list(cells.values())
    n8 = [c["group_bits"].count(8) for c in rows]
    rate = [c["seconds"]["finetune_s"] / steps for c in rows]
    tail = [c["seconds"].get("eval_s", 0.0) + c["seconds"].get("ppl_s", 0.0) for c in rows]
    setup = [c["cell_seconds"] - c["seconds"]["finetune_s"] - t for c, t in zip(rows, tail)]
    if len(set(n8)) > 1:
        slope, intercept = (float(x) for x in theilslopes(rate, n8)[:2])
    else:
        slope, intercept = 0.0, float(statistics.median(rate))
    return {"setup_s": max(0.0, float(statistics.median(setup))), "finetune_s_per_step": intercept,
            "finetune_s_per_step_per_8bit_group": slope, "evaluation_s": float(statistics.median(tail)), "steps": steps,
            "fitted_on": len(rows)}


def modelled_seconds(model: dict, group_bits, steps_done: int, final: bool) -> float:
    rate = model["finetune_s_per_step"] + model["finetune_s_per_step_per_8bit_group"] * list(group_bits).count(8)
    return model["setup_s"] + max(rate, 0.0) * steps_done + (model["evaluation_s"] if final else 0.0)


def recorded_seconds(cell: dict, steps_done: int, final: bool) -> float:
    if final:
        return float(cell["cell_seconds"])
    return float(next((h["seconds"] for h in cell["history"] if h["step"] == steps_done), 0.0))


# ---------------------------------------------------------------------------------------------
# The replayed trial


def replay(config: dict, cells: dict, by_bits: dict, n_layers: int, steps: int) -> None:
    """Tune trainable: the recorded reports of this configuration (as qpruner.trial.run_trial makes them: the
    objectives None until the final result, val_logprob at every report), then its final result."""
    from ray import tune

    from qpruner.search import bits_from_config

    name = by_bits.get(tuple(bits_from_config(config, n_layers)))
    if name is None or name not in cells:
        raise MissingCell(f"configuration {name} is not in the table yet")
    cell = cells[name]
    memory_gb = cell["weight_bytes"] / 1024**3
    for point in cell["history"]:
        tune.report({"val_logprob": point["val_logprob"], "accuracy": None, "perplexity": None, "memory_gb": memory_gb,
                     "seconds": point["seconds"], "step": point["step"], "final": False})
    tune.report({"val_logprob": cell["val_logprob"], "accuracy": cell["mean"], "perplexity": cell["wikitext2_ppl"],
                 "memory_gb": memory_gb, "seconds": cell["cell_seconds"], "step": steps, "final": True})


# ---------------------------------------------------------------------------------------------
# Inputs measured on the pruned model: importance (once, kept in the results file) and the sensitivity table (cached)


def study_args(header: dict, threads: int, cache: Path) -> argparse.Namespace:
    """benchmarks.smollm2_study's arguments that reproduce the table's own settings (documents, recipe, dtype)."""
    s = header["settings"]
    return argparse.Namespace(limit=s["limit"], val_docs=s["val_docs"], steps=s["steps"], report_every=s["report_every"],
                              chunks=int(str(s["ppl_windows"]).split()[0]), dtype=s.get("compute_dtype", "float32"),
                              threads=threads, search_limit=50, cache=str(cache))


def importance_key(header: dict, cfg) -> dict:
    return {"pruned": header["cells"]["pruned"]["path"], "method": cfg.search.importance,
            "compute_dtype": cfg.quant.compute_dtype, "val_docs": header["settings"]["val_docs"]}


def cached_importance(key: dict, name: str, extra: list[Path]) -> tuple[list[float] | None, str | None]:
    """Importance for `key` kept by an earlier run of this study (this run's results file, the committed one,
    or --importance-from)."""
    for path in [RESULTS / f"{name}.json", ROOT / "benchmarks" / "results" / f"{NAME}.json", *extra]:
        try:
            found = json.loads(Path(path).read_text()).get("importance") or {}
        except (OSError, ValueError):
            continue
        if found.get("key") == key and found.get("per_layer"):
            return found["per_layer"], str(path)
    return None, None


def measure_importance(cfg, pruned_path: Path) -> tuple[list[float], float]:
    """qpruner.importance.pruned_importance: what a run's first_configs computes (as a Ray task) for this model."""
    from qpruner.importance import pruned_importance

    started = time.perf_counter()
    return pruned_importance(cfg, str(pruned_path)), time.perf_counter() - started


def sensitivity(cfg, pruned_path: Path, key: str):
    """The pruned model's sensitivity table as benchmarks.predictor_smollm2 measured it (same recipe, documents and
    model: served from qpruner's cache) and the seconds this load took."""
    from qpruner.predict import sensitivity_table
    from qpruner.prune import load_pruned

    model, tokenizer = load_pruned(str(pruned_path), dtype=cfg.quant.compute_dtype)
    started = time.perf_counter()
    table = sensitivity_table(model, tokenizer, cfg, key)
    return table, time.perf_counter() - started


# ---------------------------------------------------------------------------------------------
# One search


def arm_config(study, arm: str, seed: int, objective: str):
    """tune_configs/smollm2_prune20.yaml (with the table's documents and settings) for this arm: 5 layer groups,
    bits {4, 8}, the arm's sampler, first points and seed, and the objective."""
    from qpruner.plan import resolved_config

    sampler, init, n_init = ARMS[arm]
    search = {"layer_groups": GROUPS, "sampler": sampler, "seed": seed, "n_init": n_init,
              "init": "random" if init == "random" else "importance", "objective": objective}
    return resolved_config(study.raw(quant={"bits": list(BITS)}, search=search))


def first_points(cfg, arm: str, pruned_path: Path, importance: list[float], sens_json: dict):
    """The arm's first configurations and (model arm) its unit table, as qpruner.tune.first_configs makes them
    from its two measurements, here the ones this study already holds (the importance, the sensitivity table):
    qpruner.search.importance_configs, random_configs, or the table's own front (qpruner.predict.first_points)."""
    from qpruner.predict import SensitivityTable, UnitTable
    from qpruner.predict import first_points as table_front
    from qpruner.search import config_from_bits, importance_configs, random_configs

    init = ARMS[arm][1]
    if init == "none":
        return [], None
    if init == "random":
        return [config_from_bits(b) for b in random_configs(GROUPS, cfg.quant.bits, cfg.search.n_init, cfg.search.seed)], None
    pruned_config = json.loads((Path(pruned_path) / "config.json").read_text())
    if init == "table":
        units = UnitTable.from_table(SensitivityTable.from_json(sens_json), GROUPS, cfg.search.sensitivity)
        return table_front(units, cfg.search.n_init, cfg.search.anchors), units
    return importance_configs(cfg, pruned_config, importance), None


def model_sampler(cfg, units):
    """qpruner.predict.ModelSampler as qpruner.tune.build_tuner builds it."""
    from qpruner.predict import ModelSampler

    return ModelSampler(units, seed=cfg.search.seed, max_memory_gb=cfg.search.max_memory_gb, objective=cfg.search.objective)


def run_arm(ctx: dict, arm: str, asha: bool, seed: int, objective: str, trials: int, storage: Path) -> list[dict]:
    """One real Tune + Optuna (+ ASHA) search over the table; its trials in the order they were proposed."""
    from ray import tune

    from qpruner.search import bits_from_config

    cfg = arm_config(ctx["study"], arm, seed, objective)
    points, units = first_points(cfg, arm, ctx["pruned_path"], ctx["importance"], ctx["sens_json"])
    sampler = model_sampler(cfg, units) if units is not None else None
    trainable = tune.with_parameters(replay, cells=ctx["cells"], by_bits=ctx["by_bits"], n_layers=ctx["n_layers"],
                                     steps=ctx["steps"])
    name = f"{objective}-{arm}-{asha}-{seed}".replace(" ", "_").replace("+", "_")
    grid = tune_search(trainable, cfg, GROUPS, points, trials, storage, name, asha, model_sampler=sampler)
    out = []
    for result in grid:
        cell_key = ctx["by_bits"].get(tuple(bits_from_config(result.config, ctx["n_layers"])))
        cell = ctx["cells"].get(cell_key)
        if result.error is not None and cell is not None:  # only a missing configuration may fail
            raise RuntimeError(f"the replay of {cell_key} failed: {result.error}")
        m = result.metrics or {}
        final = bool(m.get("final")) and cell is not None
        steps = int(m.get("step") or 0) if cell is not None else 0
        field, sign = OBJECTIVES[objective]
        out.append({"order": creation_index(result), "config": cell_key, "missing": cell is None, "final": final, "steps": steps,
                    "value": sign * cell[field] if final else None, "objective": cell[field] if final else None,
                    "memory_bytes": cell["weight_bytes"] / 1024**3 if cell else None,  # in GB, as the reference point
                    "modelled_s": modelled_seconds(ctx["cost"], cell["group_bits"], steps, final) if cell else 0.0,
                    "recorded_s": recorded_seconds(cell, steps, final) if cell else 0.0})
    out.sort(key=lambda t: t["order"])
    return out


# ---------------------------------------------------------------------------------------------
# The figures


def front_of(cells: dict, objective: str, ref: tuple[float, float]) -> dict:
    """The true front over the cells (which configurations, their values and weights), the hypervolume of all
    cells, and uniform 4-bit's distance from the front."""
    from qpruner.pareto import hypervolume, pareto_mask

    field, sign = OBJECTIVES[objective]
    names = sorted(cells, key=lambda k: cells[k]["weight_bytes"])
    y = [sign * cells[k][field] for k in names]
    mem = [cells[k]["weight_bytes"] / 1024**3 for k in names]
    best_hv = hypervolume(y, mem, *ref)
    mask = pareto_mask(y, mem)
    front = [{"config": k, objective: cells[k][field], "weight_mib": cells[k]["weight_bytes"] / 2**20,
              **({"stderr": cells[k]["mean_stderr"]} if objective == "accuracy" else {})}
             for k, on in zip(names, mask) if on]
    out = {"configs": [f["config"] for f in front], "count": len(front), "points": front, "hypervolume": best_hv}
    u4, u8 = cell_name([BITS[0]] * GROUPS), cell_name([BITS[-1]] * GROUPS)
    if u4 in cells:
        value = cells[u4][field]
        best = max(front, key=lambda f: sign * f[objective])
        anchors = [k for k in (u4, u8) if k in cells]
        gap = {"uniform4": value, "best_on_front": best[objective], "best_config": best["config"],
               "best_weight_ratio": best["weight_mib"] / (cells[u4]["weight_bytes"] / 2**20),
               "on_front": u4 in out["configs"],
               "note": "uniform 4 is the cheapest configuration, so the front's value at its memory is its own",
               "hv_fraction_uniform4_alone": hypervolume([sign * value], [cells[u4]["weight_bytes"] / 1024**3], *ref) / best_hv
               if best_hv > 0 else None,
               "hv_fraction_anchors": hypervolume([sign * cells[k][field] for k in anchors],
                                                  [cells[k]["weight_bytes"] / 1024**3 for k in anchors], *ref) / best_hv
               if best_hv > 0 else None}
        if objective == "accuracy":
            se = float(np.hypot(cells[u4]["mean_stderr"], cells[best["config"]]["mean_stderr"]))
            gap.update(gain_over_uniform4=best[objective] - value, gain_in_standard_errors=(best[objective] - value) / se,
                       front_points_beyond_2se=[f["config"] for f in front if (f[objective] - value) > 2 * np.hypot(
                           cells[u4]["mean_stderr"], f["stderr"])])
        else:
            gap.update(ratio_uniform4_to_best=value / best[objective])
        out["uniform4"] = gap
    return out


def summarise(runs: dict, best_hv: float, full_cost: dict) -> dict:
    """Per arm: final hypervolume fraction, compute (modelled and recorded), what ASHA stopped and saved."""
    out = {}
    for (arm, asha), r in runs.items():
        curves, trials = r["curves"], r["trials"]
        saved_s = [sum(full_cost[t["config"]] - t["modelled_s"] for t in ts if not t["final"] and not t["missing"]) for ts in trials]
        out[f"{arm}{' + ASHA' if asha else ''}"] = {
            "fraction_of_best_hv": mean_std(c[-1][2] / best_hv for c in curves),
            "trial_compute_s": mean_std(c[-1][1] for c in curves),
            "trial_compute_recorded_s": mean_std(c[-1][1] for c in r["recorded_curves"]),
            "charged_before_first_trial_s": r["charge"],
            "completed": mean_std(sum(t["final"] for t in ts) for ts in trials),
            "stopped_by_asha": mean_std(sum(not t["final"] and not t["missing"] for t in ts) for ts in trials),
            "missing_proposals": mean_std(sum(t["missing"] for t in ts) for ts in trials),
            "distinct_configs": mean_std(len({t["config"] for t in ts if not t["missing"]}) for ts in trials),
            "asha_steps_saved": mean_std(sum(r["steps"] - t["steps"] for t in ts if not t["final"] and not t["missing"]) for ts in trials),
            "asha_seconds_saved": mean_std(saved_s),
            "trials": [[{k: t[k] for k in ("order", "config", "final", "steps", "objective", "modelled_s", "recorded_s", "missing")} for t in ts]
                       for ts in trials],
            "curves": [[[i, s, hv / best_hv] for i, s, hv in c] for c in curves],
        }
    return out


def claims_of(runs: dict, arms: dict) -> dict:
    """Compute each arm needs to reach the reference arms' final hypervolume (mean over seeds), per ASHA setting;
    and what ASHA saves per arm."""
    claims = {}
    for asha, ref_arm in itertools.product((False, True), REFERENCE_ARMS):
        suffix = " + ASHA" if asha else ""
        if (ref_arm, asha) not in runs:
            continue
        target = float(np.mean([c[-1][2] for c in runs[(ref_arm, asha)]["curves"]]))
        total = float(np.mean([c[-1][1] for c in runs[(ref_arm, asha)]["curves"]]))
        for arm in [a for a, s in runs if s == asha and a != ref_arm]:
            reach = [seconds_to_reach(c, target) for c in runs[(arm, asha)]["curves"]]
            claims[f"{arm}{suffix}: compute to reach {ref_arm}{suffix}'s final hv"] = {
                "seconds": reach, "reference_total_s": total, "fraction": [None if s is None or not total else s / total for s in reach],
                "reached_on_all_seeds": all(s is not None for s in reach),
                "at_most_half": all(s is not None and s <= 0.5 * total for s in reach),
                "at_most_third": all(s is not None and s <= total / 3 for s in reach)}
    asha = {}
    for arm in dict.fromkeys(a for a, _ in runs):
        if (arm, False) in runs and (arm, True) in runs:
            off, on = arms[arm], arms[f"{arm} + ASHA"]
            asha[arm] = {"compute_without_s": off["trial_compute_s"]["mean"], "compute_with_s": on["trial_compute_s"]["mean"],
                         "compute_saved_fraction": 1 - on["trial_compute_s"]["mean"] / off["trial_compute_s"]["mean"]
                         if off["trial_compute_s"]["mean"] else None,
                         "hv_fraction_without": off["fraction_of_best_hv"]["mean"], "hv_fraction_with": on["fraction_of_best_hv"]["mean"]}
    return {"reach": claims, "asha": asha}


def plot(per_objective: dict, path: Path, title: str) -> None:
    """Hypervolume fraction against trial compute (modelled, mean over seeds), one panel per objective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(per_objective), figsize=(6.5 * len(per_objective), 4.8), sharey=True, squeeze=False)
    colours = dict(zip(ARMS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, (objective, result) in zip(axes[0], per_objective.items()):
        for name, a in result["arms"].items():
            arm, asha = name.removesuffix(" + ASHA"), name.endswith(" + ASHA")
            curves = np.array([[p[2] for p in c] for c in a["curves"]])
            secs = np.array([[p[1] for p in c] for c in a["curves"]]).mean(0) / 60
            ax.plot(secs, curves.mean(0), color=colours[arm], ls="-" if asha else "--", marker="." if asha else None,
                    label=name)
            if not asha and len(curves) > 1:
                ax.fill_between(secs, curves.min(0), curves.max(0), color=colours[arm], alpha=0.08)
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
        ax.set_title(f"{objective} (true front: {result['true_front']['count']} of {result['cells']} configurations)")
        ax.set_xlabel("trial compute (minutes, modelled, mean over seeds)")
    axes[0][0].set_ylabel("hypervolume / hypervolume of the whole table")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle("\n".join(textwrap.fill(line, 95 * len(per_objective)) for line in title.split("\n")), fontsize=9)  # one panel is narrow
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------


def refuse(message: str) -> None:
    print(f"search_replay_smollm2: {message}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12, help="trials per search")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of: {', '.join(ARMS)}")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES), help=f"comma-separated subset of: {', '.join(OBJECTIVES)}")
    parser.add_argument("--allow-partial", action="store_true",
                        help="replay an incomplete table (smoke test): proposals of missing configurations fail")
    parser.add_argument("--table", default=str(TABLE), help="the grouped table (default: the committed one)")
    parser.add_argument("--importance-from", action="append", default=[], help="another results file of this study whose "
                        "importance to reuse (same pruned model, method, dtype and documents)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the importance (and a sensitivity miss)")
    parser.add_argument("--cache", default=None, help="qpruner cache (default ~/.cache/qpruner)")
    parser.add_argument("--name", default=NAME, help="results/<name>.json and <name>.png")
    args = parser.parse_args()
    arms = [a.strip() for a in args.arms.split(",")]
    objectives = [o.strip() for o in args.objectives.split(",")]
    if any(a not in ARMS for a in arms):
        parser.error(f"--arms: use a subset of {', '.join(ARMS)}")
    if any(o not in OBJECTIVES for o in objectives):
        parser.error(f"--objectives: use a subset of {', '.join(OBJECTIVES)}")

    header, cells, names = read_table(Path(args.table))
    missing = [n for n in names if n not in cells]
    if missing and not args.allow_partial:
        refuse(f"{args.table} holds {len(cells)} of {len(names)} configurations ({len(missing)} missing); run "
               f"`python -m benchmarks.smollm2_study grouped` to the end, or pass --allow-partial for a smoke test")
    if missing and RESULTS.resolve() == (ROOT / "benchmarks" / "results").resolve():
        refuse("a partial replay is a smoke test and writes nothing into benchmarks/results: set QPRUNER_BENCH_RESULTS=/tmp/...")
    if not cells:
        refuse(f"{args.table} holds no configuration yet")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    import ray
    import torch

    from benchmarks.smollm2_study import GROUPED, Study
    from qpruner.config import default_cache_dir
    from qpruner.plan import resolved_config
    from qpruner.prune import pruned_layer_count
    from qpruner.prune.store import is_complete
    from qpruner.search import expand
    from qpruner.tune import asha_max_t

    torch.set_num_threads(args.threads)
    cache = Path(args.cache) if args.cache else default_cache_dir()
    key = header["cells"]["pruned"]["path"]
    pruned_path = cache / "pruned" / key
    if not is_complete(pruned_path):
        refuse(f"the table's pruned model {key} is not in {cache / 'pruned'}")
    n_layers = pruned_layer_count(pruned_path)
    by_bits = {tuple(expand(list(g), n_layers)): cell_name(g) for g in itertools.product(BITS, repeat=GROUPS)}
    if any(tuple(c["bits"]) not in by_bits for c in cells.values()):  # the table's groups must be the search's groups
        refuse("the table's per-layer bits are not qpruner.search.expand of its group bits: its groups differ from the search's")
    steps = header["settings"]["steps"]
    study = Study(GROUPED, study_args(header, args.threads, cache), cache)
    base = resolved_config(study.raw(quant={"bits": list(BITS)}, search={"layer_groups": GROUPS}))

    ikey = importance_key(header, base)
    importance, source = cached_importance(ikey, args.name, [Path(p) for p in args.importance_from])
    importance_s = None
    if importance is None:
        print(f"[replay] measuring {base.search.importance} importance of pruned model {key} (once; kept in {RESULTS / args.name}.json)",
              flush=True)
        importance, importance_s = measure_importance(base, pruned_path)
        source = "measured by this run"
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{args.name}.json").write_text(json.dumps({"study": args.name, "status": "importance only: the replay did not finish",
                                                               "importance": {"key": ikey, "per_layer": importance,
                                                                              "seconds": importance_s}}, indent=1))
    print(f"[replay] importance ({source}): {[round(x, 4) for x in importance]}", flush=True)
    sens_cfg = resolved_config(study.raw(quant={"bits": list(BITS)}, search={"sampler": "model"}))  # predictor_smollm2's
    sens, load_s = sensitivity(sens_cfg, pruned_path, key)
    if load_s > 0.5 * sens.seconds:
        print(f"[replay] note: the sensitivity table was not cached and was measured now ({load_s:.0f} s)", flush=True)

    cost = cost_model(cells, steps)
    median_cell = float(statistics.median(c["cell_seconds"] for c in cells.values()))
    full_cost = {n: modelled_seconds(cost, c["group_bits"], steps, True) for n, c in cells.items()}
    median_full = float(statistics.median(full_cost.values()))
    # the table's cost in trials: its seconds over a trial's cell_seconds (median), then in this replay's trial units
    charge = {"modelled": sens.seconds / median_cell * median_full, "recorded": sens.seconds}
    print(f"[replay] {len(cells)}/{len(names)} configurations; cost model {cost}; sensitivity table {sens.seconds:.0f} s = "
          f"{sens.seconds / median_cell:.2f} trials, charged {charge['modelled']:.0f} modelled s to the model sampler", flush=True)

    ctx = {"study": study, "pruned_path": pruned_path, "importance": importance, "sens_json": sens.to_json(), "cells": cells,
           "by_bits": by_bits, "n_layers": n_layers, "steps": steps, "cost": cost}
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    per_objective = {}
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for objective in objectives:
                field, sign = OBJECTIVES[objective]
                values = [sign * c[field] for c in cells.values()]
                ref = (min(values), 1.1 * max(c["weight_bytes"] for c in cells.values()) / 1024**3)
                truth = front_of(cells, objective, ref)
                runs = {}
                for arm, asha in itertools.product(arms, (False, True)):
                    trials_by_seed = [run_arm(ctx, arm, asha, seed, objective, args.trials, Path(tmp)) for seed in range(args.seeds)]
                    overhead = charge if ARMS[arm][0] == "model" else {"modelled": 0.0, "recorded": 0.0}
                    runs[(arm, asha)] = {
                        "trials": trials_by_seed, "steps": steps, "charge": overhead["modelled"],
                        "curves": [hv_curve(ts, ref, overhead["modelled"], value="value", seconds="modelled_s") for ts in trials_by_seed],
                        "recorded_curves": [hv_curve(ts, ref, overhead["recorded"], value="value", seconds="recorded_s")
                                            for ts in trials_by_seed]}
                    print(f"[replay] {objective} / {arm} asha={asha}: final hv / true front "
                          f"{[round(c[-1][2] / truth['hypervolume'], 3) for c in runs[(arm, asha)]['curves']]}, "
                          f"compute {[round(c[-1][1]) for c in runs[(arm, asha)]['curves']]} s, "
                          f"missing {[sum(t['missing'] for t in ts) for ts in trials_by_seed]} "
                          f"({time.perf_counter() - started:.0f} s)", flush=True)
                arm_results = summarise(runs, truth["hypervolume"], full_cost)
                per_objective[objective] = {
                    "reference_point": {objective: sign * ref[0], "memory_gb": ref[1]}, "cells": len(cells),
                    "true_front": truth, "arms": arm_results, "claims": claims_of(runs, arm_results)}
    finally:
        ray.shutdown()
    replay_s = time.perf_counter() - started

    png = RESULTS / f"{args.name}.png"
    title = (f"Search replay on the SmolLM2-135M grouped table (Taylor 20%, 5 groups x {{4, 8}} bits, {len(cells)}/{len(names)} "
             f"configurations{', PARTIAL' if missing else ''}):\n{args.trials} trials per search, {args.seeds} seed(s); dashed "
             "without ASHA (band min..max over seeds), solid with; the model sampler starts after its table's cost")
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(per_objective, png, title)
    write_result(args.name, {
        "model": "SmolLM2-135M-Instruct, Taylor 20% (pruned model " + key + "), 30 layers in 5 groups of 6, bits {4, 8} per group",
        "table": {"path": str(args.table), "date": header.get("date"), "cells_present": len(cells), "cells_total": len(names),
                  "missing": missing, "partial": bool(missing),
                  "partial_rule": "a proposal of a missing configuration fails (Optuna FAIL), costs nothing, adds no hypervolume"
                  if missing else None},
        "memory_objective": "weight bytes (exact: the table's weight_bytes, quantized decoder layers + 16-bit rest)",
        "objective_values": {"accuracy": "the cell's mean of the 7 tasks' paper metric (100 documents each)",
                             "perplexity": "the cell's WikiText-2 token perplexity over 40 x 512-token windows (not lm-eval's "
                                           "word perplexity, which the product's objective reads in a real run)"},
        "settings": {"trials_per_search": args.trials, "seeds": args.seeds, "arms": {a: dict(zip(("sampler", "init", "n_init"), ARMS[a]))
                                                                                     for a in arms},
                     "recipe": "tune_configs/smollm2_prune20.yaml + the table's documents (benchmarks.smollm2_study)",
                     "concurrency": base.search.concurrency, "anchors": base.search.anchors,
                     "asha": {"grace_period": base.search.asha.grace_period, "reduction_factor": base.search.asha.reduction_factor,
                              "max_t_reports": asha_max_t(base),
                              "report_every": base.finetune.report_every, "steps": steps}},
        "importance": {"key": ikey, "per_layer": importance, "seconds": importance_s, "source": source},
        "sensitivity_table": {"seconds": sens.seconds, "tokens": sens.tokens, "kind": base.search.sensitivity,
                              "load_seconds_now": load_s, "median_cell_seconds": median_cell,
                              "in_trials": sens.seconds / median_cell, "charged_modelled_s": charge["modelled"],
                              "charged_recorded_s": charge["recorded"]},
        "compute_model": {**cost, "median_full_trial_s": median_full, "median_recorded_trial_s": median_cell},
        "replay_seconds": replay_s,
        "objectives": per_objective, "plot": png.name})


if __name__ == "__main__":
    main()
