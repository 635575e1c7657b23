"""Zero-shot accuracy and perplexity with lm-evaluation-harness on the in-memory (peft) model, and a cheap validator.

`TaskManager` indexes thousands of YAML files (~10 s), so one is built per process and per set of
include paths, without lm-eval's own tasks when every requested task lives in the include paths
(the built-in tasks and the derived local-data tasks). Loaded task objects are cached too, so a call
costs only the forward passes. lm-eval's INFO logs and per-task progress bars are hidden; its warnings
and Python warnings still show.

Any lm-eval YAML task that reads one HF dataset can read a local file instead (`eval.local_data`),
whatever its include chain (MMLU's subtasks include a shared template), and a group (mmlu, mmlu_stem)
reads a folder of one file per subtask and is scored by lm-eval's aggregate, as one task of the
objective. Perplexity tasks (wikitext) are scored over rolling windows of the model's context in memory
set by the window and the batch size (`rolling_loglikelihoods`). docs/tasks.md lists the task families
tried offline and the file schema each expects.
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
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
import yaml
from lm_eval.tasks import TaskManager

if TYPE_CHECKING:  # annotations only: importing it at run time pulls in most of transformers (~2 s)
    from lm_eval.models.huggingface import HFLM

from qpruner.config import Config, EvalConfig
from qpruner.errors import ConfigError

STANDARD_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


# ---------------------------------------------------------------------------------------------
# Task names


DATA_SUFFIXES = (".jsonl", ".json", ".parquet")  # files eval.local_data / eval.val_data may name (groups: a folder of them)


@lru_cache(maxsize=None)
def task_manager(include_paths: tuple[str, ...] = (), include_defaults: bool = True) -> TaskManager:
    """One TaskManager per process and include-path set (construction indexes every YAML it can see)."""
    return TaskManager(include_path=list(include_paths) or None, include_defaults=include_defaults)


def resolve_tasks(ecfg: EvalConfig, cache_dir: Optional[str | Path] = None, tasks: Optional[Sequence[str]] = None) -> tuple[list[str], list[str]]:
    """Check every task name and give (task names, include paths), deriving local-data tasks first.

    `builtin` was already resolved at config load (names + eval.include_path). `check_eval_inputs` runs
    first (unknown names get "did you mean", local data for a task that is not evaluated is refused);
    names are checked against the include paths and a quick scan of lm-eval's own YAML files (~1 s, not
    the 8-20 s TaskManager index).
    """
    check_eval_inputs(ecfg)
    names = list(dict.fromkeys(tasks if tasks is not None else ecfg.tasks))
    paths = _include_paths(ecfg)
    derived = derived_tasks_dir(ecfg, cache_dir)
    if derived is not None:
        paths.append(str(derived))
    if tasks is not None:  # a subset named by the caller (twins included): known here or to lm-eval
        local = set(task_manager(tuple(paths), include_defaults=False).all_tasks) if paths else set()
        for name in names:
            if name not in local:
                _check_known(name, paths, "eval.tasks")
    return names, paths


def check_eval_inputs(cfg: Config | EvalConfig) -> None:
    """Check the names in `eval` before any data is read; each problem is one line (ConfigError, exit 2).

    - a name in eval.tasks that lm-eval does not know: "did you mean" the closest names (a family folder's
      name too: `siqa` suggests `social_iqa`, which lm-eval keeps in tasks/siqa/);
    - a key of eval.local_data / eval.val_data that eval.tasks does not name (its data would never be read),
      with "did you mean" among eval.tasks and lm-eval's names;
    - a group (mmlu, mmlu_stem) given a file instead of a folder of one file per subtask, or a task given a folder.
    `resolve_tasks` runs it, so every path (trial, tune driver, baselines, importance) gets it; the driver may
    also call it first. Lists no folder and reads no data file.
    """
    ecfg = cfg.eval if isinstance(cfg, Config) else cfg
    include = _include_paths(ecfg)
    for name in dict.fromkeys(ecfg.tasks):
        _check_known(name, include, "eval.tasks")
    for kind in ("local_data", "val_data"):
        for task, location in getattr(ecfg, kind).items():
            where = f"eval.{kind}.{task}"
            if task not in ecfg.tasks:
                close = suggestions(task, list(ecfg.tasks))
                if not close and task not in _cheap_names(include):  # a real task name needs no suggestion
                    close = suggestions(task, _cheap_names(include))
                hint = f"did you mean {', '.join(close)}? " if close else ""
                raise ConfigError(where, f"{task!r} is not in eval.tasks ({', '.join(ecfg.tasks)}), so this data would never be read; "
                                  f"{hint}name the task in eval.tasks or remove the entry")
            path = Path(location).expanduser()
            if task in stock_group_yamls() and not path.is_dir():
                raise ConfigError(where, f"{task!r} is a group of lm-eval tasks: give a folder holding one file per subtask, "
                                  f"named after it ({_example_leaf(task)}.jsonl, ...), not {location!r}")
            if task not in stock_group_yamls() and path.is_dir():
                raise ConfigError(where, f"{task!r} is one task: give one {'/'.join(DATA_SUFFIXES)} file, not the folder {location!r} "
                                  "(folders are for groups such as mmlu)")


def _include_paths(ecfg: EvalConfig) -> list[str]:
    return [str(Path(ecfg.include_path).expanduser())] if ecfg.include_path else []


def _check_known(name: str, include_paths: Sequence[str], field: str) -> None:
    """ConfigError with the closest names unless lm-eval (or an include path) knows `name`."""
    if include_paths and name in task_manager(tuple(include_paths), include_defaults=False).all_tasks:
        return
    if name in stock_task_yamls() or name in stock_group_yamls():
        return
    known = task_manager(tuple(include_paths), include_defaults=True).all_tasks  # tags, Python tasks: the full index
    if name in known:
        return
    close = suggestions(name, known)
    hint = f"did you mean {', '.join(close)}?" if close else f"use lm-eval task names such as {', '.join(STANDARD_TASKS)}, or 'builtin'"
    raise ConfigError(field, f"unknown lm-eval task {name!r}; {hint}")


def suggestions(name: str, known: Sequence[str], n: int = 3) -> list[str]:
    """The names in `known` closest to `name`: lm-eval's task folder called `name` first (tasks/siqa/
    holds social_iqa), then difflib's close matches (case-insensitive)."""
    known = list(dict.fromkeys(known))
    folder = [t for t in stock_families().get(name.lower(), []) if t in set(known)]
    lowered = {k.lower(): k for k in known}
    close = [lowered[c] for c in difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.6)]
    return list(dict.fromkeys(folder[:n] + close))[:n]


def _cheap_names(include_paths: Sequence[str]) -> list[str]:
    names = [*stock_task_yamls(), *stock_group_yamls()]
    if include_paths:
        names += task_manager(tuple(include_paths), include_defaults=False).all_tasks
    return names


def _manager_for(names: Sequence[str], include_paths: tuple[str, ...]) -> TaskManager:
    """The cheap include-path-only manager when it knows every name, else the one with lm-eval's tasks too."""
    if include_paths:
        local = task_manager(include_paths, include_defaults=False)
        if all(n in local.all_tasks for n in names):
            return local
    return task_manager(include_paths, include_defaults=True)


@lru_cache(maxsize=32)
def load_tasks(names: tuple[str, ...], include_paths: tuple[str, ...] = ()) -> dict:
    """lm-eval task objects for `names`, zero-shot, built once per process and reused across evaluations:
    lm-eval's TaskDict {"tasks": {leaf: Task}, "groups": {name: Group}, "group_map": ...}."""
    check_hub_data(names, include_paths)
    try:
        with quiet_lm_eval():
            loaded = _manager_for(names, include_paths).load(list(names))
    except Exception as exc:  # offline hub, missing data files: one line naming the field
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError("eval.tasks", f"cannot load {', '.join(names)} ({first}); give its data as eval.local_data.<task>=FILE "
                          "(a folder of one file per subtask for a group) or make the hub reachable (QPRUNER_ONLINE=1)") from None
    for task in loaded["tasks"].values():
        task.set_config(key="num_fewshot", value=0)
    return loaded


def leaves_of(loaded: dict, name: str, include_paths: Sequence[str] = ()) -> list[str]:
    """The leaf tasks of `name` in a loaded TaskDict: a group's tasks (subgroups' too), the task itself, or a
    tag's tasks (a tag is no container in lm-eval's TaskDict: loaded alone to find them)."""
    group = loaded.get("groups", {}).get(name)
    if group is not None:
        return [t.task_name for t in group.get_all_tasks()]
    if name in loaded["tasks"]:
        return [name]
    return list(load_tasks((name,), tuple(include_paths))["tasks"])


# ---------------------------------------------------------------------------------------------
# lm-eval's own tasks and groups, found without its full index


def _declaration(key: str) -> "re.Pattern[bytes]":
    # a top-level `key: name` line, key and value optionally quoted (MMLU writes "task": "mmlu_anatomy")
    return re.compile(rb"""^["']?""" + key.encode() + rb"""["']?[ \t]*:[ \t]*["']?([^"'\s#]+)["']?[ \t]*(?:#.*)?$""", re.M)


_TASK_LINE, _GROUP_LINE = _declaration("task"), _declaration("group")


@lru_cache(maxsize=1)
def stock_index() -> tuple[dict[str, Path], dict[str, Path]]:
    """({task: YAML file}, {group: YAML file}) of lm-eval's own tasks and groups.

    A plain text scan of lm-eval's task folder for top-level `task: name` / `group: name` lines, quoted
    or not (~1 s, where the TaskManager index takes 8-20 s), in lm-eval's order (first file wins). A file
    with a `group:` line is a group, as lm-eval classifies it. Tasks declared otherwise (none in lm-eval
    0.4.13) are still found by the full index.
    """
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    tasks: dict[str, Path] = {}
    groups: dict[str, Path] = {}
    paths = (p for p in root.rglob("*.yaml") if "__pycache__" not in p.parts and ".ipynb_checkpoints" not in p.parts)
    for path in sorted(paths, key=lambda p: p.as_posix()):
        text = path.read_bytes()
        match = _GROUP_LINE.search(text)
        if match:
            groups.setdefault(match.group(1).decode(), path)
            continue
        match = _TASK_LINE.search(text)
        if match:
            tasks.setdefault(match.group(1).decode(), path)
    return tasks, groups


def stock_task_yamls() -> dict[str, Path]:
    """{task name: YAML file} of lm-eval's own tasks (see `stock_index`)."""
    return stock_index()[0]


def stock_group_yamls() -> dict[str, Path]:
    """{group name: YAML file} of lm-eval's own groups (mmlu, mmlu_stem, ...; see `stock_index`)."""
    return stock_index()[1]


def _stock_root() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _family_folder(path: Path) -> Path:
    """lm_eval/tasks/<family> for a YAML file anywhere under it."""
    return _stock_root() / path.relative_to(_stock_root()).parts[0]


@lru_cache(maxsize=1)
def stock_families() -> dict[str, list[str]]:
    """{lm-eval task folder name (lower case): its groups, then its tasks}: `siqa` -> [social_iqa]."""
    families: dict[str, list[str]] = {}
    for names in (stock_group_yamls(), stock_task_yamls()):
        for name, path in names.items():
            families.setdefault(_family_folder(path).name.lower(), []).append(name)
    return families


@lru_cache(maxsize=None)
def family_index(folder: str) -> dict:
    """lm-eval's own index (tasks, groups, tags with their members) of one task family's folder: a group's
    members are resolved as lm-eval resolves them without indexing all 14,000 YAML files."""
    from lm_eval.tasks._index import TaskIndex

    with quiet_lm_eval(level=logging.ERROR):
        return TaskIndex.build([Path(folder)])


def stock_task_config(task: str, field: str) -> tuple[Path, dict]:
    """(YAML file, config with includes merged, functions unresolved) of lm-eval's stock `task`."""
    from lm_eval.tasks._yaml_loader import load_yaml

    path = stock_task_yamls().get(task)
    if path is None:
        close = suggestions(task, _cheap_names(()))
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(field, f"{task!r} is not one of lm-eval's YAML tasks; {hint}local data works for lm-eval's YAML tasks "
                          f"(e.g. {', '.join(STANDARD_TASKS[:3])}, mmlu_anatomy, wikitext) and groups (mmlu)")
    cfg = load_yaml(path, resolve_func=False, recursive=True)
    if "class" in cfg:
        raise ConfigError(field, f"lm-eval's {task!r} is a Python task class, so its data cannot be swapped for a file")
    if not isinstance(cfg.get("dataset_path"), str) or cfg.get("custom_dataset"):
        raise ConfigError(field, f"lm-eval's {task!r} does not read one HF dataset, so its data cannot be swapped for a file")
    return path, cfg


_DATA_KEYS = ("dataset_path", "dataset_name", "dataset_kwargs", "custom_dataset", "test_split", "validation_split", "training_split")


@lru_cache(maxsize=None)
def stock_group_tree(group: str, field: str = "eval.tasks") -> dict:
    """lm-eval's group `group` as a tree {"group", "cfg", "overrides", "children"}, each child a subtree or
    a leaf {"task", "overrides"}: its YAML's task list with subgroups and tags expanded as lm-eval expands
    them, read with lm-eval's own indexer on the group's family folder (members found elsewhere: the full
    index). ConfigError for shapes whose data cannot come from files (inline tasks, Python tasks)."""
    from lm_eval.tasks._index import Kind

    registry = family_index(str(_family_folder(stock_group_yamls()[group])))

    def entry(name: str):
        found = registry.get(name)
        return found if found is not None else task_manager((), include_defaults=True).task_index.get(name)

    def refuse(why: str):
        raise ConfigError(field, f"lm-eval's group {group!r} {why}, so its data cannot come from local files")

    def build(name: str, cfg: dict, overrides: dict, seen: frozenset) -> dict:
        if name in seen:
            refuse(f"contains itself through {name!r}")
        if any(key in cfg for key in _DATA_KEYS):
            refuse(f"sets its subtasks' dataset in {name!r}")
        children = []
        items = cfg.get("task")
        for item in items if isinstance(items, list) else [items]:
            extra = {}
            if isinstance(item, dict):
                if "group" in item:
                    ref, extra = item["group"], {k: v for k, v in item.items() if k != "group"}
                    found = entry(ref)
                    if found is None or found.kind != Kind.GROUP:
                        refuse(f"defines the subgroup {ref!r} inline")
                    children.append(build(ref, found.cfg, extra, seen | {name}))
                    continue
                if "task" not in item:
                    refuse(f"has a member without a task name in {name!r}")
                ref, extra = item["task"], {k: v for k, v in item.items() if k != "task"}
            else:
                ref = item
            found = entry(ref) if isinstance(ref, str) else None
            if found is None:
                refuse(f"defines the task {ref!r} inline")
            if found.kind == Kind.GROUP:
                children.append(build(ref, found.cfg, extra, seen | {name}))
            elif found.kind == Kind.TAG:
                children += [{"task": t, "overrides": extra} for t in sorted(found.tags)]
            elif found.kind == Kind.PY_TASK:
                refuse(f"has the Python task {ref!r}")
            else:
                children.append({"task": ref, "overrides": extra})
        own = {k: v for k, v in cfg.items() if k not in ("group", "task", "tag")}
        return {"group": name, "cfg": own, "overrides": overrides, "children": children}

    return build(group, registry[group].cfg, {}, frozenset())


def tree_leaves(tree: dict) -> list[str]:
    """The leaf task names of a group tree, in order."""
    out = []
    for child in tree["children"]:
        out += tree_leaves(child) if "group" in child else [child["task"]]
    return list(dict.fromkeys(out))


def _example_leaf(group: str) -> str:
    try:
        return tree_leaves(stock_group_tree(group))[0]
    except (ConfigError, IndexError):
        return f"{group}_<subtask>"


# ---------------------------------------------------------------------------------------------
# Local data: derived tasks that include lm-eval's own YAML and swap only the data source.


def derived_task_yaml(task: str, file: str, name: str, field: str) -> str:
    """A YAML task `name` that `include:`s lm-eval's YAML of `task` and reads `file` as the split it evaluates.

    Prompts, choices, process_docs and metrics stay lm-eval's, whatever the include chain (MMLU's subtasks
    include a shared template); only dataset_path/dataset_name/dataset_kwargs change, and the other splits
    are switched off (zero-shot needs none).
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


def group_files(group: str, folder: str, field: str) -> dict[str, Path]:
    """{subtask: file} of a group's local-data folder: one .jsonl/.json/.parquet file per subtask, named
    after it (mmlu_anatomy.jsonl). A file that names no subtask of the group is refused with the closest names."""
    leaves = tree_leaves(stock_group_tree(group, field))
    root = Path(folder).expanduser()
    files: dict[str, Path] = {}
    for path in sorted(root.iterdir()):
        if not path.is_file() or path.suffix not in DATA_SUFFIXES:
            continue
        if path.stem not in leaves:
            close = suggestions(path.stem, leaves)
            hint = f"did you mean {', '.join(c + path.suffix for c in close)}? " if close else ""
            raise ConfigError(field, f"{path.name} in {folder} names no subtask of lm-eval's {group!r}; {hint}"
                              f"name each file after its subtask ({leaves[0]}{path.suffix}, ...)")
        if path.stem in files:
            raise ConfigError(field, f"{folder} holds two files for {path.stem} ({files[path.stem].name}, {path.name}); keep one")
        files[path.stem] = path.resolve()
    if not files:
        raise ConfigError(field, f"{folder} holds no {'/'.join(DATA_SUFFIXES)} file; put one file per subtask of {group!r} "
                          f"in it, named after the subtask ({leaves[0]}.jsonl, ...)")
    return files


def group_yamls(group: str, folder: str, suffix: str, field: str) -> dict[str, str]:
    """{relative YAML path: text} deriving lm-eval's group `group` from a folder of one file per subtask: the
    subtasks with a file (named `<subtask><suffix>`, each including lm-eval's YAML) and lm-eval's group and
    subgroups over them (named `<group><suffix>`, lm-eval's aggregate_metric_list and aliases kept). Groups
    left without a file are dropped, so a folder of two MMLU subjects scores `mmlu` over those two."""
    tree = stock_group_tree(group, field)
    files = group_files(group, folder, field)
    out: dict[str, str] = {}

    def emit(node: dict) -> bool:
        members = []
        for child in node["children"]:
            if "group" in child:
                if emit(child):
                    members.append({"group": child["group"] + suffix, **child["overrides"]} if child["overrides"] else child["group"] + suffix)
            elif child["task"] in files:
                name = child["task"] + suffix
                members.append({"task": name, **child["overrides"]} if child["overrides"] else name)
        if not members:
            return False
        out[f"{group}{suffix}/{node['group']}{suffix}.yaml"] = yaml.safe_dump(
            {"group": node["group"] + suffix, **node["cfg"], "task": members}, sort_keys=False)
        return True

    emit(tree)
    for leaf, path in files.items():
        out[f"{group}{suffix}/{leaf}{suffix}.yaml"] = derived_task_yaml(leaf, str(path), leaf + suffix, field)
    return out


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
    """Write the derived tasks of eval.local_data (named as the task; a group's folder becomes the group and
    its subtasks) and eval.val_data (`<task>_val`) into <cache>/tasks/<content hash>/, once; None when there
    is no local data."""
    from qpruner.config import default_cache_dir

    listing = tuple((task, tuple(sorted(p.name for p in Path(loc).expanduser().iterdir())) if Path(loc).expanduser().is_dir() else ())
                    for task, loc in sorted({**ecfg.local_data, **{f"{k}\0val": v for k, v in ecfg.val_data.items()}}.items()))
    yamls = _derived_yamls(tuple(sorted(ecfg.local_data.items())), tuple(sorted(ecfg.val_data.items())), tuple(ecfg.tasks), listing)
    if not yamls:
        return None
    key = hashlib.sha256(json.dumps(yamls, sort_keys=True).encode()).hexdigest()[:16]
    home = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "tasks" / key
    if not home.is_dir():
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=_mkdir(home.parent)))
        for name, text in yamls.items():
            _mkdir((tmp / name).parent)
            (tmp / name).write_text(text)
        try:
            os.replace(tmp, home)
        except OSError:  # another process wrote the same content first
            shutil.rmtree(tmp, ignore_errors=True)
    return home


@lru_cache(maxsize=32)
def _derived_yamls(local_data: tuple, val_data: tuple, tasks: tuple, listing: tuple) -> dict[str, str]:
    """{relative YAML path: text} of every derived task; `listing` (the groups' folder contents) is only
    part of the cache key."""
    yamls: dict[str, str] = {}
    for kind, entries, suffix in (("local_data", local_data, ""), ("val_data", val_data, "_val")):
        for task, location in entries:
            field = f"eval.{kind}.{task}"
            if task in stock_group_yamls():
                files = group_files(task, location, field)
                twice = [t for t in files if t in tasks]
                if twice:
                    raise ConfigError(field, f"{twice[0]} is in eval.tasks and also a subtask of {task} through {files[twice[0]].name}; "
                                      "lm-eval scores a task once: drop one of them")
                yamls.update(group_yamls(task, location, suffix, field))
            else:
                yamls[f"{task}{suffix}.yaml"] = derived_task_yaml(task, location, task + suffix, field)
    local, val = dict(local_data), dict(val_data)
    for task in tasks:
        if task not in local and task not in val and split_twin_source(task):
            yamls[f"{task}_val.yaml"] = split_twin_yaml(task)
    return yamls


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_hub_data(names: Sequence[str], include_paths: Sequence[str]) -> None:
    """Stock tasks that read the hub: fail in about a second (offline) before lm-eval's 20 s index.

    Loads the evaluated split with `datasets` (from the local HF cache when offline) and turns a
    failure into one line naming eval.local_data, the fix. A stock group is checked on its first subtask.
    """
    local = set(task_manager(tuple(include_paths), include_defaults=False).all_tasks) if include_paths else set()
    for name in names:
        if name in local:
            continue
        if name in stock_group_yamls():
            leaves = tree_leaves(stock_group_tree(name))
            if leaves:
                _check_hub_task(leaves[0], name)
        elif name in stock_task_yamls():
            _check_hub_task(name, name)


def _check_hub_task(task: str, field_task: str) -> None:
    _, stock = stock_task_config(task, "eval.tasks")
    split = stock.get("test_split") or stock.get("validation_split")
    try:
        import datasets

        with quiet_lm_eval():
            datasets.load_dataset(stock["dataset_path"], stock.get("dataset_name"), split=split,
                                  **{k: v for k, v in (stock.get("dataset_kwargs") or {}).items() if k != "trust_remote_code"})
    except Exception as exc:  # offline and not cached, gated, missing: all one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        if task == field_task:
            raise ConfigError(f"eval.local_data.{task}", f"task {task!r} cannot load {stock['dataset_path']!r} ({first}); "
                              f"convert its {split} split to a file and pass --set eval.local_data.{task}=FILE, "
                              "or allow the hub with QPRUNER_ONLINE=1") from None
        raise ConfigError(f"eval.local_data.{field_task}", f"group {field_task!r} cannot load its subtask {task!r} from "
                          f"{stock['dataset_path']!r} ({first}); convert each subtask's {split} split to <subtask>.jsonl in one "
                          f"folder and pass --set eval.local_data.{field_task}=FOLDER, or allow the hub with QPRUNER_ONLINE=1") from None


# ---------------------------------------------------------------------------------------------
# Which documents quick validation reads, and which the final score then leaves out


def validation_tasks(cfg: Config, cache_dir: Optional[str | Path] = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(task names, include paths) for quick validation: each eval task T becomes its `T_val` twin on data
    disjoint from the final score (eval.val_data, the built-in twins, or the other split of a stock hub
    task), else stays T, whose first validation documents are then held out of the final score
    (see `held_out_docs`)."""
    cache_dir = cfg.output.cache if cache_dir is None else cache_dir
    names, paths = resolve_tasks(cfg.eval, cache_dir)
    twins = _val_twins(cfg, names, paths)
    return tuple(twins.get(n, n) for n in names), tuple(paths)


def tasks_without_validation_split(cfg: Config, cache_dir: Optional[str | Path] = None) -> list[str]:
    """Eval tasks with no disjoint `T_val` twin: quick validation reads their first documents, which the
    final score then leaves out."""
    cache_dir = cfg.output.cache if cache_dir is None else cache_dir
    names, paths = resolve_tasks(cfg.eval, cache_dir)
    twins = _val_twins(cfg, names, paths)
    return [n for n in names if n not in twins]


def validation_limits(cfg: Config, cache_dir: Optional[str | Path] = None) -> dict[str, dict[str, int]]:
    """{validation task (an eval task or its twin): {leaf task with a gold answer: documents read}}.

    A task reads its first `finetune.val_limit` documents; a group reads `val_limit` documents in all,
    spread evenly over its subtasks (ceil(val_limit / subtasks) each), so a group counts as one task in
    the validation signal as in the objective, and holding out costs each MMLU subject 2 documents, not 64.
    Perplexity tasks have no gold answer and read none.
    """
    names, paths = validation_tasks(cfg, cache_dir)
    loaded = load_tasks(names, paths)
    limits = {}
    for name in names:
        leaves = [t for t in leaves_of(loaded, name, paths) if loaded["tasks"][t].OUTPUT_TYPE in VALIDATED_TYPES]
        per_leaf = -(-cfg.finetune.val_limit // len(leaves)) if leaves else 0
        limits[name] = {leaf: per_leaf for leaf in leaves}
    return limits


def held_out_docs(cfg: Config, cache_dir: Optional[str | Path] = None) -> dict[str, int]:
    """{lm-eval leaf task: documents skipped at the start of its evaluated split} for every task validated on
    its own split, so the final score never counts a document the search validated on. Every final
    evaluation of a run (trials, baselines) passes this to `evaluate_model`, so its rows stay comparable."""
    cache_dir = cfg.output.cache if cache_dir is None else cache_dir
    own = tasks_without_validation_split(cfg, cache_dir)
    if not own:
        return {}
    limits = validation_limits(cfg, cache_dir)
    # perplexity tasks (wikitext) have no gold answer, are never validated, and so keep every document
    return {leaf: n for name in own for leaf, n in limits[name].items()}


def held_out_warnings(cfg: Config, cache_dir: Optional[str | Path] = None) -> list[str]:
    """One line per eval task whose final score loses many documents to held-out validation: when the
    documents left are fewer than half of what it would score otherwise, or fewer than 100. Each line says
    how many are left and gives the fix (eval.val_data). The driver prints them at start and report.md
    repeats them; scoring stays disjoint either way."""
    cache_dir = cfg.output.cache if cache_dir is None else cache_dir
    held = held_out_docs(cfg, cache_dir)
    if not held:
        return []
    names, paths = resolve_tasks(cfg.eval, cache_dir)
    own = tasks_without_validation_split(cfg, cache_dir)
    loaded = load_tasks(tuple(own), tuple(paths))
    lines = []
    for name in own:
        leaves = leaves_of(loaded, name, paths)
        sizes = {leaf: len(loaded["tasks"][leaf].eval_docs) for leaf in leaves}
        limit = cfg.eval.limit
        full = sum(n if limit is None else min(n, limit) for n in sizes.values())
        left = sum(max(0, n - held.get(leaf, 0)) if limit is None else min(limit, max(0, n - held.get(leaf, 0))) for leaf, n in sizes.items())
        if left >= full or (left >= full / 2 and left >= 100):
            continue
        why = " and ".join(w for w, hit in (("fewer than half", left < full / 2), ("fewer than 100", left < 100)) if hit)
        group = name in loaded.get("groups", {})
        first = max(held.get(leaf, 0) for leaf in leaves)
        read = (f"the first {first} documents of each of its {len(leaves)} subtasks" if group else f"its first {first} documents")
        fix = "FOLDER (one validation file per subtask)" if group else "FILE (validation rows in the same schema)"
        lines.append(f"{name}: the final score counts {left} of {full} documents ({why}): quick validation reads {read} "
                     f"and holds them out; give eval.val_data.{name}={fix} to score all {full}")
    return lines


def validation_plan(cfg: Config, cache_dir: Optional[str | Path] = None) -> dict[str, str]:
    """{eval task: where its quick validation reads}, in words, for the report."""
    cache_dir = cfg.output.cache if cache_dir is None else cache_dir
    names, paths = resolve_tasks(cfg.eval, cache_dir)
    twins = _val_twins(cfg, names, paths)
    plan = {}
    for name in names:
        if name in cfg.eval.val_data:
            plan[name] = f"eval.val_data {'folder' if Path(cfg.eval.val_data[name]).is_dir() else 'file'} {Path(cfg.eval.val_data[name]).name}"
        elif name in twins and name not in cfg.eval.local_data and split_twin_source(name):
            plan[name] = f"its {split_twin_source(name)!r} split (the final score reads another)"
        elif name in twins:
            plan[name] = f"its held-out twin {twins[name]}"
        else:
            leaves = _declared_group_leaves(cfg, name, paths)
            if leaves is None:  # one task: its YAML says whether it has a gold answer, no data read
                validated = declared_output_type(name, paths) in (None, *VALIDATED_TYPES)
                plan[name] = (f"its first {cfg.finetune.val_limit} documents, held out of the final score "
                              "(no other split is available)") if validated else NOT_VALIDATED
            else:
                validated = [leaf for leaf, kind in leaves.items() if kind in VALIDATED_TYPES]
                plan[name] = (f"the first {-(-cfg.finetune.val_limit // len(validated))} documents of each of its "
                              f"{len(validated)} subtasks ({cfg.finetune.val_limit} in all), held out of the final score "
                              "(no other split is available)") if validated else NOT_VALIDATED
    return plan


NOT_VALIDATED = "not validated (no gold answer to score); every document counts in the final score"


def _declared_group_leaves(cfg: Config, name: str, paths: Sequence[str]) -> Optional[dict[str, str]]:
    """{subtask: declared output_type} of a group in eval.tasks, read from YAML and folder names (no data
    loaded); None for a task. A group from an include path is loaded to find its members."""
    from lm_eval.tasks._index import Kind

    if name in stock_group_yamls():
        location = cfg.eval.local_data.get(name)
        names = list(group_files(name, location, f"eval.local_data.{name}")) if location else tree_leaves(stock_group_tree(name))
        return {leaf: stock_task_config(leaf, "eval.tasks")[1].get("output_type", "generate_until") for leaf in names}
    entry = _manager_for([name], tuple(paths)).task_index.get(name)
    if entry is None or entry.kind not in (Kind.GROUP, Kind.TAG):
        return None
    loaded = load_tasks((name,), tuple(paths))
    return {leaf: loaded["tasks"][leaf].OUTPUT_TYPE for leaf in leaves_of(loaded, name, paths)}


def declared_output_type(name: str, include_paths: Sequence[str]) -> Optional[str]:
    """The output_type a task's YAML declares (includes merged), read from lm-eval's index without loading
    data; None for groups and tags (their members declare theirs) and unknown names."""
    from lm_eval.tasks._index import Kind

    entry = _manager_for([name], tuple(include_paths)).task_index.get(name)
    if entry is None or entry.yaml_path is None or entry.kind != Kind.TASK:
        return None
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(entry.yaml_path, resolve_func=False, recursive=True).get("output_type", "generate_until")  # lm-eval's default


def _val_twins(cfg: Config, names: Sequence[str], paths: Sequence[str]) -> dict[str, str]:
    local = set(task_manager(tuple(paths), include_defaults=False).all_tasks) if paths else set()
    return {n: f"{n}_val" for n in names if n in cfg.eval.val_data or f"{n}_val" in local}


# ---------------------------------------------------------------------------------------------
# Quick validation: the log-probability of the gold answer, a smooth signal that ranks configurations.

VALIDATED_TYPES = ("multiple_choice", "loglikelihood")  # task types whose gold answer can be scored


def make_validator(model: torch.nn.Module, tokenizer, cfg: Config, cache_dir: Optional[str | Path] = None,
                   plan=None) -> Callable[[], dict]:
    """ASHA's signal: () -> {"val_logprob", "val_acc"} on the validation tasks' first documents (see
    `validation_limits`: `finetune.val_limit` per task, spread over a group's subtasks).

    val_logprob is the mean over eval tasks (a group counts once, its documents pooled) of the mean
    log-probability of each document's gold answer: for multiple-choice tasks (multiple_input ones like
    WinoGrande too) log softmax over the choices' summed continuation log-likelihoods at the gold choice,
    for single-continuation tasks its log-likelihood. Unlike accuracy on a few dozen items, it moves with
    every document's margin, so it ranks configurations instead of tying them. val_acc (the argmax,
    unnormalised) comes free with it. Requests are built once here; each call only runs the forward passes.
    `plan` (qpruner.plan.TaskPlan) carries the validation tasks and limits the driver resolved; without it
    they are resolved here.
    """
    if plan is None:
        tasks, limits = validated_tasks(cfg, cache_dir), validation_limits(cfg, cache_dir)
    else:
        loaded = load_tasks(tuple(plan.val_names), tuple(plan.include_paths))["tasks"]
        tasks, limits = {n: t for n, t in loaded.items() if t.OUTPUT_TYPE in VALIDATED_TYPES}, plan.val_limits
    owner = {leaf: name for name, leaves in limits.items() for leaf in leaves}
    requests = {leaf: gold_requests(task, limits[owner[leaf]][leaf]) for leaf, task in tasks.items()}
    lm = wrap_model(model, tokenizer, cfg.eval.batch_size)

    def validate() -> dict:
        pooled: dict[str, tuple[list, list]] = {}
        for leaf, reqs in requests.items():
            logps, hits = gold_doc_scores(lm, *reqs)
            pooled.setdefault(owner[leaf], ([], []))
            pooled[owner[leaf]][0].extend(logps)
            pooled[owner[leaf]][1].extend(hits)
        return {"val_logprob": float(np.mean([np.mean(lp) for lp, _ in pooled.values()])),
                "val_acc": float(np.mean([np.mean(h) for _, h in pooled.values()]))}

    return validate


def validated_tasks(cfg: Config, cache_dir: Optional[str | Path] = None) -> dict:
    """{leaf name: lm-eval task} the quick validation scores: the validation tasks' leaves with a gold answer
    (perplexity tasks have none); ConfigError when none has one."""
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
    for group in by_doc.values():
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


def gold_scores(lm: HFLM, instances: list, golds: list[int]) -> tuple[float, float]:
    """(mean gold log-probability, accuracy) of one task's requests under the current weights."""
    logps, hits = gold_doc_scores(lm, instances, golds)
    return float(np.mean(logps)), float(np.mean(hits))


def gold_doc_scores(lm: HFLM, instances: list, golds: list[int]) -> tuple[list[float], list[float]]:
    """Per document: (gold log-probability, 1.0 if the argmax choice is gold) under the current weights."""
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
    return logps, hits


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
    include_paths: Optional[Sequence[str]] = None,
) -> dict:
    """Zero-shot lm-eval scores of the in-memory model.

    Returns {"tasks": {eval task: {"acc", "acc_norm", other metrics, "n_docs"}}, "subtasks": {name: scores}
    (every subgroup and subtask of the groups in eval.tasks), "groups": {group: [its leaf tasks]},
    "mean_acc", "task_ppl", "seconds"}. A group (mmlu) is one eval task scored by lm-eval's aggregate
    (size-weighted over its subtasks). `tasks` defaults to ecfg.tasks; `limit` (default ecfg.limit) caps
    documents per leaf task; `skip` ({leaf: n}, see `held_out_docs`) leaves out the first n documents the
    quick validation read. Perplexity tasks (wikitext) report their perplexities (`task_ppl`: word
    perplexity) and stay out of mean_acc (None if no task has acc). `eval_record` turns this into the
    trial result's keys. `include_paths` with `tasks`: names the driver already resolved (qpruner.plan.TaskPlan),
    so nothing is resolved again here.
    """
    started = time.perf_counter()
    names, paths = (list(tasks), list(include_paths)) if tasks is not None and include_paths is not None \
        else resolve_tasks(ecfg, cache_dir, tasks)
    lm = wrap_model(model, tokenizer, ecfg.batch_size)
    loaded = load_tasks(tuple(names), tuple(paths))
    scores = run_tasks(lm, loaded, ecfg.limit if limit is None else limit, skip=skip)
    top = {name: {k: v for k, v in s.items() if k != "subtasks"} for name, s in scores.items()}
    subtasks = {sub: s for score in scores.values() for sub, s in (score.get("subtasks") or {}).items()}
    accs = any(s["acc"] is not None for s in top.values())
    return {"tasks": top, "subtasks": subtasks,
            "groups": {name: leaves_of(loaded, name) for name in top if name in loaded.get("groups", {})},
            "mean_acc": mean_acc(top, ecfg.metric) if accs else None,
            "mean_acc_stderr": mean_acc_stderr(top, ecfg.metric) if accs else None,
            "task_ppl": {name: ppl for name, s in top.items() if (ppl := perplexity_of(s)) is not None},
            "seconds": time.perf_counter() - started}


def eval_record(ev: dict) -> dict:
    """The evaluation keys of a trial result (JSON, results.parquet, report), from `evaluate_model`'s dict:

    - task_acc / task_acc_norm: {eval task: acc / acc_norm} for the tasks that report accuracy (a group:
      lm-eval's aggregate; perplexity-only tasks are left out, not None);
    - task_ppl: {eval task: word perplexity (lm-eval's `perplexity` where a task has no word perplexity)};
    - subtask_acc / subtask_acc_norm: {subgroup or subtask of a group in eval.tasks: acc / acc_norm};
    - task_docs: {eval task: documents scored} (a group: summed over its subtasks), after held-out
      validation documents and eval.limit;
    - accuracy_stderr: the standard error of the accuracy objective (`mean_acc_stderr`).
    """
    top, subs = ev["tasks"], ev.get("subtasks", {})
    return {
        "accuracy_stderr": ev.get("mean_acc_stderr"),
        "task_acc": {t: s["acc"] for t, s in top.items() if s.get("acc") is not None},
        "task_acc_norm": {t: s.get("acc_norm") for t, s in top.items() if s.get("acc") is not None},
        "task_ppl": dict(ev.get("task_ppl") or {}),
        "subtask_acc": {t: s["acc"] for t, s in subs.items() if s.get("acc") is not None},
        "subtask_acc_norm": {t: s.get("acc_norm") for t, s in subs.items() if s.get("acc") is not None},
        "task_docs": {t: s.get("n_docs") for t, s in top.items()},
    }


def perplexity_of(score: Mapping[str, Optional[float]]) -> Optional[float]:
    """A task's perplexity as the outputs show it: word_perplexity (wikitext), else lm-eval's `perplexity`
    (lambada), else None."""
    for key in ("word_perplexity", "perplexity"):
        if score.get(key) is not None:
            return float(score[key])
    return None


def wrap_model(model: torch.nn.Module, tokenizer, batch_size: int) -> HFLM:
    """lm-eval's HFLM around the in-memory model (a PeftModel works as is): nothing is saved to disk.
    Perplexity requests (loglikelihood_rolling) are scored in bounded memory (`rolling_loglikelihoods`)."""
    with eval_mode(model), quiet_lm_eval(level=logging.ERROR):  # it warns that a model object was passed: intended
        return _bounded_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


@lru_cache(maxsize=1)
def _bounded_hflm() -> type:
    from lm_eval.models.huggingface import HFLM  # imported here: it pulls in most of transformers (~2 s)

    class BoundedHFLM(HFLM):
        """HFLM whose perplexity scoring runs in memory set by the window and the batch size, not the page."""

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            totals = rolling_loglikelihoods(self, [req.args[0] for req in requests], int(self.batch_size))
            for req, total in zip(requests, totals):
                self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
            return totals

    return BoundedHFLM


def run_tasks(lm: HFLM, task_dict: dict, limit: Optional[int] = None, stderr: bool = False,
              skip: Optional[Mapping[str, int]] = None) -> dict[str, dict]:
    """Run lm-eval on already-loaded tasks in eval mode (restoring the model's mode): {task: {"acc", "acc_norm", ...}}.

    One entry per top-level item: each task outside any group, and each group with lm-eval's aggregate
    (its aggregate_metric_list, size-weighted over its subtasks; a group that defines none gets the
    size-weighted mean of its subtasks' acc/acc_norm) and "subtasks": {subgroup or subtask: scores}.
    Multiple-choice tasks give acc/acc_norm; other tasks (wikitext) give their own metrics (e.g.
    word_perplexity) with acc None. `stderr` adds `<metric>_stderr` (lm-eval's closed form for means).
    `skip` leaves out each named leaf task's first documents (then `limit` counts from there).
    "n_docs" is the number of documents scored (a group: summed over its subtasks).
    """
    from lm_eval import evaluator

    samples = doc_windows(task_dict, limit, skip) if skip and set(skip) & set(task_dict["tasks"]) else None
    with eval_mode(lm.model), quiet_lm_eval(), torch.no_grad():
        out = evaluator.evaluate(lm=lm, task_dict=task_dict, limit=None if samples else limit, samples=samples,
                                 bootstrap_iters=100 if stderr else 0, log_samples=False)
    n_samples = out.get("n-samples", {})
    groups = task_dict.get("groups", {})

    def leaf_scores(name: str) -> dict:
        score = _scores(out["results"][name], stderr)
        score["n_docs"] = n_samples.get(name, {}).get("effective")
        return score

    def group_scores(group) -> dict:
        score = _scores(out["results"].get(group.name, {}), stderr)
        leaves = [leaf_scores(t.task_name) for t in group.get_all_tasks()]
        score["n_docs"] = sum(s["n_docs"] or 0 for s in leaves)
        if not group.has_aggregation:  # lm-eval reports no aggregate: the objective still needs one
            for metric in ("acc", "acc_norm"):
                pairs = [(s[metric], s["n_docs"] or 0) for s in leaves if s[metric] is not None]
                if pairs and sum(n for _, n in pairs):
                    score[metric] = sum(v * n for v, n in pairs) / sum(n for _, n in pairs)
        return score

    children = {child for g in groups.values() for child in g.child_names}
    owner = {}
    for name, group in groups.items():
        if name not in children:
            owner.update({t.task_name: name for t in group.get_all_tasks()})
    scores: dict[str, dict] = {}
    for leaf in task_dict["tasks"]:
        name = owner.get(leaf, leaf)
        if name in scores:
            continue
        if name in groups:
            group = groups[name]
            scores[name] = group_scores(group)
            scores[name]["subtasks"] = {**{g.name: group_scores(g) for g in group.get_all_groups()},
                                        **{t.task_name: leaf_scores(t.task_name) for t in group.get_all_tasks()}}
        else:
            scores[name] = leaf_scores(leaf)
    return scores


def _scores(metrics: Mapping, stderr: bool) -> dict[str, Optional[float]]:
    """{"acc", "acc_norm", every other numeric metric} of one lm-eval result entry ('name,filter' keys)."""
    score: dict[str, Optional[float]] = {"acc": _metric(metrics, "acc"), "acc_norm": _metric(metrics, "acc_norm")}
    for key, value in metrics.items():
        metric = key.split(",")[0]
        if (isinstance(value, (int, float)) and not isinstance(value, bool) and metric not in score and metric != "sample_len"
                and (stderr or not metric.endswith("_stderr"))):
            score[metric] = float(value)
    return score


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


def mean_acc_stderr(scores: dict[str, dict[str, Optional[float]]], metric: str = "acc") -> Optional[float]:
    """The standard error of `mean_acc`: each task's accuracy is a mean of 0/1 document scores, whose standard
    error lm-eval gives as sqrt(p (1 - p) / (n - 1)) (its `mean_stderr`: sample deviation over sqrt(n)); the
    tasks' documents are independent, so the unweighted mean over T tasks has sqrt(sum se_t^2) / T. A group's
    accuracy is taken as a mean over all its documents (exact for lm-eval's size-weighted aggregate). None
    when a task's document count is unknown or below 2."""
    parts = []
    for task, s in scores.items():
        if s.get("acc") is None:
            continue
        p, n = s[task_metric(task, metric, s)], s.get("n_docs")
        if not n or n < 2:
            return None
        parts.append(p * (1 - p) / (n - 1))
    return (sum(parts) ** 0.5) / len(parts) if parts else None


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


# ---------------------------------------------------------------------------------------------
# Perplexity tasks in bounded memory

HEAD_CHUNK_ELEMENTS = 1 << 22  # logits alive at once while scoring a window: 16 MB in float32
_SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "logits_scaling")  # logits that are not lm_head(hidden)


def rolling_loglikelihoods(lm: HFLM, strings: Sequence[str], batch_size: int) -> list[float]:
    """The summed token log-likelihood of each string as lm-eval's loglikelihood_rolling defines it (its own
    disjoint windows of the model's context `lm.max_length`, every token predicted once, the first from the
    prefix token), in memory set by the window and the batch size, never by the page length:

    - windows are cut one page at a time and scored `batch_size` at a time;
    - each batch runs the decoder once, then the output layer turns its last hidden states into logits a
      chunk of positions at a time (HEAD_CHUNK_ELEMENTS floats), each chunk reduced at once to its targets'
      log-probabilities, so no batch x window x vocabulary tensor exists. Stock lm-eval 0.4 batches
      windows too but holds the batch's full log-softmax: 16 x 8192 x 49152 floats (25.8 GB) for SmolLM2 at
      batch 16. Models whose logits are not `lm_head(hidden)` (soft-capped, scaled) take the full forward,
      one batch of windows at a time.
    """
    from lm_eval import utils

    window = int(lm.max_length)
    split = _decoder_and_head(lm)
    totals = [0.0] * len(strings)
    batch: list[tuple[int, list[int], list[int]]] = []
    for index, text in enumerate(strings):
        with _quiet_transformers():  # a page longer than the context is the point: no "sequence length" warning
            tokens = lm.tok_encode(text)
        windows = utils.get_rolling_token_windows(token_list=tokens, prefix_token=lm.prefix_token_id,
                                                  max_seq_len=window, context_len=1)
        for context, continuation in map(utils.make_disjoint_window, windows):
            batch.append((index, (context + continuation)[-(window + 1):][:-1], continuation))
            if len(batch) == batch_size:
                _score_windows(lm, split, batch, totals)
                batch = []
    if batch:
        _score_windows(lm, split, batch, totals)
    return totals


def _score_windows(lm: HFLM, split, batch: list[tuple[int, list[int], list[int]]], totals: list[float]) -> None:
    """Add each window's continuation log-likelihood to totals[its page]. Rows are right-padded without an
    attention mask, as lm-eval's HFLM does: causal attention never lets a position see the padding after it."""
    width = max(len(inputs) for _, inputs, _ in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (_, inputs, _) in enumerate(batch):
        ids[row, : len(inputs)] = torch.tensor(inputs, dtype=torch.long)
    ids = ids.to(lm.device)
    if split is not None:
        decoder, head = split
        states, project = decoder(input_ids=ids, use_cache=False).last_hidden_state, head
    else:
        states, project = lm.model(input_ids=ids, use_cache=False).logits, (lambda x: x)
    vocab = lm.model.config.vocab_size if hasattr(lm.model, "config") else 1
    step = max(1, HEAD_CHUNK_ELEMENTS // max(1, int(vocab)))
    for row, (index, inputs, continuation) in enumerate(batch):
        end, target = len(inputs), torch.tensor(continuation, dtype=torch.long, device=ids.device)
        start = end - len(continuation)
        total = 0.0
        for a in range(start, end, step):
            b = min(end, a + step)
            logits = project(states[row, a:b]).float()
            total -= float(torch.nn.functional.cross_entropy(logits, target[a - start: b - start], reduction="sum"))
        totals[index] += total
    del states


def _decoder_and_head(lm: HFLM):
    """(decoder, output layer) whose composition gives the model's logits, checked on 8 tokens once per
    wrapped model; None (use the full forward) when the model is not split that way."""
    cached = getattr(lm, "_qpruner_split", False)
    if cached is not False:
        return cached
    model = lm.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    split = None
    try:
        config = getattr(base, "config", None)
        decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        if decoder is not None and head is not None and decoder is not base and not any(getattr(config, k, None) for k in _SCALED_LOGITS):
            probe = torch.arange(1, 9, dtype=torch.long, device=lm.device).unsqueeze(0) % int(config.vocab_size)
            with torch.no_grad():
                full = model(input_ids=probe, use_cache=False).logits.float()
                parts = head(decoder(input_ids=probe, use_cache=False).last_hidden_state).float()
            if torch.allclose(full, parts, rtol=1e-3, atol=1e-3):
                split = (decoder, head)
    except Exception:  # any model this cannot split is scored with its plain forward
        split = None
    lm._qpruner_split = split
    return split


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
