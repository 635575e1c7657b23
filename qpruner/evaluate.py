"""Zero-shot accuracy with lm-evaluation-harness on the in-memory (peft) model, and a cheap validator.

`TaskManager` indexes thousands of YAML files (~10 s), so one is built per process and per set of
include paths, without lm-eval's own tasks when every requested task lives in the include paths
(the built-in tasks). Loaded task objects are cached too, so a call costs only the forward passes.
lm-eval's INFO logs and per-task progress bars are hidden; its warnings and Python warnings still show.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
import yaml
from lm_eval.tasks import TaskManager

from qpruner.config import Config, EvalConfig
from qpruner.errors import ConfigError

STANDARD_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


# ---------------------------------------------------------------------------------------------
# Task names


@lru_cache(maxsize=None)
def task_manager(include_paths: tuple[str, ...] = (), include_defaults: bool = True) -> TaskManager:
    """One TaskManager per process and include-path set (construction indexes every YAML it can see)."""
    return TaskManager(include_path=list(include_paths) or None, include_defaults=include_defaults)


def resolve_tasks(ecfg: EvalConfig, cache_dir: Optional[str | Path] = None, tasks: Optional[Sequence[str]] = None) -> tuple[list[str], list[str]]:
    """Check every task name and give (task names, include paths), deriving local-data tasks first.

    `builtin` was already resolved at config load (names + eval.include_path). Names are checked
    against the include paths and a quick scan of lm-eval's own YAML files (~1 s, not the 20 s
    TaskManager index); an unknown name raises ConfigError on eval.tasks with the closest names.
    """
    names = list(dict.fromkeys(tasks if tasks is not None else ecfg.tasks))
    paths = [str(Path(ecfg.include_path).expanduser())] if ecfg.include_path else []
    derived = derived_tasks_dir(ecfg, cache_dir)
    if derived is not None:
        paths.append(str(derived))
    local = set(task_manager(tuple(paths), include_defaults=False).all_tasks) if paths else set()
    for name in names:
        if name in local or name in stock_task_yamls():
            continue
        known = task_manager(tuple(paths), include_defaults=True).all_tasks  # groups, Python tasks: the full index
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}?" if close else f"use lm-eval task names such as {', '.join(STANDARD_TASKS)}, or 'builtin'"
            raise ConfigError("eval.tasks", f"unknown lm-eval task {name!r}; {hint}")
    return names, paths


def _manager_for(names: Sequence[str], include_paths: tuple[str, ...]) -> TaskManager:
    """The cheap include-path-only manager when it knows every name, else the one with lm-eval's tasks too."""
    if include_paths:
        local = task_manager(include_paths, include_defaults=False)
        if all(n in local.all_tasks for n in names):
            return local
    return task_manager(include_paths, include_defaults=True)


@lru_cache(maxsize=32)
def load_tasks(names: tuple[str, ...], include_paths: tuple[str, ...] = ()) -> dict:
    """lm-eval task objects for `names`, zero-shot, built once per process and reused across evaluations."""
    check_hub_data(names, include_paths)
    try:
        with quiet_lm_eval():
            loaded = _manager_for(names, include_paths).load(list(names))
    except Exception as exc:  # offline hub, missing data files: one line naming the field
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError("eval.tasks", f"cannot load {', '.join(names)} ({first}); give its data as eval.local_data.<task>=FILE "
                          "or make the hub reachable (QPRUNER_ONLINE=1)") from None
    for task in loaded["tasks"].values():
        task.set_config(key="num_fewshot", value=0)
    return loaded


# ---------------------------------------------------------------------------------------------
# Local data: derived tasks that include lm-eval's own YAML and swap only the data source.


@lru_cache(maxsize=1)
def stock_task_yamls() -> dict[str, Path]:
    """{task name: YAML file} for lm-eval's own tasks declared as a top-level `task: name` line.

    A plain text scan of lm-eval's task folder (~1 s), so locating boolq's YAML does not cost the
    TaskManager's full index; tasks declared otherwise are still found by the full index.
    """
    import lm_eval.tasks

    pattern = re.compile(rb"""^task:\s*["']?([\w\-.]+)["']?\s*$""", re.M)
    found: dict[str, Path] = {}
    for path in sorted(Path(lm_eval.tasks.__file__).parent.rglob("*.yaml")):
        match = pattern.search(path.read_bytes())
        if match:
            found.setdefault(match.group(1).decode(), path)
    return found


def stock_task_config(task: str, field: str) -> tuple[Path, dict]:
    """(YAML file, config with includes merged, functions unresolved) of lm-eval's stock `task`."""
    from lm_eval.tasks._yaml_loader import load_yaml

    path = stock_task_yamls().get(task)
    if path is None:
        raise ConfigError(field, f"{task!r} is not one of lm-eval's YAML tasks; local data works for tasks like {', '.join(STANDARD_TASKS)}, wikitext")
    cfg = load_yaml(path, resolve_func=False, recursive=True)
    if not isinstance(cfg.get("dataset_path"), str) or cfg.get("custom_dataset"):
        raise ConfigError(field, f"lm-eval's {task!r} does not read one HF dataset, so its data cannot be swapped for a file")
    return path, cfg


def derived_task_yaml(task: str, file: str, name: str, field: str) -> str:
    """A YAML task `name` that `include:`s lm-eval's YAML of `task` and reads `file` as the split it evaluates.

    Prompts, choices, process_docs and metrics stay lm-eval's; only dataset_path/dataset_name/
    dataset_kwargs change, and the other splits are switched off (zero-shot needs none).
    """
    stock_path, stock = stock_task_config(task, field)
    split = stock.get("test_split") or stock.get("validation_split")
    if not split:
        raise ConfigError(field, f"lm-eval's {task!r} evaluates no test or validation split")
    path = Path(file).expanduser().resolve()
    derived = {
        "include": str(stock_path),
        "task": name,
        "dataset_path": "parquet" if path.suffix == ".parquet" else "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(path)}},
        "training_split": None,
        "validation_split": split if split == stock.get("validation_split") and not stock.get("test_split") else None,
        "test_split": split if stock.get("test_split") else None,
        "fewshot_split": None,
    }
    if stock.get("tag"):
        derived["tag"] = []  # the stock tags (e.g. ai2_arc) would group derived and stock tasks together
    return yaml.safe_dump(derived, sort_keys=False)


def split_twin_source(task: str) -> Optional[str]:
    """The split of lm-eval's stock `task` that quick validation may read instead of the evaluated one
    (validation when the test split is scored, else training), or None: no other split, a task type the
    quick validation does not score, or a task that is not one of lm-eval's YAML tasks."""
    if task not in stock_task_yamls():
        return None
    try:
        _, stock = stock_task_config(task, "eval.tasks")
    except ConfigError:
        return None
    if stock.get("output_type", "generate_until") not in VALIDATED_TYPES:
        return None
    evaluated = stock.get("test_split") or stock.get("validation_split")
    for split in (stock.get("validation_split"), stock.get("training_split")):
        if split and split != evaluated:
            return split
    return None


def split_twin_yaml(task: str) -> str:
    """The twin `<task>_val` of a stock hub task: lm-eval's own YAML, evaluating its other split."""
    stock_path, stock = stock_task_config(task, "eval.tasks")
    twin = {"include": str(stock_path), "task": f"{task}_val", "test_split": split_twin_source(task),
            "validation_split": None, "training_split": None, "fewshot_split": None}
    if stock.get("tag"):
        twin["tag"] = []
    return yaml.safe_dump(twin, sort_keys=False)


def derived_tasks_dir(ecfg: EvalConfig, cache_dir: Optional[str | Path] = None) -> Optional[Path]:
    """Write the derived tasks of eval.local_data (named as the task) and eval.val_data (`<task>_val`)
    into <cache>/tasks/<content hash>/, once; None when there is no local data."""
    from qpruner.config import default_cache_dir

    yamls = {}
    for task, file in ecfg.local_data.items():
        yamls[task] = derived_task_yaml(task, file, task, f"eval.local_data.{task}")
    for task, file in ecfg.val_data.items():
        yamls[f"{task}_val"] = derived_task_yaml(task, file, f"{task}_val", f"eval.val_data.{task}")
    for task in ecfg.tasks:
        if task not in ecfg.local_data and task not in ecfg.val_data and split_twin_source(task):
            yamls[f"{task}_val"] = split_twin_yaml(task)
    if not yamls:
        return None
    key = hashlib.sha256(json.dumps(yamls, sort_keys=True).encode()).hexdigest()[:16]
    home = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "tasks" / key
    if not home.is_dir():
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=_mkdir(home.parent)))
        for name, text in yamls.items():
            (tmp / f"{name}.yaml").write_text(text)
        try:
            os.replace(tmp, home)
        except OSError:  # another process wrote the same content first
            shutil.rmtree(tmp, ignore_errors=True)
    return home


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_hub_data(names: Sequence[str], include_paths: Sequence[str]) -> None:
    """Stock tasks that read the hub: fail in about a second (offline) before lm-eval's 20 s index.

    Loads the evaluated split with `datasets` (from the local HF cache when offline) and turns a
    failure into one line naming eval.local_data, the fix.
    """
    local = set(task_manager(tuple(include_paths), include_defaults=False).all_tasks) if include_paths else set()
    for name in names:
        if name in local or name not in stock_task_yamls():
            continue
        _, stock = stock_task_config(name, "eval.tasks")
        split = stock.get("test_split") or stock.get("validation_split")
        try:
            import datasets

            with quiet_lm_eval():
                datasets.load_dataset(stock["dataset_path"], stock.get("dataset_name"), split=split,
                                      **{k: v for k, v in (stock.get("dataset_kwargs") or {}).items() if k != "trust_remote_code"})
        except Exception as exc:  # offline and not cached, gated, missing: all one line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise ConfigError(f"eval.local_data.{name}", f"task {name!r} cannot load {stock['dataset_path']!r} ({first}); "
                              f"convert its {split} split to a file and pass --set eval.local_data.{name}=FILE, "
                              "or allow the hub with QPRUNER_ONLINE=1") from None


def validation_tasks(cfg: Config, cache_dir: Optional[str | Path] = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(task names, include paths) for quick validation: each eval task T becomes its `T_val` twin on data
    disjoint from the final score (eval.val_data, the built-in twins, or the other split of a stock hub
    task), else stays T, whose first `finetune.val_limit` documents are then held out of the final score
    (see `held_out_docs`)."""
    cache_dir = cfg.output.cache if cache_dir is None else cache_dir
    names, paths = resolve_tasks(cfg.eval, cache_dir)
    twins = _val_twins(cfg, names, paths)
    return tuple(twins.get(n, n) for n in names), tuple(paths)


def tasks_without_validation_split(cfg: Config, cache_dir: Optional[str | Path] = None) -> list[str]:
    """Eval tasks with no disjoint `T_val` twin: quick validation reads their first `finetune.val_limit`
    documents, which the final score then leaves out."""
    cache_dir = cfg.output.cache if cache_dir is None else cache_dir
    names, paths = resolve_tasks(cfg.eval, cache_dir)
    twins = _val_twins(cfg, names, paths)
    return [n for n in names if n not in twins]


def held_out_docs(cfg: Config, cache_dir: Optional[str | Path] = None) -> dict[str, int]:
    """{lm-eval task: documents skipped at the start of its evaluated split} for every task validated on
    its own split, so the final score never counts a document the search validated on. Every final
    evaluation of a run (trials, baselines) passes this to `evaluate_model`, so its rows stay comparable."""
    cache_dir = cfg.output.cache if cache_dir is None else cache_dir
    own = tasks_without_validation_split(cfg, cache_dir)
    if not own:
        return {}
    _, paths = resolve_tasks(cfg.eval, cache_dir)
    leaves = load_tasks(tuple(own), tuple(paths))["tasks"]  # a group's subtasks each hold out their own docs
    # perplexity tasks (wikitext) have no gold answer, are never validated, and so keep every document
    return {name: cfg.finetune.val_limit for name, task in leaves.items() if task.OUTPUT_TYPE in VALIDATED_TYPES}


def validation_plan(cfg: Config, cache_dir: Optional[str | Path] = None) -> dict[str, str]:
    """{eval task: where its quick validation reads}, in words, for the report."""
    cache_dir = cfg.output.cache if cache_dir is None else cache_dir
    names, paths = resolve_tasks(cfg.eval, cache_dir)
    twins = _val_twins(cfg, names, paths)
    plan = {}
    for name in names:
        if name in cfg.eval.val_data:
            plan[name] = f"eval.val_data file {Path(cfg.eval.val_data[name]).name}"
        elif name in twins and name not in cfg.eval.local_data and split_twin_source(name):
            plan[name] = f"its {split_twin_source(name)!r} split (the final score reads another)"
        elif name in twins:
            plan[name] = f"its held-out twin {twins[name]}"
        elif declared_output_type(name, paths) not in (None, *VALIDATED_TYPES):
            plan[name] = "not validated (no gold answer to score); every document counts in the final score"
        else:
            plan[name] = (f"its first {cfg.finetune.val_limit} documents, held out of the final score "
                          "(no other split is available)")
    return plan


def declared_output_type(name: str, include_paths: Sequence[str]) -> Optional[str]:
    """The output_type a task's YAML declares (includes merged), read from lm-eval's index without loading data."""
    entry = _manager_for([name], tuple(include_paths)).task_index.get(name)
    if entry is None or entry.yaml_path is None:
        return None
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(entry.yaml_path, resolve_func=False, recursive=True).get("output_type", "generate_until")  # lm-eval's default


def _val_twins(cfg: Config, names: Sequence[str], paths: Sequence[str]) -> dict[str, str]:
    local = set(task_manager(tuple(paths), include_defaults=False).all_tasks) if paths else set()
    return {n: f"{n}_val" for n in names if n in cfg.eval.val_data or f"{n}_val" in local}


# ---------------------------------------------------------------------------------------------
# Quick validation: the log-probability of the gold answer, a smooth signal that ranks configurations.

VALIDATED_TYPES = ("multiple_choice", "loglikelihood")  # task types whose gold answer can be scored


def make_validator(model: torch.nn.Module, tokenizer, cfg: Config, cache_dir: Optional[str | Path] = None) -> Callable[[], dict]:
    """ASHA's signal: () -> {"val_logprob", "val_acc"} on the validation tasks' first `finetune.val_limit` docs.

    val_logprob is the mean over tasks of the mean log-probability of each document's gold answer:
    for multiple-choice tasks (multiple_input ones like WinoGrande too) log softmax over the choices'
    summed continuation log-likelihoods at the gold choice, for single-continuation tasks its
    log-likelihood. Unlike accuracy on a few dozen items, it moves with every document's margin, so it
    ranks configurations instead of tying them. val_acc (the argmax, unnormalised) comes free with it.
    Requests are built once here; each call only runs the forward passes.
    """
    requests = {name: gold_requests(task, cfg.finetune.val_limit) for name, task in validated_tasks(cfg, cache_dir).items()}
    lm = wrap_model(model, tokenizer, cfg.eval.batch_size)

    def validate() -> dict:
        scores = [gold_scores(lm, *reqs) for reqs in requests.values()]
        return {"val_logprob": float(np.mean([s[0] for s in scores])), "val_acc": float(np.mean([s[1] for s in scores]))}

    return validate


def validated_tasks(cfg: Config, cache_dir: Optional[str | Path] = None) -> dict:
    """{name: lm-eval task} the quick validation scores: the validation tasks with a gold answer (perplexity
    tasks have none); ConfigError when none has one."""
    tasks = load_tasks(*validation_tasks(cfg, cache_dir))["tasks"]
    picked = {name: task for name, task in tasks.items() if task.OUTPUT_TYPE in VALIDATED_TYPES}
    if not picked:
        raise ConfigError("eval.tasks", f"no task of {', '.join(tasks)} has a gold answer to validate on (types "
                          f"{', '.join(VALIDATED_TYPES)}); add a multiple-choice task such as {', '.join(STANDARD_TASKS[:3])}")
    return picked


def gold_requests(task, limit: int) -> tuple[list, list[int]]:
    """lm-eval's own requests for the first `limit` docs of `task` (its prompts, choices and targets), one
    per choice (acc_mutual_info's unconditional extras dropped), and each request's doc's gold choice."""
    with quiet_lm_eval():
        task.build_all_requests(limit=limit, rank=0, world_size=1)
    by_doc: dict[int, list] = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    instances, golds = [], []
    for doc_id, group in by_doc.items():
        n = len(task.doc_to_choice(group[0].doc)) if task.OUTPUT_TYPE == "multiple_choice" else 1
        instances += group[:n]
        golds += [gold_index(task, group[0].doc)] * len(group[:n])
    return instances, golds


def gold_index(task, doc: dict) -> int:
    """The gold choice of a doc, as lm-eval's multiple-choice scoring finds it (multiple_input: doc_to_text)."""
    if task.OUTPUT_TYPE != "multiple_choice":
        return 0
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    if isinstance(gold, list):
        gold = gold[0]
    if isinstance(gold, str):
        gold = task.doc_to_choice(doc).index(gold)
    return int(gold)


def gold_scores(lm: "HFLM", instances: list, golds: list[int]) -> tuple[float, float]:
    """(mean gold log-probability, accuracy) of one task's requests under the current weights."""
    with eval_mode(lm.model), quiet_lm_eval(), torch.no_grad():
        results = lm.loglikelihood(instances, disable_tqdm=True)
    per_doc: dict[int, list] = {}
    for inst, gold, (ll, greedy) in zip(instances, golds, results):
        per_doc.setdefault(inst.doc_id, [gold, [], []])
        per_doc[inst.doc_id][1].append(ll)
        per_doc[inst.doc_id][2].append(greedy)
    logps, hits = [], []
    for gold, lls, greedy in per_doc.values():
        if len(lls) == 1:  # one continuation (loglikelihood tasks): its log-likelihood, greedy = correct
            logps.append(lls[0])
            hits.append(float(greedy[0]))
        else:
            lls = np.asarray(lls, dtype=np.float64)
            logps.append(float(lls[gold] - np.logaddexp.reduce(lls)))
            hits.append(float(np.argmax(lls) == gold))
    return float(np.mean(logps)), float(np.mean(hits))


# ---------------------------------------------------------------------------------------------
# Evaluation


def evaluate_model(
    model: torch.nn.Module,
    tokenizer,
    ecfg: EvalConfig,
    tasks: Optional[Sequence[str]] = None,
    limit: Optional[int] = None,
    cache_dir: Optional[str | Path] = None,
    skip: Optional[Mapping[str, int]] = None,
) -> dict:
    """Zero-shot lm-eval accuracy of the in-memory model: {"tasks": {name: {"acc", "acc_norm"}}, "mean_acc", "seconds"}.

    `tasks` defaults to ecfg.tasks; `limit` (default ecfg.limit) caps documents per task; `skip`
    ({task: n}, see `held_out_docs`) leaves out the first n documents the quick validation read.
    Perplexity tasks (wikitext) add their metrics and are left out of mean_acc (None if no task has acc).
    """
    started = time.perf_counter()
    names, paths = resolve_tasks(ecfg, cache_dir, tasks)
    lm = wrap_model(model, tokenizer, ecfg.batch_size)
    scores = run_tasks(lm, load_tasks(tuple(names), tuple(paths)), ecfg.limit if limit is None else limit, skip=skip)
    accs = any(s["acc"] is not None for s in scores.values())
    return {"tasks": scores, "mean_acc": mean_acc(scores, ecfg.metric) if accs else None,
            "seconds": time.perf_counter() - started}


def wrap_model(model: torch.nn.Module, tokenizer, batch_size: int) -> "HFLM":
    """lm-eval's HFLM around the in-memory model (a PeftModel works as is): nothing is saved to disk."""
    from lm_eval.models.huggingface import HFLM  # imported here: it pulls in most of transformers (~2 s)

    with eval_mode(model), quiet_lm_eval(level=logging.ERROR):  # it warns that a model object was passed: intended
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def run_tasks(lm: "HFLM", task_dict: dict, limit: Optional[int] = None, stderr: bool = False,
              skip: Optional[Mapping[str, int]] = None) -> dict[str, dict[str, Optional[float]]]:
    """Run lm-eval on already-loaded tasks in eval mode (restoring the model's mode): {task: {"acc", "acc_norm", ...}}.

    Multiple-choice tasks give acc/acc_norm; other tasks (wikitext) give their own metrics (e.g.
    word_perplexity) with acc None. `stderr` adds `<metric>_stderr` (lm-eval's closed form for means).
    `skip` leaves out each named task's first documents (then `limit` counts from there).
    """
    from lm_eval import evaluator

    samples = doc_windows(task_dict, limit, skip) if skip and set(skip) & set(task_dict["tasks"]) else None
    with eval_mode(lm.model), quiet_lm_eval(), torch.no_grad():
        out = evaluator.evaluate(lm=lm, task_dict=task_dict, limit=None if samples else limit, samples=samples,
                                 bootstrap_iters=100 if stderr else 0, log_samples=False)
    scores = {}
    for name in task_dict["tasks"]:
        metrics = out["results"][name]
        scores[name] = {"acc": _metric(metrics, "acc"), "acc_norm": _metric(metrics, "acc_norm")}
        for key, value in metrics.items():
            metric = key.split(",")[0]
            if isinstance(value, (int, float)) and metric not in scores[name] and (stderr or not metric.endswith("_stderr")):
                scores[name][metric] = float(value)
        scores[name]["n_docs"] = out.get("n-samples", {}).get(name, {}).get("effective")
    return scores


def doc_windows(task_dict: dict, limit: Optional[int], skip: Mapping[str, int]) -> dict[str, list[int]]:
    """lm-eval `samples`: per task the document indices [skip, skip + limit) of its evaluated split."""
    windows = {}
    for name, task in task_dict["tasks"].items():
        n = len(task.eval_docs)
        start = skip.get(name, 0)
        if start >= n:
            raise ConfigError("finetune.val_limit", f"task {name!r} has {n} documents and quick validation holds out the "
                              f"first {start}, leaving none to score; lower finetune.val_limit or give eval.val_data.{name}")
        windows[name] = list(range(start, n if limit is None else min(n, start + limit)))
    return windows


# Tasks whose accuracy LLM-Pruner and QPruner report as lm-eval's length-normalised acc_norm.
PAPER_ACC_NORM = frozenset({"hellaswag", "arc_easy", "arc_challenge", "openbookqa", "piqa"})


def task_metric(task: str, metric: str, score: dict[str, Optional[float]]) -> str:
    """Which of a task's metrics `eval.metric` picks: acc_norm where asked for (paper: PAPER_ACC_NORM) and
    the task reports it, acc otherwise."""
    wants_norm = metric == "acc_norm" or (metric == "paper" and task in PAPER_ACC_NORM)
    return "acc_norm" if wants_norm and score.get("acc_norm") is not None else "acc"


def mean_acc(scores: dict[str, dict[str, Optional[float]]], metric: str = "acc") -> float:
    """Unweighted mean over the tasks that report accuracy (perplexity tasks do not) of each task's `metric`
    choice: the accuracy objective of the search."""
    picked = [s[task_metric(t, metric, s)] for t, s in scores.items() if s.get("acc") is not None]
    if not picked:
        raise ConfigError("eval.tasks", f"no task reports an 'acc' metric ({', '.join(scores)}); the search needs "
                          f"multiple-choice tasks such as {', '.join(STANDARD_TASKS)}")
    return sum(picked) / len(picked)


def _metric(metrics: dict, name: str) -> Optional[float]:
    """lm-eval keys metrics as 'name,filter' (usually 'acc,none'); take the first filter's value."""
    for key, value in metrics.items():
        if key.split(",")[0] == name and isinstance(value, (int, float)):
            return float(value)
    return None


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Evaluate without dropout, then give the model back in the mode it had (mid-training validation)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def quiet_lm_eval(level: int = logging.WARNING) -> Iterator[None]:
    """Hide lm-eval's INFO logs and tqdm bars (stderr is redirected); warnings still reach the real stderr.

    The redirect is process-wide for its duration: a trial runs one evaluation at a time.
    """
    real_stderr = sys.stderr
    logger = logging.getLogger("lm_eval")
    handler = None if logger.hasHandlers() else logging.StreamHandler(real_stderr)
    old_level, old_showwarning = logger.level, warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        old_showwarning(message, category, filename, lineno, real_stderr if file is None else file, line)

    logger.setLevel(level)
    if handler is not None:
        logger.addHandler(handler)
    warnings.showwarning = show
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        warnings.showwarning = old_showwarning
        if handler is not None:
            logger.removeHandler(handler)
        logger.setLevel(old_level)


def perplexity(model: torch.nn.Module, tokenizer, docs: Sequence[str]) -> float:
    """Token-level perplexity of `docs` in one padded batch (padding masked out): the pruning studies' measure."""
    batch = tokenizer(list(docs), return_tensors="pt", padding=True).to(next(model.parameters()).device)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    with torch.no_grad():
        return float(torch.exp(model(**batch, labels=labels).loss))
