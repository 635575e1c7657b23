"""`python -m qpruner.trial`: one real trial on builtin:tiny prints one JSON line of metrics and timings."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_the_val_logprob_objective_is_the_validation_after_the_last_step(tiny_assets, cache):
    """search.objective: val_logprob is the quick validation after training. When the last step is not a report
    step, the trial validates once more at the end instead of handing on the score from steps before."""
    from qpruner.config import config_from_dict
    from qpruner.plan import resolve_config
    from qpruner.prune import prune_cached
    from qpruner.trial import run_trial

    cfg = config_from_dict({
        "model": {"name": str(tiny_assets.model_dir)},
        "prune": {"ratio": 0.3, "calibration": {"source": str(tiny_assets.corpus_path), "n_samples": 8, "seq_len": 32}},
        "finetune": {"data": str(tiny_assets.alpaca_path), "steps": 5, "report_every": 2, "batch_size": 4, "micro_batch_size": 4,
                     "max_length": 64, "val_limit": 8, "lr": 1e-3},
        "eval": {"tasks": ["builtin"], "limit": 8},
        "search": {"objective": "val_logprob"},
        "output": {"cache_dir": str(cache)}})
    cfg = resolve_config(cfg)
    pruned = prune_cached(cfg, progress=False)
    reports = []
    result = run_trial(cfg, pruned.path, [4] * 6, report=reports.append)
    assert [r["step"] for r in reports] == [2, 4] and all(r["perplexity"] is None for r in reports)
    assert result["steps"] == 5 and result["val_logprob"] < 0
    assert result["val_logprob"] != pytest.approx(reports[-1]["val_logprob"], abs=1e-9)  # step 5's, not step 4's
