"""Shared fixtures: everything offline, on the built-in tiny model (built once per cache)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_assets():
    """The built-in tiny model and its data (trained on first use, ~2 min on 2 cores)."""
    from qpruner.builtin import ensure_tiny

    return ensure_tiny(progress=False)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_assets):
    """A fresh qpruner cache per test module that reuses the built tiny model (pruned models and LoftQ
    factors start empty; the tiny model, its data and tasks are shared)."""
    root = tmp_path_factory.mktemp("cache")
    (root / "builtin").symlink_to(tiny_assets.model_dir.parent.parent)
    return root


@pytest.fixture()
def tiny_config():
    """The default Config: builtin:tiny with default settings."""
    from qpruner.plan import resolved_config

    return resolved_config({})


@pytest.fixture()
def make_recipe(tmp_path):
    """Write tune_configs/tiny.yaml with `search` overrides to tmp_path; returns its path.

    Baselines are off unless asked for: only the end-to-end test needs them."""
    from pathlib import Path

    import yaml

    def write(**search):
        raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "tune_configs" / "tiny.yaml").read_text())
        raw["search"].update({"baselines": [], **search})
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    return write
