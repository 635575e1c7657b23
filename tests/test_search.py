"""The searcher and the importance-aware first configurations, with real Ray Tune and Optuna."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qpruner.errors import ConfigError
from qpruner.plan import resolved_config
from qpruner.search import (
    bit_probabilities,
    bits_from_config,
    config_from_bits,
    initial_configs,
    make_searcher,
    param_space,
    random_configs,
    ranks_from_config,
)


def test_config_round_trip():
    bits, ranks = [4, 8, 16, 4], [8, 4, 16, 8]
    assert bits_from_config(config_from_bits(bits), 4) == bits
    assert ranks_from_config(config_from_bits(bits), 4) is None
    assert ranks_from_config(config_from_bits(bits, ranks), 4) == ranks
    assert set(param_space(4, [4, 8], [4, 8])) == {"b0", "b1", "b2", "b3", "r0", "r1", "r2", "r3"}


def test_important_layers_get_more_bits():
    importance = [0.1, 5.0, 0.1, 5.0, 0.1, 5.0]
    configs = [c for seed in range(10) for c in initial_configs(importance, [4, 8], 6, 1.0, seed, anchors=False)]
    high = np.mean([[b == 8 for b in c] for c in configs], axis=0)
    assert high[[1, 3, 5]].min() > high[[0, 2, 4]].max() + 0.2, high
    p = bit_probabilities(importance, 1.0)
    assert (p[[1, 3, 5]] > 0.5).all() and (p[[0, 2, 4]] < 0.5).all()
    sharper = bit_probabilities(importance, 0.2)
    assert sharper[1] > p[1] and sharper[0] < p[0]


def test_first_configs_have_anchors_spread_and_no_duplicates():
    configs = initial_configs([1, 2, 3, 4, 5, 6, 7, 8], [4, 8], 6, 1.0, 0)
    assert configs[0] == [4] * 8 and configs[1] == [8] * 8
    assert len({tuple(c) for c in configs}) == len(configs)
    memory = [sum(c) for c in configs[2:]]
    assert max(memory) - min(memory) >= 12  # spread over budgets: at least 3 layers' worth 4 -> 8


def test_three_bit_widths_and_memory_weights():
    configs = [c for seed in range(10) for c in initial_configs([1, 1, 1, 9, 9, 9], [4, 8, 16], 5, 1.0, seed, anchors=False)]
    mean_bits = np.mean(configs, axis=0)
    assert mean_bits[3:].min() > mean_bits[:3].max(), mean_bits
    assert {b for c in configs for b in c} == {4, 8, 16}
    # layer 5 holds most of the memory: budgets from 20% to 80% are met on average in weight_fn's units
    weights = [1, 1, 1, 1, 1, 10]

    def weight_fn(bits):
        return sum(w * b for w, b in zip(weights, bits))

    low, high = weight_fn([4] * 6), weight_fn([8] * 6)
    share = np.array([[(weight_fn(c) - low) / (high - low) for c in initial_configs([1] * 6, [4, 8], 4, 1.0, seed,
                                                                                    anchors=False, weight_fn=weight_fn)]
                      for seed in range(40)]).mean(axis=0)
    assert np.all(np.diff(share) > 0) and abs(share[0] - 0.2) < 0.1 and abs(share[-1] - 0.8) < 0.1, share


def test_random_init_is_seeded_and_differs():
    a = random_configs(8, [4, 8], 5, seed=1)
    assert a == random_configs(8, [4, 8], 5, seed=1)
    assert a != random_configs(8, [4, 8], 5, seed=2)
    assert a != initial_configs(list(range(8)), [4, 8], 5, 1.0, 1, anchors=False)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("sampler", ["tpe", "gp"])
def test_multi_objective_search_runs_first_points_first(ray_local, tmp_path, sampler):
    from ray import tune

    def toy_trainable(config):  # local, so Ray pickles it by value; accuracy from layers 0-1, memory = bit sum
        bits = bits_from_config(config, 4)
        tune.report({"accuracy": 0.5 + 0.1 * (bits[0] + bits[1]) / 8, "memory_gb": sum(bits) / 100, "final": True})

    cfg = resolved_config({"search": {"sampler": sampler, "concurrency": 1, "num_samples": 6}})
    first = [config_from_bits([8, 8, 4, 4]), config_from_bits([4, 4, 4, 4])]
    searcher = make_searcher(cfg, 4, first)
    tuner = tune.Tuner(
        toy_trainable,
        param_space=param_space(4, [4, 8]),
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=6),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="toy", verbose=0),
    )
    grid = tuner.fit()
    assert len(grid) == 6 and grid.num_errors == 0
    study = searcher.searcher._ot_study
    assert len(study.directions) == 2
    trials = sorted(study.trials, key=lambda t: t.number)
    assert [t.params for t in trials[:2]] == first
    assert all(t.values is not None and len(t.values) == 2 for t in trials)


def test_searcher_tells_optuna_about_stopped_and_failed_trials(ray_local, tmp_path):
    """ASHA-stopped trials reach Optuna as PRUNED (their quick validation is not the accuracy objective);
    completed ones as COMPLETE with their final values; a crash as FAIL."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    def toy_trainable(config):
        bits = bits_from_config(config, 3)
        if bits == [4, 4, 4]:
            raise RuntimeError("boom")
        for step in range(4):
            acc = 0.1 * sum(bits) / 4 + 0.01 * step
            tune.report({"val_acc": acc, "accuracy": acc, "memory_gb": sum(bits) / 100, "final": step == 3})

    cfg = resolved_config({"search": {"sampler": "tpe", "concurrency": 1, "seed": 1}})
    first = [config_from_bits(b) for b in ([8, 8, 8], [4, 4, 4], [4, 4, 8], [4, 8, 8], [8, 4, 4], [8, 8, 4])]
    searcher = make_searcher(cfg, 3, first)
    scheduler = ASHAScheduler(metric="val_acc", mode="max", max_t=4, grace_period=1, reduction_factor=2)
    grid = tune.Tuner(
        toy_trainable,
        param_space=param_space(3, [4, 8]),
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=6),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="asha", verbose=0),
    ).fit()
    assert grid.num_errors == 1
    trials = {tuple(bits_from_config(t.params, 3)): t for t in searcher.searcher._ot_study.trials}
    assert trials[(4, 4, 4)].state == optuna.trial.TrialState.FAIL
    stopped = [r for r in grid if r.error is None and r.metrics["training_iteration"] < 4]
    assert stopped, "ASHA stopped nothing"
    for r in stopped:  # one quantity per objective: no quick-validation score enters "accuracy"
        t = trials[tuple(bits_from_config(r.config, 3))]
        assert t.state == optuna.trial.TrialState.PRUNED and t.values is None
    finished = [r for r in grid if r.error is None and r.metrics["training_iteration"] == 4]
    assert finished
    for r in finished:
        t = trials[tuple(bits_from_config(r.config, 3))]
        assert t.state == optuna.trial.TrialState.COMPLETE
        assert t.values == [r.metrics["accuracy"], r.metrics["memory_gb"]]


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_no_configuration_is_trained_twice(ray_local, tmp_path, sampler):
    """A 2-layer, 2-bit space has 4 configurations: 6 asked samples train each at most once, repeat
    proposals are answered from the record (counted), and the search ends when the space is exhausted."""
    from ray import tune

    def toy_trainable(config):
        bits = bits_from_config(config, 2)
        tune.report({"accuracy": bits[0] / 8, "memory_gb": sum(bits) / 100, "final": True})

    cfg = resolved_config({"search": {"sampler": sampler, "concurrency": 2, "seed": 0}})
    record = tmp_path / "searcher.json"
    searcher = make_searcher(cfg, 2, [config_from_bits([4, 4]), config_from_bits([4, 4])], record_path=record)
    grid = tune.Tuner(
        toy_trainable,
        param_space=param_space(2, [4, 8]),
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=6),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="dup", verbose=0),
    ).fit()
    trained = [tuple(bits_from_config(r.config, 2)) for r in grid]
    assert len(trained) == len(set(trained)) == 4
    repeats = searcher.searcher.answered_from_record()
    assert repeats >= 1  # at least the enqueued second [4, 4]
    assert json.loads(record.read_text())["answered_from_record"] == repeats


def test_rank_search_accepts_bit_only_first_points(ray_local, tmp_path):
    from ray import tune

    def toy_trainable(config):
        ranks = ranks_from_config(config, 2)
        tune.report({"accuracy": sum(ranks) / 32, "memory_gb": sum(bits_from_config(config, 2)) / 100})

    cfg = resolved_config({"search": {"sampler": "random", "concurrency": 1, "ranks": [4, 8, 16]}})
    searcher = make_searcher(cfg, 2, [config_from_bits([8, 4])])
    grid = tune.Tuner(
        toy_trainable,
        param_space=param_space(2, [4, 8], cfg.search.ranks),
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=3),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="ranks", verbose=0),
    ).fit()
    assert grid.num_errors == 0
    first = min(searcher.searcher._ot_study.trials, key=lambda t: t.number)
    assert bits_from_config(first.params, 2) == [8, 4] and ranks_from_config(first.params, 2) == [8, 8]  # lora.rank


def test_initial_ranks_give_important_layers_more_adapter_capacity():
    from qpruner.search import initial_ranks

    draws = initial_ranks([0.0, 1.0, 2.0, 3.0, 10.0, 11.0], [4, 8, 16], 50, 1.0, 0)
    assert len(draws) == 50 and all(len(d) == 6 and set(d) <= {4, 8, 16} for d in draws)
    mean = [sum(d[i] for d in draws) / 50 for i in range(6)]
    assert mean[5] > mean[0] + 4 and mean[4] > mean[1]
    assert initial_ranks([1.0] * 4, [8], 3, 1.0, 0) == [[8] * 4] * 3


def test_memory_budget_is_a_sampler_constraint_and_an_impossible_one_is_refused(tiny_assets):
    """max_memory_gb reaches Optuna as a constraint (completed trials by their memory objective,
    stopped ones by their last report); a budget below the all-lowest-bit layers is refused up front."""
    from qpruner.errors import ConfigError
    from qpruner.prune import prune_cached
    from qpruner.search import BUDGET, check_memory_budget, smallest_memory_gb

    cfg = resolved_config({"search": {"sampler": "tpe", "max_memory_gb": 0.5, "concurrency": 4}})
    searcher = make_searcher(cfg, 2, [config_from_bits([8, 8]), config_from_bits([4, 4])])
    assert searcher.set_search_properties(None, None, param_space(2, [4, 8]))
    assert searcher.suggest("big") and searcher.suggest("small")
    searcher.on_trial_complete("big", {"accuracy": 0.9, "memory_gb": 0.7, "final": True})
    searcher.on_trial_complete("small", {"val_acc": 0.3, "memory_gb": 0.25, "final": False})  # ASHA-stopped
    trials = {tuple(bits_from_config(t.params, 2)): t for t in searcher.searcher._ot_study.trials}
    assert trials[(8, 8)].constraints == {BUDGET: pytest.approx(0.2)}
    assert trials[(4, 4)].constraints == {BUDGET: pytest.approx(-0.25)}

    cfg = resolved_config({"prune": {"ratio": 0.3}})
    pruned = json.loads((prune_cached(cfg, progress=False).path / "config.json").read_text())
    floor = smallest_memory_gb(cfg, pruned)
    assert floor > 0
    check_memory_budget(resolved_config({"prune": {"ratio": 0.3}, "search": {"max_memory_gb": floor * 1.01}}), pruned)
    with pytest.raises(ConfigError, match=r"search.max_memory_gb.*raise it above"):
        check_memory_budget(resolved_config({"prune": {"ratio": 0.3}, "search": {"max_memory_gb": floor / 2}}), pruned)


def test_layer_groups_tie_consecutive_layers_and_expand_to_per_layer_bits():
    from qpruner.search import bits_from_config, config_from_bits, expand, layer_groups, param_space, ranks_from_config, search_units

    assert layer_groups(30, 5) == [list(range(i, i + 6)) for i in range(0, 30, 6)]
    assert layer_groups(7, 3) == [[0, 1, 2], [3, 4], [5, 6]]  # sizes differ by at most one, earlier runs larger
    config = config_from_bits([4, 8, 4], [8, 16, 8])
    assert bits_from_config(config, 7) == [4, 4, 4, 8, 8, 4, 4] and ranks_from_config(config, 7) == [8, 8, 8, 16, 16, 8, 8]
    assert bits_from_config(config_from_bits([4, 8, 4]), 3) == [4, 8, 4]  # ungrouped: one per layer, unchanged
    assert expand([8, 4], 4) == [8, 8, 4, 4]
    assert len(param_space(search_units(resolved_config({"search": {"layer_groups": 5}}), 30), [4, 8])) == 5
    with pytest.raises(ConfigError, match=r"^search\.layer_groups: 40 groups asked, but the pruned model has 30"):
        search_units(resolved_config({"search": {"layer_groups": 40}}), 30)
    with pytest.raises(ConfigError, match=r"^search\.layer_groups"):
        resolved_config({"search": {"layer_groups": 0}})
