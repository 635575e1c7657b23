"""The run plan and the cluster's resources: resolved once on the driver, the driver's environment for every
worker, GPUs only where Ray assigned them, GPUs asked of the autoscaler and waited for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qpruner.errors import QPrunerError
from qpruner.plan import make_plan, resolved_config, worker_env


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=1, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_plan_carries_the_resolved_config_and_tasks(tiny_assets, tmp_path):
    plan = make_plan(resolved_config({}), tmp_path / "run")
    assert plan.config["model"]["name"] == str(tiny_assets.model_dir)  # builtin resolved on the driver
    assert Path(plan.config["output"]["cache_dir"]).is_absolute()
    assert plan.tasks.names == list(tiny_assets.test_tasks)
    assert plan.tasks.val_names == [f"{t}_val" for t in tiny_assets.test_tasks]  # the built-in validation twins
    assert plan.tasks.held_out == {}  # every task has a disjoint twin: nothing held out of the final score
    assert not (tmp_path / "run").exists()  # planning writes nothing to --out


def test_relative_paths_become_absolute_for_the_workers(tiny_assets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("alpaca.jsonl").write_text(Path(tiny_assets.alpaca_path).read_text())
    cfg = resolved_config({"finetune": {"data": "./alpaca.jsonl"}})
    assert cfg.finetune.data == str(tmp_path / "alpaca.jsonl")


def test_worker_env_carries_the_offline_flags_and_the_cache(monkeypatch, cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("QPRUNER_INJECT_NAN_BITS", "4,4")
    monkeypatch.setenv("HOME_ONLY_ON_THE_DRIVER", "x")
    cfg = resolved_config({"output": {"cache_dir": str(cache)}})  # a cache with the built tiny model (not built again)
    env = worker_env(cfg)
    assert env["HF_HUB_OFFLINE"] == env["HF_DATASETS_OFFLINE"] == "1"
    assert env["QPRUNER_INJECT_NAN_BITS"] == "4,4" and env["QPRUNER_CACHE"] == str(cache)
    assert "HOME_ONLY_ON_THE_DRIVER" not in env


def test_a_task_that_reserves_no_gpu_never_uses_one(local_ray):
    """Ray 2.60 no longer hides GPUs from a task that reserves none: the device comes from ray.get_gpu_ids().
    torch's CUDA probe is made to say yes, as on a GPU node."""
    import torch

    from qpruner.plan import task_device

    @local_ray.remote(num_gpus=0)
    def device_in_a_task():
        torch.cuda.is_available = lambda: True
        return task_device()

    assert local_ray.get(device_in_a_task.remote()) == "cpu"


def test_gpus_the_cluster_lacks_are_asked_of_the_autoscaler_then_refused_in_one_line(local_ray, capsys):
    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    from qpruner.tune import trial_resources

    cfg = resolved_config({"resources": {"gpu": 1, "gpu_wait_s": 2}, "search": {"concurrency": 2}})
    with pytest.raises(QPrunerError, match=r"^resources\.gpu: 1 GPU per trial asked, but the Ray cluster has 0 GPU after waiting 2s"):
        trial_resources(cfg)
    assert json.loads(_internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)) == [{"GPU": 1.0, "CPU": 1.0}] * 2
    assert "[qpruner] waiting for GPU nodes: 0 GPU in the cluster" in capsys.readouterr().out


def test_auto_says_it_runs_on_cpus_and_refuses_a_model_no_node_can_hold(local_ray, tmp_path, capsys):
    from qpruner.tune import trial_resources

    assert trial_resources(resolved_config({"resources": {"gpu": "auto"}})) == {"cpu": 1.0, "gpu": 0.0}
    assert "found no GPU in the Ray cluster: trials run on CPUs" in capsys.readouterr().out
    big = tmp_path / "llama7b"  # a config without weights: LLaMA-7B is 27 GB in float32, more than this machine holds
    big.mkdir()
    (big / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000}))
    with pytest.raises(QPrunerError, match=r"^resources\.gpu: 'auto' found no GPU .* exceed the largest node's memory"):
        trial_resources(resolved_config({"model": {"name": str(big)}, "resources": {"gpu": "auto"}}))
