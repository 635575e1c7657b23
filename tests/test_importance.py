"""Layer importance (qpruner.importance) on the built-in tiny model and small local lm-eval tasks."""

from __future__ import annotations

import numpy as np
import pytest

from qpruner.config import config_from_dict
from qpruner.importance import importance_task


@pytest.mark.parametrize("method", ["mi", "quant_loss", "taylor"])
def test_layer_importance_methods_on_the_pruned_tiny_model(tiny_assets, method):
    from qpruner.prune import prune_cached

    cfg = config_from_dict({"prune": {"ratio": 0.3}, "search": {"importance": method}})
    path = prune_cached(cfg, progress=False).path
    scores = importance_task(cfg.to_dict(), str(path))
    assert len(scores) == 6 and all(np.isfinite(scores)) and min(scores) > 0 and len(set(scores)) > 1
    assert scores == importance_task(cfg.to_dict(), str(path))  # deterministic
