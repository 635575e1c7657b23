"""How well the performance model (qpruner.predict) predicts real SmolLM2-135M trials.

The ground truth is the grouped table (benchmarks/results/smollm2_table_grouped.json, written by
`python -m benchmarks.smollm2_study grouped`): SmolLM2-135M pruned 20% with Taylor, its 30 layers in 5
groups at 4 or 8 bits, each configuration fine-tuned and scored (WikiText-2 perplexity, validation
log-probability, the seven tasks). This script measures the sensitivity table (kl and fisher) of the
same pruned model on the same validation documents, once (cached), and reports Spearman rank
correlations between the model's predictions and the measured objectives:

- from the table alone (no trial);
- after refitting on 4 and on 8 measured configurations (mean over 20 random draws, predicting the rest);
- the same among configurations of equal memory (same number of 8-bit groups; within 5% memory),
  where only the choice of groups differs.

It reads whatever the table holds when it runs; rerun it as the table grows (the table is cached).

    python -m benchmarks.predictor_smollm2 [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, write_result

OBJECTIVES = {"perplexity": "wikitext2_ppl", "val_logprob": "val_logprob", "accuracy": "mean"}  # search.objective: the cell's column


def measured_cells() -> tuple[dict, dict]:
    """(the grouped table's header, {name: cell}) of the configurations measured so far."""
    table = json.loads((RESULTS / "smollm2_table_grouped.json").read_text())
    cells = {k: v for k, v in table["cells"].items() if k != "pruned" and v and "wikitext2_ppl" in v}
    return table, cells


def sensitivity(args) -> tuple[object, float]:
    """The sensitivity table of the grouped table's pruned model, with the study's recipe and validation documents."""
    import torch

    from benchmarks.smollm2_study import GROUPED, Study, grouped_pruned
    from qpruner.plan import resolved_config
    from qpruner.predict import sensitivity_table
    from qpruner.prune import load_pruned

    torch.set_num_threads(args.threads)
    study = Study(GROUPED, args, Path(args.cache))
    path, key = grouped_pruned(study)
    cfg = resolved_config(study.raw(quant={"bits": [4, 8]}, search={"sampler": "model"}))
    model, tokenizer = load_pruned(str(path), dtype=cfg.quant.compute_dtype)
    started = time.perf_counter()
    table = sensitivity_table(model, tokenizer, cfg, key)
    return table, time.perf_counter() - started


def correlations(units, idx: list, y: list, rng: np.random.Generator, draws: int = 20, sizes=(4, 8)) -> dict:
    """Spearman of the table alone, and after refitting on `sizes` configurations (mean over draws, each
    predicting the configurations it was not fitted on)."""
    from qpruner.predict import PerformanceModel, _spearman, prior_spearman

    out = {"n": len(y), "table_alone": prior_spearman(units, idx, y)}
    for k in sizes:
        if len(y) < k + 3:
            out[f"refit_{k}"] = None
            continue
        rhos = []
        for _ in range(draws):
            seen = rng.choice(len(y), k, replace=False)
            rest = [i for i in range(len(y)) if i not in seen]
            model = PerformanceModel(units).fit([idx[i] for i in seen], [y[i] for i in seen])
            rho = _spearman(model.predict([idx[i] for i in rest])[0], [y[i] for i in rest])
            if rho is not None:
                rhos.append(rho)
        out[f"refit_{k}"] = {"mean": float(np.mean(rhos)), "std": float(np.std(rhos)), "draws": len(rhos)} if rhos else None
    return out


def equal_memory(units, idx: list, y: list) -> dict:
    """Table-alone Spearman within each set of configurations with the same number of 8-bit units (their memory
    differs by less than 5%: only the choice of units differs)."""
    from qpruner.predict import prior_spearman

    mem = np.array([units.memory_bytes(i) for i in idx])
    out = {}
    for count in sorted({sum(i) for i in idx}):
        rows = [j for j, i in enumerate(idx) if sum(i) == count]
        if len(rows) >= 3 and np.ptp(mem[rows]) <= 0.05 * mem[rows].min():
            out[f"{count} groups at 8 bits"] = {"n": len(rows), "spearman": prior_spearman(units, [idx[j] for j in rows], [y[j] for j in rows])}
    return out


def main() -> None:
    from qpruner.predict import UnitTable, to_target

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "qpruner"))
    # the grouped table's own settings (benchmarks.smollm2_study's defaults), so the documents and recipe match
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--val-docs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--report-every", type=int, default=5)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--chunks", type=int, default=40)
    parser.add_argument("--search-limit", type=int, default=50)
    args = parser.parse_args()
    header, cells = measured_cells()
    if args.dtype is None:
        args.dtype = header["settings"]["compute_dtype"]
    table, seconds = sensitivity(args)
    trial_s = [c["cell_seconds"] for c in cells.values() if c.get("cell_seconds")]
    result = {"model": "SmolLM2-135M, Taylor 20%, 5 groups x {4, 8} bits (the grouped table)",
              "configurations_measured": len(cells), "configurations_total": 32,
              "sensitivity_table": {"seconds_when_measured": table.seconds, "seconds_now": seconds, "tokens": table.tokens,
                                    "mean_trial_seconds": float(np.mean(trial_s)) if trial_s else None},
              "objectives": {}}
    names = sorted(cells)
    rng = np.random.default_rng(0)
    for kind in ("kl", "fisher"):
        units = UnitTable.from_table(table, 5, kind)
        idx = [[units.choices.index((int(b), None)) for b in name.split("-")] for name in names]
        for objective, column in OBJECTIVES.items():
            y = [float(v) for v in to_target(objective, [cells[n][column] for n in names])]  # what the sampler fits
            result["objectives"][f"{kind}/{objective}"] = {**correlations(units, idx, y, rng), "equal_memory": equal_memory(units, idx, y)}
        result[f"{kind}_per_group"] = units.score.tolist()
    write_result("predictor_smollm2", result)


if __name__ == "__main__":
    main()
