"""benchmarks/gpu_check.py (issue 25, item 8): its random-weight pruned folders load through the product's path,
its packing arithmetic counts what max_memory_allocated misses, and `--dry-run` runs every part's plumbing on the
CPU and writes the JSON the GPU run writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def test_pruned_shapes_remove_whole_gqa_groups():
    layers = gpu_check.pruned_layer_shapes(gpu_check.SMOLLM2_135M, 0.2, 4, 27)
    assert len(layers) == 30
    assert layers[0] == {"num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536}  # outside 4..27
    cut = layers[10]
    assert cut["intermediate_size"] < 1536
    removed = 3 - cut["num_key_value_heads"]
    assert cut["num_attention_heads"] == 9 - 3 * removed  # a KV group takes its three query heads with it


def test_random_pruned_folder_loads_as_a_pruned_model(tmp_path, tiny_assets):
    from qpruner.prune import load_pruned, pruned_layer_count
    from qpruner.prune.store import is_complete

    shape = gpu_check.TINY_PACK
    layers = gpu_check.pruned_layer_shapes(shape, 0.2, 1, 3)
    folder = gpu_check.random_pruned_folder(shape, layers, tmp_path / "m", tiny_assets.model_dir, "test")
    assert is_complete(folder) and pruned_layer_count(folder) == 4
    model, tokenizer = load_pruned(folder, dtype="bfloat16")
    for layer, want in zip(model.model.layers, layers):
        assert layer.mlp.gate_proj.out_features == want["intermediate_size"]
        assert layer.self_attn.k_proj.out_features == want["num_key_value_heads"] * shape["head_dim"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as SmolLM2
    ids = tokenizer("The red fox", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == shape["vocab_size"]


def test_trial_data_fills_every_example_to_max_length(tmp_path, tiny_assets):
    """The memory figures are for micro_batch x max_length tokens: every fine-tuning example is truncated to it."""
    from transformers import AutoTokenizer

    from qpruner.finetune import load_alpaca, tokenize_dataset

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "builtin").symlink_to(tiny_assets.model_dir.parent.parent)
    recipe = gpu_check.trial_recipe(cache, tmp_path / "runs", steps=2, micro_batch=4, seq_len=256, compute_dtype="bfloat16")
    records = load_alpaca(recipe["finetune"]["data"])
    examples = tokenize_dataset(records, AutoTokenizer.from_pretrained(tiny_assets.model_dir), 256)
    assert len(examples) == 64 and {len(e["input_ids"]) for e in examples} == {256}


def test_footprint_counts_reserved_paged_and_context():
    result = {"memory_measured": "torch.cuda.max_memory_allocated over the fine-tuning steps (...) + 3000 bytes of paged "
                                 "optimizer state (CUDA managed memory, from tensor sizes)",
              "process": {"reserved_peak_bytes": 10_000}}
    assert gpu_check.paged_bytes(result) == 3000
    assert gpu_check.footprint(result, context_bytes=500) == 13_500
    assert gpu_check.paged_bytes({"memory_measured": ""}) == 0  # an estimated (CPU) trial
    assert gpu_check.footprint({"process": {"reserved_peak_bytes": None}}, 500) is None


def test_budget_skips_what_would_start_late(tmp_path):
    """Past --budget-s nothing new starts, and the JSON says what was skipped (here: a budget of 0)."""
    env = {**os.environ, "QPRUNER_BENCH_RESULTS": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--parts", "packing,taylor", "--budget-s", "0"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    packing = json.loads((tmp_path / "gpu_packing_dry_run.json").read_text())
    assert all(level["skipped"] == "over --budget-s" for level in packing["packings"].values()) and len(packing["packings"]) == 3
    assert json.loads((tmp_path / "gpu_taylor_dry_run.json").read_text())["skipped"] == "over --budget-s"
    assert not (tmp_path / "gpu_memory_trial_dry_run.json").exists()  # not asked for


@pytest.mark.slow
def test_dry_run_writes_every_part(tmp_path, tiny_assets):
    """The whole command on the CPU (about 3 min on 2 busy cores: each trial is its own Python process)."""
    env = {**os.environ, "QPRUNER_BENCH_RESULTS": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--levels", "1,2"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["gpu_memory_trial_dry_run.json", "gpu_packing_dry_run.json",
                                                               "gpu_taylor_dry_run.json", "gpu_tests_dry_run.json"]
    tests = json.loads((tmp_path / "gpu_tests_dry_run.json").read_text())
    assert tests["skipped"] == len(tests["tests"]) >= 3 and tests["failure"] == tests["error"] == 0  # CUDA-only: skipped here
    memory = json.loads((tmp_path / "gpu_memory_trial_dry_run.json").read_text())
    rows = memory["results"]
    assert list(rows) == ["uniform-16", "uniform-4", "uniform-8", "mixed-4/8 (8 on first/last quarter)"]
    for name, row in rows.items():
        assert "error" not in row, (name, row)
        assert row["device"] == "cpu" and row["memory_source"] == "estimated" and row["peak_measured_bytes"] is None
        assert row["memory_bytes"] == row["peak_estimate_bytes"] > row["weight_bytes"] > 0
        assert row["steps"] == 2 and row["paper_gb"] == gpu_check.PAPER_GB.get(name)
    weights = {name: row["weight_bytes"] for name, row in rows.items()}
    assert weights["uniform-4"] < weights["mixed-4/8 (8 on first/last quarter)"] < weights["uniform-8"] < weights["uniform-16"]
    assert rows["mixed-4/8 (8 on first/last quarter)"]["bits"] == [8, 4, 4, 8]
    packing = json.loads((tmp_path / "gpu_packing_dry_run.json").read_text())
    assert "Ray is not installed" in packing["how"]
    assert list(packing["packings"]) == ["1", "2"]
    for k, level in packing["packings"].items():
        assert level["per_gpu"] == int(k) and level["completed"] == level["trial_count"] == int(k), level
        assert level["trials_per_hour"] > 0 and len(level["trials"]) == int(k)
        assert all(t["peak_estimate_gb"] > 0 and t["seconds"] > 0 for t in level["trials"])
    taylor = json.loads((tmp_path / "gpu_taylor_dry_run.json").read_text())
    assert taylor["taylor_20pct"]["layers_pruned"] > 0 and "dry run" in taylor["note"]
