"""The run plan: what a run's Ray tasks and trials need, resolved once on the driver and handed on as data.

    load_config (parse and check values: no disk, builds nothing)
      -> resolve_config (driver: builtin:tiny built, local files checked and made absolute, cache absolute)
      -> preflight (driver: every input loaded once; the tasks, their validation twins, held-out documents)
      -> RunPlan (+ the pruned model's location in the shared cache and its layer shapes, after pruning)
      -> Ray tasks and trials, which read the plan and never re-resolve or re-validate against their disk.

On a cluster every node must see the run folder (--out) and the cache at the same paths: `check_storage`
proves it with a marker file read by a task on every alive node, before any work. The driver's
environment (offline flags, QPRUNER_* settings) reaches the workers through `runtime_env`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from qpruner.config import Config, ConfigError, check_local_paths, config_from_dict
from qpruner.errors import QPrunerError, make_dirs

# Environment the workers must share with the driver (read by Hugging Face libraries and by qpruner).
ENV_NAMES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY",
             "TOKENIZERS_PARALLELISM")
ENV_PREFIX = "QPRUNER_"


@dataclass
class TaskPlan:
    """The evaluation tasks as resolved on the driver: lm-eval names and the folders that define them."""

    names: list[str]
    include_paths: list[str]
    val_names: list[str]  # quick validation: each task's disjoint twin, or the task itself
    held_out: dict[str, int]  # documents skipped at the start of a task validated on its own split
    validation: dict[str, str]  # where each task's quick validation reads, in words (report)
    warnings: list[str] = field(default_factory=list)  # tasks left with few scored documents (printed, reported)
    val_limits: dict[str, dict[str, int]] = field(default_factory=dict)  # validation documents per leaf task


@dataclass
class RunPlan:
    """Everything a Ray task or trial of this run reads, as plain data (it pickles small)."""

    config: dict[str, Any]  # the resolved config: builtin:tiny and every local path absolute
    tasks: TaskPlan
    out: str  # the run folder (Tune's storage_path), shared by every node
    resources: dict[str, float] = field(default_factory=dict)  # per trial: {"cpu", "gpu"}
    env: dict[str, str] = field(default_factory=dict)  # runtime_env env_vars
    pruned_path: Optional[str] = None  # in the shared cache, after pruning
    pruned_config: dict[str, Any] = field(default_factory=dict)  # its config.json: per-layer shapes in qpruner_layers

    @property
    def cfg(self) -> Config:
        """The Config (values were checked on the driver; building it touches no disk)."""
        return config_from_dict(self.config)

    @property
    def n_layers(self) -> int:
        return len(self.pruned_config["qpruner_layers"])

    def with_pruned(self, path: str | Path) -> "RunPlan":
        """The plan with the pruned model's folder and its config (per-layer shapes), read once, here."""
        config = json.loads((Path(path) / "config.json").read_text())
        return dataclasses.replace(self, pruned_path=str(path), pruned_config=config)


# ---------------------------------------------------------------------------------------------
# Driver: resolve once.


def resolve_config(cfg: Config) -> Config:
    """A copy of `cfg` that means the same on every node: local files checked (one line naming the field
    when missing), relative paths made absolute, the cache folder absolute, `builtin` built and resolved."""
    from qpruner.builtin import resolve_builtin

    cfg = copy.deepcopy(cfg)
    check_local_paths(cfg)
    cfg.output.cache_dir = str(cfg.output.cache.resolve())
    _absolute_paths(cfg)
    resolve_builtin(cfg)
    return cfg


def _absolute_paths(cfg: Config) -> None:
    """Relative local paths would mean another folder in a worker (its working directory is Ray's)."""
    def absolute(value: str) -> str:
        path = Path(value).expanduser()
        return str(path.resolve()) if path.exists() else value  # hub ids and `builtin` stay as they are

    cfg.model.name = absolute(cfg.model.name)
    cfg.finetune.data = absolute(cfg.finetune.data)
    cfg.prune.calibration.source = absolute(cfg.prune.calibration.source)
    cfg.eval.local_data = {t: absolute(f) for t, f in cfg.eval.local_data.items()}
    cfg.eval.val_data = {t: absolute(f) for t, f in cfg.eval.val_data.items()}
    if cfg.eval.include_path:
        cfg.eval.include_path = absolute(cfg.eval.include_path)


def preflight(cfg: Config) -> TaskPlan:
    """Load (not just name) every input a trial reads before any work starts, once, on the driver: the
    model config, every eval and validation task's data, the fine-tuning data and the calibration text.
    Offline (the CLI default) an unreachable input is one line naming the field within seconds, not a
    failure minutes into a search. Returns the resolved tasks."""
    from qpruner.data import calibration_texts
    from qpruner.evaluate import check_eval_inputs, check_hub_data, load_tasks, resolve_tasks, validated_tasks, validation_tasks
    from qpruner.finetune import load_alpaca
    from qpruner.model import check_model

    check_eval_inputs(cfg)
    names, paths = resolve_tasks(cfg.eval, cfg.output.cache)
    val_names, _ = validation_tasks(cfg)
    check_hub_data(names + [n for n in val_names if n not in names], paths)  # the usual offline failure, in ~1 s
    check_model(cfg.model.name, cfg.output.cache, cfg.model.trust_remote_code, cfg.model.allow_pickle)
    load_alpaca(cfg.finetune.data, cfg.output.cache)
    if cfg.prune.calibrates:
        calibration_texts(cfg.prune.calibration, cfg.output.cache)
    try:
        loaded = load_tasks(tuple(names), tuple(paths))
    except ConfigError as exc:
        raise local_data_error(cfg, exc) from None
    validated_tasks(cfg)
    check_objective(cfg, {name: task.OUTPUT_TYPE for name, task in loaded["tasks"].items()})
    return plan_tasks(cfg)


PERPLEXITY_TYPE = "loglikelihood_rolling"  # lm-eval's output type of perplexity tasks (wikitext)


def check_objective(cfg: Config, output_types: dict[str, str]) -> None:
    """search.objective: perplexity needs a perplexity task among eval.tasks (`output_types`: {lm-eval task:
    output type}), and that task's text must not be the pruning's calibration text (a model pruned on a text
    and scored on it ranks by memorisation). One line naming the field, before any work."""
    if cfg.search.objective != "perplexity":
        return
    task = next((t for t in cfg.eval.tasks if output_types.get(t) == PERPLEXITY_TYPE), None)
    if task is None:
        raise ConfigError("search.objective", "perplexity needs a perplexity task in eval.tasks, e.g. wikitext with "
                          "eval.local_data.wikitext=FILE (any text in its `page` field); add one, or use accuracy or val_logprob")
    text = cfg.eval.local_data.get(task)
    source = cfg.prune.calibration.source
    same = text and Path(source).expanduser().is_file() and Path(text).expanduser().resolve() == Path(source).expanduser().resolve()
    if cfg.prune.calibrates and same:
        raise ConfigError(f"eval.local_data.{task}", f"{text!r} is also prune.calibration.source; the perplexity objective "
                          "must be measured on a text the pruning did not calibrate on: name another file")


def local_data_error(cfg: Config, exc: ConfigError) -> ConfigError:
    """A task that does not load from its eval.local_data file: the file's rows do not fit the task (a column
    its prompt reads is missing), so name the file's field, not eval.tasks."""
    local = cfg.eval.local_data
    if exc.field != "eval.tasks" or not local:
        return exc
    task = next((t for t in local if t in exc.reason), next(iter(local)))
    detail = exc.reason.split(" (", 1)[-1].split("); ", 1)[0] if " (" in exc.reason else exc.reason
    return ConfigError(f"eval.local_data.{task}", f"task {task!r} cannot read {local[task]!r} ({detail}); its rows need "
                       f"the columns of the split lm-eval's {task} evaluates (docs/tasks.md lists them)")


def plan_tasks(cfg: Config) -> TaskPlan:
    """The evaluation tasks, their validation twins and held-out documents, resolved once."""
    from qpruner.evaluate import (
        check_eval_inputs,
        held_out_docs,
        held_out_warnings,
        resolve_tasks,
        validation_limits,
        validation_plan,
        validation_tasks,
    )

    check_eval_inputs(cfg)
    names, paths = resolve_tasks(cfg.eval, cfg.output.cache)
    val_names, _ = validation_tasks(cfg)
    return TaskPlan(names=list(names), include_paths=list(paths), val_names=list(val_names),
                    held_out=held_out_docs(cfg), validation=validation_plan(cfg), warnings=held_out_warnings(cfg),
                    val_limits=validation_limits(cfg))


def make_plan(cfg: Config, out: Path) -> RunPlan:
    """Resolve the config and its tasks once (nothing written to --out yet)."""
    cfg = resolve_config(cfg)
    tasks = preflight(cfg)
    return RunPlan(config=cfg.to_dict(), tasks=tasks, out=str(Path(out).resolve()), env=worker_env(cfg))


def worker_env(cfg: Config) -> dict[str, str]:
    """The driver's settings every worker must share: HF offline flags, qpruner's own variables, and the
    cache folder (also in the config, for code that reads QPRUNER_CACHE)."""
    env = {k: v for k, v in os.environ.items() if k in ENV_NAMES or k.startswith(ENV_PREFIX)}
    env["QPRUNER_CACHE"] = str(cfg.output.cache)
    return env


# ---------------------------------------------------------------------------------------------
# Cluster checks (driver), and the device a Ray task was given (worker).


def check_storage(paths: dict[str, Path]) -> list[str]:
    """Prove that every alive node reads `paths` ({what: folder}) as the driver wrote them: write a marker
    in each, read it from a task pinned to every alive node, then remove the markers and any folder made
    for them. A node that cannot read one stops the run in one line naming the node, the path and the fix.
    Returns the checked nodes' addresses."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from qpruner.errors import ray_get

    token = uuid.uuid4().hex
    made: list[Path] = []
    markers = {}
    try:
        for what, folder in paths.items():
            made += make_dirs(Path(folder), what)
            marker = Path(folder) / f".qpruner-preflight-{token}"
            marker.write_text(token)
            markers[what] = str(marker)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        probe = ray.remote(_read_markers)
        refs = [probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(markers, token) for n in nodes]
        for node, unreadable in zip(nodes, ray_get(refs)):
            if unreadable:
                what, path = unreadable[0]
                raise QPrunerError(
                    f"preflight: node {node['NodeManagerAddress']} ({node['NodeID'][:12]}) cannot read {path}, "
                    f"which the driver wrote in {what}: every node must see the run folder and the cache at the same "
                    "path; mount the shared filesystem there on every node, or set --out and QPRUNER_CACHE "
                    "(output.cache_dir) to a shared path"
                )
        return [n["NodeManagerAddress"] for n in nodes]
    finally:
        for marker in markers.values():
            Path(marker).unlink(missing_ok=True)
        for folder in reversed(made):
            shutil.rmtree(folder, ignore_errors=True)


def _read_markers(markers: dict[str, str], token: str) -> list[tuple[str, str]]:
    """Ray task body: the (what, path) pairs this node cannot read with the expected content."""
    bad = []
    for what, path in markers.items():
        try:
            ok = Path(path).read_text() == token
        except OSError:
            ok = False
        if not ok:
            bad.append((what, path))
    return bad


def task_device(wants_gpu: bool = True) -> str:
    """The device a piece of work may use: inside a Ray task or trial, CUDA only if Ray assigned it a GPU
    (Ray no longer hides GPUs from tasks that reserve none); outside Ray, CUDA whenever one is visible."""
    import torch

    if not (wants_gpu and torch.cuda.is_available()):
        return "cpu"
    import ray

    if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
        return "cuda" if ray.get_gpu_ids() else "cpu"
    return "cuda"


def resolved_config(raw: dict[str, Any]) -> Config:
    """Parse plain data and resolve it for this machine in one step (tests, benchmarks and one-machine
    scripts that call the stages directly; a run resolves once in `make_plan`)."""
    return resolve_config(config_from_dict(raw))


def whole_gpu(gpu: float) -> float:
    """What a step outside the search reserves (importance, sensitivity table, baselines): a whole GPU where
    trials are packed fractionally (nothing else runs then, and the dense model of a baseline needs more than
    a trial's share; Ray's fractions do not partition memory), else the trials' own request."""
    return 1.0 if 0 < gpu < 1 else float(gpu)
