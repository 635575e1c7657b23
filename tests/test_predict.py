"""The performance model (qpruner.predict): exact fronts, a fit that learns, a sampler that proposes from
it inside a real Optuna study, the sensitivity table on the real tiny model, and `qpruner predict`."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qpruner.predict import (
    ModelSampler,
    PerformanceModel,
    UnitTable,
    best_under,
    first_points,
    loo_spearman,
    pareto_dp,
    predicted_front,
)

ROOT = Path(__file__).resolve().parents[1]


def synthetic_units(n_units: int = 6, seed: int = 0) -> tuple[UnitTable, np.ndarray]:
    """A 4/8-bit table whose true objective is additive: 4 bits costs each unit a loss proportional to its
    score (with a hidden per-unit factor the score misses), 8 bits costs more memory."""
    rng = np.random.default_rng(seed)
    score = np.column_stack([rng.uniform(0.1, 1.0, n_units), rng.uniform(0.0, 0.02, n_units)])
    cost = np.column_stack([np.full(n_units, 100.0), rng.integers(180, 220, n_units).astype(float)])
    true_loss = score * rng.uniform(0.5, 1.5, n_units)[:, None]
    return UnitTable([(4, None), (8, None)], score, cost, 1000.0), true_loss


def objective(true_loss: np.ndarray, idx) -> float:
    return float(0.8 - 0.1 * true_loss[np.arange(len(idx)), idx].sum())


def test_pareto_dp_is_the_exact_front_of_every_configuration():
    units, _ = synthetic_units(7, seed=3)
    values = -units.score
    states = pareto_dp(values, units.cost)
    every = [(units.cost[np.arange(7), idx].sum(), values[np.arange(7), idx].sum(), list(idx))
             for idx in itertools.product(range(2), repeat=7)]
    brute = [e for e in every if not any(o[0] <= e[0] and o[1] >= e[1] and (o[0], o[1]) != (e[0], e[1]) for o in every)]
    assert sorted((round(c, 9), round(v, 9)) for c, v, _ in states) == sorted({(round(c, 9), round(v, 9)) for c, v, _ in brute})
    for c, v, idx in states:  # each state's path reproduces its totals
        assert np.isclose(units.cost[np.arange(7), idx].sum(), c) and np.isclose(values[np.arange(7), idx].sum(), v)


def test_model_ranks_by_the_table_before_trials_and_learns_from_them():
    units, true_loss = synthetic_units(6)
    every = [list(idx) for idx in itertools.product(range(2), repeat=6)]
    truth = [objective(true_loss, idx) for idx in every]
    model = PerformanceModel(units)
    mean, std = model.fit([], []).predict(every)
    assert std is None and not model.fitted
    assert np.allclose(mean, [-units.total_score(i) for i in every])  # the table alone: -S
    rng = np.random.default_rng(1)
    seen = rng.choice(len(every), 12, replace=False)
    model.fit([every[i] for i in seen], [truth[i] for i in seen])
    mean, std = model.predict(every)
    assert model.fitted and np.all(std > 0)
    from scipy.stats import spearmanr

    assert spearmanr(mean, truth).statistic > 0.9
    errors = np.abs(mean - truth)
    assert np.mean(errors) < 0.05, errors  # objective spans ~0.4
    assert loo_spearman(units, [every[i] for i in seen], [truth[i] for i in seen]) > 0.7


def test_predicted_front_and_best_under_a_budget():
    units, true_loss = synthetic_units(6)
    every = [list(idx) for idx in itertools.product(range(2), repeat=6)]
    model = PerformanceModel(units).fit(every[::3], [objective(true_loss, i) for i in every[::3]])
    front = predicted_front(model)
    mems = [r["memory_bytes"] for r in front]
    preds = [r["predicted"] for r in front]
    assert mems == sorted(mems) and preds == sorted(preds)  # more memory only where it predicts better
    assert front[0]["choices"] == [0] * 6 and front[-1]["choices"] == [1] * 6
    budget = front[2]["memory_gb"]
    best = best_under(front, budget)
    assert best["memory_gb"] <= budget and best["predicted"] == max(r["predicted"] for r in front if r["memory_gb"] <= budget)
    assert best_under(front, front[0]["memory_gb"] / 2) is None


def _run_study(sampler, units, true_loss, n_trials: int, budget_gb=None):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    n = units.score.shape[0]
    for params in first_points(units, 2):
        study.enqueue_trial(params)

    def run(trial):
        idx = [[4, 8].index(trial.suggest_categorical(f"b{u}", [4, 8])) for u in range(n)]
        return objective(true_loss, idx), units.memory_bytes(idx) / 1024**3

    study.optimize(run, n_trials=n_trials)
    return study


def test_model_sampler_proposes_new_configurations_on_the_true_front_in_a_real_study():
    from qpruner.pareto import hypervolume

    units, true_loss = synthetic_units(8, seed=5)
    every = [list(idx) for idx in itertools.product(range(2), repeat=8)]
    truth = [(objective(true_loss, i), units.memory_bytes(i) / 1024**3) for i in every]
    ref = (min(t[0] for t in truth), 1.1 * max(t[1] for t in truth))
    best = hypervolume([t[0] for t in truth], [t[1] for t in truth], *ref)

    def hv(study):
        done = [t.values for t in study.trials if t.values]
        return hypervolume([v[0] for v in done], [v[1] for v in done], *ref) / best

    import optuna

    model = _run_study(ModelSampler(units, seed=0), units, true_loss, 16)
    keys = [tuple(sorted(t.params.items())) for t in model.trials]
    assert len(set(keys)) == len(keys)  # never trains a configuration twice
    randoms = [hv(_run_study(optuna.samplers.RandomSampler(seed=s), units, true_loss, 16)) for s in range(3)]
    assert hv(model) > 0.97 and hv(model) > max(randoms), (hv(model), randoms)


def test_model_sampler_keeps_to_the_memory_budget():
    units, true_loss = synthetic_units(6, seed=2)
    budget_bytes = units.memory_bytes([0] * 6) + 2.5 * (units.cost[:, 1] - units.cost[:, 0]).mean()
    study = _run_study(ModelSampler(units, seed=1, max_memory_gb=budget_bytes / 1024**3), units, true_loss, 10)
    proposed = [t for t in study.trials if "fixed_params" not in t.system_attrs]  # not the enqueued first points
    assert len(proposed) >= 6 and all(t.values[1] <= budget_bytes / 1024**3 + 1e-12 for t in proposed)


# ---------------------------------------------------------------------------------------------
# On the real tiny model


@pytest.fixture(scope="module")
def tiny_table(cache):
    from qpruner.config import config_from_dict
    from qpruner.plan import resolve_config
    from qpruner.predict import sensitivity_table
    from qpruner.prune import load_pruned, prune_cached

    cfg = resolve_config(config_from_dict({"output": {"cache_dir": str(cache)}, "finetune": {"val_limit": 8}}))
    pruned = prune_cached(cfg, progress=False)
    model, tokenizer = load_pruned(str(pruned.path), dtype=cfg.quant.compute_dtype)
    table = sensitivity_table(model, tokenizer, cfg, pruned.path.name, max_tokens=512)
    return cfg, pruned, model, tokenizer, table


def test_sensitivity_table_on_the_tiny_model(tiny_table):
    cfg, _, model, _, table = tiny_table
    n = model.config.num_hidden_layers
    assert table.choices == [[4, None], [8, None]]
    kl, fisher = np.array(table.kl), np.array(table.fisher)
    assert kl.shape == fisher.shape == (n, 2) and (kl >= 0).all() and (fisher >= 0).all()
    assert (kl[:, 0] > kl[:, 1]).all() and (fisher[:, 0] > fisher[:, 1]).all()  # 4-bit moves the logits more than 8
    assert 0 < table.tokens <= 512 and table.seconds > 0
    # memory: each layer's 8-bit bytes exceed its 4-bit bytes by exactly the weight difference
    from qpruner.memory import model_shapes, weight_bytes

    shapes = model_shapes(model)
    diff = np.array(weight_bytes(shapes, [8] * n, cfg.quant)["layers"]) - np.array(weight_bytes(shapes, [4] * n, cfg.quant)["layers"])
    assert np.array_equal(np.array(table.layer_bytes)[:, 1] - np.array(table.layer_bytes)[:, 0], diff)


def test_sensitivity_kl_is_the_kl_of_the_changed_model(tiny_table):
    """Recompute one cell by hand: layer 0 at 4 bits, its LoftQ-initialised weights put in by hand."""
    import torch

    from qpruner.loftq import approximation, loftq_for_model, target_linears
    from qpruner.predict import validation_sequences

    cfg, pruned, model, tokenizer, table = tiny_table
    seqs = validation_sequences(model, tokenizer, cfg, max_tokens=512)
    n = model.config.num_hidden_layers
    inits, _ = loftq_for_model(model, [4] * n, cfg, cfg.output.cache, pruned.path.name)
    total, tokens = 0.0, 0
    with torch.no_grad():
        base = [torch.log_softmax(model(input_ids=torch.tensor([s])).logits.float(), -1) for s in seqs]
        saved = {}
        for layer, name, linear in target_linears(model, cfg.lora.target_modules):
            if layer == 0:
                saved[name] = linear.weight.data.clone()
                linear.weight.data = approximation(linear.weight.data, inits[name], 4, cfg.quant).to(linear.weight.dtype)
        for s, logp in zip(seqs, base):
            logq = torch.log_softmax(model(input_ids=torch.tensor([s])).logits.float(), -1)
            total += float((logp.exp() * (logp - logq)).sum())
            tokens += len(s)
        for _, name, linear in target_linears(model, cfg.lora.target_modules):
            if name in saved:
                linear.weight.data = saved[name]
    assert np.isclose(table.kl[0][0], total / tokens, rtol=1e-3), (table.kl[0][0], total / tokens)


def test_sensitivity_table_is_cached(tiny_table):
    import time

    from qpruner.predict import sensitivity_table

    cfg, pruned, model, tokenizer, table = tiny_table
    started = time.perf_counter()
    again = sensitivity_table(model, tokenizer, cfg, pruned.path.name, max_tokens=512)
    assert json.dumps(again.to_json(), sort_keys=True) == json.dumps(table.to_json(), sort_keys=True)
    assert time.perf_counter() - started < table.seconds


# ---------------------------------------------------------------------------------------------
# A search with the model sampler, its report, and `qpruner predict`


@pytest.fixture(scope="module")
def model_run(tmp_path_factory, tiny_assets):
    import yaml

    tmp = tmp_path_factory.mktemp("model_sampler")
    raw = yaml.safe_load((ROOT / "tune_configs" / "tiny.yaml").read_text())
    # the perplexity objective on a text that is neither the calibration corpus nor the tasks: the fine-tuning
    # records' responses, as wikitext pages
    records = [json.loads(line) for line in tiny_assets.alpaca_path.read_text().splitlines() if line.strip()]
    text = " ".join(r["output"] for r in records)
    wiki = tmp / "wiki.jsonl"
    wiki.write_text("".join(json.dumps({"page": text[i * 3000:(i + 1) * 3000]}) + "\n" for i in range(2)))
    raw["eval"] = {"tasks": ["builtin", "wikitext"], "local_data": {"wikitext": str(wiki)}}
    raw["search"].update(sampler="model", objective="perplexity", num_samples=6, n_init=2, asha={"enabled": False}, baselines=[])
    raw["finetune"].update(steps=10, report_every=5, val_limit=8)
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    out = tmp / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "qpruner.tune", "--config", str(recipe), "--out", str(out), "--no-dashboard"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return recipe, out, proc


def test_search_with_the_model_sampler_reports_its_predictor(model_run):
    """search.sampler: model with search.objective: perplexity (smaller is better), end to end: the front is
    the perplexity/memory front, the predictor fits -log(perplexity) and reports in perplexity."""
    import pyarrow.parquet as pq

    from qpruner.pareto import pareto_mask

    _, out, proc = model_run
    assert "sensitivity table" in proc.stdout
    table = pq.read_table(out / "results.parquet")
    assert json.loads(table.schema.metadata[b"objectives"]) == {"perplexity": "min", "memory_bytes": "min"}
    results = table.to_pylist()
    completed = [r for r in results if r["status"] == "completed"]
    assert len(completed) == 6 and len({tuple(r["bits"]) for r in completed}) == 6
    assert all(r["perplexity"] == r["ppl_wikitext"] and r["perplexity"] > 1 for r in completed)
    front = pq.read_table(out / "pareto.parquet").to_pylist()
    expected = pareto_mask([-r["perplexity"] for r in completed], [r["memory_bytes"] for r in completed])
    assert sorted(r["trial_id"] for r in front) == sorted(r["trial_id"] for r, on in zip(completed, expected) if on)
    quality = json.loads((out / "performance_model.json").read_text())
    assert quality["objective"] == "perplexity"
    assert quality["trials"] == 6 and quality["fitted"] and -1 <= quality["loo_spearman"] <= 1
    predicted = pq.read_table(out / "predicted_front.parquet").to_pylist()
    assert predicted and all(r["predicted_std"] > 0 and 1 < r["predicted_low"] <= r["predicted"] <= r["predicted_high"]
                             for r in predicted)
    assert [r["memory_bytes"] for r in predicted] == sorted(r["memory_bytes"] for r in predicted)
    report = (out / "report.md").read_text()
    assert "## Performance model" in report and "leave-one-out Spearman" in report and "predicted_front.parquet" in report
    assert "word perplexity (min; search.objective)" in report and "against the measured perplexity" in report


def test_predict_command_answers_a_budget_from_the_run(model_run):
    import pyarrow.parquet as pq

    _, out, _ = model_run
    front = pq.read_table(out / "predicted_front.parquet").to_pylist()
    budget = front[len(front) // 2]["memory_gb"]
    env = {**os.environ}
    proc = subprocess.run([sys.executable, "-m", "qpruner", "predict", "--run", str(out), "--max-memory-gb", f"{budget:.9f}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "best under" in proc.stdout and "predicted perplexity" in proc.stdout and "bits per layer" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "qpruner", "predict", "--run", str(out), "--max-memory-gb", "0.000001"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "--max-memory-gb" in proc.stderr


def test_predict_command_from_the_recipe_alone_without_training(model_run):
    """--config: prune (cached) and the sensitivity table (cached by the run above), no trial: a table score."""
    recipe, out, _ = model_run
    proc = subprocess.run([sys.executable, "-m", "qpruner", "predict", "--config", str(recipe), "--max-memory-gb", "1"],
                          cwd=ROOT, env={**os.environ}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "table score" in proc.stdout and "no trial to calibrate" in proc.stdout and "bits per layer" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "qpruner", "predict", "--config", str(recipe), "--run", str(out),
                           "--max-memory-gb", "1"], cwd=ROOT, env={**os.environ}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--run/--config" in proc.stderr and "Traceback" not in proc.stderr


def test_grouped_units_sum_their_layers():
    from qpruner.predict import SensitivityTable

    table = SensitivityTable([[4, None], [8, None]], kl=[[float(i + 1), 0.1] for i in range(5)], fisher=[[1.0, 0.0]] * 5,
                             layer_bytes=[[10, 20]] * 5, offset_bytes=7, memory_objective="weights", tokens=1, seconds=1.0)
    units = UnitTable.from_table(table, 2, "kl")  # layers 0-2 and 3-4
    assert units.score.tolist() == [[6.0, 0.30000000000000004], [9.0, 0.2]]
    assert units.cost.tolist() == [[30.0, 60.0], [20.0, 40.0]]
    assert units.params([1, 0]) == {"b0": 8, "b1": 4} and units.index({"b0": 8, "b1": 4}) == [1, 0]
    assert units.memory_bytes([1, 0]) == 7 + 60 + 20


def test_stopped_trials_enter_at_their_fidelity():
    from qpruner.predict import at_fidelity

    completed = [([[10, -2.0], [20, -1.5]], -1.2), ([[10, -3.0], [20, -2.0]], -1.8)]  # gains from step 10: 0.8, 1.2
    assert at_fidelity(completed, [[[10, -2.5]], [[10, -2.6], [20, -2.1]], [[30, -1.0]]]) == \
        pytest.approx([-2.5 + 1.0, -2.1 + 0.25, None])  # from step 20: 0.3, 0.2; nobody reported at step 30


def test_the_searcher_keeps_progress_and_the_model_sampler_learns_from_stopped_trials(tiny_config):
    """Ray's OptunaSearch drops progress reports in a multi-objective study; RecordedOptunaSearch keeps the
    validation curve on the Optuna trial, and with search.objective: val_logprob the model sampler fits an
    ASHA-stopped trial at its last report plus the completed trials' gain from that step. With accuracy it
    does not (a stopped trial has no accuracy at any fidelity)."""
    from qpruner.search import CURVE_ATTR, config_from_bits, make_searcher, param_space

    units, _ = synthetic_units(2)
    for objective, expect_stopped in (("val_logprob", True), ("accuracy", False)):
        cfg = tiny_config
        cfg.search.sampler, cfg.search.objective, cfg.search.concurrency = "model", objective, 4
        sampler = ModelSampler(units, seed=0, objective=objective)
        first = [config_from_bits(b) for b in ([4, 4], [8, 8], [4, 8])]
        searcher = make_searcher(cfg, 2, first, model_sampler=sampler)
        assert searcher.set_search_properties(None, None, param_space(2, [4, 8]))
        for name in ("a", "b", "c"):
            assert searcher.suggest(name)
        for name, start in (("a", -3.0), ("b", -2.0)):  # a and b pass ASHA's rung at step 10 and run on
            searcher.on_trial_result(name, {"step": 10, "val_logprob": start, "accuracy": None, "memory_gb": 0.1, "final": False})
        final = {"a": -2.5, "b": -1.0}  # gains 0.5 and 1.0 from step 10
        for name, value in final.items():
            searcher.on_trial_complete(name, {"val_logprob": value, "accuracy": 0.5, "memory_gb": 0.1, "final": True})
        # c is stopped at the rung: as in Tune, the report ASHA stops it at reaches the searcher only here
        searcher.on_trial_complete("c", {"step": 10, "val_logprob": -4.0, "accuracy": None, "memory_gb": 0.1, "final": False})
        study = searcher.searcher._ot_study
        assert sorted(t.user_attrs[CURVE_ATTR][0][1] for t in study.trials) == [-4.0, -3.0, -2.0]
        # a killed trial retried by a resumed run keeps its id: its reports must not touch the finished Optuna trial
        searcher.on_trial_result("c", {"step": 10, "val_logprob": -3.9, "accuracy": None, "memory_gb": 0.1, "final": False})
        idx, y = sampler.training_data(study.get_trials(deepcopy=False))
        if expect_stopped:
            assert y == pytest.approx([-2.5, -1.0, -4.0 + 0.75]) and idx[2] == units.index({"b0": 4, "b1": 8})
        else:
            assert y == pytest.approx([0.5, 0.5])


def test_a_model_sampler_pickled_before_search_objective_restores_as_accuracy():
    """A run resumed from a searcher pickled by an earlier version: its ModelSampler has no `objective` attribute."""
    import pickle

    units, _ = synthetic_units(2)
    sampler = ModelSampler(units, seed=0)
    del sampler.__dict__["objective"]
    restored = pickle.loads(pickle.dumps(sampler))
    assert restored.objective == "accuracy" and restored.training_data([]) == ([], [])
