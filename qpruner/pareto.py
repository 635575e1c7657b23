"""Trial records -> an Arrow table (results.parquet), the Pareto front (pareto.parquet), hypervolume, plot.

Objectives: a quality objective (search.objective: accuracy or validation log-prob, max; perplexity, min;
qpruner.results.Objective) and memory_bytes (min). Internally the quality values are oriented so that higher
is better (Objective.oriented); the files keep them in their own units. Only completed trials (final evaluation done) can
be on the front; trials stopped early by ASHA and failed trials stay in results.parquet with their
status. The hypervolume reference point is chosen once per run and stored in the files' metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from qpruner.config import QUALITY, Objective
from qpruner.results import (
    GB,
    accuracy_text,
    merge_previous,
    objective_of,
    reference_rule,
    results_table,
    wider,
    with_reference,
    write_parquet_atomic,
)


def completed_mask(table: pa.Table) -> pa.ChunkedArray:
    """True for rows that can be on the front: status completed, a finite value of the quality objective, memory known."""
    name = objective_of(table).name
    if name not in table.column_names:
        return pa.chunked_array([pa.array([False] * table.num_rows, type=pa.bool_())])
    acc = table[name]
    ok = pc.and_(pc.and_(pc.equal(table["status"], "completed"), pc.is_valid(acc)),
                 pc.and_(pc.invert(pc.is_nan(acc)), pc.is_valid(table["memory_bytes"])))
    return pc.fill_null(ok, False)


def completed(table: pa.Table) -> pa.Table:
    """The rows of `completed_mask`."""
    return table.filter(completed_mask(table))


# ---------------------------------------------------------------------------------------------
# Front and hypervolume.


TIE = 1e-9  # accuracies closer than this are equal: a mean over tasks summed in another order differs in the last bit


def pareto_mask(acc: Sequence[float], mem: Sequence[float]) -> np.ndarray:
    """Non-dominated points (accuracy max, memory min); of exact duplicates only the first is kept.

    Sort by memory ascending (ties: accuracy descending, then index); a point is on the front iff its
    accuracy beats every front point before it by more than TIE, so equal-in-one, worse-in-the-other points
    are dominated, and a dearer point whose accuracy differs from a cheaper one's only by float rounding is
    not on the front.
    """
    acc, mem = np.asarray(acc, dtype=float), np.asarray(mem, dtype=float)
    if acc.size == 0:
        return np.zeros(0, dtype=bool)
    order = np.lexsort((np.arange(len(acc)), -acc, mem))
    mask = np.zeros(len(acc), dtype=bool)
    best = -np.inf  # the best accuracy on the front so far (cheaper points only)
    for i in order:
        if acc[i] > best + TIE:
            mask[i], best = True, acc[i]
    return mask


def hypervolume(acc: Sequence[float], mem: Sequence[float], ref_acc: float, ref_mem: float) -> float:
    """Area of {(a, m): ref_acc <= a <= some point's acc, that point's mem <= m <= ref_mem}.

    Points outside the reference box (accuracy below ref_acc or memory above ref_mem) add nothing.
    """
    acc, mem = np.asarray(acc, dtype=float), np.asarray(mem, dtype=float)
    inside = (acc > ref_acc) & (mem < ref_mem)
    acc, mem = acc[inside], mem[inside]
    if acc.size == 0:
        return 0.0
    front = pareto_mask(acc, mem)
    order = np.argsort(mem[front])
    a, m = acc[front][order], mem[front][order]
    right = np.append(m[1:], ref_mem)  # each front point owns memory [m_i, m_{i+1}) at its accuracy
    return float(np.sum((right - m) * (a - ref_acc)))


def reference_point(table: pa.Table) -> tuple[float, float]:
    """The run's reference point: the one stored in the table's metadata, else `reference_rule`."""
    stored = (table.schema.metadata or {}).get(b"reference_point")
    if stored is not None:
        ref_acc, ref_mem = json.loads(stored)
        return float(ref_acc), float(ref_mem)
    return reference_rule(table)


def normalized(hv: float, ref: tuple[float, float], objective: Objective = QUALITY["accuracy"]) -> float:
    """Hypervolume as a fraction of the reference box (quality ref..its ideal value, e.g. accuracy ref..1, x
    memory 0..ref): scale-free."""
    box = abs(objective.ideal - ref[0]) * ref[1]
    return hv / box if box > 0 else 0.0


def quality_hypervolume(values: Sequence[float], mem: Sequence[float], ref: tuple[float, float], objective: Objective) -> float:
    """`hypervolume` of quality values in their own units (a perplexity's smaller is better)."""
    return hypervolume(objective.oriented(values), mem, float(objective.oriented(ref[0])), ref[1])


def front_table(results: pa.Table) -> pa.Table:
    """The non-dominated completed trials sorted by memory; hypervolume and reference point in metadata."""
    objective = objective_of(results)
    done = completed(results)
    acc, mem = done[objective.name].to_numpy(zero_copy_only=False), done["memory_bytes"].to_numpy(zero_copy_only=False)
    front = done.filter(pa.array(pareto_mask(objective.oriented(acc), mem), type=pa.bool_())).sort_by("memory_bytes")
    ref = reference_point(results)
    hv = quality_hypervolume(acc, mem, ref, objective)
    table = with_reference(front, ref, objective.name)
    meta = dict(table.schema.metadata)
    meta.update({b"hypervolume": repr(hv).encode(), b"hypervolume_normalized": repr(normalized(hv, ref, objective)).encode(),
                 b"n_completed": str(done.num_rows).encode()})
    return table.replace_schema_metadata(meta)


def hypervolume_curve(results: pa.Table, ref: Optional[tuple[float, float]] = None) -> list[tuple[int, float, float]]:
    """(completed trials so far, summed seconds of every trial finished so far, hypervolume) per completion.

    Trials are ordered by finish time (started_at + wall_seconds); stopped-early and failed trials add
    their seconds but no point, so the curve shows what the search's compute bought.
    """
    ref = ref or reference_point(results)
    objective = objective_of(results)
    rows = results.select(["memory_bytes", "started_at", "wall_seconds"]).to_pylist()
    values = results[objective.name].to_pylist() if objective.name in results.column_names else [None] * len(rows)
    for row, value, ok in zip(rows, values, completed_mask(results).to_pylist()):
        row.update(ok=ok, value=value)
    rows.sort(key=lambda r: (r["started_at"] or 0.0) + (r["wall_seconds"] or 0.0))
    curve, seconds, acc, mem = [], 0.0, [], []
    for r in rows:
        seconds += r["wall_seconds"] or 0.0
        if r["ok"]:
            acc.append(r["value"])
            mem.append(r["memory_bytes"])
            curve.append((len(acc), seconds, quality_hypervolume(acc, mem, ref, objective)))
    return curve


# ---------------------------------------------------------------------------------------------
# Files.


def write_results(records: Sequence[dict], out_dir: Path, baselines: Optional[dict[str, tuple[int, float]]] = None,
                  plot: bool = True, objective: Optional[str] = None) -> tuple[pa.Table, pa.Table]:
    """results.parquet and pareto.parquet (and pareto.png when `plot`) in out_dir, merged with the
    results file already there (see merge_previous); the stored reference point is kept unless a
    trial now needs a larger box. `objective` is search.objective (default: the existing file's, else
    accuracy). Temp files of an earlier killed write are removed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".*.parquet.*.tmp"):  # left by a writer killed mid-write; one writer per run
        stale.unlink(missing_ok=True)
    previous = pq.read_table(out_dir / "results.parquet") if (out_dir / "results.parquet").is_file() else None
    objective = objective or (objective_of(previous).name if previous is not None else "accuracy")
    results = results_table(records, objective)
    ref = reference_rule(results)
    if previous is not None:
        results = merge_previous(results, previous)
        ref = wider(reference_point(previous), reference_rule(results), QUALITY[objective])
    results = with_reference(results, ref)
    front = front_table(results)
    write_parquet_atomic(results, out_dir / "results.parquet")
    write_parquet_atomic(front, out_dir / "pareto.parquet")
    if plot:
        plot_front(results, front, out_dir / "pareto.png", baselines)
    return results, front


# ---------------------------------------------------------------------------------------------
# Terminal table and plot.


def compact_bits(bits: Sequence[int]) -> str:
    """Bits per layer for tables: groups of four digits ([4,8,4,8,8,8] -> '4848 88'), or run-length
    ('16x3 4 8x2') when some width has two digits."""
    if all(b < 10 for b in bits):
        digits = "".join(str(b) for b in bits)
        return " ".join(digits[i : i + 4] for i in range(0, len(digits), 4))
    runs: list[list[int]] = []
    for b in bits:
        if runs and runs[-1][0] == b:
            runs[-1][1] += 1
        else:
            runs.append([b, 1])
    return " ".join(f"{b}x{n}" if n > 1 else str(b) for b, n in runs)


def print_front(front: pa.Table, console=None) -> None:
    """The front in the terminal, readable at 80 columns and in a log file: trial, bits per layer (folded onto
    more lines when long, never cut), accuracy ± standard error, the perplexity of each perplexity task in
    eval.tasks, memory. Per-task accuracies are in report.md."""
    from rich.console import Console
    from rich.table import Table

    objective = objective_of(front)
    ppl = [c for c in front.column_names if c.startswith("ppl_")]
    table = Table(title=f"Pareto front ({front.num_rows} configurations; {objective.name} {objective.mode}, memory min)",
                  title_justify="left")
    table.add_column("trial", no_wrap=True)
    table.add_column("bits per layer", overflow="fold")
    if objective.name == "val_logprob":
        table.add_column("val log-prob", justify="right", no_wrap=True)
    table.add_column("accuracy ± se", justify="right", no_wrap=True)
    for column in ppl:
        table.add_column(f"{column.removeprefix('ppl_')} ppl", justify="right", overflow="fold")
    table.add_column("memory GB", justify="right", no_wrap=True)
    for r in front.to_pylist():
        first = [f"{r['val_logprob']:.4f}"] if objective.name == "val_logprob" else []
        table.add_row(r["trial_id"], compact_bits(r["bits"]), *first, accuracy_text(r),
                      *[f"{r[c]:.4g}" if r[c] is not None else "-" for c in ppl], f"{r['memory_gb']:.4f}")
    (console or Console()).print(table)


def uniform_baselines(results: pa.Table) -> dict[str, tuple[int, float]]:
    """Completed trials whose layers all share one bit-width: {'uniform-4': (memory bytes, quality objective)}.
    The earliest such trial per width is the baseline."""
    name = objective_of(results).name
    out: dict[str, tuple[int, float]] = {}
    for r in completed(results).to_pylist():
        if r["bits"] and len(set(r["bits"])) == 1:
            out.setdefault(f"uniform-{r['bits'][0]}", (r["memory_bytes"], r[name]))
    return out


def memory_label(results: pa.Table) -> str:
    """Axis label saying whether the memory objective was measured on the GPU or estimated."""
    sources = {s for s in results["memory_source"].to_pylist() if s}
    if sources == {"measured"}:
        return "peak fine-tuning GPU memory, measured (GB)"
    if sources == {"estimated"}:
        return "peak fine-tuning memory, estimated (GB)"
    return "peak fine-tuning memory (GB; measured where available, else estimated)"


MIN_ACCURACY_SPAN = 0.10  # the accuracy axis spans at least 10 points ...
MIN_MEMORY_SPAN = 0.25  # ... and the memory axis at least a quarter of the largest memory, so that a
# 0.006 accuracy gap or a 1.6% memory spread looks as small as it is


def honest_range(lo: float, hi: float, min_span: float, floor: Optional[float] = None,
                 ceil: Optional[float] = None) -> tuple[float, float]:
    """Axis limits around [lo, hi] with 8% padding, widened about the middle to at least `min_span` (shifted to
    stay within [floor, ceil])."""
    pad = 0.08 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    if hi - lo < min_span:
        mid = (lo + hi) / 2
        lo, hi = mid - min_span / 2, mid + min_span / 2
    if floor is not None and lo < floor:
        lo, hi = floor, hi + (floor - lo)
    if ceil is not None and hi > ceil:
        lo, hi = lo - (hi - ceil), ceil
        lo = lo if floor is None else max(lo, floor)
    return lo, hi


def plot_front(results: pa.Table, front: pa.Table, path: Path,
               baselines: Optional[dict[str, tuple[int, float]]] = None, predicted: Optional[list[dict]] = None) -> None:
    """The quality objective (accuracy by default) vs memory: completed trials grey with their 95% intervals
    (accuracy), stopped-early ones as ticks on the memory axis (they have no final value), failed ones omitted,
    the front as a red step line, baselines as stars, and the performance model's predicted front
    (qpruner.predict) dashed with a ±1 standard deviation band. The accuracy axis spans at least
    MIN_ACCURACY_SPAN and the memory axis MIN_MEMORY_SPAN, so noise does not fill the plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.transforms as mtransforms
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    objective = objective_of(results)
    baselines = uniform_baselines(results) if baselines is None else baselines
    baselines = {k: v for k, v in baselines.items() if v[1] is not None}
    rows = results.select(["status", "memory_gb"]).to_pylist()
    done = completed(results)
    early = [r["memory_gb"] for r in rows if r["status"] == "stopped_early" and r["memory_gb"] is not None]
    fig, ax = plt.subplots(figsize=(8.5, 4.8), dpi=130)
    values = done[objective.name].to_pylist()
    ax.scatter(done["memory_gb"].to_pylist(), values, c="0.6", s=28, label="completed trials")
    se = [v if v is not None else 0.0 for v in done["accuracy_stderr"].to_pylist()] \
        if objective.name == "accuracy" and "accuracy_stderr" in done.column_names else []
    if any(se):
        ax.errorbar(done["memory_gb"].to_pylist(), values, yerr=[1.96 * v for v in se], fmt="none",
                    ecolor="0.7", elinewidth=1, capsize=2, zorder=1, label="95% interval (±1.96 standard errors)")
    if early:
        rug = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
        ax.scatter(early, [0.03] * len(early), transform=rug, marker="|", s=160, c="0.45",
                   label=f"stopped early (no final {objective.name})")
    f_mem, f_acc = front["memory_gb"].to_pylist(), front[objective.name].to_pylist()
    xs = done["memory_gb"].to_pylist() + early + [b[0] / GB for b in baselines.values()]
    if f_mem:
        ax.step(f_mem + [max(xs)], f_acc + [f_acc[-1]], where="post", c="tab:red", lw=1.6, zorder=2)
        ax.scatter(f_mem, f_acc, c="tab:red", s=48, zorder=3, label=f"Pareto front ({len(f_mem)})")
    p_acc = plot_predicted(ax, predicted, xs)
    for name, (mem, acc) in sorted(baselines.items(), key=lambda kv: kv[1][0]):
        ax.scatter([mem / GB], [acc], marker="*", s=200, c="tab:blue", edgecolors="white", zorder=4)
        near_right = xs and mem / GB > min(xs) + 0.8 * (max(xs) - min(xs))  # keep the label inside the axes
        ax.annotate(name, (mem / GB, acc), textcoords="offset points", xytext=(0, 9), ha="right" if near_right else "center",
                    fontsize=10, color="tab:blue", fontweight="bold")
    if baselines:
        ax.scatter([], [], marker="*", s=120, c="tab:blue", label="uniform-precision baselines")
    if xs:  # the rug is not in data coordinates on y, so set the memory range by hand
        ax.set_xlim(*honest_range(min(xs), max(xs), MIN_MEMORY_SPAN * max(xs), floor=0.0))
    ys = ([a - 1.96 * e for a, e in zip(values, se)] + [a + 1.96 * e for a, e in zip(values, se)] + values + f_acc
          + [b[1] for b in baselines.values()] + p_acc)
    if ys and objective.name == "accuracy":
        ax.set_ylim(*honest_range(min(ys), max(ys), MIN_ACCURACY_SPAN, floor=0.0, ceil=1.0))
    elif ys:
        ax.set_ylim(*honest_range(min(ys), max(ys), 0.02 * max(abs(y) for y in ys)))
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:.4g}"))
    ax.set_xlabel(memory_label(results))
    ax.set_ylabel(objective.label + (" (lower is better)" if objective.mode == "min" else ""))
    ax.set_title(f"qpruner: {objective.name} vs memory of every trial")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_predicted(ax, predicted: Optional[list[dict]], xs: list[float]) -> list[float]:
    """The predicted front (rows of predicted_front.parquet) as a dashed step line with its ±1 standard
    deviation band (`predicted_low`..`predicted_high`, in the objective's units), within the measured memory
    range; its plotted values (for the axis range)."""
    rows = [r for r in predicted or [] if r.get("predicted_std") is not None and (not xs or r["memory_gb"] <= max(xs))]
    if not rows:
        return []
    mem = [r["memory_gb"] for r in rows]
    value = np.array([r["predicted"] for r in rows])
    low, high = np.array([r["predicted_low"] for r in rows]), np.array([r["predicted_high"] for r in rows])
    ax.step(mem, value, where="post", ls="--", c="tab:green", lw=1.3, zorder=2, label=f"predicted front ({len(rows)})")
    ax.fill_between(mem, low, high, step="post", color="tab:green", alpha=0.12, zorder=1)
    return list(low) + list(high)

