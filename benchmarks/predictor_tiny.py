"""How well the performance model (qpruner.predict) predicts the tiny model's 64-configuration table.

Ground truth: benchmarks/results/search_table_tiny.json (every 4/8-bit vector of builtin:tiny pruned 30%,
trained and scored with tune_configs/tiny.yaml's trial settings, written by benchmarks.search_efficiency).
The sensitivity table (kl and fisher) is measured on the same pruned model (cached). Spearman rank
correlations of the model's predictions with the measured accuracy and validation log-probability:
from the table alone, after refitting on 4, 8 and 16 configurations (20 random draws each, predicting
the rest), leave-one-out over all 64, and among configurations of equal memory.

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
    write_result("predictor_tiny", result)


if __name__ == "__main__":
    main()
