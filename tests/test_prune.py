"""Structured pruning on builtin:tiny: ratio, GQA shapes, safetensors round trip, importance, cache, CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qpruner.errors import QPrunerError
from qpruner.evaluate import perplexity
from qpruner.plan import resolved_config
from qpruner.prune import load_pruned, prune_cached, prune_with_ray

ROOT = Path(__file__).resolve().parents[1]


def cfg_for(cache: Path, **prune):
    return resolved_config({"prune": prune, "output": {"cache_dir": str(cache)}})


@pytest.mark.parametrize("prune", [{"ratio": 0.2}, {"ratio": 0.3, "taylor_order": "second", "calibration": {"n_samples": 6}},
                                   {"ratio": 0.5, "first_layer": 0, "last_layer": 6}])
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
    from qpruner.model import load_model
    from qpruner.prune.store import save_pruned
    from qpruner.prune.taylor import prune_model

    model, tok = load_model("builtin:tiny", cache_dir=cache)
    prune_model(model, [], cfg_for(cache, ratio=0.3, method="random").prune, progress=False)
    ids = tok("the bakof lives in the forest .", return_tensors="pt").input_ids
    path = cache / "roundtrip"
    path.mkdir()
    save_pruned(model, tok, path, {"note": "test"})
    assert not list(path.glob("*.bin")) and not list(path.glob("*.pt"))  # no pickle
    loaded, _ = load_pruned(path)
    assert torch.equal(model(ids).logits, loaded(ids).logits)


@pytest.mark.slow  # ~70 s: ten lm-eval passes; the perplexity test below is the fast check of importance
def test_taylor_importance_beats_random_groups(cache, tiny_config):
    """On builtin:tiny at 30%, Taylor-ranked pruning keeps task accuracy clearly above random groups.

    Measured: Taylor 0.752 mean acc; random seeds 1-4: 0.479, 0.627, 0.755, 0.636 (mean 0.624).
    Random pruning is erratic on this small model (one seed matches Taylor); Taylor is
    compared against the random mean over four seeds.
    """
    from qpruner.evaluate import evaluate_model

    def accuracy(cfg) -> float:
        model, tok = load_pruned(prune_cached(cfg, progress=False).path)
        return evaluate_model(model, tok, tiny_config.eval)["mean_acc"]

    taylor = accuracy(cfg_for(cache, ratio=0.3))
    random_accs = [
        accuracy(resolved_config({"prune": {"ratio": 0.3, "method": "random", "calibration": {"seed": s}}, "output": {"cache_dir": str(cache)}}))
        for s in (1, 2, 3, 4)
    ]
    print(f"mean acc at 30%: taylor {taylor:.3f}, random {[round(a, 3) for a in random_accs]}")
    assert taylor > sum(random_accs) / len(random_accs) + 0.05


@pytest.fixture(scope="module")
def heldout_ppl(cache, tiny_assets):
    """ppl(**prune) -> held-out perplexity of the model pruned with these settings (ratio 0.3 unless given).

    Held out: the last 128 corpus documents, which the calibration file excludes. `ppl()` with no
    arguments is the dense model."""
    from qpruner.model import load_model

    lines = tiny_assets.corpus_path.read_text().splitlines()
    docs = lines[-128:]
    calib = cache / "calibration.txt"
    calib.write_text("\n".join(lines[:-128]) + "\n")

    def ppl(**prune) -> float:
        if not prune:
            return perplexity(*load_model("builtin:tiny", cache_dir=cache), docs)
        prune = {"ratio": 0.3, **prune, "calibration": {"source": str(calib), **prune.get("calibration", {})}}
        return perplexity(*load_pruned(prune_cached(cfg_for(cache, **prune), progress=False).path), docs)

    return ppl


def test_taylor_perplexity_beats_random(heldout_ppl):
    """At 30% of MLP channels, Taylor ranking costs far less held-out perplexity than random (3 seeds).

    With attention pruned too (the default), each prunable layer loses 1 of only 2 GQA groups;
    first-order Taylor picks the cheaper group in only 2 of 4 layers on this model (removing a whole
    head is far from a small perturbation), so that case is printed, not asserted.
    """
    ppl = heldout_ppl
    dense = ppl()
    taylor = ppl(prune_attention=False)
    randoms = [ppl(prune_attention=False, method="random", calibration={"seed": s}) for s in (1, 2, 3)]
    with_heads = ppl(method="taylor")
    randoms_heads = [ppl(method="random", calibration={"seed": s}) for s in (1, 2, 3)]
    print(f"held-out ppl at 30%: dense {dense:.3f}; MLP only: taylor {taylor:.3f}, random {[round(r, 3) for r in randoms]}; "
          f"heads+MLP: taylor {with_heads:.3f}, random {[round(r, 3) for r in randoms_heads]}")
    random_cost = sum(randoms) / len(randoms) - dense
    assert random_cost > 0.02
    assert taylor - dense < 0.5 * random_cost


def test_second_order_matches_its_formula(cache):
    """|w*g - 1/2 w^2 F| with g the mean gradient and F the mean of per-sample squared gradients (LLM-Pruner)."""
    from qpruner.model import load_model
    from qpruner.prune.taylor import _padded, channel_sums, weight_scores

    model, tok = load_model("builtin:tiny", cache_dir=cache)
    batches = [tok(t, return_tensors="pt").input_ids for t in ("the bakof eats fish .", "you find the doziko in the desert .")]
    name = "model.layers.2.mlp.down_proj.weight"
    w = dict(model.named_parameters())[name]
    grads = []
    for b in batches:
        w.grad = None
        model(input_ids=b, labels=b).loss.backward()
        grads.append(w.grad.clone())
    w.grad = None
    model(**_padded(batches)).loss.backward()  # first order: one padded micro-batch, mean over its tokens
    g_batch, w.grad = w.grad.clone(), None
    g, fisher = sum(grads) / 2, sum(x * x for x in grads) / 2
    expected = (w.detach() * g - 0.5 * w.detach() ** 2 * fisher).abs()
    scores = weight_scores(model, batches, "second", progress=False)
    torch.testing.assert_close(scores[name], channel_sums(name, expected), rtol=1e-4, atol=1e-10)
    first = weight_scores(model, batches, "first", progress=False)
    torch.testing.assert_close(first[name], channel_sums(name, (w.detach() * g_batch).abs()), rtol=1e-4, atol=1e-10)
    assert not torch.equal(first[name], scores[name])


def test_unreachable_ratio_names_the_max(cache, tiny_assets):
    from qpruner.errors import ConfigError
    from qpruner.model import load_model
    from qpruner.prune.taylor import plan_pruning

    model, _ = load_model("builtin:tiny", cache_dir=cache)
    with pytest.raises(ConfigError, match=r"prune\.ratio: 0\.9 cannot be reached .*at most 0\.\d+ is reachable"):
        plan_pruning(model, cfg_for(cache, ratio=0.9).prune)
    with pytest.raises(ConfigError, match=r"prune\.last_layer"):
        plan_pruning(model, cfg_for(cache, ratio=0.2, first_layer=1, last_layer=9).prune)


def test_unreachable_hub_calibration_is_one_line(tmp_path):
    from qpruner.config import CalibrationConfig
    from qpruner.data import calibration_texts
    from qpruner.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^prune\.calibration\.source: cannot load dataset 'nobody/no-such-corpus'"):
        calibration_texts(CalibrationConfig(source="nobody/no-such-corpus"), tmp_path)
    texts = tmp_path / "calib.txt"
    texts.write_text("one short line\n" * 50)
    out = calibration_texts(CalibrationConfig(source=str(texts), n_samples=3, seq_len=8), tmp_path)
    assert len(out) == 3 and all(len(t) >= 32 for t in out)  # short lines joined to fill seq_len


def test_layer_importance_is_stored(cache):
    result = prune_cached(cfg_for(cache, ratio=0.2), progress=False)
    meta = json.loads((result.path / "qpruner_prune.json").read_text())
    assert len(meta["layer_importance"]) == 6 and all(x > 0 for x in meta["layer_importance"])


def test_unfinished_folder_is_not_taken_as_done(cache):
    cfg = cfg_for(cache, ratio=0.25, method="random")
    done = prune_cached(cfg, progress=False)
    (done.path / "COMPLETE").unlink()  # as if killed before the marker was written
    again = prune_cached(cfg, progress=False)
    assert not again.cached and (again.path / "COMPLETE").is_file()
    weights = again.path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated weights with a stale marker
    assert not prune_cached(cfg, progress=False).cached


def test_ray_task_prunes_once(cache):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:  # the cache path travels in the resolved config: the task prunes into it whatever its own environment says
        cfg = resolved_config({"prune": {"ratio": 0.35}, "output": {"cache_dir": str(cache)}})
        first = prune_with_ray(cfg)
        written = (first.path / "model.safetensors").stat().st_mtime_ns
        started = time.time()
        second = prune_with_ray(cfg)
        took = time.time() - started
        with pytest.raises(QPrunerError, match=r"^prune\.ratio: 0\.9 cannot be reached"):  # one line, not a Ray traceback
            prune_with_ray(resolved_config({"prune": {"ratio": 0.9}, "output": {"cache_dir": str(cache)}}))
    finally:
        ray.shutdown()
    assert not first.cached and second.cached and took < 10
    assert (second.path / "model.safetensors").stat().st_mtime_ns == written  # nothing rebuilt
    assert first.path == second.path and first.path.parent.parent == cache


def test_cli_bad_field_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("prune:\n  ratio: 1.5\n")
    proc = subprocess.run([sys.executable, "-m", "qpruner.prune", "--config", str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: prune.ratio: must be in [0, 1), got 1.5"


def test_config_error_survives_pickling():
    """Errors raised inside Ray tasks are pickled to the driver; ConfigError must keep its field and reason."""
    import pickle

    from qpruner.errors import ConfigError

    err = pickle.loads(pickle.dumps(ConfigError("prune.ratio", "must be in (0, 1)")))
    assert (err.field, err.reason, str(err)) == ("prune.ratio", "must be in (0, 1)", "prune.ratio: must be in (0, 1)")


def test_prune_cli_reports_unreachable_ratio_in_one_line(tmp_path, tiny_assets):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("prune:\n  ratio: 0.9\n")
    env = {**os.environ, "QPRUNER_CACHE": str(tiny_assets.model_dir.parents[2])}
    proc = subprocess.run([sys.executable, "-m", "qpruner.prune", "--config", str(recipe)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "prune.ratio: 0.9 cannot be reached" in errors[0]


def test_slimgpt_structure_and_perplexity_against_taylor(cache, heldout_ppl):
    """SlimGPT at 30%, no fine-tuning: the overall ratio holds, deeper layers lose more, and held-out
    perplexity is compared with Taylor's (the SlimGPT paper's claim: OBS compensation keeps it lower).

    Measured on builtin:tiny (dense 1.666): heads+MLP taylor 1.898, slimgpt 1.790; MLP only (both barely
    above dense) taylor 1.6764, slimgpt 1.6764. So the claim holds where pruning hurts (whole heads go)
    and is a tie where it does not; the test asserts exactly that.
    """
    from qpruner.prune.slimgpt import layer_ratios

    ratios = layer_ratios(4, 0.3)
    assert all(a < b for a, b in zip(ratios, ratios[1:])) and sum(ratios) / 4 == pytest.approx(0.3)
    result = prune_cached(cfg_for(cache, ratio=0.3, method="slimgpt"), progress=False)
    assert abs(result.overall_ratio - 0.3) <= 0.02
    model, _ = load_pruned(result.path)
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    meta = json.loads((result.path / "qpruner_prune.json").read_text())
    pruned = meta["layers"]
    assert widths[0] == widths[-1] == 352 and all(a >= b for a, b in zip(
        [widths[i] for i in pruned], [widths[i] for i in pruned][1:])), widths

    dense = heldout_ppl()
    taylor = heldout_ppl(method="taylor")
    slim = heldout_ppl(method="slimgpt")
    taylor_mlp, slim_mlp = heldout_ppl(method="taylor", prune_attention=False), heldout_ppl(method="slimgpt", prune_attention=False)
    print(f"held-out ppl at 30%, no fine-tuning: dense {dense:.3f}; heads+MLP: taylor {taylor:.3f}, slimgpt {slim:.3f}; "
          f"MLP only: taylor {taylor_mlp:.3f}, slimgpt {slim_mlp:.3f}")
    assert slim < taylor - 0.05 and slim_mlp < taylor_mlp * 1.01


def _one_layer_scores():
    """A 1-layer LLaMA (4 query heads in 2 GQA groups, head_dim 2, hidden 8, MLP 3) with constant
    per-module scores: q 1, k 2, v 3, o 4, gate 1, up 2, down 5 per weight, as channel_sums."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qpruner.prune.taylor import channel_sums

    config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=3, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=2)
    model = LlamaForCausalLM(config)
    value = {"q_proj": 1, "k_proj": 2, "v_proj": 3, "o_proj": 4, "gate_proj": 1, "up_proj": 2, "down_proj": 5}
    scores = {n: channel_sums(n, torch.full_like(p, float(value[n.split(".")[-2]]))) for n, p in model.named_parameters()
              if n.endswith("proj.weight")}
    return model, scores


@pytest.mark.parametrize("how, head, channel", [
    # per group: q 4 rows x 8 = 32, k 2x8x2 = 32, v 2x8x3 = 48, o 8x4x4 = 128; per channel: gate 8, up 16, down 40
    ("sum", 240.0, 64.0), ("mean", 60.0, 64.0 / 3), ("max", 128.0, 40.0), ("last", 128.0, 40.0),
    ("prod", math.log(32 * 32 * 48 * 128), math.log(8 * 16 * 40)),
])
def test_aggregation_reduces_across_the_coupled_modules_per_channel_sums(how, head, channel):
    from qpruner.prune.taylor import group_scores

    model, scores = _one_layer_scores()
    heads, channels = group_scores(model, scores, 0, how)
    assert heads == pytest.approx([head, head], rel=1e-5)
    torch.testing.assert_close(channels, torch.full((3,), channel), rtol=1e-5, atol=0)


def test_layer_importance_counts_only_the_kept_weights():
    from qpruner.prune.taylor import layer_totals

    _, scores = _one_layer_scores()
    assert layer_totals(scores, 1) == [64 + 64 + 96 + 256 + 24 + 48 + 120]
    # group 0 (q rows 0-3, k/v rows 0-1, o columns 0-3) and MLP channel 1 removed: half of q/k/v/o,
    # two thirds of gate/up/down remain
    removed = {0: ([0], torch.tensor([1]), 2, 2)}
    assert layer_totals(scores, 1, removed) == [32 + 32 + 48 + 128 + 16 + 32 + 80]
