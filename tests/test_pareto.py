"""Pareto extraction, hypervolume and results files, checked against brute force on generated data."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qpruner.pareto import compact_bits, hypervolume, pareto_mask, results_table, write_parquet_atomic, write_results
from qpruner.report import write_report

points = st.lists(st.tuples(st.integers(0, 20), st.integers(1, 20)), min_size=1, max_size=25)


def dominates(a, b) -> bool:
    return a[0] >= b[0] and a[1] <= b[1] and a != b


@given(points)
def test_front_is_exactly_the_non_dominated_points(pts):
    acc, mem = [p[0] for p in pts], [p[1] for p in pts]
    mask = pareto_mask(acc, mem)
    for i, p in enumerate(pts):
        dominated = any(dominates(q, p) for q in pts)
        duplicate_before = p in pts[:i]
        assert mask[i] == (not dominated and not duplicate_before)


def brute_force_hv(pts, ref_acc, ref_mem) -> float:
    """Unit-cell count of the dominated region on the integer grid."""
    cells = 0
    for a, m in itertools.product(range(ref_acc, 21), range(0, ref_mem)):
        if any(p[0] >= a + 1 and p[1] <= m for p in pts):
            cells += 1
    return float(cells)


@settings(max_examples=60)
@given(points)
def test_hypervolume_matches_brute_force_and_grows(pts):
    acc, mem = [p[0] for p in pts], [p[1] for p in pts]
    hv = hypervolume(acc, mem, 0, 21)
    assert hv == brute_force_hv(pts, 0, 21)
    assert hypervolume(acc + [10], mem + [5], 0, 21) >= hv
    outside = hypervolume(acc + [30], mem + [25], 0, 21)  # beyond the reference box: ignored
    assert outside == hv


def record(i, status, bits, acc, mem):
    return {"trial_id": f"t{i}", "status": status, "bits": bits, "accuracy": acc if status == "completed" else None,
            "task_acc": {"x": acc} if status == "completed" else {}, "val_acc": acc, "memory_bytes": mem,
            "iterations": 3, "steps": 30 if status != "stopped_early" else 10, "max_steps": 30, "wall_seconds": 5.0,
            "timings": {"eval_s": 1.0}, "error": "boom" if status == "failed" else None, "started_at": float(i)}


def test_results_files_report_and_schema(tmp_path):
    recs = [record(0, "completed", [4, 4], 0.6, 100), record(1, "completed", [8, 8], 0.7, 200),
            record(2, "completed", [4, 8], 0.72, 150), record(3, "stopped_early", [8, 4], 0.5, 150),
            record(4, "failed", [8, 4], None, None), record(5, "completed", [8, 4], 0.65, 160)]
    results, front = write_results(recs, tmp_path)
    again = pq.read_table(tmp_path / "results.parquet")
    assert again.schema == results_table(recs).schema and again.num_rows == 6
    assert str(again.schema.field("bits").type.value_type) == "int8"
    assert pq.read_table(tmp_path / "pareto.parquet")["trial_id"].to_pylist() == ["t0", "t2"]
    assert float(front.schema.metadata[b"hypervolume"]) > 0
    report = write_report(tmp_path).read_text()
    assert "1 stopped early" in report and "1 failed" in report and "steps saved by early stopping: 20" in report
    for png in ("pareto.png", "hypervolume.png", "bits_heatmap.png"):
        assert (tmp_path / png).stat().st_size > 5_000


def test_atomic_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "results.parquet"
    good = results_table([record(0, "completed", [4], 0.5, 10)])
    write_parquet_atomic(good, path)

    class Broken:  # pyarrow raises while writing: the old file must survive, no temp file left
        schema = None

    with pytest.raises(Exception):
        write_parquet_atomic(Broken(), path)
    assert pq.read_table(path).equals(good)
    assert [p.name for p in tmp_path.iterdir()] == ["results.parquet"]


def test_compact_bits():
    assert compact_bits([4, 4, 4, 8, 8, 4]) == "4x3 8x2 4"
