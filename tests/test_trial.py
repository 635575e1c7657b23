"""`python -m qpruner.trial`: one real trial on builtin:tiny prints one JSON line of metrics and timings."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_trial_cli_prints_metrics_json(tiny_assets, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "qpruner.trial", "--config", str(ROOT / "tune_configs" / "tiny.yaml"),
         "--bits", "4,8,4,8,4,8", "--adapter-out", str(tmp_path / "adapter")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["bits"] == [4, 8, 4, 8, 4, 8]
    assert set(result["task_acc"]) == {"tiny_colour", "tiny_home", "tiny_food"}
    assert 0.25 < result["accuracy"] <= 1.0
    assert result["memory_source"] == "estimated" and result["memory_bytes"] > result["weight_bytes"] > 0
    for key in ("quantize_s", "loftq_s", "finetune_s", "eval_s"):
        assert result[key] >= 0
    assert result["steps"] == 40
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
