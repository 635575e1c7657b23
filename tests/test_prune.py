"""Structured pruning on builtin:tiny: ratio, GQA shapes, safetensors round trip, importance, cache, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qpruner.config import config_from_dict
from qpruner.prune import load_pruned, prune_cached, prune_with_ray

ROOT = Path(__file__).resolve().parents[1]


def cfg_for(cache: Path, **prune):
    return config_from_dict({"prune": prune, "output": {"cache_dir": str(cache)}})


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_assets):
    """A fresh pruning cache that reuses the already built tiny model."""
    root = tmp_path_factory.mktemp("cache")
    (root / "builtin").symlink_to(tiny_assets.model_dir.parent.parent)
    return root


@pytest.mark.parametrize("prune", [{"ratio": 0.2}, {"ratio": 0.3, "taylor_order": "second"}, {"ratio": 0.5, "first_layer": 0, "last_layer": 6}])
def test_ratio_and_gqa_structure(cache, prune):
    result = prune_cached(cfg_for(cache, **prune), progress=False)
    assert abs(result.overall_ratio - prune["ratio"]) <= 0.02
    assert result.block_ratio > result.overall_ratio  # only some layers are pruned
    model, tok = load_pruned(result.path)
    assert sum(p.numel() for p in model.parameters()) == result.params_after
    for layer, shape in zip(model.model.layers, model.config.qpruner_layers):
        assert shape["num_attention_heads"] // shape["num_key_value_heads"] == model.config.num_attention_heads // model.config.num_key_value_heads
        assert layer.self_attn.q_proj.out_features == shape["num_attention_heads"] * model.config.head_dim
        assert layer.mlp.down_proj.in_features == shape["intermediate_size"]
    ids = tok("Question: what colour is the bakof?\nAnswer:", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], len(tok))
    out = model.generate(ids, max_new_tokens=3, do_sample=False)  # the KV cache works with pruned shapes
    assert out.shape[1] == ids.shape[1] + 3


def test_save_load_round_trip_is_exact(cache):
    from qpruner.prune.taylor import prune_model
    from qpruner.prune.store import save_pruned
    from qpruner.model import load_model

    model, tok = load_model("builtin:tiny", cache_dir=cache)
    prune_model(model, [], cfg_for(cache, ratio=0.3, method="random").prune, progress=False)
    ids = tok("the bakof lives in the forest .", return_tensors="pt").input_ids
    path = cache / "roundtrip"
    path.mkdir()
    save_pruned(model, tok, path, {"note": "test"})
    assert not list(path.glob("*.bin")) and not list(path.glob("*.pt"))  # no pickle
    loaded, _ = load_pruned(path)
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_taylor_importance_beats_random_groups(cache, tiny_config):
    """On builtin:tiny at 30%, Taylor-ranked pruning keeps task accuracy clearly above random groups.

    Measured: Taylor 0.761 mean acc; random seeds 1-4: 0.491, 0.827, 0.776, 0.539 (mean 0.658).
    Random pruning is erratic on this small model (one seed even beats the unpruned 0.745); Taylor is
    compared against the random mean over four seeds.
    """
    from qpruner.evaluate import evaluate_model

    def accuracy(cfg) -> float:
        model, tok = load_pruned(prune_cached(cfg, progress=False).path)
        return evaluate_model(model, tok, tiny_config.eval)["mean_acc"]

    taylor = accuracy(cfg_for(cache, ratio=0.3))
    random_accs = [
        accuracy(config_from_dict({"prune": {"ratio": 0.3, "method": "random", "calibration": {"seed": s}}, "output": {"cache_dir": str(cache)}}))
        for s in (1, 2, 3, 4)
    ]
    print(f"mean acc at 30%: taylor {taylor:.3f}, random {[round(a, 3) for a in random_accs]}")
    assert taylor > sum(random_accs) / len(random_accs) + 0.05


def test_layer_importance_is_stored(cache):
    result = prune_cached(cfg_for(cache, ratio=0.2), progress=False)
    meta = json.loads((result.path / "qpruner_prune.json").read_text())
    assert len(meta["layer_importance"]) == 6 and all(x > 0 for x in meta["layer_importance"])


def test_unfinished_folder_is_not_taken_as_done(cache):
    cfg = cfg_for(cache, ratio=0.25)
    done = prune_cached(cfg, progress=False)
    (done.path / "COMPLETE").unlink()  # as if killed before the marker was written
    again = prune_cached(cfg, progress=False)
    assert not again.cached and (again.path / "COMPLETE").is_file()
    weights = again.path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated weights with a stale marker
    assert not prune_cached(cfg, progress=False).cached


def test_ray_task_prunes_once(cache):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, runtime_env={"env_vars": {"QPRUNER_CACHE": str(cache)}})
    try:
        cfg = config_from_dict({"prune": {"ratio": 0.35}})
        first = prune_with_ray(cfg)
        second = prune_with_ray(cfg)
    finally:
        ray.shutdown()
    assert not first.cached and second.cached
    assert first.path == second.path and first.path.parent.parent == cache


def test_cli_bad_field_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("prune:\n  ratio: 1.5\n")
    proc = subprocess.run([sys.executable, "-m", "qpruner.prune", "--config", str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: prune.ratio: must be in [0, 1), got 1.5"
