"""How well the performance model (qpruner.predict) predicts the tiny model's 64-configuration table.

Ground truth: benchmarks/results/search_table_tiny.json (every 4/8-bit vector of builtin:tiny pruned 30%,
trained and scored with tune_configs/tiny.yaml's trial settings, written by benchmarks.search_efficiency).
The sensitivity table (kl and fisher) is measured on the same pruned model (cached). Spearman rank
correlations of the model's predictions with the measured accuracy and validation log-probability:
from the table alone, after refitting on 4, 8 and 16 configurations (20 random draws each, predicting
the rest), leave-one-out over all 64, and among configurations of equal memory.

`fidelity`: would trials that ASHA stopped help the model if they entered at their fidelity? Only the
val_logprob objective can say: a stopped trial has no final accuracy, only its validation log-prob at the rung.
Per draw, 2k configurations start; as ASHA's first rung (step 10 of 40, reduction factor 2) the k best at step
10 run to the end and the k worst stop there. The model is fitted on (a) the k completed only; (b) plus the k
stopped at their step-10 value as if final; (c) plus the k stopped shifted by the mean final - step-10 gain of
the completed ones (a fidelity offset); (d) all 2k as if completed (what full training would buy). Spearman
against the final val_logprob of the configurations not drawn, 50 draws, k = 4 and 8.

    python -m benchmarks.predictor_tiny
"""

from __future__ import annotations

import json

import numpy as np

from benchmarks.common import RESULTS, tiny_recipe, write_result
from benchmarks.predictor_smollm2 import correlations, equal_memory


def main() -> None:
    from qpruner.plan import resolved_config
    from qpruner.predict import UnitTable, loo_spearman, sensitivity_table
    from qpruner.prune import load_pruned, prune_cached

    cfg = resolved_config(tiny_recipe())
    pruned = prune_cached(cfg, progress=False)
    model, tokenizer = load_pruned(str(pruned.path), dtype=cfg.quant.compute_dtype)
    table = sensitivity_table(model, tokenizer, cfg, pruned.path.name)
    rows = json.loads((RESULTS / "search_table_tiny.json").read_text())["rows"]
    keys = sorted(rows)
    objectives = {"accuracy": [rows[k]["accuracy"] for k in keys],
                  "val_logprob": [rows[k]["curve"][-1]["val_logprob"] for k in keys]}
    result = {"model": "builtin:tiny, 30% Taylor, 6 layers x {4, 8} bits (search_table_tiny.json, 64 configurations)",
              "sensitivity_table": {"seconds_when_measured": table.seconds, "tokens": table.tokens,
                                    "mean_trial_seconds": float(np.mean([rows[k]["seconds"] for k in keys]))},
              "objectives": {}}
    rng = np.random.default_rng(0)
    for kind in ("kl", "fisher"):
        units = UnitTable.from_table(table, len(table.kl), kind)
        idx = [[units.choices.index((int(b), None)) for b in k.split(",")] for k in keys]
        for name, y in objectives.items():
            out = correlations(units, idx, y, rng)
            out["refit_16"] = correlations(units, idx, y, rng, sizes=(16,))["refit_16"]
            out["loo_all"] = loo_spearman(units, idx, y)
            result["objectives"][f"{kind}/{name}"] = {**out, "equal_memory": equal_memory(units, idx, y)}
        result[f"{kind}_per_layer"] = units.score.tolist()
    units = UnitTable.from_table(table, len(table.kl), "kl")
    idx = [[units.choices.index((int(b), None)) for b in k.split(",")] for k in keys]
    rung = [next(c["val_logprob"] for c in rows[k]["curve"] if c["step"] == RUNG_STEP) for k in keys]
    result["fidelity"] = fidelity(units, idx, objectives["val_logprob"], rung, np.random.default_rng(1))
    write_result("predictor_tiny", result)


RUNG_STEP = 10  # tiny.yaml: report_every 10, ASHA grace period 1 report


def fidelity(units, idx: list, final: list, rung: list, rng: np.random.Generator, draws: int = 50, sizes=(4, 8)) -> dict:
    """The `fidelity` study of the module docstring: Spearman (mean ± std over draws) of each way of using the
    stopped trials."""
    from qpruner.predict import PerformanceModel, _spearman

    out = {}
    for k in sizes:
        rhos = {"completed_only": [], "stopped_raw": [], "stopped_shifted": [], "all_completed": []}
        for _ in range(draws):
            started = rng.choice(len(final), 2 * k, replace=False)
            ranked = sorted(started, key=lambda i: -rung[i])  # ASHA keeps the best half at the rung
            done, stopped = ranked[:k], ranked[k:]
            gain = float(np.mean([final[i] - rung[i] for i in done]))
            rest = [i for i in range(len(final)) if i not in set(started)]
            fits = {"completed_only": (done, [final[i] for i in done]),
                    "stopped_raw": (done + stopped, [final[i] for i in done] + [rung[i] for i in stopped]),
                    "stopped_shifted": (done + stopped, [final[i] for i in done] + [rung[i] + gain for i in stopped]),
                    "all_completed": (done + stopped, [final[i] for i in done + stopped])}
            for name, (which, y) in fits.items():
                model = PerformanceModel(units).fit([idx[i] for i in which], y)
                rho = _spearman(model.predict([idx[i] for i in rest])[0], [final[i] for i in rest])
                if rho is not None:
                    rhos[name].append(rho)
        out[f"k={k}"] = {name: {"mean": float(np.mean(v)), "std": float(np.std(v)), "draws": len(v)} for name, v in rhos.items()}
    return out


if __name__ == "__main__":
    main()
