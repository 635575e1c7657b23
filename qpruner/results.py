"""The run folder's records: where each artefact lives, the trial record, its Arrow schema, and atomic writes.

Every artefact a later step or command needs lives in the run folder (`--out`, Tune's storage_path,
shared by every node of a cluster) or in the shared cache; nothing is read from a node's Ray folder
after its trial ends. One trial is one `TrialRecord`: the Tune callback (`record_from_trial`), the
baselines (`baseline_record`), results.parquet (`results_table`, `RESULTS_SCHEMA`), the front
(qpruner.pareto), the report and export all read and write that one shape.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from qpruner.config import QUALITY, Objective
from qpruner.errors import out_of_memory

RESULTS = "results.parquet"
ADAPTERS = "adapters"  # one folder per trial id, written by the trial on whichever node ran it


def adapter_path(out: str | Path, trial_id: str) -> Path:
    """Where a trial's trained adapter lives: in the run folder, which every node shares."""
    return Path(out) / ADAPTERS / trial_id


# ---------------------------------------------------------------------------------------------
# The trial record and its Arrow schema (one definition: the dataclass fields carry their Arrow type).


def _col(arrow_type: pa.DataType, default: Any = None):
    return field(default=default, metadata={"arrow": arrow_type})


INT8_LIST = pa.list_(pa.field("element", pa.int8()))  # Parquet's item name, so a table reads back with this schema
INT16_LIST = pa.list_(pa.field("element", pa.int16()))


@dataclass
class TrialRecord:
    """One trial (or baseline) of a run. Fields with an Arrow type are results.parquet's fixed columns, in
    this order; the per-task dicts become one column per task (TASK_COLUMNS: acc_, acc_norm_, ppl_, docs_)."""

    trial_id: str = _col(pa.string(), "")
    status: str = _col(pa.string(), "failed")  # completed / stopped_early / oom / failed (pending / running in snapshots)
    bits: list = _col(INT8_LIST, None)
    ranks: Optional[list] = _col(INT16_LIST)
    accuracy: Optional[float] = _col(pa.float64())  # the final test accuracy; None unless completed
    accuracy_stderr: Optional[float] = _col(pa.float64())  # its standard error (qpruner.evaluate.mean_acc_stderr)
    perplexity: Optional[float] = _col(pa.float64())  # word perplexity of the first perplexity task in eval.tasks
    val_logprob: Optional[float] = _col(pa.float64())
    val_acc: Optional[float] = _col(pa.float64())
    memory_bytes: Optional[int] = _col(pa.int64())
    memory_gb: Optional[float] = _col(pa.float64())  # derived from memory_bytes
    memory_source: Optional[str] = _col(pa.string())
    memory_measured: Optional[str] = _col(pa.string())  # what a measured peak counts (window, paged bytes); "" when estimated
    weight_bytes: Optional[int] = _col(pa.int64())
    lora_bytes: Optional[int] = _col(pa.int64())
    peak_estimate_bytes: Optional[int] = _col(pa.int64())
    peak_measured_bytes: Optional[int] = _col(pa.int64())
    train_loss: Optional[float] = _col(pa.float64())
    stopped_early: bool = _col(pa.bool_(), False)  # derived from status
    iterations: int = _col(pa.int32(), 0)
    steps: int = _col(pa.int32(), 0)
    max_steps: int = _col(pa.int32(), 0)
    wall_seconds: float = _col(pa.float64(), 0.0)
    quantize_s: Optional[float] = _col(pa.float64())
    loftq_s: Optional[float] = _col(pa.float64())
    finetune_s: Optional[float] = _col(pa.float64())
    eval_s: Optional[float] = _col(pa.float64())
    error: Optional[str] = _col(pa.string())
    gpu_fraction: Optional[float] = _col(pa.float64())  # the share of a GPU the trial held (0: CPU; None: not recorded)
    started_at: float = _col(pa.float64(), 0.0)
    subtask_scores: Optional[str] = _col(pa.string())  # JSON {"acc": {subtask: acc}, "acc_norm": {...}} of groups
    task_acc: dict = field(default_factory=dict)  # -> acc_<task>
    task_acc_norm: dict = field(default_factory=dict)  # -> acc_norm_<task>
    task_ppl: dict = field(default_factory=dict)  # -> ppl_<task>: perplexity tasks (word perplexity)
    task_docs: dict = field(default_factory=dict)  # -> docs_<task>: documents scored per task
    weight_storage: Optional[str] = None
    label: Optional[str] = None  # baselines: what the row is, in words
    config: dict = field(default_factory=dict)  # the Tune config (bits as b0, b1, ...)

    @classmethod
    def of(cls, data: "TrialRecord | dict") -> "TrialRecord":
        """A record from a record or a plain dict (unknown keys ignored; timings may come as a `timings` dict)."""
        if isinstance(data, cls):
            return data
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values.update({k: v for k, v in (data.get("timings") or {}).items() if k in TIMINGS})
        record = cls(**values)
        if record.subtask_scores is None and (data.get("subtask_acc") or data.get("subtask_acc_norm")):
            record.subtask_scores = json.dumps({"acc": data.get("subtask_acc") or {},
                                                "acc_norm": data.get("subtask_acc_norm") or {}})
        record.stopped_early = record.status == "stopped_early"
        record.memory_gb = None if record.memory_bytes is None else record.memory_bytes / GB
        return record

    def as_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["timings"] = {k: data[k] for k in TIMINGS if data[k] is not None}
        return data


GB = 1024**3
TIMINGS = ("quantize_s", "loftq_s", "finetune_s", "eval_s")
SCHEMA_VERSION = "3"  # 2: status oom and gpu_fraction; 3: perplexity and memory_measured (older files read with them null)
RESULTS_SCHEMA = pa.schema([(f.name, f.metadata["arrow"]) for f in dataclasses.fields(TrialRecord) if "arrow" in f.metadata])
FIXED = RESULTS_SCHEMA  # the fixed columns, in order; per-task metric columns follow


# per-task columns: (record field, column prefix, Arrow type), in results_table's order
TASK_COLUMNS = (("task_acc", "acc_", pa.float64()), ("task_acc_norm", "acc_norm_", pa.float64()),
                ("task_ppl", "ppl_", pa.float64()), ("task_docs", "docs_", pa.int64()))
METRIC_LABELS = {"acc_norm_": "acc_norm", "acc_": "acc", "ppl_": "word perplexity"}


def _prefix_of(column: str) -> Optional[str]:
    return next((p for _, p, _ in sorted(TASK_COLUMNS, key=lambda c: -len(c[1])) if column.startswith(p)), None)


def metric_columns(names: Sequence[str]) -> list[str]:
    """The per-task score columns in results_table's order: every acc_<task>, acc_norm_<task>, then ppl_<task>."""
    return [c for _, prefix, _ in TASK_COLUMNS[:3] for c in sorted(names) if _prefix_of(c) == prefix]


def task_columns(names: Sequence[str]) -> list[str]:
    """Every per-task column in results_table's order: the scores, then docs_<task>."""
    return metric_columns(names) + sorted(c for c in names if _prefix_of(c) == "docs_")


def column_label(column: str) -> str:
    """A table header that says the metric: acc_norm_hellaswag -> 'hellaswag (acc_norm)', ppl_wikitext ->
    'wikitext (word perplexity)'."""
    prefix = _prefix_of(column) or "acc_"
    return f"{column[len(prefix):]} ({METRIC_LABELS[prefix]})"


def accuracy_text(row: dict, digits: int = 3) -> str:
    """A row's accuracy with its standard error where known: '0.423 ± 0.018'; '-' when it has none."""
    acc, se = row.get("accuracy"), row.get("accuracy_stderr")
    if acc is None:
        return "-"
    return f"{acc:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def noise_text(a: dict, b: dict) -> str:
    """Whether a's accuracy differs from b's beyond noise: the difference against 1.96 x its standard error
    (sqrt(se_a^2 + se_b^2), the two evaluations taken as independent; they share documents, so this is
    conservative). Empty when either standard error is unknown."""
    if a.get("accuracy_stderr") is None or b.get("accuracy_stderr") is None:
        return ""
    margin = 1.96 * (a["accuracy_stderr"] ** 2 + b["accuracy_stderr"] ** 2) ** 0.5
    verdict = "within noise" if abs(a["accuracy"] - b["accuracy"]) <= margin else "beyond noise"
    return f"{verdict} (95% margin ±{100 * margin:.1f} pt)"


# ---------------------------------------------------------------------------------------------
# The quality objective (search.objective, qpruner.config.QUALITY): which column the front and hypervolume read.


MEMORY_OBJECTIVE = ("memory_bytes", "min")


def objective_perplexity(task_ppl: dict, tasks: Sequence[str]) -> Optional[float]:
    """search.objective: perplexity's value: the word perplexity of the first perplexity task in eval.tasks
    (`tasks`) that was scored, else of any scored one (None when the run scores none)."""
    first = next((t for t in tasks if task_ppl.get(t) is not None), None) or next(iter(task_ppl), None)
    return None if first is None else float(task_ppl[first])


def objective_of(table: pa.Table) -> Objective:
    """The quality objective a results (or front) table was written for: the first key of its `objectives`
    metadata; accuracy for files without one."""
    stored = (table.schema.metadata or {}).get(b"objectives")
    name = next(iter(json.loads(stored)), "accuracy") if stored else "accuracy"
    return QUALITY.get(name, QUALITY["accuracy"])


def results_table(records: Sequence["TrialRecord | dict"], objective: Optional[str] = None) -> pa.Table:
    """One row per trial: the fixed columns, then `acc_<task>` and `acc_norm_<task>` per task seen; sorted by start.

    The schema metadata holds the objectives (`objective`, default accuracy, and memory) and the run's
    hypervolume reference point.
    """
    rows = sorted((TrialRecord.of(r) for r in records), key=lambda r: r.started_at or 0.0)
    columns = [pa.array([getattr(r, f.name) for r in rows], type=f.type) for f in RESULTS_SCHEMA]
    fields = list(RESULTS_SCHEMA)
    acc_tasks = sorted({t for r in rows for t in r.task_acc})  # acc_norm columns follow the acc tasks
    for name, prefix, arrow in TASK_COLUMNS:
        tasks = acc_tasks if name == "task_acc_norm" else sorted({t for r in rows for t in getattr(r, name)})
        for task in tasks:
            columns.append(pa.array([getattr(r, name).get(task) for r in rows], type=arrow))
            fields.append(pa.field(f"{prefix}{task}", arrow))
    table = pa.Table.from_arrays(columns, schema=pa.schema(fields))
    table = with_reference(table, (0.0, 0.0), objective or "accuracy")
    return with_reference(table, reference_rule(table))


REF_MEMORY_FACTOR = 1.1  # the reference point's memory: 1.1 x the largest trial memory
REF_QUALITY_MARGIN = 0.1  # val_logprob / perplexity: 10% beyond the worst completed value


def reference_rule(table: pa.Table) -> tuple[float, float]:
    """The rule: memory 1.1 x the largest memory of any trial in the table; the quality objective's side is
    accuracy 0.0, or, for objectives without a natural worst value, 10% beyond the worst completed value
    (val_logprob: worst - 0.1 |worst|; perplexity: 1.1 x the largest), 0.0 while none has completed.

    Any status counts for memory (it is known before fine-tuning), so once the uniform-highest anchor has
    started - the costliest configuration of the run - that side no longer moves; write_results keeps the wider
    of the stored and the new point (`wider`), so the box only grows.
    """
    mems = [m for m in table["memory_bytes"].to_pylist() if m is not None]
    objective = objective_of(table)
    if objective.name == "accuracy" or objective.name not in table.column_names:
        return 0.0, REF_MEMORY_FACTOR * float(max(mems, default=0))
    done = [v for v, s in zip(table[objective.name].to_pylist(), table["status"].to_pylist())
            if s == "completed" and v is not None and v == v]
    worst = (min if objective.mode == "max" else max)(done, default=0.0)
    beyond = -1.0 if objective.mode == "max" else 1.0
    return worst + beyond * REF_QUALITY_MARGIN * abs(worst), REF_MEMORY_FACTOR * float(max(mems, default=0))


def wider(a: tuple[float, float], b: tuple[float, float], objective: Objective) -> tuple[float, float]:
    """The reference point whose box holds both: the larger memory, and the worse quality value (a value of
    0.0 on a val_logprob or perplexity side means none completed yet)."""
    qa, qb = a[0], b[0]
    if objective.name != "accuracy" and 0.0 in (qa, qb):
        quality = qb if qa == 0.0 else qa
    else:
        quality = min(qa, qb) if objective.mode == "max" else max(qa, qb)
    return quality, max(a[1], b[1])


def with_reference(table: pa.Table, ref: tuple[float, float], objective: Optional[str] = None) -> pa.Table:
    """The table with run metadata: objectives (`objective`, else the table's own), schema version and the
    hypervolume reference point `ref`."""
    name = objective or objective_of(table).name
    meta = dict(table.schema.metadata or {})
    meta.update({b"objectives": json.dumps(dict([(name, QUALITY[name].mode), MEMORY_OBJECTIVE])).encode(),
                 b"schema_version": SCHEMA_VERSION.encode(),
                 b"reference_point": json.dumps([float(ref[0]), float(ref[1])]).encode()})
    return table.replace_schema_metadata(meta)


def baseline_record(name: str, label: str, bits: list[int], accuracy: float, scores: dict, memory_bytes,
                    weight_bytes: int, tasks: Sequence[str] = ()) -> dict:
    """A baseline's row (baselines.json), shaped like a results row: `trial_id` is `baseline:<name>`, and the
    per-task scores (`scores`: qpruner.evaluate.eval_record's dict, or a trial result) become acc_/ppl_ columns;
    `perplexity` is objective_perplexity's over eval.tasks (`tasks`)."""
    columns = {f"{prefix}{t}": v for name_, prefix, _ in TASK_COLUMNS for t, v in (scores.get(name_) or {}).items()}
    return {"trial_id": f"baseline:{name}", "label": label, "bits": bits, "accuracy": accuracy,
            "accuracy_stderr": scores.get("accuracy_stderr"),
            "perplexity": objective_perplexity(scores.get("task_ppl") or {}, tasks),
            "val_logprob": scores.get("val_logprob"),  # a trained baseline's (uniform-16); zero-shot rows have none
            "memory_bytes": memory_bytes, "weight_bytes": weight_bytes, **columns}


# ---------------------------------------------------------------------------------------------
# Tune trials <-> records.

RECORDED_KEYS = ("accuracy", "accuracy_stderr", "perplexity", "val_logprob", "val_acc", "memory_bytes", "memory_source",
                 "memory_measured", "weight_bytes", "lora_bytes", "peak_estimate_bytes", "peak_measured_bytes", "train_loss",
                 "steps", "max_steps", *TIMINGS)


def write_oom_marker(out: str | Path, trial_id: str, oom) -> Path:
    """Record a TrialOOM for the searcher (see qpruner.search.oom_marker)."""
    from qpruner.search import oom_marker

    path = oom_marker(out, trial_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    memory = getattr(oom, "memory_bytes", None)
    write_json_atomic({"trial_id": trial_id, "stage": oom.stage, "gpu_fraction": oom.gpu_fraction, "host": oom.host,
                       "memory_gb": None if memory is None else memory / GB, "error": str(oom)}, path)
    return path


def recorded_result(out: Path, trial_id: str) -> Optional[dict]:
    """The last report of a trial that results.parquet holds as completed or stopped early (None otherwise),
    shaped so that record_from_trial gives the same row back."""
    import pyarrow.parquet as pq

    path = out / "results.parquet"
    try:
        rows = [r for r in pq.read_table(path).to_pylist() if r["trial_id"] == trial_id] if path.is_file() else []
    except (OSError, pa.ArrowException, ValueError):  # damaged: the driver repairs it; train the trial again
        rows = []
    if not rows or rows[0]["status"] not in ("completed", "stopped_early"):
        return None
    row = rows[0]
    result = {k: row.get(k) for k in RECORDED_KEYS}
    result.update(memory_gb=row["memory_gb"], final=row["status"] == "completed", answered_from_record=True)
    for name, prefix, _ in TASK_COLUMNS:
        result[name] = {c[len(prefix):]: row[c] for c in row if _prefix_of(c) == prefix and row[c] is not None}
    subtasks = json.loads(row["subtask_scores"]) if row.get("subtask_scores") else {}
    result.update(subtask_acc=subtasks.get("acc", {}), subtask_acc_norm=subtasks.get("acc_norm", {}))
    return result


# ---------------------------------------------------------------------------------------------
# Records: one plain dict per Tune trial, the input of qpruner.pareto.


def record_from_trial(trial, tune_status: Optional[str] = None, n_layers: Optional[int] = None) -> dict:
    """Flatten a Tune Trial (status, last result, error) into the record qpruner.pareto expects.
    `tune_status` overrides trial.status (callbacks run before Tune updates it)."""
    from qpruner.search import bits_from_config, ranks_from_config

    last = dict(trial.last_result or {})
    if n_layers is None:  # one bit-width per layer (a grouped search passes the model's layer count)
        n_layers = sum(1 for k in trial.config if k.startswith("b") and k[1:].isdigit())
    final = bool(last.get("final"))
    status_now = tune_status or trial.status
    error = None
    if status_now == "ERROR":
        error = _error_text(trial)
        status = "oom" if out_of_memory(error) else "failed"  # Ray's memory monitor killed its worker
    elif final:
        status = "completed"
    elif status_now == "TERMINATED":
        status = "stopped_early"
    else:
        status = status_now.lower()  # pending / running: only seen in mid-run snapshots
    return {
        "trial_id": trial.trial_id,
        "status": status,
        "bits": bits_from_config(trial.config, n_layers),
        "ranks": ranks_from_config(trial.config, n_layers),
        "accuracy": last.get("accuracy") if final else None,
        "accuracy_stderr": last.get("accuracy_stderr") if final else None,
        "perplexity": last.get("perplexity") if final else None,
        "task_acc": last.get("task_acc") or {},
        "task_acc_norm": last.get("task_acc_norm") or {},
        "task_ppl": last.get("task_ppl") or {},
        "task_docs": last.get("task_docs") or {},
        "subtask_acc": last.get("subtask_acc") or {},
        "subtask_acc_norm": last.get("subtask_acc_norm") or {},
        "val_logprob": last.get("val_logprob"),
        "val_acc": last.get("val_acc"),
        "memory_bytes": last.get("memory_bytes") or _gb_to_bytes(last.get("memory_gb")),
        "memory_source": last.get("memory_source"),
        "memory_measured": last.get("memory_measured"),
        "weight_storage": last.get("weight_storage"),
        "weight_bytes": last.get("weight_bytes"),
        "lora_bytes": last.get("lora_bytes"),
        "peak_estimate_bytes": last.get("peak_estimate_bytes"),
        "peak_measured_bytes": last.get("peak_measured_bytes"),
        "train_loss": last.get("train_loss"),
        "iterations": int(last.get("training_iteration") or 0),
        "steps": int(last.get("steps") or last.get("step") or 0),
        "max_steps": int(last.get("max_steps") or 0),
        "wall_seconds": float(last.get("time_total_s") or 0.0),
        "timings": {k: last[k] for k in TIMINGS if last.get(k) is not None},
        "error": error,
        "gpu_fraction": last.get("gpu_fraction") if last.get("gpu_fraction") is not None else _trial_gpus(trial),
        "started_at": float(getattr(trial.run_metadata, "start_time", None) or 0.0),
        "config": dict(trial.config),
    }


def _trial_gpus(trial) -> Optional[float]:
    """The GPU share Tune reserved for the trial (its placement group's bundles)."""
    try:
        return float(trial.placement_group_factory.required_resources.get("GPU", 0.0))
    except (AttributeError, TypeError, ValueError):
        return None


def _gb_to_bytes(gb: Optional[float]) -> Optional[int]:
    return None if gb is None else int(round(gb * 1024**3))


def _error_text(trial) -> str:
    """The last line of the trial's error (the exception message), for results.parquet; a failure answered from
    the record (RecordedFailure) keeps its recorded text."""
    path = trial.error_file
    if path and Path(path).is_file():
        lines = [ln for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
        text = lines[-1] if lines else "unknown error"
        return text.split(f"{RecordedFailure.__name__}: ", 1)[-1][:2000]
    return "unknown error"


# What a trial's error says when the trial was killed from outside (Ray's memory monitor, a lost worker or node,
# a signal) rather than failing by itself: a resumed run trains it again. A trial that ran out of GPU memory
# itself (qpruner.errors.TrialOOM) is not killed: it is infeasible at its packing, and stays recorded.
KILLED = ("OutOfMemoryError", "running low on memory", "ActorDiedError", "The actor is dead", "worker process has died",
          "WorkerCrashedError", "NodeDiedError", "ActorUnavailableError", "died unexpectedly", "interrupted before it finished")


def killed(error: Optional[str]) -> bool:
    """Whether a failed trial's error text says it was killed rather than failed by itself."""
    return bool(error) and any(marker in error for marker in KILLED) and not own_oom(error)


def own_oom(error: Optional[str]) -> bool:
    """Whether an error is the trial's own out-of-memory (TrialOOM: torch's allocator refused), not a kill."""
    return bool(error) and ("out of GPU memory during" in error or "out of host memory during" in error)


class RecordedFailure(Exception):
    """A resumed run's trial that results.parquet holds as failed by itself: failed again at once with the
    recorded error (not trained again), while the killed trials beside it are retried."""


def recorded_failure(out: Path, trial_id: str) -> Optional[str]:
    """The recorded error of a trial that failed by itself (not killed), or None."""
    path = Path(out) / "results.parquet"
    try:
        rows = [r for r in pq.read_table(path, columns=["trial_id", "status", "error"]).to_pylist()
                if r["trial_id"] == trial_id] if path.is_file() else []
    except (OSError, pa.ArrowException, ValueError):
        return None
    if rows and rows[0]["status"] in ("failed", "oom") and rows[0]["error"] and not killed(rows[0]["error"]):
        return rows[0]["error"]
    return None


def killed_trials(out: Path) -> list[str]:
    """The trials results.parquet holds as killed: a resume retries them."""
    path = Path(out) / "results.parquet"
    try:
        rows = pq.read_table(path, columns=["trial_id", "status", "error"]).to_pylist() if path.is_file() else []
    except (OSError, pa.ArrowException, ValueError):
        return []
    return [r["trial_id"] for r in rows if r["status"] in ("failed", "oom") and killed(r["error"])]


# ---------------------------------------------------------------------------------------------
# Files: atomic writes, merging with an earlier file.


def write_atomic(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call `write(file)` on a temp file beside `path`, fsync, then os.replace: a kill mid-write never
    leaves a truncated file, and the previous file stays readable until the new one is complete."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """results.parquet / pareto.parquet, atomically (`write_atomic`)."""
    write_atomic(path, lambda f: pq.write_table(table, f))


def write_json_atomic(data: Any, path: Path) -> None:
    """run.json / baselines.json / validation.json, atomically (`write_atomic`)."""
    write_atomic(path, lambda f: json.dump(data, f, indent=1), mode="w")


def merge_previous(results: pa.Table, previous: pa.Table) -> pa.Table:
    """Keep rows of an earlier results file that this run no longer knows, or knows only as unfinished:
    a trial completed before a crash stays, once, with its original metrics."""
    new = {r["trial_id"]: r["status"] for r in results.select(["trial_id", "status"]).to_pylist()}
    keep_old = [r["trial_id"] for r in previous.select(["trial_id", "status"]).to_pylist()
                if r["trial_id"] not in new or (r["status"] == "completed" and new[r["trial_id"]] != "completed")]
    if not keep_old:
        return results
    old = previous.filter(pc.is_in(previous["trial_id"], pa.array(keep_old)))
    fresh = results.filter(pc.invert(pc.is_in(results["trial_id"], pa.array(keep_old))))
    merged = pa.concat_tables([fresh, old], promote_options="default")
    columns = RESULTS_SCHEMA.names + task_columns(merged.column_names)  # same order as results_table
    return merged.select(columns).sort_by("started_at").replace_schema_metadata(results.schema.metadata)
