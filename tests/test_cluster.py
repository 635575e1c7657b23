"""The cluster as users run it: a Ray head that runs no trials (the driver's node) and worker nodes
that share only the run folder and the cache, each in its own mount namespace (tests/local_cluster.py).

A tiny search runs with `--address`; then the cluster is stopped and every node's Ray session folder
deleted, and report, export and the exported model's reload work from `--out` alone. A second
cluster has a worker whose view of `--out` and the cache is private: its run stops in preflight.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.local_cluster import LocalCluster, can_unshare

ROOT = Path(__file__).resolve().parents[1]

needs_namespaces = pytest.mark.skipif(not can_unshare(), reason="needs mount namespaces (unshare -m) to give nodes private folders")


def test_cluster_yaml_passes_rays_autoscaler_validation_and_sets_what_the_plan_needs():
    """What `ray up cluster.yaml` checks (defaults filled, then the schema and Ray's own rules)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(raw))
    head = raw["available_node_types"][raw["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # the driver's node runs no trials
    starts = raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]
    assert all("QPRUNER_CACHE=/mnt/qpruner/cache" in c and "HF_HOME=/mnt/qpruner/hf" in c for c in starts if "ray start" in c)
    assert any("--num-cpus=0" in c for c in raw["head_start_ray_commands"])
    assert any("/mnt/qpruner" in opt for opt in raw["docker"]["run_options"])  # the shared mount inside the container


def shared_cache(shared: Path, tiny_assets) -> Path:
    """The shared cache, holding the built tiny model (linked, as the conftest `cache` fixture does)."""
    cache = shared / "cache"
    cache.mkdir(parents=True)
    (cache / "builtin").symlink_to(tiny_assets.model_dir.parent.parent)
    return cache


def recipe(tmp: Path) -> Path:
    raw = yaml.safe_load((ROOT / "tune_configs" / "tiny.yaml").read_text())
    # a grouped search (3 groups of the 6 layers) checks on the way that every output holds per-layer bits
    raw["search"].update(num_samples=4, concurrency=2, n_init=2, baselines=["unpruned"], layer_groups=3)
    raw["finetune"].update(steps=20, report_every=10, val_limit=20)
    raw["resources"] = {"cpu": 1, "gpu": "auto"}
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def cli(args: list[str], env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def driver_env(cluster: LocalCluster, cache: Path) -> dict:
    return {**cluster.env(cluster.head_home), "QPRUNER_CACHE": str(cache)}


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory, tiny_assets):
    """A tiny search on head + two workers; returns (run folder, driver process, env) after the cluster is gone."""
    shared = tmp_path_factory.mktemp("shared")
    cache = shared_cache(shared, tiny_assets)
    cluster = LocalCluster(shared)
    try:
        cluster.start_head()
        cluster.add_worker("w1")
        cluster.add_worker("w2")
        cluster.wait_for_nodes(3)
        out = shared / "run"
        env = driver_env(cluster, cache)
        proc = cli(["qpruner.tune", "--config", str(recipe(shared)), "--address", cluster.address, "--out", str(out),
                    "--no-dashboard"], env)
        print(proc.stdout[-3000:], proc.stderr[-3000:])
    finally:
        cluster.stop()
        cluster.delete_session_folders()
    return out, proc, {k: v for k, v in env.items() if not k.startswith("RAY_")}


@needs_namespaces
def test_search_on_workers_leaves_everything_in_the_run_folder(cluster_run):
    out, proc, _ = cluster_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert len(rows) == 4
    front = pq.read_table(out / "pareto.parquet").column("trial_id").to_pylist()
    assert front
    for trial_id in front:  # the front's adapters were written by workers into the run folder
        assert (out / "adapters" / trial_id / "adapter_model.safetensors").is_file(), trial_id
    kept = {p.name for p in (out / "adapters").iterdir()}
    assert kept == set(front)  # output.keep_adapters: pareto dropped the others, wherever they ran


def per_layer_grouped(bits) -> bool:
    """Six per-layer bit-widths, equal within each of the 3 groups (layers 0-1, 2-3, 4-5)."""
    return len(bits) == 6 and all(bits[i] == bits[i + 1] for i in (0, 2, 4))


@needs_namespaces
def test_a_grouped_search_records_per_layer_bits_everywhere(cluster_run):
    out, proc, env = cluster_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert all(per_layer_grouped(r["bits"]) for r in rows), [r["bits"] for r in rows]
    assert len({tuple(r["bits"]) for r in rows}) > 1
    assert all(per_layer_grouped(b) for b in json.loads((out / "importance.json").read_text())["initial"])
    assert len(json.loads((out / "importance.json").read_text())["importance"]) == 6  # measured per layer
    baselines = json.loads((out / "baselines.json").read_text())
    assert baselines["unpruned"]["bits"] == [16] * 6


@needs_namespaces
def test_report_export_and_reload_from_the_run_folder_alone(cluster_run, tmp_path):
    out, proc, env = cluster_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out / "report.md").unlink()
    report = cli(["qpruner.report", str(out)], env)
    assert report.returncode == 0, report.stderr[-2000:]
    assert (out / "report.md").is_file()
    exported = tmp_path / "exported"
    exp = cli(["qpruner.export", "--run", str(out), "--pick", "best-acc", "--out", str(exported)], env)
    assert exp.returncode == 0, exp.stderr[-2000:]
    reload = ("import sys, torch; sys.path.insert(0, sys.argv[1]); from load_qpruner import load; "
              "m, tok = load(sys.argv[1]); ids = tok('The creature', return_tensors='pt').input_ids; "
              "print(bool(torch.isfinite(m(input_ids=ids).logits).all()))")
    loaded = subprocess.run([sys.executable, "-c", reload, str(exported)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert loaded.returncode == 0 and loaded.stdout.strip().endswith("True"), loaded.stderr[-2000:]
    assert per_layer_grouped(json.loads((exported / "quantization.json").read_text())["bits"])


@needs_namespaces
def test_a_node_without_the_shared_folder_stops_the_run_in_preflight(tmp_path_factory, tiny_assets):
    shared = tmp_path_factory.mktemp("shared_missing")
    cache = shared_cache(shared, tiny_assets)
    config = recipe(shared)
    before = sorted(p.relative_to(shared) for p in shared.rglob("*"))
    cluster = LocalCluster(shared)
    try:
        cluster.start_head()
        cluster.add_worker("good")
        cluster.add_worker("bad", private_shared=True)
        cluster.wait_for_nodes(3)
        out = shared / "run"
        proc = cli(["qpruner.tune", "--config", str(config), "--address", cluster.address, "--out", str(out),
                    "--no-dashboard"], driver_env(cluster, cache), timeout=300)
        print(proc.stderr[-2000:])
    finally:
        cluster.stop()
        cluster.delete_session_folders()
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "cannot read" in lines[0] and str(shared) in lines[0] and "QPRUNER_CACHE" in lines[0], lines[0]
    assert sorted(p.relative_to(shared) for p in shared.rglob("*")) == before  # nothing left behind
    assert not os.path.exists(out)
