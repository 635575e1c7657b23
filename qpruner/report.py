"""`python -m qpruner.report RUN_DIR` (also written at the end of every run): report.md and its plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import pyarrow.parquet as pq

from qpruner.errors import QPrunerError
from qpruner.pareto import compact_bits, completed, front_table, hypervolume_curve, plot_front, reference_point


def write_report(run_dir: str | Path) -> Path:
    """report.md + pareto.png, hypervolume.png and bits_heatmap.png from RUN_DIR/results.parquet."""
    run = Path(run_dir)
    if not (run / "results.parquet").is_file():
        raise QPrunerError(f"{run}: no results.parquet; give the --out folder of a qpruner.tune run")
    results = pq.read_table(run / "results.parquet")
    front = front_table(results)
    plot_front(results, front, run / "pareto.png")
    curve = hypervolume_curve(results, reference_point(results))
    _plot_hypervolume(curve, run / "hypervolume.png")
    _plot_bits(front.to_pylist(), run / "bits_heatmap.png")
    (run / "report.md").write_text(_markdown(run, results, front, curve))
    return run / "report.md"


def _markdown(run: Path, results, front, curve) -> str:
    rows = results.to_pylist()
    tasks = [c for c in results.column_names if c.startswith("acc_")]
    lines = [f"# qpruner run: {run.name}", ""]
    done = [r for r in rows if r["status"] == "completed"]
    early = [r for r in rows if r["status"] == "stopped_early"]
    failed = [r for r in rows if r["status"] == "failed"]
    seconds = sum(r["wall_seconds"] or 0 for r in rows)
    saved = sum(max((r["max_steps"] or 0) - (r["steps"] or 0), 0) for r in early)
    lines += [
        f"Trials: {len(rows)} ({len(done)} completed, {len(early)} stopped early by ASHA, {len(failed)} failed). "
        f"Trial time: {seconds / 3600:.2f} trial-hours. Fine-tuning steps saved by early stopping: {saved}.",
        f"Hypervolume of the front: {curve[-1][2] if curve else 0:.4g} (reference point: accuracy 0, "
        f"memory {json.loads(front.schema.metadata[b'reference_point'])[1] / 1024**3:.4f} GB).",
        "", "![accuracy vs memory](pareto.png)", "", "## Pareto front", "",
    ]
    lines += _table(front.to_pylist(), tasks)
    baselines = [r for r in done if len(set(r["bits"])) == 1]
    best_mixed = sorted((r for r in front.to_pylist() if len(set(r["bits"])) > 1), key=lambda r: -r["accuracy"])[:3]
    lines += ["", "## Comparison (the paper's rows)", ""]
    lines += _table(sorted(baselines, key=lambda r: r["bits"][0]) + best_mixed, tasks, label=True)
    lines += ["", "![hypervolume vs trials](hypervolume.png)", "", "![bits per layer on the front](bits_heatmap.png)", ""]
    if failed:
        lines += ["## Failed trials", ""] + [f"- `{r['trial_id']}` bits {compact_bits(r['bits'])}: {r['error']}" for r in failed]
    if (run / "config.yaml").is_file():
        lines += ["", "## Config", "", "```yaml", (run / "config.yaml").read_text().rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _table(rows: Sequence[dict], tasks: list[str], label: bool = False) -> list[str]:
    head = (["row"] if label else []) + ["trial", "bits per layer", "accuracy", *[t[4:] for t in tasks], "memory GB"]
    out = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        name = ([f"uniform-{r['bits'][0]} {'LoRA' if r['bits'][0] == 16 else 'LoftQ'}" if len(set(r["bits"])) == 1 else "best mixed"]
                if label else [])
        cells = [*name, r["trial_id"], compact_bits(r["bits"]), f"{r['accuracy']:.3f}",
                 *[f"{r[t]:.3f}" if r[t] is not None else "-" for t in tasks], f"{r['memory_gb']:.4f}"]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _plot_hypervolume(curve, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=120)
    if curve:
        ax.plot([c[0] for c in curve], [c[2] for c in curve], marker="o")
    ax.set_xlabel("completed trials")
    ax.set_ylabel("hypervolume (accuracy x bytes)")
    ax.set_title("search progress")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_bits(front: list[dict], path: Path) -> None:
    """Front configurations x decoder layers, coloured by bits: which layers keep high precision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap

    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.4 * max(len(front), 1)), dpi=120)
    if front:
        grid = np.array([r["bits"] for r in front])
        levels = sorted(set(grid.flatten().tolist()))
        cmap = ListedColormap(["#9ecae1", "#3182bd", "#08306b"][: len(levels)])
        ax.imshow(np.searchsorted(levels, grid), cmap=cmap, aspect="auto", vmin=0, vmax=max(len(levels) - 1, 1))
        for (i, j), b in np.ndenumerate(grid):
            ax.text(j, i, str(b), ha="center", va="center", color="white" if b == levels[-1] else "black", fontsize=8)
        ax.set_yticks(range(len(front)), [f"{r['trial_id']} ({r['memory_gb']:.4f} GB)" for r in front], fontsize=8)
        ax.set_xticks(range(grid.shape[1]))
    ax.set_xlabel("decoder layer")
    ax.set_title("bits per layer on the Pareto front")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m qpruner.report", description="Write report.md and plots for a run.")
    parser.add_argument("run_dir")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    print(write_report(args.run_dir))
    return 0


if __name__ == "__main__":
    from qpruner.cli import run_cli

    run_cli(main)
