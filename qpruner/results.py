"""The run folder's records: where each artefact lives, the trial record, its Arrow schema, and atomic writes.

Every artefact a later step or command needs lives in the run folder (`--out`, Tune's storage_path,
shared by every node of a cluster) or in the shared cache; nothing is read from a node's Ray folder
after its trial ends.
"""

from __future__ import annotations

from pathlib import Path

RESULTS = "results.parquet"
ADAPTERS = "adapters"  # one folder per trial id, written by the trial on whichever node ran it


def adapter_path(out: str | Path, trial_id: str) -> Path:
    """Where a trial's trained adapter lives: in the run folder, which every node shares."""
    return Path(out) / ADAPTERS / trial_id
