"""Out of memory is an outcome, not a crash (issue 25, item 3): a trial that runs out of GPU (or host) memory
is recorded `oom` with its GPU fraction, the searcher hears a constraint violation, the report counts it, and
a worker killed by Ray's memory monitor no longer ends the driver. Real Ray, Optuna and torch throughout."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from qpruner.errors import TrialOOM, out_of_memory
from qpruner.plan import resolved_config
from qpruner.results import (
    RESULTS_SCHEMA,
    killed,
    killed_trials,
    merge_previous,
    own_oom,
    results_table,
    write_oom_marker,
)
from qpruner.search import (
    BUDGET,
    OOM_ATTR,
    OOM_VIOLATION,
    bits_from_config,
    config_from_bits,
    make_searcher,
    param_space,
    read_oom_marker,
)

ROOT = Path(__file__).resolve().parents[1]
HOST_KILL = ("OutOfMemoryError: 1 worker(s) were killed due to the node running low on memory. Memory on the node "
             "(IP: 10.0.0.1) was 14.2GB used / 23.5GB limit")


def test_trial_oom_carries_stage_fraction_bits_and_survives_pickling():
    oom = TrialOOM("finetune", 0.25, [8, 4], detail="CUDA out of memory. Tried to allocate 2.00 GiB\n(GPU 0)")
    assert str(oom) == ("out of GPU memory during finetune at GPU fraction 0.25 (bits 8,4): CUDA out of memory. "
                        "Tried to allocate 2.00 GiB (GPU 0)")
    back = pickle.loads(pickle.dumps(oom))  # it crosses Ray's process boundary
    assert (back.stage, back.gpu_fraction, back.bits, str(back)) == ("finetune", 0.25, [8, 4], str(oom))
    assert "out of host memory during eval" in str(TrialOOM("eval", 0.0, [4], host=True))
    assert out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory")) and out_of_memory(HOST_KILL)
    assert not out_of_memory("ValueError: loss is NaN")


def test_statuses_and_resume_tell_an_oom_from_a_kill(tmp_path):
    """A trial's own TrialOOM is not a kill (a resume keeps it: infeasible at its packing); Ray's memory
    monitor killing the worker is (a resume trains it again), both recorded `oom`."""
    own = "qpruner.errors.TrialOOM: out of GPU memory during finetune at GPU fraction 0.5 (bits 8,8): CUDA out of memory"
    assert own_oom(own) and not killed(own)
    assert killed(HOST_KILL) and not own_oom(HOST_KILL)
    rows = [{"trial_id": "own", "status": "oom", "bits": [8, 8], "error": own, "gpu_fraction": 0.5, "started_at": 1.0},
            {"trial_id": "host", "status": "oom", "bits": [8, 4], "error": HOST_KILL, "gpu_fraction": 0.5, "started_at": 2.0},
            {"trial_id": "nan", "status": "failed", "bits": [4, 4], "error": "loss is NaN", "started_at": 3.0}]
    table = results_table(rows)
    assert table["gpu_fraction"].to_pylist() == [0.5, 0.5, None]
    pq.write_table(table, tmp_path / "results.parquet")
    assert killed_trials(tmp_path) == ["host"]

    # a results file from before the column (schema version 1) still merges
    old = table.drop_columns(["gpu_fraction"]).replace_schema_metadata({b"schema_version": b"1"})
    fresh = results_table([{"trial_id": "new", "status": "completed", "bits": [4, 4], "accuracy": 0.5,
                            "gpu_fraction": 1.0, "started_at": 4.0}])
    merged = merge_previous(fresh, old)
    assert merged.schema.names[:len(RESULTS_SCHEMA)] == RESULTS_SCHEMA.names
    assert dict(zip(merged["trial_id"].to_pylist(), merged["gpu_fraction"].to_pylist())) == {
        "own": None, "host": None, "nan": None, "new": 1.0}
    assert merged.schema.metadata[b"schema_version"] == b"3"
    assert merged.schema.field("gpu_fraction").type == pa.float64()


def test_run_trial_raises_trial_oom_from_a_real_cuda_oom(tiny_assets, monkeypatch):
    """QPRUNER_INJECT_OOM_BITS raises a real torch.cuda.OutOfMemoryError as fine-tuning starts; run_trial turns
    it into a TrialOOM naming the stage, the GPU fraction (0: CPU) and the bits, with the analytic peak."""
    from qpruner.prune import prune_cached, pruned_layer_count
    from qpruner.trial import OOM_ENV, run_trial

    cfg = resolved_config({"prune": {"ratio": 0.3}, "finetune": {"steps": 2}})
    pruned = prune_cached(cfg, progress=False).path
    bits = [8] * pruned_layer_count(pruned)
    monkeypatch.setenv(OOM_ENV, ",".join(map(str, bits)))
    with pytest.raises(TrialOOM) as caught:
        run_trial(cfg, pruned, bits)
    oom = caught.value
    assert (oom.stage, oom.gpu_fraction, oom.bits, oom.host) == ("finetune", 0.0, bits, False)
    assert isinstance(oom.__cause__, torch.cuda.OutOfMemoryError)
    assert oom.memory_bytes and oom.memory_bytes > 0
    assert str(oom).startswith("out of GPU memory during finetune at GPU fraction 0 (bits 8,")


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def test_searcher_hears_an_oom_as_a_constraint_violation(ray_local, tmp_path):
    """Real Tune + Optuna TPE: a trial that raised TrialOOM reaches Optuna as PRUNED with the BUDGET
    constraint positive (TPE ranks it below every feasible trial), not as FAIL, which samplers ignore;
    a plain crash stays FAIL; with search.max_memory_gb the violation adds how far over budget it was."""
    import optuna
    from ray import tune

    run = tmp_path / "run"
    run.mkdir()

    def toy_trainable(config):
        from ray import tune as rt

        from qpruner.errors import TrialOOM as Oom
        from qpruner.results import write_oom_marker as mark

        bits = bits_from_config(config, 3)
        if bits == [8, 8, 8]:
            oom = Oom("finetune", 0.5, bits, detail="CUDA out of memory")
            oom.memory_bytes = int(0.9 * 1024**3)
            mark(str(run), rt.get_context().get_trial_id(), oom)
            raise oom
        if bits == [4, 4, 4]:
            raise RuntimeError("boom")
        rt.report({"accuracy": 0.1 * sum(bits) / 4, "memory_gb": sum(bits) / 100, "final": True})

    from qpruner.tune import ResultsWriter

    first = [config_from_bits(b) for b in ([8, 8, 8], [4, 4, 4], [4, 4, 8], [8, 4, 4])]
    for budget, expected in ((None, OOM_VIOLATION), (0.5, OOM_VIOLATION + 0.4)):
        cfg = resolved_config({"search": {"sampler": "tpe", "concurrency": 1, "seed": 1, "max_memory_gb": budget}})
        searcher = make_searcher(cfg, 3, first, record_path=run / "searcher.json")
        grid = tune.Tuner(
            tune.with_resources(toy_trainable, {"cpu": 1, "gpu": 0}),
            param_space=param_space(3, [4, 8]),
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=5),
            run_config=tune.RunConfig(storage_path=str(tmp_path), name=f"oom{budget}", verbose=0,
                                      callbacks=[ResultsWriter(run, 5, 3)] if budget is None else []),
        ).fit()
        assert grid.num_errors == 2
        if budget is None:  # the Tune callback's records: `oom` with the fraction Tune reserved, `failed`
            rows = {tuple(r["bits"]): r for r in pq.read_table(run / "results.parquet").to_pylist()}
            assert rows[(8, 8, 8)]["status"] == "oom" and rows[(8, 8, 8)]["gpu_fraction"] == 0.0
            assert rows[(8, 8, 8)]["error"].endswith("out of GPU memory during finetune at GPU fraction 0.5 "
                                                     "(bits 8,8,8): CUDA out of memory")
            assert rows[(4, 4, 4)]["status"] == "failed" and rows[(4, 4, 8)]["status"] == "completed"
        trials = {tuple(bits_from_config(t.params, 3)): t for t in searcher.searcher._ot_study.trials}
        oom = trials[(8, 8, 8)]
        assert oom.state == optuna.trial.TrialState.PRUNED
        assert oom.constraints == {BUDGET: pytest.approx(expected)} and oom.user_attrs[OOM_ATTR] == 0.5
        assert trials[(4, 4, 4)].state == optuna.trial.TrialState.FAIL and not trials[(4, 4, 4)].constraints
        assert len(trials) == 5  # the search went on past both


def test_report_counts_oom_trials_with_their_fraction(tmp_path):
    from qpruner.pareto import write_results
    from qpruner.report import write_report

    own = "out of GPU memory during finetune at GPU fraction 0.25 (bits 8,8): CUDA out of memory"
    records = [{"trial_id": "a", "status": "completed", "bits": [4, 4], "accuracy": 0.5, "accuracy_stderr": 0.02,
                "memory_bytes": 10**8, "task_acc": {"arc_easy": 0.5}, "gpu_fraction": 0.25, "started_at": 1.0},
               {"trial_id": "b", "status": "oom", "bits": [8, 8], "memory_bytes": 2 * 10**8, "error": own,
                "gpu_fraction": 0.25, "started_at": 2.0},
               {"trial_id": "c", "status": "oom", "bits": [8, 4], "error": HOST_KILL, "gpu_fraction": 0.0,
                "started_at": 3.0}]
    write_results(records, tmp_path)
    report = write_report(tmp_path).read_text()
    assert "- Trials: 3: 1 completed, 0 stopped early by ASHA, 0 failed, 2 out of memory." in report
    section = report.split("## Out of memory")[1].split("\n## ")[0]
    assert "| b | 88 | 0.25 | out of GPU memory during finetune at GPU fraction 0.25" in section
    assert "| c | 84 | CPU | OutOfMemoryError: 1 worker(s) were killed due to the node running low on memory" in section


def run_cli(args: list[str], env_extra: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **env_extra}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_search_records_an_oom_trial_and_goes_on(tmp_path, tiny_assets):
    """The real CLI on builtin:tiny, the uniform-8 anchor made to run out of GPU memory (a real
    torch.cuda.OutOfMemoryError): results.parquet holds it as `oom` with its fraction, Optuna's study holds
    the constraint, the report counts it, and the driver exits 0."""
    raw = yaml.safe_load((ROOT / "tune_configs" / "tiny.yaml").read_text())
    raw["finetune"].update(steps=4, report_every=2, val_limit=8)
    raw["eval"]["limit"] = 8
    raw["search"].update(num_samples=3, concurrency=1, asha={"enabled": False}, baselines=[], n_init=1)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    n_layers = yaml.safe_load((Path(tiny_assets.model_dir) / "config.json").read_text())["num_hidden_layers"]
    started = time.time()
    proc = run_cli(["qpruner.tune", "--config", str(recipe), "--out", str(out), "--no-dashboard"],
                   {"QPRUNER_INJECT_OOM_BITS": ",".join(["8"] * n_layers)})
    print(proc.stdout[-3000:], proc.stderr[-3000:], f"tune wall seconds: {time.time() - started:.1f}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = pq.read_table(out / "results.parquet").to_pylist()
    oom = [r for r in rows if r["status"] == "oom"]
    assert len(oom) == 1 and oom[0]["bits"] == [8] * len(oom[0]["bits"]), [r["status"] for r in rows]
    assert oom[0]["gpu_fraction"] == 0.0 and "out of GPU memory during finetune" in oom[0]["error"]
    assert all(r["gpu_fraction"] == 0.0 for r in rows)
    assert any(r["status"] == "completed" for r in rows)
    assert read_oom_marker(out, oom[0]["trial_id"])["stage"] == "finetune"

    state = sorted((out / "tune").glob("searcher-state-*.pkl"))
    assert state, sorted(p.name for p in (out / "tune").iterdir())
    saved = pickle.loads(state[-1].read_bytes())
    study = saved["_ot_study"]
    violated = [t for t in study.trials if t.constraints.get(BUDGET, 0) > 0]
    assert len(violated) == 1 and bits_from_config(violated[0].params, n_layers) == oom[0]["bits"]

    report = (out / "report.md").read_text()
    assert ", 1 out of memory." in report and "## Out of memory" in report
    assert "out of memory 1" in proc.stdout  # the progress line


KILL_SCRIPT = textwrap.dedent("""
    import os, sys, time
    import psutil
    vm = psutil.virtual_memory()
    # Ray's memory monitor kills a worker once the node uses 1.5 GB more than now
    os.environ["RAY_memory_usage_threshold"] = str(round((vm.total - vm.available + 1.5 * 1024**3) / vm.total, 3))
    os.environ["RAY_memory_monitor_refresh_ms"] = "100"
    import ray
    from ray import tune
    from qpruner.tune import tolerate_worker_kills
    from qpruner.results import record_from_trial

    ray.init(num_cpus=1, include_dashboard=False, configure_logging=False)
    if sys.argv[1] == "patched":
        tolerate_worker_kills()

    def trainable(config):
        import numpy as np
        for i in range(100):
            time.sleep(0.2)
            if i == 5:
                x = np.ones(400_000_000)  # 3.2 GB, while the trial's `train` task runs
            tune.report({"score": float(i)})

    class Record(tune.Callback):
        def on_trial_error(self, iteration, trials, trial, **info):
            r = record_from_trial(trial, "ERROR", 0)
            print("RECORD", r["status"], r["gpu_fraction"], flush=True)

    tune.Tuner(trainable, param_space={"a": tune.grid_search([1, 2])},
               run_config=tune.RunConfig(storage_path=sys.argv[2], name="k", verbose=0, callbacks=[Record()])).fit()
    print("FIT RETURNED", flush=True)
""")


@pytest.mark.slow
def test_a_worker_killed_by_the_memory_monitor_is_a_trial_outcome(tmp_path):
    """Ray's real memory monitor kills the trial's worker mid-task: unpatched, Tune 2.60's fit() raises
    "RuntimeError: Caught unexpected exception: 1 worker(s) were killed due to the node running low on
    memory" (the SmolLM2 driver crash); with tolerate_worker_kills the trials are recorded `oom` and fit returns.
    Allocates 3.2 GB for a moment."""
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = {}
    for mode in ("plain", "patched"):
        runs[mode] = subprocess.run([sys.executable, str(script), mode, str(tmp_path / mode)], env=env, cwd=ROOT,
                                    capture_output=True, text=True, timeout=300)
    plain, patched = runs["plain"], runs["patched"]
    assert plain.returncode != 0 and "Caught unexpected exception" in plain.stderr and \
        "running low on memory" in plain.stderr, plain.stderr[-2000:]
    assert patched.returncode == 0, patched.stderr[-3000:]
    assert "FIT RETURNED" in patched.stdout
    assert patched.stdout.count("RECORD oom 0.0") == 2, patched.stdout[-2000:]
    assert "[qpruner] a trial's worker was killed" in patched.stdout


def test_oom_marker_round_trip(tmp_path):
    oom = TrialOOM("quantize", 1.0, [4, 8], detail="CUDA out of memory")
    oom.memory_bytes = 3 * 1024**3
    path = write_oom_marker(tmp_path, "t1", oom)
    assert json.loads(path.read_text())["memory_gb"] == 3.0
    assert read_oom_marker(tmp_path, "t1")["gpu_fraction"] == 1.0 and read_oom_marker(tmp_path, "t2") is None


def test_steps_outside_the_search_reserve_a_whole_gpu_when_trials_are_packed():
    from qpruner.plan import whole_gpu

    assert whole_gpu(0.25) == 1.0 and whole_gpu(0.5) == 1.0  # importance, sensitivity table, baselines
    assert whole_gpu(0.0) == 0.0 and whole_gpu(1.0) == 1.0 and whole_gpu(2.0) == 2.0


def test_apt_baseline_loads_in_the_compute_dtype(cache, monkeypatch):
    """The APT baseline's dense model loads in quant.compute_dtype like the trials (it loaded float32: 27 GB for
    a 7B model), and is evaluated in it."""
    import qpruner.prune as prune
    from qpruner.baselines import apt_no_retraining
    from qpruner.plan import plan_tasks

    raw = yaml.safe_load((ROOT / "tune_configs" / "tiny.yaml").read_text())
    raw["prune"] = {"method": "apt", "ratio": 0, "sparsity": "2:4",
                    "calibration": {"source": "builtin", "n_samples": 8, "seq_len": 32}}
    raw["quant"]["compute_dtype"] = "bfloat16"
    raw["eval"]["limit"] = 8
    raw["output"] = {"cache_dir": str(cache)}
    cfg = resolved_config(raw)
    loaded = []
    real = prune.load_pruned

    def recording(path, dtype="float32", device=None):
        model, tokenizer = real(path, dtype=dtype, device=device)
        loaded.append(next(model.parameters()).dtype)
        return model, tokenizer

    monkeypatch.setattr(prune, "load_pruned", recording)
    row = apt_no_retraining(cfg, plan_tasks(cfg))
    assert loaded == [torch.bfloat16] and 0 <= row["accuracy"] <= 1


def test_a_task_out_of_memory_is_one_line_not_a_traceback(ray_local):
    """The driver's Ray tasks (pruning, importance, sensitivity table, baselines): a real CUDA OOM inside one
    reaches the driver as a TrialOOM naming the step (a QPrunerError: one line, exit 2)."""
    import ray

    from qpruner.errors import QPrunerError, ray_get

    @ray.remote(num_cpus=0)
    def allocate():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with pytest.raises(TrialOOM) as caught:
        ray_get(allocate.remote(), what="the layer importance")
    assert isinstance(caught.value, QPrunerError) and not caught.value.host
    assert str(caught.value) == ("out of GPU memory during the layer importance: CUDA out of memory. "
                                 "Tried to allocate 20.00 GiB")


def test_a_search_whose_every_trial_ran_out_of_memory_says_so_in_one_line(tmp_path):
    from qpruner.errors import QPrunerError
    from qpruner.pareto import write_results
    from qpruner.tune import check_not_all_failed

    own = "out of GPU memory during finetune at GPU fraction 0.25 (bits 8,8): CUDA out of memory"
    rows = [{"trial_id": t, "status": "oom", "bits": b, "error": own, "gpu_fraction": 0.25, "started_at": i}
            for i, (t, b) in enumerate((("a", [8, 8]), ("b", [4, 8])))]
    write_results(rows, tmp_path, plot=False)
    with pytest.raises(QPrunerError, match=r"^every trial ran out of memory \(2 of 2, GPU fraction 0.25\): lower "
                                           r"search.concurrency or set resources.gpu: 1"):
        check_not_all_failed(tmp_path)
    write_results(rows + [{"trial_id": "c", "status": "completed", "bits": [4, 4], "accuracy": 0.5,
                           "memory_bytes": 10**8, "started_at": 3.0}], tmp_path, plot=False)
    check_not_all_failed(tmp_path)  # one trial fitted: the run goes on to its report

    from qpruner.export import pick_trial

    with pytest.raises(QPrunerError, match=r"^--trial a: that trial ran out of memory \(out of GPU memory during finetune"):
        pick_trial(tmp_path, trial="a")
