"""report.md and its three PNGs for a synthetic run with completed, stopped-early and failed trials;
the CLI's one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from matplotlib.image import imread

from qpruner.cli import run_cli
from qpruner.errors import QPrunerError
from qpruner.pareto import front_table, write_results
from qpruner.report import compact_bits, main, write_report
from qpruner.results import noise_text

ROOT = Path(__file__).resolve().parents[1]
N_LAYERS = 12
LAYER_BYTES = {4: 1_000_000, 8: 2_000_000, 16: 4_000_000}


def trial(i: int, bits: list[int], status: str = "completed", steps: int = 40, max_steps: int = 40,
          error: str | None = None) -> dict:
    """A record whose memory follows the bits and whose accuracy grows with memory, plus noise."""
    rng = np.random.default_rng(i)
    mem = 50_000_000 + sum(LAYER_BYTES[b] for b in bits)
    acc = 0.40 + 0.2 * sum(b > 4 for b in bits) / N_LAYERS + 0.05 * (bits.count(16) > 0) + rng.normal(0, 0.01)
    done = status == "completed"
    return {"trial_id": f"trial{i:02d}", "status": status, "bits": bits, "ranks": None,
            "accuracy": acc if done else None, "accuracy_stderr": 0.02 if done else None,
            "task_acc": {"arc_easy": acc + 0.1, "hellaswag": acc - 0.1} if done else {}, "task_acc_norm": {},
            "val_acc": acc + rng.normal(0, 0.02) if status != "failed" else None,
            "memory_bytes": mem if status != "failed" else None, "memory_source": "estimated",
            "weight_bytes": mem - 45_000_000, "lora_bytes": 5_000_000, "peak_estimate_bytes": mem,
            "peak_measured_bytes": None, "train_loss": 1.2, "iterations": steps // 10, "steps": steps,
            "max_steps": max_steps, "wall_seconds": 60.0 + i, "error": error, "started_at": 1_700_000_000.0 + 30 * i,
            "timings": {"quantize_s": 2.0, "loftq_s": 3.0, "finetune_s": 40.0, "eval_s": 10.0} if done else {},
            "config": {}}


def synthetic_records() -> list[dict]:
    rng = np.random.default_rng(0)
    recs = [trial(0, [4] * N_LAYERS), trial(1, [8] * N_LAYERS), trial(2, [16] * N_LAYERS)]
    for i in range(3, 13):
        recs.append(trial(i, [int(b) for b in rng.choice([4, 8], N_LAYERS)]))
    recs += [trial(13, [4, 8] * 6, "stopped_early", steps=10), trial(14, [8, 4] * 6, "stopped_early", steps=20),
             trial(15, [4] * 6 + [8] * 6, "stopped_early", steps=10, max_steps=0)]  # max_steps not reported
    recs += [trial(16, [8] * 6 + [4] * 6, "failed", steps=0,
                   error="Traceback (most recent call last):\n  ...\ntorch.OutOfMemoryError: CUDA out of memory")]
    return recs


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    write_results(synthetic_records(), out)
    (out / "config.yaml").write_text("model:\n  name: builtin:tiny\nsearch:\n  num_samples: 17\n")
    write_report(out)
    return out


def test_report_sections_and_numbers(run_dir):
    text = (run_dir / "report.md").read_text()
    recs = synthetic_records()
    assert "17: 13 completed, 3 stopped early by ASHA, 1 failed" in text
    assert "80 fine-tuning steps saved" in text  # (40-10) + (40-20) + (40-10), the last via the run's max_steps
    trial_hours = sum(r["wall_seconds"] for r in recs) / 3600
    assert f"{trial_hours:.3g} trial-hours" in text
    front = front_table(pq.read_table(run_dir / "results.parquet"))
    for r in front.to_pylist():  # every front configuration is listed with its compact bits
        assert f"| {r['trial_id']} | {compact_bits(r['bits'])} | {r['accuracy']:.3f} ± 0.020 |" in text
    for row in ("uniform-16 LoRA", "uniform-8 LoftQ", "uniform-4 LoftQ", "best mixed"):
        assert f"| {row}" in text
    assert "| arc_easy (acc) | hellaswag (acc) | arc_easy (acc_norm) | hellaswag (acc_norm) |" in text
    done = [r for r in recs if r["status"] == "completed"]
    base = next(r for r in done if set(r["bits"]) == {8})
    pick = max((r for r in done if len(set(r["bits"])) > 1 and r["memory_bytes"] <= base["memory_bytes"]),
               key=lambda r: r["accuracy"])
    assert (f"within uniform-8 memory (`{pick['trial_id']}`) vs uniform-8: "
            f"{100 * (pick['accuracy'] - base['accuracy']):+.1f} pt accuracy, {noise_text(pick, base)}, "
            f"{100 * (pick['memory_bytes'] / base['memory_bytes'] - 1):+.1f}% memory") in text
    assert "noise (95% margin ±5.5 pt)" in text  # 1.96 x sqrt(2) x 0.02
    assert "`trial16` (bits 8888 8844 4444): torch.OutOfMemoryError: CUDA out of memory" in text
    assert "| trial15 | 4444 4488 8888 | 10 / 40 |" in text
    assert "```yaml\nmodel:\n  name: builtin:tiny\nsearch:\n  num_samples: 17\n```" in text
    for png in ("pareto.png", "hypervolume.png", "bits_heatmap.png"):
        assert f"]({png})" in text


@pytest.mark.parametrize("name", ["pareto.png", "hypervolume.png", "bits_heatmap.png"])
def test_pngs_are_real_images(run_dir, name):
    img = imread(run_dir / name)
    assert img.shape[0] >= 300 and img.shape[1] >= 700  # readable at README size
    assert img[..., :3].std() > 0.05  # not blank


def test_report_without_completed_trials(tmp_path):
    write_results([trial(0, [4] * N_LAYERS, "stopped_early", steps=10), trial(1, [8] * N_LAYERS, "failed", error="boom")],
                  tmp_path)
    text = write_report(tmp_path).read_text()
    assert "No completed trial yet." in text and "boom" in text and "## Config" not in text
    assert (tmp_path / "bits_heatmap.png").is_file() and (tmp_path / "hypervolume.png").is_file()


def test_missing_inputs_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(QPrunerError, match="does not exist"):
        write_report(tmp_path / "nope")
    with pytest.raises(QPrunerError, match="no results.parquet"):
        write_report(tmp_path)
    (tmp_path / "results.parquet").write_bytes(b"not parquet")
    with pytest.raises(SystemExit) as exc:
        run_cli(main, [str(tmp_path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "is damaged" in err


def test_cli_module(run_dir, tmp_path):
    ok = subprocess.run([sys.executable, "-m", "qpruner.report", str(run_dir)], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.strip() == str(run_dir / "report.md")
    bad = subprocess.run([sys.executable, "-m", "qpruner.report", str(tmp_path / "missing")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "does not exist" in bad.stderr


def test_report_counts_repeat_proposals_answered_from_the_record(tmp_path):
    write_results(synthetic_records(), tmp_path)
    (tmp_path / "searcher.json").write_text('{"answered_from_record": 3}')
    write_report(tmp_path)
    assert "- Repeat proposals answered from the record (not trained again): 3." in (tmp_path / "report.md").read_text()
