"""Calibration text for pruning and importance: the built-in corpus, a local file, or a hub dataset."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional

from qpruner.config import CalibrationConfig
from qpruner.errors import ConfigError

FIELD = "prune.calibration.source"


def calibration_texts(ccfg: CalibrationConfig, cache_dir: Optional[Path] = None) -> list[str]:
    """`n_samples` texts, drawn with the seed, long enough to fill `seq_len` tokens where the source allows."""
    texts = _read_source(ccfg, cache_dir)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ConfigError(FIELD, f"{ccfg.source!r} holds no text in field {ccfg.text_field!r}")
    rng = random.Random(ccfg.seed)
    rng.shuffle(texts)
    # join neighbours so short documents still fill seq_len tokens (~4 characters a token)
    want = ccfg.seq_len * 4
    out, cur = [], ""
    for t in texts:
        cur = f"{cur} {t}".strip()
        if len(cur) >= want:
            out.append(cur)
            cur = ""
        if len(out) == ccfg.n_samples:
            break
    if len(out) < ccfg.n_samples and cur:
        out.append(cur)
    return out


def _read_source(ccfg: CalibrationConfig, cache_dir: Optional[Path]) -> list[str]:
    path = Path(ccfg.source).expanduser()
    if path.is_file():
        if path.suffix == ".txt":
            return path.read_text().splitlines()
        text = path.read_text()
        rows = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" else json.loads(text)
        return [str(r.get(ccfg.text_field, "")) for r in rows if isinstance(r, dict)]
    return _hub_texts(ccfg)


def _hub_texts(ccfg: CalibrationConfig) -> list[str]:
    """A hub dataset id, optionally `id:config`; the train split, streamed only as far as needed."""
    import datasets

    name, _, subset = ccfg.source.partition(":")
    try:
        ds = datasets.load_dataset(name, subset or None, split="train", streaming=True)
        rows = []
        for row in ds:
            rows.append(str(row.get(ccfg.text_field, "")))
            if len(rows) >= ccfg.n_samples * 20:
                break
        return rows
    except Exception as exc:  # datasets raises many types for "not reachable / not found"
        raise ConfigError(
            FIELD,
            f"cannot load dataset {ccfg.source!r} ({type(exc).__name__}); use 'builtin', a local .txt/.jsonl file, "
            "or a hub dataset reachable from this machine",
        ) from None
