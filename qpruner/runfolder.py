"""A run folder (`--out`) belongs to one run and one config: the driver's lock on it, the recorded config a
`--resume` must match, and reading its files with one line that says what is damaged and how to recover.

- `RunLock`: `fcntl.flock` on `<out>/.qpruner.lock`, held for the driver's life (the kernel drops it when the
  process dies, so a killed driver leaves no stale lock); a second driver is refused in one line naming the
  holder's pid and host. A refusal before the run starts removes what this invocation created.
- `differing_keys`: the result-changing settings in which two configs differ (where files go, resources and
  how many trials run at once change no result).
- `read_json` / `read_results`: run.json, baselines.json, results.parquet, or a QPrunerError naming the file,
  what is wrong with it, and the repair (`python -m qpruner.report RUN --repair`, or `qpruner.tune --resume`).
- `repair`: rebuild results.parquet from Tune's experiment state (`<out>/tune`), rebuild run.json from
  config.yaml, set a damaged baselines.json aside (the rerun measures them again).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Optional

from qpruner.errors import QPrunerError, check_out_path, make_dirs

LOCK = ".qpruner.lock"
RUN = "run.json"
RESULTS = "results.parquet"
BASELINES = "baselines.json"
EXPERIMENT = "tune"  # Tune's experiment folder inside the run folder
DAMAGED = ".damaged"  # suffix a repaired file's damaged original is kept under
# Settings that change no trial's result: where files go, what a trial is given to run on, how many trials run
# at once or in all, retries, and which reference rows are measured after the search.
NEUTRAL = ("output.", "resources.", "search.concurrency", "search.num_samples", "search.max_failures",
           "search.baselines")


def repair_hint(run: Path) -> str:
    return f"python -m qpruner.report {run} --repair"


# ---------------------------------------------------------------------------------------------
# The lock.


class RunLock:
    """`with RunLock(out) as lock:` holds the run folder for this process; `lock.commit()` once the folder is
    the run's (written or resumed): before that, leaving the block (a refusal, Ctrl-C) removes everything this
    invocation created, so a refused command leaves --out as it found it."""

    def __init__(self, out: Path, what: str = "--out"):
        self.out = Path(out)
        self.what = what
        self.fd: Optional[int] = None
        self.made: list[Path] = []  # folders this invocation created, outermost first
        self.existing: set[str] = set()  # entries of --out before this invocation
        self.committed = False

    def __enter__(self) -> "RunLock":
        check_out_path(self.out, self.what)
        self.made = make_dirs(self.out)
        self.existing = {p.name for p in self.out.iterdir()}
        path = self.out / LOCK
        for _ in range(5):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_text(path) or "another process"
                os.close(fd)
                self._rollback(holds_lock=False)
                raise QPrunerError(f"{self.what} {self.out} is in use by another qpruner run ({holder}); wait for it "
                                   f"to finish, or give another {self.what}") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a lock file its holder removed while this process waited to open it
                break
            os.close(fd)
        else:
            raise QPrunerError(f"{self.what} {self.out}: could not take the run folder's lock; try again")
        self.fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        return self

    def commit(self) -> None:
        """From now on the folder is the run's: leaving keeps what was written."""
        self.committed = True

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self._rollback()
        else:
            (self.out / LOCK).unlink(missing_ok=True)
        if self.fd is not None:
            os.close(self.fd)  # releases the flock
            self.fd = None

    def _rollback(self, holds_lock: bool = True) -> None:
        """Remove what this invocation created: the folders it made, else the entries that were not there (and
        the lock file, unless another process holds it)."""
        if self.made:
            shutil.rmtree(self.made[0], ignore_errors=True)
            return
        if not self.out.is_dir():
            return
        for entry in self.out.iterdir():
            if entry.name == LOCK and not holds_lock:
                continue
            if entry.name not in self.existing:
                remove(entry, strict=False)
        if LOCK in self.existing and holds_lock:
            (self.out / LOCK).unlink(missing_ok=True)  # a killed driver's leftover: stale, not the run's


def remove(entry: Path, strict: bool = True) -> None:
    """Delete a run folder's entry: a folder with its contents, anything else (a file, a link) alone; errors
    pass silently unless `strict`."""
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=not strict)
    elif strict:
        entry.unlink()
    else:
        entry.unlink(missing_ok=True)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""


def user_entries(out: Path) -> list[str]:
    """The entries of a folder other than a leftover lock file."""
    return [p.name for p in out.iterdir() if p.name != LOCK] if out.is_dir() else []


# ---------------------------------------------------------------------------------------------
# The recorded config.


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def differing_keys(recorded: dict, current: dict, neutral: bool = False) -> list[str]:
    """Dotted keys whose values differ: the result-changing ones (or, `neutral`, the others)."""
    a, b = flatten(recorded), flatten(current)
    missing = object()
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]
    return [k for k in keys if k.startswith(NEUTRAL) == neutral]


# ---------------------------------------------------------------------------------------------
# Reading the run folder's files.


def read_json(path: Path, recover: Optional[str] = None) -> dict:
    """A run folder's JSON file (run.json, baselines.json), or one line naming it, what is wrong and the repair."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise QPrunerError(f"{path} is damaged ({_reason(exc)}); {recover or 'repair the run folder with ' + repair_hint(path.parent)}") from None
    if not isinstance(data, dict):
        raise QPrunerError(f"{path} is damaged (a JSON {type(data).__name__}, not an object); "
                           f"{recover or 'repair the run folder with ' + repair_hint(path.parent)}")
    return data


def read_results(run: Path, what: str = "run folder"):
    """results.parquet of a run folder, or one line saying it is missing or damaged and how to rebuild it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(run) / RESULTS
    if not path.is_file():
        raise QPrunerError(f"{Path(run)} has no {RESULTS}; give the output folder of a qpruner.tune run"
                           + (f" (or rebuild it from Tune's state: {repair_hint(run)})" if can_rebuild(run) else ""))
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise QPrunerError(f"{path} is damaged ({_reason(exc)}); rebuild it from Tune's experiment state with "
                           f"{repair_hint(run)}" if can_rebuild(run) else
                           f"{path} is damaged ({_reason(exc)}) and {Path(run) / EXPERIMENT} holds no Tune state to "
                           "rebuild it from; rerun the search with --overwrite") from None
    missing = [c for c in ("trial_id", "status", "bits", "accuracy", "memory_bytes") if c not in table.column_names]
    if missing:
        raise QPrunerError(f"{path} is not a qpruner results file (no column {missing[0]!r}); give the output folder "
                           "of a qpruner.tune run")
    return table


def _reason(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = text.split(": ", 1)[-1] if text.startswith("Could not open Parquet input source") else text
    return f"{type(exc).__name__}: {text[:100]}"


def can_rebuild(run: Path) -> bool:
    return any((Path(run) / EXPERIMENT).glob("experiment_state-*.json"))


def damage(run: Path) -> list[str]:
    """The run folder's files that exist but cannot be read, by name."""
    damaged = []
    for name in (RUN, BASELINES):
        if (Path(run) / name).is_file():
            try:
                read_json(Path(run) / name)
            except QPrunerError:
                damaged.append(name)
    if (Path(run) / RESULTS).is_file():
        try:
            read_results(run)
        except QPrunerError:
            damaged.append(RESULTS)
    return damaged


# ---------------------------------------------------------------------------------------------
# Repair.


def repair(run: Path, n_layers: Optional[int] = None) -> list[str]:
    """Fix what the data allows, keeping each damaged original beside it as `<name>.damaged`; returns one line
    per file repaired. results.parquet is rebuilt (also when missing) from Tune's experiment state."""
    run = Path(run)
    done = []
    broken = damage(run)
    if BASELINES in broken:
        _set_aside(run / BASELINES)
        done.append(f"{BASELINES} was damaged: set aside as {BASELINES}{DAMAGED}; rerun the tune command to measure "
                    "the baselines again")
    if RUN in broken:
        rebuild_run_json(run)
        done.append(f"{RUN} was damaged: rebuilt from config.yaml (the original kept as {RUN}{DAMAGED})")
    if RESULTS in broken or not (run / RESULTS).is_file():
        count = rebuild_results(run, n_layers)
        done.append(f"{RESULTS} rebuilt from Tune's experiment state: {count} trials")
    return done


def set_aside_damaged(run: Path) -> list[str]:
    """Move every damaged file aside (`<name>.damaged`), for a run that starts its search afresh."""
    broken = damage(run)
    for name in broken:
        _set_aside(Path(run) / name)
    return broken


def _set_aside(path: Path) -> None:
    os.replace(path, path.with_name(path.name + DAMAGED))


def rebuild_run_json(run: Path) -> None:
    """run.json from config.yaml (the resolved config): its key and the pruned model's place in the cache."""
    from qpruner.config import load_config
    from qpruner.results import write_json_atomic

    if not (run / "config.yaml").is_file():
        raise QPrunerError(f"{run / RUN} is damaged and {run} has no config.yaml to rebuild it from; rerun the search "
                           "with --overwrite")
    cfg = load_config(run / "config.yaml")
    from qpruner.prune.store import prune_key

    marker: dict[str, Any] = {"run_key": None, "created": time.time(), "repaired": True}
    pruned = cfg.output.cache / "pruned" / prune_key(cfg)
    if pruned.is_dir():
        marker["pruned_path"] = str(pruned)
    shutil.copyfile(run / RUN, run / f"{RUN}{DAMAGED}")
    write_json_atomic(marker, run / RUN)


def recorded_layers(run: Path) -> Optional[int]:
    """The pruned model's decoder layer count (a grouped search's trials hold one bit-width per group)."""
    try:
        pruned = read_json(run / RUN).get("pruned_path")
        return len(json.loads((Path(pruned) / "config.json").read_text())["qpruner_layers"]) if pruned else None
    except (QPrunerError, OSError, ValueError, KeyError, TypeError):
        return None


def recorded_objective(run: Path) -> Optional[str]:
    """The run's search.objective, from the config run.json holds (None when it holds none: accuracy then)."""
    try:
        return ((read_json(run / RUN).get("config") or {}).get("search") or {}).get("objective")
    except (QPrunerError, AttributeError):
        return None


def tune_trials(run: Path) -> list:
    """The Tune trials of the run's experiment state (no Ray cluster needed)."""
    if not can_rebuild(run):
        raise QPrunerError(f"{run / RESULTS} cannot be rebuilt: {run / EXPERIMENT} holds no Tune experiment state; "
                           "rerun the search with --overwrite")
    from ray.tune import ExperimentAnalysis

    try:
        return list(ExperimentAnalysis(str(run / EXPERIMENT)).trials)
    except Exception as exc:  # a damaged state file: Ray raises many kinds
        raise QPrunerError(f"{run / EXPERIMENT}: Tune's experiment state cannot be read ({_reason(exc)}), so "
                           f"{RESULTS} cannot be rebuilt; rerun the search with --overwrite") from None


def rebuild_results(run: Path, n_layers: Optional[int] = None) -> int:
    """results.parquet from the trials in Tune's experiment state; the damaged file is kept as .damaged."""
    from qpruner.pareto import write_results
    from qpruner.results import record_from_trial

    trials = tune_trials(run)
    if n_layers is None:
        n_layers = recorded_layers(run)
    # a trial still running at the last snapshot is not finished: the resumed run finishes it
    records = [record_from_trial(t, None, n_layers) for t in trials if t.status in ("TERMINATED", "ERROR")]
    if (run / RESULTS).is_file():
        _set_aside(run / RESULTS)
    if records:
        write_results(records, run, plot=False, objective=recorded_objective(run))
    return len(records)


def check_run_dir(run_dir: str | Path, what: str = "run folder") -> Path:
    """A path that is a run folder, or one line saying what it is instead."""
    from qpruner.errors import check_path

    run = Path(run_dir)
    check_path(run, what)
    if run.is_file():
        raise QPrunerError(f"{what} {run} is a file; give the output folder (--out) of a qpruner.tune run, which "
                           "holds results.parquet")
    if not run.is_dir():
        raise QPrunerError(f"{what} {run} does not exist; give the output folder of a qpruner.tune run")
    return run
