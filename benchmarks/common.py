"""Shared by the studies: the machine they ran on, and writing results/<name>.json."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


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
