"""Pareto front and hypervolume against brute force on generated data; the results table's fixed
schema, Parquet round trips, atomic writes and the run's fixed reference point."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from qpruner.pareto import (
    TIE,
    compact_bits,
    front_table,
    hypervolume,
    hypervolume_curve,
    pareto_mask,
    print_front,
    reference_point,
    uniform_baselines,
    write_results,
)
from qpruner.results import FIXED, results_table, write_parquet_atomic

ROOT = Path(__file__).resolve().parents[1]

grid_points = st.lists(st.tuples(st.integers(0, 20), st.integers(1, 20)), min_size=1, max_size=25)
float_points = st.lists(st.tuples(st.floats(0, 1), st.floats(0, 100)), min_size=0, max_size=30)


def dominates(p, q) -> bool:
    """p is at least as good in both objectives (acc max, mem min) and not equal."""
    return p[0] >= q[0] and p[1] <= q[1] and p != q


# ---------------------------------------------------------------------------------------------
# Front.


@given(st.one_of(grid_points, float_points))
def test_front_points_are_non_dominated_and_cover_the_rest(pts):
    mask = pareto_mask([p[0] for p in pts], [p[1] for p in pts])
    front = [p for p, keep in zip(pts, mask) if keep]
    for p in front:
        assert not any(dominates(q, p) for q in pts)
    for i, p in enumerate(pts):
        if not mask[i]:  # dominated by a front point, or equal to one up to TIE in accuracy (a float-rounding tie)
            assert any(q[1] <= p[1] and q[0] >= p[0] - TIE for q in front)
    assert len(set(front)) == len(front)  # duplicates kept once


@given(grid_points)
def test_front_tie_rules(pts):
    mask = pareto_mask([p[0] for p in pts], [p[1] for p in pts])
    for i, p in enumerate(pts):
        expected = not any(dominates(q, p) for q in pts) and p not in pts[:i]  # first duplicate wins
        assert mask[i] == expected


def test_front_weak_domination_and_duplicates():
    acc = [0.5, 0.5, 0.6, 0.6, 0.4]
    mem = [10, 12, 12, 12, 5]
    # (0.5, 12) is weakly dominated by (0.5, 10) and by (0.6, 12); the second (0.6, 12) is a duplicate
    assert pareto_mask(acc, mem).tolist() == [True, False, True, False, True]
    assert pareto_mask([], []).tolist() == []


def test_front_is_fast_on_many_points():
    rng = np.random.default_rng(0)
    acc, mem = rng.random(200_000), rng.random(200_000)
    start = time.perf_counter()
    mask = pareto_mask(acc, mem)
    assert time.perf_counter() - start < 2.0
    front_mem = np.sort(mem[mask])
    assert np.all(np.diff(acc[mask][np.argsort(mem[mask])]) > 0) and mask.sum() == len(front_mem)


# ---------------------------------------------------------------------------------------------
# Hypervolume.


def grid_hv(pts, ref_acc: int, ref_mem: int) -> float:
    """Unit cells of the integer grid covered by some point's box [mem, ref_mem] x [ref_acc, acc]."""
    cells = 0
    for a, m in itertools.product(range(ref_acc, 21), range(0, ref_mem)):
        if any(p[0] >= a + 1 and p[1] <= m for p in pts):
            cells += 1
    return float(cells)


def union_hv(pts, ref_acc: float, ref_mem: float) -> float:
    """Area of the union of the points' boxes by coordinate compression (no front computed)."""
    boxes = [(m, a) for a, m in pts if a > ref_acc and m < ref_mem]
    xs = sorted({m for m, _ in boxes} | {ref_mem})
    ys = sorted({a for _, a in boxes} | {ref_acc})
    area = 0.0
    for x0, x1 in zip(xs, xs[1:]):
        for y0, y1 in zip(ys, ys[1:]):
            if any(m <= x0 and a >= y1 for m, a in boxes):
                area += (x1 - x0) * (y1 - y0)
    return area


@settings(max_examples=60)
@given(grid_points, st.integers(0, 10), st.integers(5, 21))
def test_hypervolume_matches_grid_count(pts, ref_acc, ref_mem):
    assert hypervolume([p[0] for p in pts], [p[1] for p in pts], ref_acc, ref_mem) == grid_hv(pts, ref_acc, ref_mem)


@settings(max_examples=80)
@given(float_points, st.floats(0, 0.5), st.floats(1, 120))
def test_hypervolume_matches_union_of_boxes(pts, ref_acc, ref_mem):
    hv = hypervolume([p[0] for p in pts], [p[1] for p in pts], ref_acc, ref_mem)
    assert math.isclose(hv, union_hv(pts, ref_acc, ref_mem), rel_tol=1e-9, abs_tol=1e-9)


@settings(max_examples=80)
@given(float_points, st.tuples(st.floats(0, 1), st.floats(0, 100)), st.randoms(use_true_random=False))
def test_hypervolume_monotone_order_free_and_ignores_outside_points(pts, extra, rnd):
    acc, mem = [p[0] for p in pts], [p[1] for p in pts]
    hv = hypervolume(acc, mem, 0.0, 110.0)
    assert hypervolume(acc + [extra[0]], mem + [extra[1]], 0.0, 110.0) >= hv - 1e-12
    shuffled = list(pts)
    rnd.shuffle(shuffled)
    assert math.isclose(hypervolume([p[0] for p in shuffled], [p[1] for p in shuffled], 0.0, 110.0), hv,
                        rel_tol=1e-12, abs_tol=1e-12)
    assert hypervolume(acc + [1.0], mem + [150.0], 0.0, 110.0) == hv  # memory beyond the reference
    assert 0.0 <= hv <= 110.0


# ---------------------------------------------------------------------------------------------
# Results table.


def record(i: int, status: str, bits, acc=None, mem=None, tasks=None, **extra) -> dict:
    """A trial record as the Tune driver writes it."""
    rec = {"trial_id": f"t{i}", "status": status, "bits": bits, "ranks": None, "accuracy": acc,
           "task_acc": tasks if tasks is not None else ({"arc_easy": acc, "piqa": acc} if acc is not None else {}),
           "task_acc_norm": {}, "val_acc": 0.5, "memory_bytes": mem, "memory_source": "estimated",
           "weight_bytes": mem and mem // 2, "lora_bytes": 1000, "peak_estimate_bytes": mem,
           "peak_measured_bytes": None, "train_loss": 1.0, "iterations": 4, "steps": 40, "max_steps": 40,
           "wall_seconds": 10.0, "timings": {"quantize_s": 1.0, "loftq_s": 2.0, "finetune_s": 5.0, "eval_s": 1.5},
           "error": None, "started_at": 1000.0 + i, "config": {"b0": bits[0]}}
    rec.update(extra)
    return rec


def sample_records() -> list[dict]:
    return [record(3, "completed", [4, 8], 0.72, 150), record(0, "completed", [4, 4], 0.60, 100),
            record(1, "completed", [8, 8], 0.70, 200), record(2, "stopped_early", [8, 4], None, 160, steps=10, val_acc=0.9),
            record(4, "failed", [8, 4], None, None, error="CUDA out of memory", steps=0),
            record(5, "completed", [8, 4], 0.65, 160), record(6, "completed", [4, 8], float("nan"), 90)]


EXPECTED_FIXED = [
    ("trial_id", "string"), ("status", "string"), ("bits", "list<element: int8>"), ("ranks", "list<element: int16>"),
    ("accuracy", "double"), ("accuracy_stderr", "double"), ("perplexity", "double"), ("val_logprob", "double"),
    ("val_acc", "double"), ("memory_bytes", "int64"), ("memory_gb", "double"),
    ("memory_source", "string"), ("memory_measured", "string"), ("weight_bytes", "int64"), ("lora_bytes", "int64"), ("peak_estimate_bytes", "int64"),
    ("peak_measured_bytes", "int64"), ("train_loss", "double"), ("stopped_early", "bool"), ("iterations", "int32"),
    ("steps", "int32"), ("max_steps", "int32"), ("wall_seconds", "double"), ("quantize_s", "double"),
    ("loftq_s", "double"), ("finetune_s", "double"), ("eval_s", "double"), ("error", "string"), ("gpu_fraction", "double"),
    ("started_at", "double"),
    ("subtask_scores", "string"),
]


def test_perplexity_and_document_counts_get_their_own_columns_and_read_back():
    """A perplexity task in eval.tasks reaches results.parquet (ppl_<task>), the table labels and a resumed trial."""
    from qpruner.results import column_label, metric_columns, recorded_result

    rec = {**record(0, "completed", [4, 8], 0.6, 100), "task_ppl": {"wikitext": 31.5}, "task_docs": {"boolq": 36, "wikitext": 5},
           "subtask_acc": {"mmlu_anatomy": 0.25}}
    table = results_table([rec])
    assert table["ppl_wikitext"].to_pylist() == [31.5] and table["docs_boolq"].to_pylist() == [36]
    assert "ppl_wikitext" in metric_columns(table.column_names) and "docs_boolq" not in metric_columns(table.column_names)
    assert column_label("ppl_wikitext") == "wikitext (word perplexity)"
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        write_results([rec], Path(tmp), plot=False)
        back = recorded_result(Path(tmp), rec["trial_id"])
    assert back["task_ppl"] == {"wikitext": 31.5} and back["task_docs"] == {"boolq": 36, "wikitext": 5}
    assert back["subtask_acc"] == {"mmlu_anatomy": 0.25}


def test_results_table_schema_is_fixed():
    fixed = [(f.name, str(f.type)) for f in FIXED]
    assert fixed == EXPECTED_FIXED
    empty = results_table([])
    assert empty.num_rows == 0 and empty.schema.equals(FIXED)
    sparse = results_table([{"trial_id": "x", "status": "failed", "bits": [4], "error": "boom"}])  # fields missing
    assert sparse.schema.equals(FIXED) and sparse["memory_bytes"].null_count == 1
    full = results_table(sample_records())
    assert full.column_names == [n for n, _ in EXPECTED_FIXED] + ["acc_arc_easy", "acc_piqa", "acc_norm_arc_easy",
                                                                   "acc_norm_piqa"]
    assert full.schema.equals(results_table(list(reversed(sample_records()))).schema)


def test_results_table_values_and_metadata():
    t = results_table(sample_records())
    assert t["trial_id"].to_pylist() == [f"t{i}" for i in range(7)]  # sorted by started_at
    row = {r["trial_id"]: r for r in t.to_pylist()}
    assert row["t2"]["stopped_early"] and not row["t3"]["stopped_early"]
    assert row["t2"]["acc_piqa"] is None and row["t3"]["acc_piqa"] == 0.72
    assert row["t4"]["error"] == "CUDA out of memory" and row["t4"]["memory_gb"] is None
    assert row["t0"]["memory_gb"] == 100 / 1024**3 and row["t0"]["loftq_s"] == 2.0
    assert t.schema.metadata[b"objectives"] == b'{"accuracy": "max", "memory_bytes": "min"}'
    assert reference_point(t) == (0.0, 1.1 * 200)


def test_parquet_round_trip_keeps_schema_rows_and_metadata(tmp_path):
    t = results_table(sample_records())
    write_parquet_atomic(t, tmp_path / "r.parquet")
    back = pq.read_table(tmp_path / "r.parquet")
    assert back.schema.equals(t.schema, check_metadata=True)
    finite = pc.invert(pc.is_nan(pc.fill_null(t["accuracy"], 0.0)))  # NaN != NaN
    assert back.filter(finite).equals(t.filter(finite)) and back.num_rows == t.num_rows == 7
    assert math.isnan(back["accuracy"][6].as_py()) and back.to_pylist()[0]["bits"] == [4, 4]


def test_front_table_only_completed_sorted_with_metadata():
    t = results_table(sample_records())
    front = front_table(t)
    # t2 (stopped early, val_acc 0.9) and t6 (NaN accuracy) never count; t5 (0.65, 160) is dominated by t3
    assert front["trial_id"].to_pylist() == ["t0", "t3"]
    ref = reference_point(t)
    hv = hypervolume([0.6, 0.72, 0.70, 0.65], [100, 150, 200, 160], *ref)
    assert float(front.schema.metadata[b"hypervolume"]) == pytest.approx(hv)
    assert float(front.schema.metadata[b"hypervolume_normalized"]) == pytest.approx(hv / ref[1])
    assert uniform_baselines(t) == {"uniform-4": (100, 0.60), "uniform-8": (200, 0.70)}


def test_hypervolume_curve_follows_completion_order():
    recs = sample_records()
    curve = hypervolume_curve(results_table(recs))
    assert [c[0] for c in curve] == [1, 2, 3, 4]
    hvs = [c[2] for c in curve]
    assert hvs == sorted(hvs) and hvs[-1] == pytest.approx(hypervolume([0.6, 0.72, 0.70, 0.65], [100, 150, 200, 160], 0, 220))
    # every trial finishing before a completion adds its seconds, stopped-early and failed included
    assert [c[1] for c in curve] == [10.0, 20.0, 40.0, 60.0]


def test_reference_point_is_kept_for_the_run(tmp_path):
    write_results(sample_records()[:3], tmp_path, plot=False)
    first = reference_point(pq.read_table(tmp_path / "results.parquet"))
    assert first == (0.0, 1.1 * 200)
    write_results(sample_records(), tmp_path, plot=False)  # more trials, none larger: same box
    assert reference_point(pq.read_table(tmp_path / "pareto.parquet")) == first
    write_results(sample_records() + [record(9, "completed", [8, 8], 0.8, 400)], tmp_path, plot=False)
    assert reference_point(pq.read_table(tmp_path / "results.parquet")) == (0.0, 1.1 * 400)


def test_write_results_keeps_finished_trials_a_restart_forgot(tmp_path):
    recs = sample_records()
    write_results(recs, tmp_path, plot=False)
    results, front = write_results([record(7, "completed", [8, 8], 0.9, 50)], tmp_path, baselines={}, plot=True)
    assert set(results["trial_id"].to_pylist()) == {f"t{i}" for i in range(8)}
    assert front["trial_id"].to_pylist() == ["t7"]
    assert results.column_names[-4:] == ["acc_arc_easy", "acc_piqa", "acc_norm_arc_easy", "acc_norm_piqa"]
    newer = record(8, "completed", [4, 4], 0.3, 500, tasks={"boolq": 0.3})  # a task the old file lacks
    results, _ = write_results([newer], tmp_path, plot=False)
    assert results.column_names == FIXED.names + ["acc_arc_easy", "acc_boolq", "acc_piqa", "acc_norm_arc_easy",
                                                  "acc_norm_boolq", "acc_norm_piqa"]
    assert pq.read_table(tmp_path / "results.parquet").schema.equals(results.schema)
    assert (tmp_path / "pareto.png").stat().st_size > 10_000


# ---------------------------------------------------------------------------------------------
# Atomic writes.


def test_failed_write_keeps_the_previous_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "results.parquet"
    good = results_table(sample_records()[:2])
    write_parquet_atomic(good, path)

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # the new data is written, then the flush to disk fails
    with pytest.raises(OSError):
        write_parquet_atomic(results_table(sample_records()), path)
    monkeypatch.undo()
    assert pq.read_table(path).equals(good)
    assert [p.name for p in tmp_path.iterdir()] == ["results.parquet"]


KILL_WRITER = """
import sys
import numpy as np, pyarrow as pa
from qpruner.results import write_parquet_atomic
small = pa.table({"x": pa.array([1.0])})
big = pa.table({"x": pa.array(np.arange(3_000_000, dtype=np.float64))})
write_parquet_atomic(small, sys.argv[1])
print("ready", flush=True)
while True:
    write_parquet_atomic(big, sys.argv[1])
    write_parquet_atomic(small, sys.argv[1])
"""


def test_kill_during_writes_never_leaves_a_truncated_file(tmp_path):
    path = tmp_path / "results.parquet"
    mid_write = 0
    for delay in (0.05, 0.3, 0.7):
        proc = subprocess.Popen([sys.executable, "-c", KILL_WRITER, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        x = pq.read_table(path)["x"]  # whole file, either version
        assert len(x) in (1, 3_000_000) and x[len(x) - 1].as_py() == float(len(x) - 1 if len(x) > 1 else 1.0)
        mid_write += len(list(tmp_path.glob(".results.parquet.*.tmp")))  # killed inside a write: temp left
    assert mid_write > 0  # at least one kill landed mid-write, so the check above meant something
    path.unlink()  # not a results table; the next run's write_results sweeps the temps
    write_results([record(0, "completed", [4], 0.5, 10)], tmp_path, plot=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pareto.parquet", "results.parquet"]


# ---------------------------------------------------------------------------------------------
# Display.


def test_compact_bits():
    assert compact_bits([4, 8, 4, 8, 8, 8, 4, 4, 8]) == "4848 8844 8"
    assert compact_bits([16, 16, 16, 4, 8, 8]) == "16x3 4 8x2"
    assert compact_bits([]) == ""


def test_print_front_shows_every_front_row():
    console = Console(record=True, width=160)
    front = front_table(results_table(sample_records()))
    print_front(front, console=console)
    text = console.export_text()
    assert "t0" in text and "t3" in text and "48" in text and "0.720" in text
    assert "t5" not in text


def test_front_table_reads_whole_at_80_columns():
    """At 80 columns (a log file's width too) nothing is cut: every trial id, each layer's bits, accuracy ±
    its standard error and memory appear in full; long bit strings fold onto further lines."""
    bits = [4, 8] * 16  # 32 layers, as LLaMA-7B
    records = [record(i, "completed", bits[i:] + bits[:i], 0.5 + 0.01 * i, 1000 * 2**30 + i * 2**29,
                      accuracy_stderr=0.0123, trial_id=f"a1b2c_0000{i}", task_ppl={"wikitext": 35.25 + i}) for i in range(3)]
    console = Console(record=True, width=80)
    print_front(front_table(results_table(records)), console=console)
    text = console.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    for r in records:
        assert r["trial_id"] in text and f"{r['accuracy']:.3f} ± 0.012" in text and f"{r['task_ppl']['wikitext']:.4g}" in text
    cells = "".join(ch for ch in text if ch in "48\n").split("\n")  # the bits cells' digits, folded lines joined below
    digits = "".join(cells)
    assert all("".join(map(str, r["bits"])) in digits for r in records)


def test_noise_verdicts_and_axes_that_do_not_inflate_noise():
    from qpruner.pareto import MIN_ACCURACY_SPAN, honest_range
    from qpruner.results import accuracy_text, noise_text

    a, b = {"accuracy": 0.606, "accuracy_stderr": 0.02}, {"accuracy": 0.600, "accuracy_stderr": 0.02}
    assert noise_text(a, b).startswith("within noise") and "±5.5 pt" in noise_text(a, b)
    assert noise_text({"accuracy": 0.70, "accuracy_stderr": 0.02}, b).startswith("beyond noise")
    assert noise_text(a, {"accuracy": 0.6}) == ""
    assert accuracy_text(a) == "0.606 ± 0.020" and accuracy_text({"accuracy": 0.6}) == "0.600"
    lo, hi = honest_range(0.600, 0.606, MIN_ACCURACY_SPAN, floor=0.0, ceil=1.0)  # a 0.006 gap: 6% of the axis
    assert hi - lo >= MIN_ACCURACY_SPAN - 1e-9 and lo < 0.600 and hi > 0.606
    assert honest_range(0.97, 0.99, 0.1, 0.0, 1.0)[1] == 1.0 and honest_range(0.0, 0.01, 0.1, 0.0, 1.0)[0] == 0.0
    assert honest_range(0.2, 0.9, 0.1, 0.0, 1.0) == pytest.approx((0.144, 0.956))  # a wide spread: padding only


def test_results_record_both_metrics_and_headers_name_them():
    from qpruner.results import column_label, metric_columns

    rec = record(0, "completed", [4, 4], 0.6, 100)
    rec["task_acc"], rec["task_acc_norm"] = {"hellaswag": 0.4, "boolq": 0.7}, {"hellaswag": 0.5, "boolq": None}
    t = results_table([rec])
    r = t.to_pylist()[0]
    assert (r["acc_hellaswag"], r["acc_norm_hellaswag"], r["acc_boolq"], r["acc_norm_boolq"]) == (0.4, 0.5, 0.7, None)
    assert metric_columns(t.column_names) == ["acc_boolq", "acc_hellaswag", "acc_norm_boolq", "acc_norm_hellaswag"]
    assert column_label("acc_norm_hellaswag") == "hellaswag (acc_norm)" and column_label("acc_boolq") == "boolq (acc)"


def test_a_dearer_point_tied_up_to_float_rounding_is_not_on_the_front():
    """0.7333333333333334 vs 0.7333333333333333 (one mean summed in another order) is a tie, not a gain."""
    from qpruner.pareto import pareto_mask

    assert pareto_mask([0.7333333333333333, 0.7333333333333334, 0.75], [1.0, 2.0, 3.0]).tolist() == [True, False, True]


# ---------------------------------------------------------------------------------------------
# search.objective: perplexity (smaller is better) and val_logprob.


def perplexity_records() -> list[dict]:
    """Four completed trials whose perplexity front is t1 (cheap) and t2 (dear, lower perplexity); t3 is dominated
    by t2, t0 by t1. Accuracy says the opposite, so a front on the wrong column fails."""
    return [record(0, "completed", [4, 4], 0.9, 120, perplexity=30.0), record(1, "completed", [4, 8], 0.1, 100, perplexity=25.0),
            record(2, "completed", [8, 8], 0.2, 200, perplexity=12.0), record(3, "completed", [8, 4], 0.95, 210, perplexity=15.0),
            record(4, "stopped_early", [8, 4], None, 160, steps=10)]


def test_a_perplexity_run_has_its_front_hypervolume_and_reference_on_perplexity(tmp_path):
    from qpruner.config import QUALITY
    from qpruner.pareto import normalized, quality_hypervolume
    from qpruner.results import objective_of

    results, front = write_results(perplexity_records(), tmp_path, plot=True, objective="perplexity")
    assert objective_of(results).name == "perplexity" and objective_of(front).mode == "min"
    assert front["trial_id"].to_pylist() == ["t1", "t2"]
    ref = reference_point(results)
    assert ref == pytest.approx((1.1 * 30.0, 1.1 * 210))  # 10% beyond the worst completed perplexity
    # by hand: t1 owns memory [100, 200) at 33 - 25, t2 owns [200, 231) at 33 - 12
    by_hand = (200 - 100) * (33.0 - 25.0) + (231 - 200) * (33.0 - 12.0)
    assert float(front.schema.metadata[b"hypervolume"]) == pytest.approx(by_hand)
    assert quality_hypervolume([25.0, 12.0], [100, 200], ref, QUALITY["perplexity"]) == pytest.approx(by_hand)
    assert normalized(by_hand, ref, QUALITY["perplexity"]) == pytest.approx(by_hand / ((33.0 - 1.0) * 231))
    assert hypervolume_curve(results)[-1][2] == pytest.approx(by_hand)
    assert uniform_baselines(results) == {"uniform-4": (120, 30.0), "uniform-8": (200, 12.0)}
    assert (tmp_path / "pareto.png").is_file()
    # a later write without an objective keeps the file's; a worse perplexity widens the box, never narrows it
    results, front = write_results([record(5, "completed", [4, 4], 0.5, 90, perplexity=40.0)], tmp_path, plot=False)
    assert objective_of(results).name == "perplexity" and "t5" in front["trial_id"].to_pylist()
    assert reference_point(results) == pytest.approx((1.1 * 40.0, 1.1 * 210))


def test_a_val_logprob_run_takes_its_reference_below_the_worst_value(tmp_path):
    recs = [record(0, "completed", [4, 4], 0.5, 100, val_logprob=-2.0), record(1, "completed", [8, 8], 0.5, 200, val_logprob=-1.5)]
    results, front = write_results(recs, tmp_path, plot=False, objective="val_logprob")
    assert reference_point(results) == pytest.approx((-2.2, 220.0))
    assert front["trial_id"].to_pylist() == ["t0", "t1"]
    assert float(front.schema.metadata[b"hypervolume"]) == pytest.approx((200 - 100) * 0.2 + (220 - 200) * 0.7)


def test_the_searcher_is_told_the_objective_and_its_direction(tiny_config):
    from qpruner.search import objectives

    assert objectives(tiny_config) == (["accuracy", "memory_gb"], ["max", "min"])
    tiny_config.search.objective = "perplexity"
    assert objectives(tiny_config) == (["perplexity", "memory_gb"], ["min", "min"])
    tiny_config.search.objective = "val_logprob"
    assert objectives(tiny_config) == (["val_logprob", "memory_gb"], ["max", "min"])


def test_a_rebuilt_results_file_keeps_the_run_objective(tmp_path):
    """report --repair rebuilds results.parquet from Tune's state; the objective comes from run.json's config."""
    from qpruner.runfolder import recorded_objective

    assert recorded_objective(tmp_path) is None  # no run.json: accuracy
    (tmp_path / "run.json").write_text(json.dumps({"config": {"search": {"objective": "perplexity"}}}))
    assert recorded_objective(tmp_path) == "perplexity"


def test_export_picks_on_the_run_objective_and_skips_non_finite_rows(tmp_path):
    """--pick best: lowest perplexity on a perplexity run (a NaN row is no candidate); best-acc: highest accuracy;
    max-mem=GB: lowest perplexity under the cap."""
    from qpruner.export import pick_trial

    recs = perplexity_records() + [record(9, "completed", [4, 4], 0.99, 50, perplexity=float("nan"))]
    write_results(recs, tmp_path, plot=False, objective="perplexity")
    assert pick_trial(tmp_path, pick="best")["trial_id"] == "t2"
    assert pick_trial(tmp_path, pick="best-acc")["trial_id"] == "t9"  # accuracy is still measured and pickable
    assert pick_trial(tmp_path, pick=f"max-mem={150 / 1024**3}")["trial_id"] == "t1"
