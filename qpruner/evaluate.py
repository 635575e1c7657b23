"""Zero-shot accuracy with lm-evaluation-harness on the in-memory (peft) model, and a cheap validator.

`TaskManager` indexes thousands of YAML files (~10 s), so one is built per process and per set of
include paths, without lm-eval's own tasks when every requested task lives in the include paths
(the built-in tasks). Loaded task objects are cached too, so a call costs only the forward passes.
lm-eval's INFO logs and per-task progress bars are hidden; its warnings and Python warnings still show.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import logging
import sys
import time
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
from lm_eval import evaluator
from lm_eval.models.huggingface import HFLM
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
    """Expand `builtin` to the tiny model's test tasks and check every name: (task names, include paths).

    An unknown name raises ConfigError on eval.tasks with the closest lm-eval task names.
    """
    names: list[str] = []
    paths = [str(Path(ecfg.include_path).expanduser())] if ecfg.include_path else []
    for name in tasks if tasks is not None else ecfg.tasks:
        if name == "builtin":
            from qpruner.builtin import ensure_tiny

            assets = ensure_tiny(cache_dir, progress=False)
            names += [t for t in assets.test_tasks if t not in names]
            if str(assets.tasks_dir) not in paths:
                paths.append(str(assets.tasks_dir))
        elif name not in names:
            names.append(name)
    known = _manager_for(names, tuple(paths)).all_tasks
    for name in names:
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
    try:
        with quiet_lm_eval():
            loaded = _manager_for(names, include_paths).load(list(names))
    except Exception as exc:  # offline hub, missing data files: one line naming the field
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError("eval.tasks", f"cannot load {', '.join(names)} ({first}); its data must be in the local HF cache or reachable") from None
    for task in loaded["tasks"].values():
        task.set_config(key="num_fewshot", value=0)
    return loaded


# ---------------------------------------------------------------------------------------------
# Evaluation


def evaluate_model(
    model: torch.nn.Module,
    tokenizer,
    ecfg: EvalConfig,
    tasks: Optional[Sequence[str]] = None,
    limit: Optional[int] = None,
    cache_dir: Optional[str | Path] = None,
) -> dict:
    """Zero-shot lm-eval accuracy of the in-memory model: {"tasks": {name: {"acc", "acc_norm"}}, "mean_acc", "seconds"}.

    `tasks` (default ecfg.tasks) may contain `builtin`; `limit` (default ecfg.limit) caps documents per task.
    """
    started = time.perf_counter()
    names, paths = resolve_tasks(ecfg, cache_dir, tasks)
    lm = wrap_model(model, tokenizer, ecfg.batch_size)
    scores = run_tasks(lm, load_tasks(tuple(names), tuple(paths)), ecfg.limit if limit is None else limit)
    return {"tasks": scores, "mean_acc": mean_acc(scores, ecfg.metric), "seconds": time.perf_counter() - started}


def make_validator(model: torch.nn.Module, tokenizer, cfg: Config, cache_dir: Optional[str | Path] = None) -> Callable[[], float]:
    """A quick accuracy for early stopping: mean `eval.metric` over the validation tasks, `finetune.val_limit` docs each.

    `builtin` uses the `*_val` tasks (held-out docs, disjoint from the test docs); any other task is
    validated on its own evaluation split, first `val_limit` documents, so it overlaps the final test.
    Tasks and the lm-eval wrapper are built here once; each call only runs the forward passes.
    """
    task_dict = load_tasks(*validation_tasks(cfg, cache_dir))
    lm = wrap_model(model, tokenizer, cfg.eval.batch_size)
    limit = cfg.finetune.val_limit

    def validate() -> float:
        return mean_acc(run_tasks(lm, task_dict, limit), cfg.eval.metric)

    return validate


def validation_tasks(cfg: Config, cache_dir: Optional[str | Path] = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(task names, include paths) for quick validation: builtin tasks swap to their held-out `*_val` twins."""
    cache_dir = cfg.output.cache if cache_dir is None else cache_dir
    names, paths = resolve_tasks(cfg.eval, cache_dir)
    if "builtin" in cfg.eval.tasks:
        from qpruner.builtin import ensure_tiny

        assets = ensure_tiny(cache_dir, progress=False)
        swap = dict(zip(assets.test_tasks, assets.val_tasks))
        names = [swap.get(n, n) for n in names]
    return tuple(names), tuple(paths)


def wrap_model(model: torch.nn.Module, tokenizer, batch_size: int) -> HFLM:
    """lm-eval's HFLM around the in-memory model (a PeftModel works as is): nothing is saved to disk."""
    with _eval_mode(model), quiet_lm_eval(level=logging.ERROR):  # it warns that a model object was passed: intended
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def run_tasks(lm: HFLM, task_dict: dict, limit: Optional[int] = None) -> dict[str, dict[str, Optional[float]]]:
    """Run lm-eval on already-loaded tasks in eval mode (restoring the model's mode): {task: {"acc", "acc_norm"}}."""
    with _eval_mode(lm.model), quiet_lm_eval(), torch.no_grad():
        out = evaluator.evaluate(lm=lm, task_dict=task_dict, limit=limit, bootstrap_iters=0, log_samples=False)
    scores = {}
    for name in task_dict["tasks"]:
        metrics = out["results"][name]
        acc = _metric(metrics, "acc")
        if acc is None:
            raise ConfigError("eval.tasks", f"task {name!r} reports no 'acc' metric; use multiple-choice tasks such as {', '.join(STANDARD_TASKS)}")
        scores[name] = {"acc": acc, "acc_norm": _metric(metrics, "acc_norm")}
    return scores


# Tasks whose accuracy LLM-Pruner and QPruner report as lm-eval's length-normalised acc_norm.
PAPER_ACC_NORM = frozenset({"hellaswag", "arc_easy", "arc_challenge", "openbookqa", "piqa"})


def task_metric(task: str, metric: str, score: dict[str, Optional[float]]) -> str:
    """Which of a task's metrics `eval.metric` picks: acc_norm where asked for (paper: PAPER_ACC_NORM) and
    the task reports it, acc otherwise."""
    wants_norm = metric == "acc_norm" or (metric == "paper" and task in PAPER_ACC_NORM)
    return "acc_norm" if wants_norm and score.get("acc_norm") is not None else "acc"


def mean_acc(scores: dict[str, dict[str, Optional[float]]], metric: str = "acc") -> float:
    """Unweighted mean over tasks of each task's `metric` choice (the accuracy objective of the search)."""
    return sum(s[task_metric(t, metric, s)] for t, s in scores.items()) / len(scores)


def _metric(metrics: dict, name: str) -> Optional[float]:
    """lm-eval keys metrics as 'name,filter' (usually 'acc,none'); take the first filter's value."""
    for key, value in metrics.items():
        if key.split(",")[0] == name and isinstance(value, (int, float)):
            return float(value)
    return None


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
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
