"""`python -m qpruner.tune`: prune once, then search per-layer bit-widths with Ray Tune + Optuna + ASHA.

Flow: ray.init -> prune (cached Ray task) -> layer importance -> first configurations -> Tuner over
fractional-GPU trials -> results.parquet / pareto.parquet / pareto.png / report.md in the output folder.
Results are rewritten after every finished trial, so a killed driver loses nothing; rerunning the same
command (or `--resume`) continues the run with `Tuner.restore`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from ray.exceptions import RayActorError
from ray.tune import Callback

from qpruner.config import Config
from qpruner.errors import ConfigError, QPrunerError, ray_get
from qpruner.plan import RunPlan, check_storage, make_plan, whole_gpu
from qpruner.results import (
    ADAPTERS,
    RecordedFailure,
    adapter_path,
    killed_trials,
    record_from_trial,
    recorded_failure,
    recorded_result,
    write_atomic,
    write_json_atomic,
)

EXPERIMENT = "tune"  # Tune's experiment folder inside the output folder
SEARCHER_RECORD = "searcher.json"  # the searcher's counts (proposals answered from the record)
VALIDATION_RECORD = "validation.json"  # where each task's quick validation reads (the report says so)
# results.parquet's error of a trial the run's end stopped before it finished: a failure, which a resume retries
INTERRUPTED = "interrupted before it finished (Ctrl-C or a signal stopped the run); --resume runs it again"


# ---------------------------------------------------------------------------------------------
# The trainable: one Tune trial = one call of qpruner.trial.run_trial.


def trial_trainable(config: dict, plan: RunPlan) -> None:
    """Ray Tune function trainable: decode the bits from `config`, run the trial, report as it goes.

    Everything comes from the driver's `plan`; the adapter goes into the run folder (shared by every
    node), not into Tune's trial folder, which on a worker node is a staging folder that is never synced.
    A trial that results.parquet already holds as finished (it ended just before a driver kill, after
    Tune's last snapshot, so a resumed run starts it again) is answered from that row, not trained twice.
    """
    from ray import tune

    from qpruner.search import bits_from_config, ranks_from_config
    from qpruner.trial import run_trial

    trial_id = tune.get_context().get_trial_id()
    recorded = recorded_result(Path(plan.out), trial_id)
    if recorded is not None:
        tune.report(recorded)
        return
    failure = recorded_failure(Path(plan.out), trial_id)
    if failure is not None:  # restarted with the killed trials (restart_errored), but it failed by itself
        raise RecordedFailure(failure)
    cfg = plan.cfg
    bits = bits_from_config(config, plan.n_layers)
    ranks = ranks_from_config(config, plan.n_layers)
    keep = cfg.output.keep_adapters != "none"
    adapter_dir = adapter_path(Path(plan.out), trial_id) if keep else None
    from qpruner.errors import TrialOOM
    from qpruner.results import write_oom_marker

    try:
        result = run_trial(cfg, plan.pruned_path, bits, ranks=ranks, report=tune.report, adapter_dir=adapter_dir,
                           tasks=plan.tasks)
    except TrialOOM as exc:  # an outcome: recorded `oom`, and the searcher hears a constraint violation
        write_oom_marker(plan.out, trial_id, exc)
        raise
    tune.report({**result, "gpu_fraction": float(plan.resources["gpu"])})


class ResultsWriter(Callback):
    """Tune callback: rewrite results.parquet (atomically) whenever a trial ends, and print progress.

    It lives in the Tuner's pickled run config, so a restored run keeps writing the same files.
    """

    def __init__(self, out_dir: Path, num_samples: int, n_layers: int, objective: str = "accuracy"):
        self.out_dir = Path(out_dir)
        self.num_samples = num_samples
        self.n_layers = n_layers  # a grouped search's configs hold one bit-width per group
        self.objective = objective  # search.objective: the column the front is computed on
        self.setup()

    def setup(self, **info):
        # Trials started in this session, and those that ended through Tune's callbacks (finished, stopped by
        # ASHA, or failed). One started but never ended was stopped by the experiment's end: interrupted.
        self.started: set[str] = set()
        self.ended: set[str] = set()

    def write(self, trials, plot: bool = False, just_ended=None, status: Optional[str] = None) -> list[dict]:
        from qpruner.pareto import write_results

        records = []
        for t in trials:
            if t is just_ended or t.status in ("TERMINATED", "ERROR"):
                record = record_from_trial(t, status if t is just_ended else None, self.n_layers)
                if t is not just_ended and self.interrupted(t, record):
                    record.update(status="failed", accuracy=None, error=INTERRUPTED)
                records.append(record)
        if records:
            write_results(records, self.out_dir, plot=plot, objective=getattr(self, "objective", None))
        return records

    def interrupted(self, trial, record: dict) -> bool:
        """Stopped by the end of the experiment (Ctrl-C, a signal), not by ASHA or its own end: Tune marks it
        TERMINATED without calling on_trial_complete, and its last report is not the final one."""
        return (trial.trial_id in self.started and trial.trial_id not in self.ended and record["status"] != "completed"
                and record["status"] != "failed")

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started.add(trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended.add(trial.trial_id)
        self._progress(self.write(trials, just_ended=trial, status="TERMINATED"), trials, trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.ended.add(trial.trial_id)
        self._progress(self.write(trials, just_ended=trial, status="ERROR"), trials, trial)

    def on_experiment_end(self, trials, **info):
        self.write(trials, plot=True)

    def _progress(self, records: list[dict], trials, just_ended) -> None:
        count = {s: sum(r["status"] == s for r in records) for s in ("completed", "stopped_early", "failed", "oom")}
        running = sum(t.status == "RUNNING" and t is not just_ended for t in trials)
        print(
            f"[qpruner] trials finished {len(records)}/{self.num_samples}: completed {count['completed']}, "
            f"stopped early {count['stopped_early']}, failed {count['failed']}"
            + (f", out of memory {count['oom']}" if count["oom"] else "") + f"; running {running}",
            flush=True,
        )


# ---------------------------------------------------------------------------------------------
# Driver steps.


# ---------------------------------------------------------------------------------------------
# Workers killed from outside.


class WorkerKilled(RayActorError):
    """A trial's worker that Ray killed with an error Tune 2.60 does not expect from an actor task
    (ray.exceptions.OutOfMemoryError from the memory monitor; WorkerCrashedError, NodeDiedError): the
    trial fails with this one-line text (recorded `oom` or `failed`, qpruner.results) and the search goes on."""

    def __init__(self, cause: BaseException | str):
        text = cause if isinstance(cause, str) else f"{type(cause).__name__}: {' '.join(str(cause).split())}"
        super().__init__(error_msg=text[:2000])

    def __reduce__(self):
        return (type(self), (self.error_msg,))


def tolerate_worker_kills() -> None:
    """Make Tune treat a trial's worker killed by Ray (its memory monitor above all) as that trial's failure.

    Ray Tune 2.60's actor manager (ray/air/execution/_internal/actor_manager.py, _actor_task_failed) handles
    RayActorError and RayTaskError; any other error of an actor task, such as the OutOfMemoryError raised
    when the memory monitor kills the trial's worker, becomes "RuntimeError: Caught unexpected exception"
    and ends Tuner.fit(): the driver died with a traceback and the other trials with it. Here such an error
    reaches Tune as a RayActorError (WorkerKilled), which Tune already handles as a dead trial actor."""
    from ray.air.execution._internal.actor_manager import RayActorManager
    from ray.exceptions import RayError, RayTaskError

    original = RayActorManager._actor_task_failed
    if getattr(original, "qpruner_tolerant", False):
        return

    def _actor_task_failed(self, tracked_actor_task, exception):
        if isinstance(exception, RayError) and not isinstance(exception, (RayActorError, RayTaskError)):
            print(f"[qpruner] a trial's worker was killed: {' '.join(str(exception).split())[:300]}", flush=True)
            exception = WorkerKilled(exception)
        return original(self, tracked_actor_task, exception)

    _actor_task_failed.qpruner_tolerant = True
    RayActorManager._actor_task_failed = _actor_task_failed


def run_key(cfg: Config) -> str:
    """What identifies a run: everything in the recipe except where its files go."""
    return config_key(cfg.to_dict())


def config_key(config: dict) -> str:
    """run_key of a config dict."""
    data = {k: v for k, v in config.items() if k != "output"}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def check_out_dir(out: Path, cfg: Config, resume: bool, overwrite: bool) -> bool:
    """Check the output folder without writing; True when an earlier run there should be continued.

    A folder of a run with other result-changing settings is refused naming the keys that differ, even with
    --resume (continuing would mix trials trained two ways); damaged files are named, and --resume repairs
    them (qpruner.runfolder.repair) once every check has passed."""
    from qpruner.runfolder import RUN, damage, differing_keys, read_json, repair_hint, user_entries

    marker = out / RUN
    if marker.is_file() or (out / "config.yaml").is_file():
        if overwrite:
            return False
        damaged = damage(out)
        if damaged and not resume:
            raise QPrunerError(
                f"--out {out}: {' and '.join(damaged)} {'is' if len(damaged) == 1 else 'are'} damaged; pass --resume to "
                f"repair and continue the run, repair it alone "
                f"with {repair_hint(out)}, or pass --overwrite to start again"
            )
        recorded = read_json(marker) if marker.is_file() and RUN not in damaged else {}
        if isinstance(recorded.get("config"), dict):  # a run of an earlier version: fields added since at their defaults
            recorded["config"] = with_defaults(recorded["config"])
            if config_key(recorded["config"]) == config_key(with_defaults(cfg.to_dict())):  # both parsed alike
                recorded["run_key"] = run_key(cfg)
        if recorded.get("run_key") != run_key(cfg):
            if isinstance(recorded.get("config"), dict):
                refuse_changed(out, differing_keys(recorded["config"], cfg.to_dict()))
            if not resume:
                neutral = differing_keys(recorded["config"], cfg.to_dict(), neutral=True) \
                    if isinstance(recorded.get("config"), dict) else []
                if recorded.get("repaired"):
                    raise QPrunerError(f"--out {out}: its run.json was rebuilt by --repair and records no recipe; pass "
                                       "--resume to continue the run (config.yaml there is compared with yours first)")
                if neutral:
                    raise QPrunerError(f"--out {out} holds this run with other {', '.join(neutral[:4])}, which change no "
                                       "result; pass --resume to continue it with them, or another --out")
                raise QPrunerError(
                    f"--out {out} holds a different run's results; pass --overwrite to replace them, "
                    "--resume to continue that run, or another --out"
                )
        from ray import tune

        return tune.Tuner.can_restore(str(out / EXPERIMENT))
    if user_entries(out) and not overwrite:
        raise QPrunerError(f"--out {out} is not empty and holds no qpruner run; pass --overwrite or another --out")
    return False


def with_defaults(config: dict) -> dict:
    """A recorded config with every field a later version added at its default (the behaviour the run had);
    as recorded when it no longer parses."""
    from qpruner.config import config_from_dict

    try:
        return config_from_dict(config).to_dict()
    except (ConfigError, TypeError, ValueError):
        return config


def refuse_changed(out: Path, changed: list[str]) -> None:
    """Refuse to continue a run whose result-changing settings differ from the recorded ones."""
    if changed:
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        raise QPrunerError(
            f"--out {out} holds a run with other settings: {', '.join(changed[:6])}{more} differ from config.yaml there; "
            "continuing would mix trials trained two ways: restore those settings, pass --overwrite to replace the "
            "run, or give another --out"
        )


def check_recorded_config(out: Path, plan: RunPlan) -> None:
    """A run folder whose run.json records no config (an earlier version, or a repaired run.json): compare the
    resolved config with its config.yaml instead."""
    from qpruner.runfolder import RUN, read_json

    try:
        recorded = read_json(out / RUN) if (out / RUN).is_file() else {}
    except QPrunerError:
        recorded = {}
    if isinstance(recorded.get("config"), dict) or not (out / "config.yaml").is_file():
        return
    from qpruner.runfolder import differing_keys

    try:
        previous = yaml.safe_load((out / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return
    if isinstance(previous, dict):
        refuse_changed(out, differing_keys(with_defaults(previous), plan.config))


def init_out_dir(out: Path, cfg: Config, resolved: Config, overwrite: bool) -> None:
    """Start a fresh output folder: the run key and the user's recipe `cfg` (to recognise it later, and refuse a
    --resume with other settings) and the resolved config (local paths absolute: report and export read it)."""
    from qpruner.runfolder import LOCK, remove

    if overwrite and out.exists():
        for entry in out.iterdir():
            if entry.name != LOCK:  # the lock file stays: this driver holds it
                remove(entry)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "config.yaml", lambda f: f.write(yaml.safe_dump(resolved.to_dict(), sort_keys=False)), mode="w")
    write_json_atomic({"run_key": run_key(cfg), "created": time.time(), "config": cfg.to_dict()}, out / "run.json")


def trial_resources(cfg: Config, can_grow: bool = True) -> dict[str, float]:
    """The per-trial Ray resources; `gpu: auto` means a GPU fraction of 1/concurrency where GPUs exist.

    On a cluster that can grow (one the driver joined with --address) GPUs it does not have yet are asked
    of the autoscaler (see `wait_for_gpus`); a local Ray started by the driver cannot grow, so the
    refusal is immediate. `auto` on a cluster without GPUs says so, and refuses a model that would not
    fit in a node's memory."""
    import ray

    gpu = cfg.resources.gpu
    if gpu != "auto" and gpu > 0:
        wait_for_gpus(cfg, gpu, cfg.resources.gpu_wait_s if can_grow else 0)
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpu == "auto":
        gpu = min(1.0, gpus / cfg.search.concurrency) if gpus else 0.0
        if not gpus:
            check_fits_cpu_nodes(cfg)
    if cfg.resources.cpu > ray.cluster_resources().get("CPU", 0):
        raise QPrunerError(
            f"resources.cpu: {cfg.resources.cpu} CPUs per trial asked, but the cluster has "
            f"{ray.cluster_resources().get('CPU', 0):g}; lower resources.cpu"
        )
    return {"cpu": cfg.resources.cpu, "gpu": float(gpu)}


def wait_for_gpus(cfg: Config, gpu: float, wait: float) -> None:
    """GPUs asked for but not (yet) in the cluster: ask the autoscaler for one trial's worth per concurrent
    trial and wait up to `resources.gpu_wait_s`, printing progress, before failing in one line. Without an
    autoscaler the request is a no-op and the wait shows that no GPU node joins."""
    import ray
    from ray.autoscaler.sdk import request_resources

    if ray.cluster_resources().get("GPU", 0) >= gpu:
        return
    if wait > 0:
        bundle = {"GPU": gpu, "CPU": cfg.resources.cpu}
        request_resources(bundles=[bundle] * cfg.search.concurrency)
        started = time.time()
        last = 0.0
        while time.time() - started < wait:
            if ray.cluster_resources().get("GPU", 0) >= gpu:
                print(f"[qpruner] GPUs joined after {time.time() - started:.0f}s", flush=True)
                return
            if time.time() - last >= 15:
                last = time.time()
                print(f"[qpruner] waiting for GPU nodes: {ray.cluster_resources().get('GPU', 0):g} GPU in the cluster, "
                      f"{gpu:g} per trial asked; {time.time() - started:.0f}s of resources.gpu_wait_s {wait:g}s", flush=True)
            time.sleep(1)
    raise QPrunerError(
        f"resources.gpu: {gpu:g} GPU per trial asked, but the Ray cluster has "
        f"{ray.cluster_resources().get('GPU', 0):g} GPU" + (f" after waiting {wait:g}s (resources.gpu_wait_s)" if wait else "")
        + "; start GPU "
        "workers (cluster.yaml), wait longer, or set resources.gpu: 0 (CPU) or 'auto'"
    )


def check_fits_cpu_nodes(cfg: Config) -> None:
    """`gpu: auto` found no GPU: say trials run on CPUs, and refuse a model whose weights alone would not
    fit in the largest node's memory (a 7B model silently trained on CPUs is not what anyone wants)."""
    import ray

    from qpruner.model import parameter_bytes

    need = parameter_bytes(cfg.model.name, cfg.output.cache, cfg.quant.compute_dtype)
    largest = max((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    if need and largest and need > largest:
        raise QPrunerError(
            f"resources.gpu: 'auto' found no GPU in the Ray cluster, and the model's weights ({need / 1024**3:.1f} GB in "
            f"{cfg.quant.compute_dtype}) exceed the largest node's memory ({largest / 1024**3:.1f} GB); start GPU workers "
            "and set resources.gpu: 1 (qpruner then waits for them), or use a smaller model"
        )
    print("[qpruner] resources.gpu: auto found no GPU in the Ray cluster: trials run on CPUs", flush=True)


def first_configs(plan: RunPlan) -> tuple[list[dict], list[float] | None, object]:
    """The first Tune configs, the layer importance (or None), and the sensitivity table per search unit
    (or None): importance-aware bit vectors (QPruner's probabilistic decision) or random ones, with
    per-unit ranks drawn the same way when ranks are searched (anchors keep lora.rank). With
    `search.layer_groups` a group's importance is its layers' mean and its memory their sum. With
    `search.sampler: model` the table is measured (a Ray task, cached) and the first configs are the
    anchors and points of the table's own front (qpruner.predict.first_points)."""
    import ray

    from qpruner.importance import importance_task
    from qpruner.search import config_from_bits, importance_configs, random_configs, search_units

    if plan.cfg.search.sampler == "model":
        from qpruner.predict import first_points

        table = sensitivity_units(plan)
        return first_points(table, plan.cfg.search.n_init, plan.cfg.search.anchors), None, table
    cfg = plan.cfg
    search, units = cfg.search, search_units(plan.cfg, plan.n_layers)
    if search.init == "random":
        bits = random_configs(units, cfg.quant.bits, search.n_init, search.seed)
        ranks = random_configs(units, search.ranks, search.n_init, search.seed + 1) if search.ranks else [None] * len(bits)
        return [config_from_bits(b, r) for b, r in zip(bits, ranks)], None, None
    task = ray.remote(importance_task).options(num_cpus=plan.resources["cpu"], num_gpus=whole_gpu(plan.resources["gpu"]))
    importance = ray_get(task.remote(plan), what="the layer importance")
    return importance_configs(cfg, plan.pruned_config, importance), importance, None


def sensitivity_units(plan: RunPlan):
    """The sensitivity table (a Ray task on a trial's resources; cached per pruned model), kept in the run
    folder for the report and `qpruner predict`, summed per search unit."""
    import ray

    from qpruner.predict import SensitivityTable, UnitTable, sensitivity_task, table_path
    from qpruner.search import search_units

    print("[qpruner] measuring the sensitivity table (each layer at each choice, one at a time)", flush=True)
    task = ray.remote(sensitivity_task).options(num_cpus=plan.resources["cpu"], num_gpus=whole_gpu(plan.resources["gpu"]))
    table = SensitivityTable.from_json(ray_get(task.remote(plan), what="the sensitivity table"))
    print(f"[qpruner] sensitivity table: {table.seconds:.1f}s on {table.tokens} validation tokens", flush=True)
    write_json_atomic(table.to_json(), table_path(plan.out))
    return UnitTable.from_table(table, search_units(plan.cfg, plan.n_layers), plan.cfg.search.sensitivity)


def asha_max_t(cfg: Config) -> int:
    """ASHA's max_t in reports: the last intermediate report made BEFORE the last training step, so no
    rung sits where all training is done and stopping would only skip the evaluation (`asha.max_t`
    caps it further). Reports come every `report_every` steps; the final evaluation is one more."""
    steps, every = cfg.finetune.steps, cfg.finetune.report_every
    before_end = (steps - 1) // every  # reports at steps every, 2*every, ... < steps
    return min(before_end, cfg.search.asha.max_t) if cfg.search.asha.max_t else before_end


def build_tuner(plan: RunPlan, points: list, restore: bool, unit_table=None):
    """A Tuner (new or restored) over the qpruner trainable with OptunaSearch and ASHA; `unit_table` is the
    sensitivity table the `model` sampler proposes from (a restored searcher brings its own)."""
    from ray import tune

    from qpruner.search import make_searcher, param_space, search_units

    cfg, out, units = plan.cfg, Path(plan.out), search_units(plan.cfg, plan.n_layers)
    trainable = tune.with_resources(tune.with_parameters(trial_trainable, plan=plan), plan.resources)
    if restore:
        retry = killed_trials(out)  # killed from outside (memory, a lost worker): trained again
        if retry:
            print(f"[qpruner] retrying {len(retry)} trial(s) killed before they finished: {', '.join(retry)}", flush=True)
        # resume_errored keeps the trial ids (restart_errored would start them afresh under new ids): a killed trial
        # is trained again from the start (trials keep no checkpoint), one that failed by itself fails again at
        # once with its recorded error (trial_trainable)
        return tune.Tuner.restore(str(out / EXPERIMENT), trainable, resume_unfinished=True, resume_errored=bool(retry))
    scheduler = None
    max_t = asha_max_t(cfg)
    if cfg.search.asha.enabled and max_t >= cfg.search.asha.grace_period:
        scheduler = tune.schedulers.ASHAScheduler(
            metric="val_logprob",  # gold-answer log-probability on validation data (make_validator)
            mode="max",
            time_attr="training_iteration",
            max_t=max_t,
            grace_period=cfg.search.asha.grace_period,
            reduction_factor=cfg.search.asha.reduction_factor,
            stop_last_trials=False,  # a trial past the top rung finishes its training and evaluation
        )
    sampler = None
    if unit_table is not None:
        from qpruner.predict import ModelSampler

        sampler = ModelSampler(unit_table, seed=cfg.search.seed, max_memory_gb=cfg.search.max_memory_gb,
                               objective=cfg.search.objective)
    searcher = make_searcher(cfg, units, points, record_path=out / SEARCHER_RECORD, model_sampler=sampler)
    return tune.Tuner(
        trainable,
        param_space=param_space(units, cfg.quant.bits, cfg.search.ranks),
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=cfg.search.num_samples),
        run_config=tune.RunConfig(
            name=EXPERIMENT,
            storage_path=str(out),
            failure_config=tune.FailureConfig(max_failures=cfg.search.max_failures),
            callbacks=[ResultsWriter(out, cfg.search.num_samples, plan.n_layers, cfg.search.objective)],
            verbose=1,
        ),
    )


def finish(out: Path, cfg: Config) -> None:
    """Pareto table, report, and (by default) drop the adapters of trials off the front; the most accurate trial's
    stays too when the front is on another objective (perplexity, val_logprob), so `export --pick best-acc` works."""
    import pyarrow.parquet as pq

    from qpruner.export import pick_trial
    from qpruner.pareto import print_front
    from qpruner.report import write_report

    front = pq.read_table(out / "pareto.parquet")
    if cfg.output.keep_adapters == "pareto" and (out / ADAPTERS).is_dir():
        keep = set(front.column("trial_id").to_pylist())
        try:  # the trial `export --pick best-acc` exports, chosen by the same rule (ties: the smaller memory)
            keep.add(pick_trial(out, pick="best-acc")["trial_id"])
        except QPrunerError:  # no completed trial has an accuracy
            pass
        for adapter in (out / ADAPTERS).iterdir():
            if adapter.name not in keep:
                shutil.rmtree(adapter, ignore_errors=True)
    write_report(out)
    print_front(front)
    print(f"[qpruner] results: {out / 'results.parquet'}  front: {out / 'pareto.parquet'}  plot: {out / 'pareto.png'}")


def start_ray(address: Optional[str], dashboard: bool, env: dict[str, str]) -> None:
    """Join the cluster at `address` (or start a local one) with the driver's environment for every worker."""
    import ray

    if ray.is_initialized():
        return
    local = {"include_dashboard": dashboard, "dashboard_host": "127.0.0.1"} if address is None else {}
    ray.init(address=address, configure_logging=False, log_to_driver=True, runtime_env={"env_vars": env}, **local)


def run(cfg: Config, out: Path, address: Optional[str] = None, resume: bool = False, overwrite: bool = False,
        dashboard: bool = True) -> Path:
    """The whole search; returns the output folder. The driver holds --out's lock throughout; every refusal
    before the first trial leaves --out as it was (qpruner.runfolder.RunLock)."""
    from qpruner.errors import check_out_path
    from qpruner.runfolder import RunLock

    check_out_path(out, "--out")
    out = Path(out).expanduser().resolve()
    with RunLock(out) as lock:
        return _run(cfg, out, lock, address, resume, overwrite, dashboard)


def _run(cfg: Config, out: Path, lock, address: Optional[str], resume: bool, overwrite: bool, dashboard: bool) -> Path:
    from qpruner.prune import prune_with_ray
    from qpruner.quantize import check_lora_fits
    from qpruner.runfolder import damage, repair, set_aside_damaged
    from qpruner.search import bits_from_config, check_memory_budget, ranks_from_config

    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")  # snapshot the (small) search state every second
    restore = check_out_dir(out, cfg, resume, overwrite)
    plan = make_plan(cfg, out)  # resolved once, here: every task and trial gets this plan
    if not overwrite:
        check_recorded_config(out, plan)
    start_ray(address, dashboard, plan.env)
    plan = dataclasses.replace(plan, resources=trial_resources(plan.cfg, can_grow=address is not None))
    check_storage({"the run folder (--out)": out, "the cache": plan.cfg.output.cache})
    for line in plan.tasks.warnings:
        print(f"[qpruner] {line}", flush=True)
    started = time.time()
    pruned = prune_with_ray(plan.cfg, num_gpus=1.0 if plan.resources['gpu'] else 0)
    print(f"[qpruner] pruned model: {pruned.path} ({'cached' if pruned.cached else f'{pruned.seconds:.1f}s'})", flush=True)
    plan = plan.with_pruned(pruned.path)
    check_memory_budget(plan.cfg, plan.pruned_config)  # before any trial, before --out is written
    check_lora_fits(plan.cfg, plan.pruned_config)
    if restore:
        if damage(out) or not (out / "results.parquet").is_file():
            for line in repair(out, plan.n_layers):
                print(f"[qpruner] repaired: {line}", flush=True)
    elif not overwrite:
        set_aside_damaged(out)  # a run killed before its search started, resumed: its files are written anew
    lock.commit()
    if not restore:
        init_out_dir(out, cfg, plan.cfg, overwrite)
        write_json_atomic({"validation": plan.tasks.validation, "warnings": plan.tasks.warnings}, out / VALIDATION_RECORD)
    from qpruner.runfolder import read_json

    marker = read_json(out / "run.json")
    if not isinstance(marker.get("config"), dict):  # an earlier version's or a repaired run.json, checked above
        marker.update(run_key=run_key(cfg), config=cfg.to_dict())
    write_json_atomic({**marker, "pruned_path": str(pruned.path)}, out / "run.json")
    points: list = []
    unit_table = None
    if not restore:
        points, importance, unit_table = first_configs(plan)
        initial = {"initial": [bits_from_config(p, plan.n_layers) for p in points]}
        if plan.cfg.search.ranks:
            initial["initial_ranks"] = [ranks_from_config(p, plan.n_layers) for p in points]
        (out / "importance.json").write_text(json.dumps({"importance": importance, **initial}))
    tolerate_worker_kills()
    build_tuner(plan, points, restore, unit_table).fit()
    check_interrupted(out)
    check_not_all_failed(out)
    if plan.cfg.search.baselines:
        from qpruner.baselines import run_baselines

        run_baselines(plan)
    finish(out, plan.cfg)
    print(f"[qpruner] search took {time.time() - started:.1f}s", flush=True)
    return out


def check_interrupted(out: Path) -> None:
    """Tune ends fit() quietly on Ctrl-C; the run then stops too (exit 130), without baselines or report, and
    says how to continue."""
    from qpruner.runfolder import read_results

    stopped = [r["trial_id"] for r in read_results(out).to_pylist() if r["error"] == INTERRUPTED]
    if stopped:
        print(f"[qpruner] interrupted: {len(stopped)} trial(s) stopped before they finished ({', '.join(stopped)}); "
              "rerun with --resume to run them and finish the search", flush=True)
        raise KeyboardInterrupt


def check_not_all_failed(out: Path) -> None:
    """A search whose every trial failed for one reason (a configuration no trial can run), or ran out of
    memory, fails the run in one line, instead of exiting 0 with an empty front."""
    from qpruner.report import one_line
    from qpruner.runfolder import read_results

    rows = [r for r in read_results(out).to_pylist() if not str(r["trial_id"]).startswith("baseline:")]
    if rows and all(r["status"] == "oom" for r in rows):
        fractions = sorted({f"{r['gpu_fraction']:g}" for r in rows if r.get("gpu_fraction") is not None})
        raise QPrunerError(f"every trial ran out of memory ({len(rows)} of {len(rows)}"
                           + (f", GPU fraction {', '.join(fractions)}" if fractions else "") + "): lower "
                           "search.concurrency or set resources.gpu: 1 (a whole GPU per trial), and rerun with --overwrite "
                           f"(the errors: {out / 'results.parquet'})")
    errors = {one_line(r["error"]) for r in rows if r["status"] == "failed"}
    if rows and all(r["status"] == "failed" for r in rows) and len(errors) == 1:
        raise QPrunerError(f"every trial failed ({len(rows)} of {len(rows)}) with the same error: {errors.pop()}; "
                           f"fix the configuration and rerun with --overwrite (trial logs: {out / EXPERIMENT})")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from qpruner.cli import base_parser, load_cli_config, set_offline_defaults

    set_offline_defaults(argv)
    parser = base_parser("python -m qpruner.tune", "Search per-layer bit-widths for a pruned model (QPruner).")
    parser.add_argument("--out", default=None, help="output folder (default: output.dir from the config)")
    parser.add_argument("--num-samples", type=int, default=None, help="number of trials (overrides search.num_samples)")
    parser.add_argument("--address", default=None, help="Ray cluster address; 'auto' joins a cluster started with ray up")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--overwrite", action="store_true", help="replace the results in --out")
    parser.add_argument("--no-dashboard", action="store_true", help="start Ray without its dashboard")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.num_samples is not None:
        overrides["search.num_samples"] = args.num_samples
    cfg = load_cli_config(args, overrides)
    out = Path(args.out or cfg.output.dir)
    run(cfg, out, address=args.address, resume=args.resume, overwrite=args.overwrite, dashboard=not args.no_dashboard)
    return 0


if __name__ == "__main__":
    from qpruner.cli import run_cli

    run_cli(main)
