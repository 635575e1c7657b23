"""Pruned models on disk, without pickle, and the run-once cache.

A pruned folder holds model.safetensors, the source model's config (any supported family, see
qpruner.families) whose `qpruner_layers` lists each decoder layer's head counts and intermediate size,
the tokenizer, `qpruner_prune.json` (what was done), and a `COMPLETE` marker written last. The folder is
keyed by a hash of (model, pruning, calibration).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from qpruner.config import Config
from qpruner.prune.structure import head_dim_of, layer_shape

COMPLETE = "COMPLETE"
ALGORITHM = 3  # bump when pruning results change for the same settings, so old cached folders are not reused
META = "qpruner_prune.json"


@dataclass
class PruneResult:
    path: Path
    key: str
    params_before: int
    params_after: int
    overall_ratio: float
    block_ratio: float
    seconds: float
    cached: bool
    sparsity: Optional[dict] = None  # sparse methods: what was zeroed (qpruner_prune.json's "sparsity")


def save_pruned(model, tokenizer, path: Path, meta: dict) -> None:
    """Weights as safetensors, per-layer shapes in config.json, metadata beside them."""
    head_dim = head_dim_of(model)
    model.config.head_dim = head_dim
    model.config.qpruner_layers = [dataclasses.asdict(layer_shape(layer, head_dim)) for layer in model.model.layers]
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    (path / META).write_text(json.dumps(meta, indent=1))


def load_pruned(path: str | Path, dtype: str = "float32", device: Optional[str] = None):
    """Rebuild the family's own transformers CausalLM with the pruned per-layer shapes; (model, tokenizer)."""
    from qpruner.model import load_model

    return load_model(str(path), dtype, device=device)


def pruned_layer_count(path: str | Path) -> int:
    return len(json.loads((Path(path) / "config.json").read_text())["qpruner_layers"])


def is_complete(path: Path) -> bool:
    """A folder counts only with its COMPLETE marker and the weights it names."""
    marker = path / COMPLETE
    if not marker.is_file():
        return False
    try:
        expected = json.loads(marker.read_text())["weights_bytes"]
    except (ValueError, KeyError):
        return False
    weights = path / "model.safetensors"
    return weights.is_file() and weights.stat().st_size == expected


def model_fingerprint(name: str) -> str:
    """What identifies the source model: a local folder's files (builtin:tiny is resolved to one), or the hub id."""
    local = Path(name).expanduser()
    if local.suffix == ".gguf" and local.is_file():
        from qpruner.model import file_sha256

        return f"gguf:{file_sha256(local)}"
    if local.is_dir():
        files = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in local.iterdir() if p.is_file())
        return hashlib.sha256(((local / "config.json").read_text() + json.dumps(files)).encode()).hexdigest()
    return name


def prune_key(cfg: Config) -> str:
    data = {"algorithm": ALGORITHM, "model": model_fingerprint(cfg.model.name), "dtype": cfg.model.dtype,
            "prune": dataclasses.asdict(cfg.prune)}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def prune_cached(cfg: Config, progress: bool = True) -> PruneResult:
    """Prune once: return the stored result for this key, or prune, store atomically, and return it."""
    from filelock import FileLock

    key = prune_key(cfg)
    root = cfg.output.cache / "pruned"
    path = root / key
    root.mkdir(parents=True, exist_ok=True)
    if not is_complete(path):
        with FileLock(str(path) + ".lock"):
            if not is_complete(path):
                _build(cfg, key, path, progress)
                meta = json.loads((path / META).read_text())
                return _result(path, key, meta, cached=False)
    return _result(path, key, json.loads((path / META).read_text()), cached=True)


def _result(path: Path, key: str, meta: dict, cached: bool) -> PruneResult:
    return PruneResult(path, key, meta["params_before"], meta["params_after"], meta["overall_ratio"],
                       meta["block_ratio"], meta["seconds"], cached, meta.get("sparsity"))


def _build(cfg: Config, key: str, path: Path, progress: bool) -> None:
    """Prune into a temp folder, write COMPLETE last, then rename into place."""
    from qpruner.config import SPARSE_METHODS
    from qpruner.data import calibration_texts
    from qpruner.model import load_model, resolve_model, source_info
    from qpruner.plan import task_device
    from qpruner.prune.slimgpt import prune_slimgpt
    from qpruner.prune.sparse import prune_sparse, zero_count
    from qpruner.prune.taylor import prune_model

    started = time.time()
    device = task_device()  # inside Ray: only a GPU the prune task was given
    model, tokenizer = load_model(cfg.model.name, cfg.model.dtype, cfg.output.cache, cfg.model.trust_remote_code, device,
                                  allow_pickle=cfg.model.allow_pickle)
    before = sum(p.numel() for p in model.parameters())
    batches = []
    if cfg.prune.calibrates:
        texts = calibration_texts(cfg.prune.calibration, cfg.output.cache)
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=cfg.prune.calibration.seq_len).input_ids
            batches.append(ids.to(device))
    sparse = cfg.prune.method in SPARSE_METHODS
    zeros_before = zero_count(model) if sparse else 0
    if sparse:
        info = prune_sparse(model, batches, cfg.prune, progress)
    elif cfg.prune.ratio == 0:  # the unpruned baseline through the same pipeline: stored as is
        info = {"layers": [], "groups_removed": 0, "channels_removed": 0, "block_ratio": 0.0, "layer_importance": []}
    else:
        prune = prune_slimgpt if cfg.prune.method == "slimgpt" else prune_model
        info = prune(model, batches, cfg.prune, progress)
    # Sparse methods keep the shapes: "after" counts the weights that are not zero (stored dense all the same).
    after = sum(p.numel() for p in model.parameters()) - (zero_count(model) - zeros_before if sparse else 0)
    meta = {
        "key": key, "source_model": cfg.model.name, "model_source": source_info(resolve_model(cfg.model.name, cfg.output.cache)),
        "prune": dataclasses.asdict(cfg.prune),
        "params_before": before, "params_after": after, "overall_ratio": 1 - after / before,
        "seconds": round(time.time() - started, 2), **info,
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=path.parent))
    try:
        save_pruned(model.cpu(), tokenizer, tmp, meta)
        (tmp / COMPLETE).write_text(json.dumps({"weights_bytes": (tmp / "model.safetensors").stat().st_size}))
        if path.exists():
            shutil.rmtree(path)  # an unfinished earlier attempt
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prune_with_ray(cfg: Config, num_gpus: float = 0, progress: bool = False) -> PruneResult:
    """Run `prune_cached` as a Ray task (on a GPU node when asked) and wait for it; the Tune driver calls
    this with its resolved config (qpruner.plan.resolve_config: the cache path is absolute, so the result
    lands in the shared cache whichever node prunes).

    A user mistake found in the task (e.g. an unreachable ratio) is raised here as the same one-line error.
    """
    import ray

    from qpruner.errors import ray_get

    task = ray.remote(_prune_task).options(num_cpus=1, num_gpus=num_gpus)
    return ray_get(task.remote(cfg.to_dict(), progress), what="pruning")


def _prune_task(config: dict, progress: bool) -> PruneResult:
    """Ray task body: prune the driver's resolved config (parsing it reads no disk)."""
    from qpruner.config import config_from_dict

    return prune_cached(config_from_dict(config), progress=progress)
