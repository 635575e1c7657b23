"""User-facing errors: each one becomes a single line and exit code 2 at the CLI; and the path checks and
folder creation that raise them."""

from __future__ import annotations


class QPrunerError(Exception):
    """A problem with the user's input or environment that the user can fix."""


class ConfigError(QPrunerError):
    """A config field is wrong: names the field path and what is allowed."""

    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")

    def __reduce__(self):
        # Rebuild from (field, reason): errors raised inside Ray tasks must reach the driver intact,
        # or Ray replaces them with an UnserializableException and the user sees a traceback.
        return (type(self), (self.field, self.reason))


class TrialOOM(QPrunerError):
    """A trial (or a task on a trial's resources) ran out of memory: the GPU's (torch.cuda.OutOfMemoryError) or
    the host's (torch's CPU allocator, MemoryError). An outcome of the configuration at its packing, not a
    bug: the trial is recorded with status `oom` and its GPU fraction, and the searcher hears a constraint
    violation (qpruner.search.RecordedOptunaSearch)."""

    memory_bytes = None  # the trial's analytic peak when known (qpruner.trial sets it)

    def __init__(self, stage: str, gpu_fraction: float | None = None, bits=None, detail: str = "", host: bool = False):
        self.stage = stage
        self.gpu_fraction = gpu_fraction
        self.bits = list(bits) if bits is not None else None
        self.detail = detail
        self.host = host
        where = "host" if host else "GPU"
        packing = "" if gpu_fraction is None else f" at GPU fraction {gpu_fraction:g}"
        shown = "" if self.bits is None else f" (bits {','.join(map(str, self.bits))})"
        text = " ".join(str(detail).split())[:300]
        super().__init__(f"out of {where} memory during {stage}{packing}{shown}" + (f": {text}" if text else ""))

    def __reduce__(self):
        return (type(self), (self.stage, self.gpu_fraction, self.bits, self.detail, self.host))


# How a memory failure reads in a trial's error text: TrialOOM's own words, and what Ray's memory monitor
# (ray.exceptions.OutOfMemoryError) and torch's allocators write.
OOM_MARKERS = ("out of GPU memory", "out of host memory", "running low on memory", "OutOfMemoryError",
               "CUDA out of memory", "DefaultCPUAllocator: can't allocate memory")


def out_of_memory(error) -> bool:
    """Whether an error (text or exception) says the trial ran out of memory, on the GPU or the host."""
    return bool(error) and any(marker in str(error) or marker in type(error).__name__ for marker in OOM_MARKERS)


def ray_get(refs, what: str = "a Ray task", **kwargs):
    """`ray.get` that re-raises a QPrunerError raised inside a Ray task or actor as itself, so the user
    sees the same one line as in the driver instead of a Ray traceback; a task that ran out of memory
    (torch's allocators, or killed by Ray's memory monitor) becomes a TrialOOM naming `what` it was."""
    import ray
    from ray.exceptions import OutOfMemoryError, RayTaskError

    try:
        return ray.get(refs, **kwargs)
    except RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, QPrunerError):
            raise cause from None
        if cause is not None and out_of_memory(cause):  # torch's CUDA or CPU allocator inside a task
            raise TrialOOM(what, detail=str(cause), host="CUDA" not in str(cause)) from None
        raise
    except OutOfMemoryError as exc:  # Ray's memory monitor killed the task's worker: the host ran low on memory
        raise TrialOOM(what, detail=str(exc), host=True) from None


def check_path(path, what: str) -> None:
    """Refuse, in one line naming `what` (a flag or field), a path the filesystem cannot hold: a name longer
    than the filesystem's limit, a path longer than PATH_MAX, or one below an existing file."""
    import errno
    import os
    from pathlib import Path

    path = Path(path).expanduser()
    text = str(path)
    existing = next((p for p in [path, *path.parents] if _exists(p)), Path("."))
    try:
        name_max = os.pathconf(existing if existing.is_dir() else existing.parent, "PC_NAME_MAX")
        path_max = os.pathconf(existing if existing.is_dir() else existing.parent, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    long = next((part for part in path.parts if len(os.fsencode(part)) > name_max), None)
    if long is not None:
        raise QPrunerError(f"{what}: the name {long[:40]!r}... is {len(os.fsencode(long))} bytes, longer than the "
                           f"filesystem allows ({name_max}); give a shorter path")
    if len(os.fsencode(text)) >= path_max:
        raise QPrunerError(f"{what}: the path is {len(os.fsencode(text))} bytes, longer than the filesystem allows "
                           f"({path_max}); give a shorter path")
    for parent in path.parents:
        if _exists(parent) and not parent.is_dir():
            raise QPrunerError(f"{what}: {str(parent)!r} is a file, so {text!r} cannot be made below it; "
                               "give another path")
    try:
        path.stat()
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
            raise QPrunerError(f"{what}: cannot use {text!r} ({exc.strerror or exc}); give another path") from None


def check_out_path(path, what: str = "--out", kind: str = "folder") -> None:
    """An output path (`kind` 'folder' or 'file') the command can write: check_path, and not an existing
    file where a folder is written (or a folder where a file is)."""
    from pathlib import Path

    check_path(path, what)
    path = Path(path).expanduser()
    if kind == "folder" and path.exists() and not path.is_dir():
        raise QPrunerError(f"{what}: {str(path)!r} is an existing file, and a folder is written here; "
                           "give a folder path (or remove the file)")
    if kind == "file" and path.is_dir():
        raise QPrunerError(f"{what}: {str(path)!r} is an existing folder, and one file is written here; "
                           "give a file path such as model.gguf")


def _exists(path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


def make_dirs(folder, what: str = "--out") -> list:
    """mkdir -p, returning the folders it created (outermost first) so that a refusal can remove them again;
    a folder that cannot be made is one line naming `what`."""
    missing = []
    for parent in [folder, *folder.parents]:
        if parent.exists():
            break
        missing.append(parent)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QPrunerError(f"{what} {folder}: cannot create the folder ({exc.strerror or exc}); give another path") from None
    return list(reversed(missing))
