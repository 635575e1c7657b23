"""End-to-end: the real `python -m qpruner.tune` CLI on builtin:tiny with real Ray, Optuna, ASHA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from qpruner.pareto import pareto_mask

ROOT = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], env_extra: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_assets):
    """One real search: 6 trials, 2 at a time, one trial's fine-tuning made to diverge for real."""
    tmp = tmp_path_factory.mktemp("tune")
    raw = yaml.safe_load((ROOT / "tune_configs" / "tiny.yaml").read_text())
    raw["search"].update(num_samples=6, concurrency=2, asha={"enabled": True, "grace_period": 1, "reduction_factor": 3})
    raw["finetune"]["val_limit"] = 50  # all validation docs: fewer tied scores, which ASHA never stops
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    out = tmp / "run"
    n_layers = yaml.safe_load((Path(tiny_assets.model_dir) / "config.json").read_text())["num_hidden_layers"]
    poisoned = ",".join(["8"] * n_layers)  # the uniform-8 anchor diverges: a real NaN loss
    started = time.time()
    proc = run_cli(["qpruner.tune", "--config", str(recipe), "--out", str(out)], {"QPRUNER_INJECT_NAN_BITS": poisoned})
    seconds = time.time() - started
    print(proc.stdout[-4000:], proc.stderr[-4000:], f"tune wall seconds: {seconds:.1f}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc, seconds


def test_search_writes_consistent_results_and_front(tiny_run):
    out, proc, _ = tiny_run
    results = pq.read_table(out / "results.parquet").to_pylist()
    front = pq.read_table(out / "pareto.parquet").to_pylist()
    assert len(results) >= 6
    statuses = [r["status"] for r in results]
    assert statuses.count("failed") == 1, statuses
    assert "stopped_early" in statuses, "ASHA stopped no trial"
    failed = next(r for r in results if r["status"] == "failed")
    assert failed["error"] and ("NaN" in failed["error"] or "nan" in failed["error"] or "diverge" in failed["error"])
    completed = [r for r in results if r["status"] == "completed"]
    assert completed and all(r["accuracy"] is not None and r["memory_bytes"] > 0 for r in completed)
    assert all(0 < r["accuracy_stderr"] < 0.5 for r in completed)  # lm-eval's standard error, combined over tasks
    # the front is exactly the non-dominated completed trials
    mask = pareto_mask([r["accuracy"] for r in completed], [r["memory_bytes"] for r in completed])
    expected = {r["trial_id"] for r, keep in zip(completed, mask) if keep}
    assert {r["trial_id"] for r in front} == expected
    assert failed["trial_id"] not in expected
    assert (out / "pareto.png").stat().st_size > 10_000
    assert "[qpruner] trials finished" in proc.stdout


def test_report_compares_with_the_measured_baselines(tiny_run):
    """The paper's rows: unpruned (zero-shot) and uniform-16 LoRA measured after the search, beside the anchors."""
    out, _, _ = tiny_run
    baselines = json.loads((out / "baselines.json").read_text())
    assert set(baselines) == {"unpruned", "uniform-16"}
    assert baselines["unpruned"]["memory_bytes"] is None and baselines["unpruned"]["weight_bytes"] > 0
    sixteen = baselines["uniform-16"]
    assert sixteen["bits"] == [16] * len(sixteen["bits"]) and 0 <= sixteen["accuracy"] <= 1
    front = pq.read_table(out / "results.parquet").to_pylist()
    assert sixteen["memory_bytes"] > max(r["memory_bytes"] for r in front if r["memory_bytes"])  # 16-bit costs most
    report = (out / "report.md").read_text()
    comparison = report.split("## Comparison with uniform precision")[1].split("##")[0]
    for label in ("unpruned, no fine-tuning", "uniform-16 LoRA", "uniform-4 LoftQ"):  # the uniform-8 anchor is made to fail
        assert f"| {label} |" in comparison, label
    assert f"{sixteen['accuracy']:.3f} ± {sixteen['accuracy_stderr']:.3f}" in comparison


def test_first_trials_are_the_importance_aware_configs(tiny_run):
    out, _, _ = tiny_run

    planned = json.loads((out / "importance.json").read_text())["initial"]
    results = pq.read_table(out / "results.parquet").to_pylist()
    tried = [list(r["bits"]) for r in sorted(results, key=lambda r: r["started_at"])]
    for bits in planned[: len(tried)]:
        assert bits in tried


def test_gpu_request_without_gpu_fails_fast(tmp_path, tiny_assets):
    raw = yaml.safe_load((ROOT / "tune_configs" / "tiny.yaml").read_text())
    raw["resources"]["gpu"] = 0.25
    recipe = tmp_path / "gpu.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    started = time.time()
    proc = run_cli(["qpruner.tune", "--config", str(recipe), "--out", str(tmp_path / "run"), "--no-dashboard"], timeout=120)
    assert proc.returncode == 2
    assert time.time() - started < 60
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "resources.gpu" in lines[0] and "Traceback" not in proc.stderr


def test_bad_config_is_one_line_exit_2(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("prune:\n  ratoi: 0.3\n")
    proc = run_cli(["qpruner.tune", "--config", str(recipe)], timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: prune.ratoi: unknown key; did you mean 'prune.ratio'?"


LOAD_AND_EVALUATE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from load_qpruner import load
model, tok = load(sys.argv[2], device="cpu")
assert not [m for m in sys.modules if m.startswith("qpruner")], "the loader imported qpruner"
from lm_eval import evaluator
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
tm = TaskManager(include_path=sys.argv[3], include_defaults=False)
res = evaluator.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=16),
                                tasks=["tiny_colour", "tiny_home", "tiny_food"], task_manager=tm, num_fewshot=0)
accs = [res["results"][t]["acc,none"] for t in ("tiny_colour", "tiny_home", "tiny_food")]
print(json.dumps(sum(accs) / len(accs)))
"""


def test_export_loads_without_qpruner_and_scores_as_reported(tiny_run, tiny_assets, tmp_path):
    out, _, _ = tiny_run
    target = tmp_path / "exported"
    proc = run_cli(["qpruner.export", "--run", str(out), "--pick", "best-acc", "--out", str(target), "--merge"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    quant = json.loads((target / "quantization.json").read_text())
    assert not list(target.rglob("*.bin")) and not list(target.rglob("*.pt"))
    for folder in (target, target / "merged"):
        script = tmp_path / "check.py"
        script.write_text(LOAD_AND_EVALUATE)
        run = subprocess.run([sys.executable, str(script), str(target), str(folder), str(tiny_assets.tasks_dir)],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        accuracy = json.loads(run.stdout.strip().splitlines()[-1])
        if folder == target:  # quantized base + adapter: the very model the trial evaluated
            assert accuracy == pytest.approx(quant["accuracy"], abs=1e-9)
        else:  # merged full precision: same function up to the fp rounding of the fold
            assert abs(accuracy - quant["accuracy"]) <= 0.02


def test_slimgpt_and_per_layer_ranks_end_to_end(tmp_path, tiny_assets):
    """tune_configs/tiny_slimgpt_ranks.yaml, shortened: SlimGPT pruning, ranks searched per layer,
    recorded in results.parquet, held by the trained adapters and carried by the export (rank_pattern)."""
    raw = yaml.safe_load((ROOT / "tune_configs" / "tiny_slimgpt_ranks.yaml").read_text())
    raw["search"].update(num_samples=4, concurrency=2, asha={"enabled": False}, n_init=2, baselines=[])
    raw["finetune"].update(steps=10, report_every=5, val_limit=8)
    raw["eval"]["limit"] = 40  # what is checked is where the ranks go, not the accuracy: a short evaluation
    raw["output"]["keep_adapters"] = "all"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    proc = run_cli(["qpruner.tune", "--config", str(recipe), "--out", str(out), "--no-dashboard"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    pruned = json.loads((Path(json.loads((out / "run.json").read_text())["pruned_path"]) / "qpruner_prune.json").read_text())
    assert pruned["prune"]["method"] == "slimgpt"
    rows = [r for r in pq.read_table(out / "results.parquet").to_pylist() if r["status"] == "completed"]
    assert len(rows) == 4
    assert all(len(r["ranks"]) == len(r["bits"]) and set(r["ranks"]) <= {4, 8, 16} for r in rows)
    assert len({tuple(r["ranks"]) for r in rows}) > 1, "the search never varied the ranks"
    row = max(rows, key=lambda r: len(set(r["ranks"])))
    target = tmp_path / "exported"
    proc = run_cli(["qpruner.export", "--run", str(out), "--trial", row["trial_id"], "--out", str(target)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapter_cfg = json.loads((target / "adapter" / "adapter_config.json").read_text())
    for i, rank in enumerate(row["ranks"]):
        effective = next((r for pattern, r in adapter_cfg["rank_pattern"].items() if f"layers.{i}." in pattern.replace("\\", "")),
                         adapter_cfg["r"])
        assert effective == rank, (i, adapter_cfg["rank_pattern"])
    from safetensors.torch import load_file

    state = load_file(target / "adapter" / "adapter_model.safetensors")
    for key, tensor in state.items():
        if "lora_A" in key:
            layer = int(key.split(".layers.")[1].split(".")[0])
            assert tensor.shape[0] == row["ranks"][layer], key
    assert json.loads((target / "quantization.json").read_text())["ranks"] == row["ranks"]


@pytest.mark.parametrize("steps,every,cap,expected", [(40, 10, None, 3), (45, 10, None, 4), (40, 10, 2, 2), (10, 10, None, 0)])
def test_asha_rungs_never_sit_at_the_last_step(steps, every, cap, expected):
    """tiny.yaml (40 steps, a report every 10): ASHA's top is report 3 (step 30), not 4 (step 40, all
    training done) or 5 (the final evaluation); its rungs are then 1 and 2."""
    from ray.tune.schedulers.async_hyperband import _Bracket

    from qpruner.plan import resolved_config
    from qpruner.tune import asha_max_t

    cfg = resolved_config({"finetune": {"steps": steps, "report_every": every}, "search": {"asha": {"max_t": cap}}})
    max_t = asha_max_t(cfg)
    assert max_t == expected
    if max_t:
        rungs = [m for m, _ in _Bracket(1, max_t, 2, 0)._rungs]
        assert max(rungs) * every < steps


def test_intermediate_reports_carry_the_analytic_peak_not_a_pre_training_measurement():
    """A CUDA measurement taken before training (no activations, no optimizer state) is below the
    analytic fine-tuning peak; the intermediate report carries the larger, never the smaller."""
    from qpruner.memory import MemoryReport
    from qpruner.trial import progress_memory

    before_training = MemoryReport(weight_bytes=100, lora_bytes=10, peak_estimate_bytes=250,
                                   peak_measured_bytes=120, source="measured")
    assert progress_memory(before_training) == {"memory_gb": 250 / 1024**3, "memory_bytes": 250, "memory_source": "estimated"}
    later = MemoryReport(100, 10, 250, 400, "measured")
    assert progress_memory(later)["memory_bytes"] == 400
    cpu = MemoryReport(100, 10, 250, None, "estimated")
    assert progress_memory(cpu)["memory_bytes"] == 250


def test_memory_objective_weights_and_a_nonpositive_budget():
    """search.memory_objective: weights makes memory the quantized weights alone, in every report;
    max_memory_gb must be positive (one ConfigError naming the field)."""
    from qpruner.errors import ConfigError
    from qpruner.memory import MemoryReport
    from qpruner.plan import resolved_config
    from qpruner.trial import progress_memory

    memory = MemoryReport(100, 10, 250, 400, "measured")
    assert memory.objective("weights") == 100 and memory.objective() == 400
    assert progress_memory(memory, "weights")["memory_bytes"] == 100
    assert resolved_config({"search": {"memory_objective": "weights"}}).search.memory_objective == "weights"
    with pytest.raises(ConfigError, match="search.max_memory_gb"):
        resolved_config({"search": {"max_memory_gb": 0}})


def test_a_run_of_an_earlier_version_continues_when_only_new_fields_are_missing(tmp_path, tiny_config):
    """run.json of a version before a config field existed (here search.objective) records the behaviour of the
    field's default: the run is the same run, not "a different run's results"; a real change is still refused."""
    from qpruner.errors import QPrunerError
    from qpruner.tune import check_out_dir

    old = tiny_config.to_dict()
    del old["search"]["objective"]
    (tmp_path / "run.json").write_text(json.dumps({"run_key": "0123456789abcdef", "created": 0.0, "config": old}))
    assert check_out_dir(tmp_path, tiny_config, resume=False, overwrite=False) is False  # same run; no Tune state yet
    tiny_config.search.objective = "perplexity"
    with pytest.raises(QPrunerError, match="search.objective"):
        check_out_dir(tmp_path, tiny_config, resume=True, overwrite=False)


def test_finish_keeps_the_adapter_that_export_pick_best_acc_exports(tmp_path, tiny_config):
    """A perplexity run keeps the front's adapters and the most accurate trial's; on an accuracy tie that is the
    one `export --pick best-acc` chooses (the smaller memory), not merely the first."""
    from qpruner.export import pick_trial
    from qpruner.pareto import write_results
    from qpruner.tune import finish
    from tests.test_pareto import perplexity_records, record

    recs = perplexity_records() + [record(5, "completed", [8, 4], 0.95, 205, perplexity=50.0)]  # ties t3 on accuracy
    write_results(recs, tmp_path, plot=False, objective="perplexity")
    for r in recs:
        (tmp_path / "adapters" / r["trial_id"]).mkdir(parents=True)
    finish(tmp_path, tiny_config)
    kept = sorted(p.name for p in (tmp_path / "adapters").iterdir())
    assert pick_trial(tmp_path, pick="best-acc")["trial_id"] == "t5"
    assert kept == ["t1", "t2", "t5"]  # the perplexity front, and the accuracy pick
