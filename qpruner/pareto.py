"""Trial records -> an Arrow table (results.parquet), the Pareto front (pareto.parquet), hypervolume, plot.

Objectives: accuracy (max) and memory (min). Only completed trials (final evaluation done) can be on
the front; trials stopped early by ASHA and failed trials are kept in results.parquet with their status.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

FIXED = [
    ("trial_id", pa.string()), ("status", pa.string()), ("bits", pa.list_(pa.int8())), ("ranks", pa.list_(pa.int16())),
    ("accuracy", pa.float64()), ("val_acc", pa.float64()), ("memory_bytes", pa.int64()), ("memory_gb", pa.float64()),
    ("memory_source", pa.string()), ("weight_bytes", pa.int64()), ("lora_bytes", pa.int64()),
    ("peak_estimate_bytes", pa.int64()), ("peak_measured_bytes", pa.int64()), ("train_loss", pa.float64()),
    ("stopped_early", pa.bool_()), ("iterations", pa.int32()), ("steps", pa.int32()), ("max_steps", pa.int32()),
    ("wall_seconds", pa.float64()), ("quantize_s", pa.float64()), ("loftq_s", pa.float64()), ("finetune_s", pa.float64()),
    ("eval_s", pa.float64()), ("error", pa.string()), ("started_at", pa.float64()),
]


def results_table(records: Sequence[dict]) -> pa.Table:
    """One row per trial with a fixed schema plus one `acc_<task>` column per task seen; sorted by start."""
    records = sorted(records, key=lambda r: r.get("started_at") or 0.0)
    tasks = sorted({t for r in records for t in (r.get("task_acc") or {})})
    columns = {}
    for name, typ in FIXED:
        if name == "stopped_early":
            values = [r.get("status") == "stopped_early" for r in records]
        elif name == "memory_gb":
            values = [None if r.get("memory_bytes") is None else r["memory_bytes"] / 1024**3 for r in records]
        elif name in ("quantize_s", "loftq_s", "finetune_s", "eval_s"):
            values = [(r.get("timings") or {}).get(name) for r in records]
        else:
            values = [r.get(name) for r in records]
        columns[name] = pa.array(values, type=typ)
    for task in tasks:
        columns[f"acc_{task}"] = pa.array([(r.get("task_acc") or {}).get(task) for r in records], type=pa.float64())
    meta = {"objectives": json.dumps({"accuracy": "max", "memory_bytes": "min"})}
    return pa.table(columns).replace_schema_metadata(meta)


def pareto_mask(acc: Sequence[float], mem: Sequence[float]) -> np.ndarray:
    """Non-dominated points (accuracy max, memory min); of exact duplicates the first is kept.

    Sweep by memory ascending (accuracy descending on ties): a point is on the front iff its
    accuracy beats every point with less or equal memory seen before it.
    """
    acc, mem = np.asarray(acc, dtype=float), np.asarray(mem, dtype=float)
    order = np.lexsort((np.arange(len(acc)), -acc, mem))
    mask = np.zeros(len(acc), dtype=bool)
    best = -np.inf
    for i in order:
        if acc[i] > best:
            mask[i] = True
            best = acc[i]
    return mask


def hypervolume(acc: Sequence[float], mem: Sequence[float], ref_acc: float, ref_mem: float) -> float:
    """Area dominated by the points inside the reference box (accuracy >= ref_acc, memory <= ref_mem)."""
    acc, mem = np.asarray(acc, dtype=float), np.asarray(mem, dtype=float)
    inside = (acc > ref_acc) & (mem < ref_mem)
    acc, mem = acc[inside], mem[inside]
    if not len(acc):
        return 0.0
    front = pareto_mask(acc, mem)
    a, m = acc[front], mem[front]
    order = np.argsort(m)
    a, m = a[order], m[order]
    edges = np.append(m[1:], ref_mem)  # each front point owns memory [m_i, m_{i+1}) at its accuracy
    return float(np.sum((edges - m) * (a - ref_acc)))


def completed(table: pa.Table) -> pa.Table:
    mask = pc.and_(pc.equal(table["status"], "completed"), pc.is_valid(table["accuracy"]))
    return table.filter(mask)


def reference_point(table: pa.Table) -> tuple[float, float]:
    """Accuracy 0 and 1.1 x the largest memory among completed trials: every completed trial counts."""
    done = completed(table)
    top = max(done["memory_bytes"].to_pylist(), default=1)
    return 0.0, 1.1 * float(top)


def front_table(results: pa.Table) -> pa.Table:
    """The non-dominated completed trials, by memory, with the hypervolume and reference in metadata."""
    done = completed(results)
    acc, mem = done["accuracy"].to_numpy(), done["memory_bytes"].to_numpy()
    front = done.filter(pa.array(pareto_mask(acc, mem))) if len(done) else done
    front = front.sort_by("memory_bytes")
    ref = reference_point(results)
    meta = dict(results.schema.metadata or {})
    meta.update({b"hypervolume": str(hypervolume(acc, mem, *ref)).encode(), b"reference_point": json.dumps(ref).encode()})
    return front.replace_schema_metadata(meta)


def hypervolume_curve(results: pa.Table, ref: Optional[tuple[float, float]] = None) -> list[tuple[int, float, float]]:
    """(completed trials so far, their summed trial seconds, hypervolume) in order of completion."""
    ref = ref or reference_point(results)
    rows = sorted(completed(results).to_pylist(), key=lambda r: (r["started_at"] or 0) + (r["wall_seconds"] or 0))
    curve, seconds = [], 0.0
    for n in range(1, len(rows) + 1):
        seconds += rows[n - 1]["wall_seconds"] or 0.0
        sub = rows[:n]
        curve.append((n, seconds, hypervolume([r["accuracy"] for r in sub], [r["memory_bytes"] for r in sub], *ref)))
    return curve


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write beside the target, fsync, then rename: a kill never leaves a truncated file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def merge_previous(results: pa.Table, previous: pa.Table) -> pa.Table:
    """Keep rows of an earlier results file that this run no longer knows, or knows only as unfinished:
    a trial completed before a crash stays, once, with its original metrics."""
    new = {r["trial_id"]: r["status"] for r in results.select(["trial_id", "status"]).to_pylist()}
    keep_old = [r["trial_id"] for r in previous.select(["trial_id", "status"]).to_pylist()
                if r["trial_id"] not in new or (r["status"] == "completed" and new[r["trial_id"]] != "completed")]
    if not keep_old:
        return results
    old = previous.filter(pc.is_in(previous["trial_id"], pa.array(keep_old)))
    fresh = results.filter(pc.invert(pc.is_in(results["trial_id"], pa.array(keep_old))))
    merged = pa.concat_tables([fresh, old], promote_options="default")
    return merged.sort_by("started_at").replace_schema_metadata(results.schema.metadata)


def write_results(records: Sequence[dict], out_dir: Path, plot: bool = True) -> tuple[pa.Table, pa.Table]:
    """results.parquet and pareto.parquet (and pareto.png when `plot`) in out_dir, merged with the
    results file already there (see merge_previous)."""
    out_dir = Path(out_dir)
    results = results_table(records)
    if (out_dir / "results.parquet").is_file():
        results = merge_previous(results, pq.read_table(out_dir / "results.parquet"))
    front = front_table(results)
    write_parquet_atomic(results, out_dir / "results.parquet")
    write_parquet_atomic(front, out_dir / "pareto.parquet")
    if plot:
        plot_front(results, front, out_dir / "pareto.png")
    return results, front


def compact_bits(bits: Sequence[int]) -> str:
    """Run-length form for tables: [4,4,4,8,8] -> '4x3 8x2'."""
    runs: list[list[int]] = []
    for b in bits:
        if runs and runs[-1][0] == b:
            runs[-1][1] += 1
        else:
            runs.append([b, 1])
    return " ".join(f"{b}x{n}" if n > 1 else str(b) for b, n in runs)


def print_front(front: pa.Table, console=None) -> None:
    """The front as a rich table in the terminal."""
    from rich.console import Console
    from rich.table import Table

    tasks = [c for c in front.column_names if c.startswith("acc_")]
    table = Table(title=f"Pareto front ({front.num_rows} configurations)")
    for col in ["trial", "bits per layer", "accuracy", *[t[4:] for t in tasks], "memory GB"]:
        table.add_column(col)
    for r in front.to_pylist():
        table.add_row(r["trial_id"], compact_bits(r["bits"]), f"{r['accuracy']:.3f}",
                      *[f"{r[t]:.3f}" if r[t] is not None else "-" for t in tasks], f"{r['memory_gb']:.4f}")
    (console or Console()).print(table)


def uniform_baselines(results: pa.Table) -> dict[str, tuple[float, float]]:
    """Completed trials whose layers all share one bit-width: {'uniform-4': (memory GB, accuracy)}."""
    out = {}
    for r in completed(results).to_pylist():
        if len(set(r["bits"])) == 1:
            out[f"uniform-{r['bits'][0]}"] = (r["memory_gb"], r["accuracy"])
    return out


def plot_front(results: pa.Table, front: pa.Table, path: Path) -> None:
    """Accuracy vs memory: all trials grey (stopped early hollow), the front as a step line, baselines marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    rows = results.to_pylist()
    done = [r for r in rows if r["status"] == "completed" and r["accuracy"] is not None]
    early = [r for r in rows if r["status"] == "stopped_early" and r["val_acc"] is not None and r["memory_gb"] is not None]
    ax.scatter([r["memory_gb"] for r in done], [r["accuracy"] for r in done], c="0.6", s=30, label="completed trials")
    if early:
        ax.scatter([r["memory_gb"] for r in early], [r["val_acc"] for r in early], facecolors="none", edgecolors="0.6",
                   s=30, label="stopped early (validation acc)")
    f = front.to_pylist()
    if f:
        ax.step([r["memory_gb"] for r in f], [r["accuracy"] for r in f], where="post", c="tab:red", lw=1.5)
        ax.scatter([r["memory_gb"] for r in f], [r["accuracy"] for r in f], c="tab:red", s=45, zorder=3, label="Pareto front")
    for name, (mem, acc) in sorted(uniform_baselines(results).items()):
        ax.scatter([mem], [acc], marker="*", s=160, c="tab:blue", zorder=4)
        ax.annotate(name, (mem, acc), textcoords="offset points", xytext=(6, -12), fontsize=9, color="tab:blue")
    ax.set_xlabel("fine-tuning memory (GB; measured peak on GPU, else estimate)")
    ax.set_ylabel("mean zero-shot accuracy")
    ax.set_title("qpruner search: accuracy vs memory")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
