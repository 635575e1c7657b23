"""Faults a long search must survive (real Ray, real processes killed) and bad input answered in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def finished_trials(out: Path) -> dict:
    """Trials already written to results.parquet (completed, stopped early or failed)."""
    try:
        rows = pq.read_table(out / "results.parquet").to_pylist()
    except Exception:
        return {}
    return {r["trial_id"]: r for r in rows}


def start(args, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "qpruner.tune", *args], cwd=ROOT, env=env, start_new_session=True,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and everything it started (the local Ray cluster included: every process of the session
    `start` gave it): a crashed machine. Never `ray stop`, which kills every Ray process on the machine."""
    def session(p):
        try:
            return os.getsid(p.pid)
        except OSError:
            return None

    started = [p for p in psutil.process_iter() if session(p) == proc.pid and p.pid != proc.pid]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for p in started:
        try:
            p.kill()
        except psutil.Error:
            pass


def running_trial(p: psutil.Process) -> bool:
    """Ray titles a trial's worker `ray::ImplicitFunc.train` while the trial runs, plain `ray::ImplicitFunc` after."""
    try:
        return " ".join(p.cmdline()).startswith("ray::ImplicitFunc.train")
    except psutil.Error:
        return False


def trial_workers() -> list[psutil.Process]:
    return [p for p in psutil.process_iter() if running_trial(p)]


def trial_of(worker: psutil.Process) -> str | None:
    """The Tune trial id a worker runs: Tune starts each trial in its own folder, trial_trainable_<id>_<n>_..."""
    try:
        return Path(worker.cwd()).name.split("_")[2]
    except (psutil.Error, IndexError):
        return None


def test_killed_driver_resumes_and_a_killed_worker_is_isolated(tmp_path, tiny_assets, make_recipe):
    cfg = make_recipe(num_samples=8, concurrency=2)
    raw = yaml.safe_load(cfg.read_text())  # shorter trials: what is checked is what survives the kills
    raw["finetune"].update(steps=20)
    raw["eval"]["limit"] = 60
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    args = ["--config", str(cfg), "--out", str(out), "--no-dashboard"]
    first = start(args, tmp_path / "first.log")
    deadline = time.time() + 400
    while len(finished_trials(out)) < 2 and time.time() < deadline and first.poll() is None:
        time.sleep(1)
    assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    kill_group(first)
    before = finished_trials(out)
    assert len(before) >= 2
    pq.read_table(out / "results.parquet")  # never truncated

    second = start(args, tmp_path / "second.log")  # the same command continues the run
    victim = None
    deadline = time.time() + 400
    while victim is None and time.time() < deadline and second.poll() is None:
        # A trial finished just before the first kill can be rerun (Tune's snapshot lagged); its finished row
        # is kept, so the victim must run a trial that never finished.
        workers = [w for w in trial_workers() if trial_of(w) not in (None, *before)]
        if workers:
            time.sleep(1)  # let it get into the trial
            if running_trial(workers[0]):  # not finished meanwhile: killing an idle worker fails no trial
                victim = workers[0]
                victim.kill()
        time.sleep(0.5)
    code = second.wait(timeout=600)
    log = (tmp_path / "second.log").read_text()
    assert code == 0, log[-3000:]
    rows = pq.read_table(out / "results.parquet").to_pylist()
    ids = [r["trial_id"] for r in rows]
    assert len(ids) == len(set(ids)) and len(rows) >= 8
    after = {r["trial_id"]: r for r in rows}
    for trial_id, row in before.items():  # every trial finished before the kill: once, same metrics
        for key in ("status", "accuracy", "val_acc", "bits", "memory_bytes"):
            assert after[trial_id][key] == row[key]
    assert victim is not None
    failed = [r for r in rows if r["status"] == "failed"]
    assert failed and all(r["error"] for r in failed)  # the killed worker's trial is recorded, the rest went on
    front = {r["trial_id"] for r in pq.read_table(out / "pareto.parquet").to_pylist()}
    assert not front & {r["trial_id"] for r in failed}


def run_cli(args, timeout=120):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    return lines[0]


@pytest.mark.parametrize(
    "section, value, words",
    [
        ({"model": {"name": "nobody/no-such-model"}}, None, "model.name"),
        ({"eval": {"tasks": ["boolqq"]}}, None, "eval.tasks"),
        ({"finetune": {"data": "missing.jsonl"}}, None, "finetune.data"),
        ({"search": {"concurrency": 0}}, None, "search.concurrency"),
        ({"resources": {"gpu": 1.5}}, None, "resources.gpu"),
        ({"prune": {"ratoi": 0.2}}, None, "did you mean 'prune.ratio'"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_assets, section, value, words):
    raw = yaml.safe_load((ROOT / "tune_configs" / "tiny.yaml").read_text())
    for key, sub in section.items():
        raw.setdefault(key, {}).update(sub)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    line = one_line_error(run_cli(["qpruner.tune", "--config", str(path), "--out", str(out), "--no-dashboard"]))
    assert words in line
    assert not out.exists()


def test_bad_alpaca_record_names_the_index(tmp_path, tiny_assets):
    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"question": "no"}\n')
    raw = yaml.safe_load((ROOT / "tune_configs" / "tiny.yaml").read_text())
    raw["finetune"]["data"] = str(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    line = one_line_error(run_cli(["qpruner.tune", "--config", str(path), "--out", str(tmp_path / "o"), "--no-dashboard"]))
    assert "finetune.data" in line and "1" in line


def test_yaml_that_does_not_parse_gives_its_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("prune:\n  ratio: 0.2\n search: [\n")
    line = one_line_error(run_cli(["qpruner.tune", "--config", str(path)]))
    assert "line" in line


def test_out_folder_of_another_run_needs_resume_or_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text('{"run_key": "someone-else"}')
    line = one_line_error(run_cli(["qpruner.tune", "--config", str(ROOT / "tune_configs" / "tiny.yaml"), "--out", str(out)]))
    assert "--overwrite" in line and "--resume" in line
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]


def test_trial_cli_wrong_bit_vector(tiny_assets):
    line = one_line_error(run_cli(["qpruner.trial", "--config", str(ROOT / "tune_configs" / "tiny.yaml"), "--bits", "4,8"], timeout=300))
    assert "bits: got 2 entries" in line


def test_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("prune:\n  ratio: 2\n")
    proc = run_cli(["qpruner.tune", "--config", str(path), "--debug"])
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_a_trial_finished_before_a_kill_is_answered_from_its_row_not_trained_again(tmp_path):
    """A resumed run restarts a trial that finished after Tune's last snapshot; the trainable then reports
    that trial's recorded row (recorded_result), which becomes the very same row again: nothing is trained
    twice. Fails before: the trainable always trained."""
    from types import SimpleNamespace

    from qpruner.pareto import write_results
    from qpruner.results import record_from_trial, recorded_result

    def row(trial_id, status, accuracy, steps):
        return {"trial_id": trial_id, "status": status, "bits": [4, 8], "ranks": None, "accuracy": accuracy,
                "task_acc": {"piqa": 0.6, "boolq": 0.7} if accuracy else {}, "task_acc_norm": {"piqa": 0.65} if accuracy else {},
                "val_logprob": -0.8, "val_acc": 0.5, "memory_bytes": 1000, "memory_source": "estimated",
                "weight_bytes": 400, "lora_bytes": 10, "peak_estimate_bytes": 1000, "peak_measured_bytes": None,
                "train_loss": 1.2, "iterations": 2, "steps": steps, "max_steps": 40, "wall_seconds": 0.0,
                "timings": {"quantize_s": 1.0, "loftq_s": 2.0, "finetune_s": 3.0, "eval_s": 4.0} if accuracy else {},
                "error": None, "started_at": 5.0, "config": {"b0": 4, "b1": 8}}

    rows = [row("done", "completed", 0.66, 40), row("early", "stopped_early", None, 10),
            {**row("broke", "failed", None, 0), "error": "NaN"}]
    write_results(rows, tmp_path, plot=False)
    assert recorded_result(tmp_path, "broke") is None and recorded_result(tmp_path, "never") is None
    columns = ("status", "accuracy", "task_acc", "task_acc_norm", "val_logprob", "val_acc", "memory_bytes", "weight_bytes",
               "steps", "timings")
    for original in rows[:2]:
        result = recorded_result(tmp_path, original["trial_id"])
        assert result["answered_from_record"]
        trial = SimpleNamespace(trial_id=original["trial_id"], status="TERMINATED", config=original["config"],
                                last_result={**result, "training_iteration": 1}, run_metadata=SimpleNamespace(start_time=5.0),
                                error_file=None)
        again = record_from_trial(trial)
        assert {k: again[k] for k in columns} == {k: original[k] for k in columns}


def test_ctrl_c_fails_the_running_trial_a_resume_runs_it_and_a_second_driver_is_refused(tmp_path, tiny_assets, make_recipe):
    """Issue 28: a trial stopped by Ctrl-C is recorded failed with its reason (not stopped_early, which a resume
    would answer from the record and never train), the driver exits 130, --resume trains it; and while a driver
    runs, a second one on the same --out is refused in one line (the run folder's lock)."""
    cfg = make_recipe(num_samples=3, concurrency=1)
    raw = yaml.safe_load(cfg.read_text())
    raw["finetune"].update(steps=10, report_every=5)
    raw["eval"]["limit"] = 30
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    args = ["--config", str(cfg), "--out", str(out), "--no-dashboard"]
    log = tmp_path / "first.log"
    first = start(args, log)
    deadline = time.time() + 400
    while "started with configuration" not in log.read_text() and time.time() < deadline and first.poll() is None:
        time.sleep(0.5)
    time.sleep(2)  # into the trial
    assert first.poll() is None, log.read_text()[-3000:]
    line = one_line_error(run_cli(["qpruner.tune", *args]))
    assert "in use by another qpruner run" in line and str(first.pid) in line

    os.kill(first.pid, signal.SIGINT)
    assert first.wait(timeout=300) == 130, log.read_text()[-3000:]
    rows = finished_trials(out)
    stopped = {i: r for i, r in rows.items() if r["error"] and "interrupted" in r["error"]}
    assert stopped and all(r["status"] == "failed" for r in stopped.values()), rows
    assert not (out / ".qpruner.lock").exists()

    again = run_cli(["qpruner.tune", *args, "--resume"], timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    after = pq.read_table(out / "results.parquet").to_pylist()
    assert len({r["trial_id"] for r in after}) == len(after)
    for trial_id in stopped:  # trained this time: finished, with no error
        row = next(r for r in after if r["trial_id"] == trial_id)
        assert row["status"] in ("completed", "stopped_early") and row["error"] is None
    for trial_id, row in rows.items():  # everything finished before Ctrl-C: once, same metrics
        if trial_id not in stopped:
            kept = next(r for r in after if r["trial_id"] == trial_id)
            assert (kept["status"], kept["accuracy"], kept["memory_bytes"]) == (row["status"], row["accuracy"], row["memory_bytes"])

    # A truncated results.parquet: refused in one line naming the repair, which rebuilds it from Tune's state.
    data = (out / "results.parquet").read_bytes()
    (out / "results.parquet").write_bytes(data[:300])
    assert "results.parquet is damaged" in one_line_error(run_cli(["qpruner.report", str(out)]))
    assert "--resume" in one_line_error(run_cli(["qpruner.tune", *args]))
    changed = one_line_error(run_cli(["qpruner.tune", *args, "--resume", "--set", "finetune.steps=20", "--set", "lora.rank=4"]))
    assert "finetune.steps, lora.rank" in changed
    repaired = run_cli(["qpruner.report", str(out), "--repair"])
    assert repaired.returncode == 0 and "rebuilt from Tune's experiment state" in repaired.stdout, repaired.stderr[-2000:]
    rebuilt = {r["trial_id"]: r for r in pq.read_table(out / "results.parquet").to_pylist()}
    assert (out / "results.parquet.damaged").read_bytes() == data[:300]
    for row in after:
        for key in ("status", "accuracy", "val_acc", "bits", "memory_bytes", "steps"):
            assert rebuilt[row["trial_id"]][key] == row[key], (row["trial_id"], key)


@pytest.mark.parametrize("setting, field", [("search.max_memory_gb=0.0001", "search.max_memory_gb"),
                                            ("prune.first_layer=10", "prune.first_layer")])
def test_late_refusals_leave_no_out_folder(tmp_path, tiny_assets, make_recipe, setting, field):
    """Refused after pruning (the model's shapes decide), before any trial: --out is not created, so the
    corrected rerun is not refused as 'a different run'."""
    out = tmp_path / "out"
    line = one_line_error(run_cli(["qpruner.tune", "--config", str(make_recipe()), "--out", str(out), "--no-dashboard",
                                   "--set", setting], timeout=300))
    assert field in line and not out.exists()


def test_a_killed_trial_is_retried_and_one_that_failed_by_itself_keeps_its_error(tmp_path):
    """Issue 28: a resume trains again the trials killed from outside (Ray's memory monitor, a dead worker, Ctrl-C),
    and answers a trial that failed by itself with its recorded error (RecordedFailure, same text in the row)."""
    from types import SimpleNamespace

    from qpruner.pareto import write_results
    from qpruner.results import RecordedFailure, _error_text, killed, killed_trials, recorded_failure
    from qpruner.tune import INTERRUPTED

    def row(trial_id, error):
        return {"trial_id": trial_id, "status": "failed", "bits": [4, 8], "error": error, "started_at": 1.0,
                "config": {"b0": 4, "b1": 8}}

    oom = "ray.exceptions.OutOfMemoryError: Task was killed due to the node running low on memory."
    dead = "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR"
    nan = "qpruner.finetune.TrainingDiverged: finetune: training diverged at step 1 (loss nan)"
    write_results([row("oom", oom), row("dead", dead), row("stop", INTERRUPTED), row("nan", nan)], tmp_path, plot=False)
    assert killed(oom) and killed(dead) and killed(INTERRUPTED) and not killed(nan) and not killed(None)
    assert sorted(killed_trials(tmp_path)) == ["dead", "oom", "stop"]
    assert recorded_failure(tmp_path, "nan") == nan and recorded_failure(tmp_path, "oom") is None
    error_file = tmp_path / "error.txt"
    error_file.write_text(f"Traceback (most recent call last):\n  ...\n{RecordedFailure.__module__}.RecordedFailure: {nan}\n")
    assert _error_text(SimpleNamespace(error_file=str(error_file))) == nan


def _session_title(pid: int, prefix: str) -> bool:
    """Whether a process of the driver's session (`start` gives each driver its own) runs a Ray task `prefix`."""
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == pid and " ".join(p.cmdline()).startswith(prefix):
                return True
        except (psutil.Error, OSError):
            pass
    return False


@pytest.mark.slow  # ~100 s: the default suite keeps the mid-trial and after-N kill points (test above)
def test_driver_killed_during_pruning_and_during_baselines_resumes(tmp_path, tiny_assets, make_recipe, cache):
    """Issue 28's kill points beside test_killed_driver_resumes...: kill -9 while the pruning task runs (before
    --out holds anything but the lock file, which the kernel has released), and while the baselines are measured;
    each time the same command finishes the run, every finished trial once."""
    cfg = make_recipe(num_samples=2, concurrency=1, baselines=["unpruned"])
    raw = yaml.safe_load(cfg.read_text())
    raw["finetune"].update(steps=10, report_every=5)
    raw["eval"]["limit"] = 30
    raw["output"]["cache_dir"] = str(cache)
    raw["prune"]["ratio"] = 0.25  # not pruned by another test of this module: the task runs
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    args = ["--config", str(cfg), "--out", str(out), "--no-dashboard"]

    first = start(args, tmp_path / "first.log")
    deadline = time.time() + 300
    while not _session_title(first.pid, "ray::_prune_task") and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    kill_group(first)
    assert [p.name for p in out.iterdir()] in ([], [".qpruner.lock"])  # nothing of the run was written yet

    second = start(args, tmp_path / "second.log")
    deadline = time.time() + 600
    while "baselines: measuring" not in (tmp_path / "second.log").read_text() and time.time() < deadline \
            and second.poll() is None:
        time.sleep(0.5)
    assert second.poll() is None, (tmp_path / "second.log").read_text()[-3000:]
    kill_group(second)
    before = finished_trials(out)
    assert len(before) == 2 and not (out / "baselines.json").exists()

    third = run_cli(["qpruner.tune", *args], timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    after = finished_trials(out)
    assert set(after) == set(before)
    for trial_id, row in before.items():
        assert (after[trial_id]["status"], after[trial_id]["accuracy"]) == (row["status"], row["accuracy"])
    assert "unpruned" in json.loads((out / "baselines.json").read_text())
    assert not (out / ".qpruner.lock").exists()
