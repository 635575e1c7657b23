"""The paper's reference rows, measured after the search: the unpruned model (zero-shot, no fine-tuning),
the pruned model with plain LoRA at uniform 16 bits, and optionally "apt": the source model pruned by APT
at matching sparsity with no retraining (arXiv 2410.15567's setting). The uniform 4- and 8-bit LoftQ rows come from
the search's own anchor trials. Results go to RUN_DIR/baselines.json, one entry as each finishes, so
a rerun (or `--resume`) only measures what is missing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from qpruner.config import Config, config_from_dict

FILE = "baselines.json"
LABELS = {"unpruned": "unpruned, no fine-tuning", "uniform-16": "uniform-16 LoRA", "apt": "APT, no retraining"}


def load(run: Path) -> dict[str, dict]:
    """{baseline name: row} already measured in this run (empty if none)."""
    from qpruner.runfolder import read_json

    path = Path(run) / FILE
    return read_json(path) if path.is_file() else {}


def row(cfg: Config, name: str, bits: list[int], accuracy: float, scores: dict, memory_bytes, weight_bytes: int) -> dict:
    from qpruner.results import baseline_record

    return baseline_record(name, LABELS[name], bits, accuracy, scores, memory_bytes, weight_bytes, cfg.eval.tasks)

def measure(name: str, plan) -> dict:
    """Ray task body: one baseline of the driver's run plan (qpruner.plan.RunPlan) as a results row."""
    cfg_dict = plan.config
    bits = sorted({*cfg_dict["quant"]["bits"], 16})  # 16 may lie outside the search space
    cfg = config_from_dict({**cfg_dict, "quant": {**cfg_dict["quant"], "bits": bits}})
    if name == "uniform-16":
        from qpruner.trial import run_trial

        result = run_trial(cfg, plan.pruned_path, [16] * plan.n_layers, tasks=plan.tasks)
        return row(cfg, name, result["bits"], result["accuracy"], result, result["memory_bytes"], result["weight_bytes"])
    if name == "apt":
        return apt_no_retraining(cfg, plan.tasks)
    return unpruned(cfg, plan.tasks)


def apt_sparsity(cfg: Config):
    """The APT baseline's sparsity: the run's own prune.sparsity for a sparse method, else prune.ratio as an
    unstructured fraction (a structured ratio counts the whole model, APT's the decoder Linears: close, not equal)."""
    from qpruner.config import SPARSE_METHODS

    return cfg.prune.sparsity if cfg.prune.method in SPARSE_METHODS else cfg.prune.ratio


def apt_no_retraining(cfg: Config, tasks) -> dict:
    """The source model APT-pruned (same calibration, the shared prune cache) at matching sparsity, evaluated
    zero-shot without quantization or fine-tuning; memory is its dense weights (zeros stored)."""
    from qpruner.evaluate import eval_record, evaluate_model
    from qpruner.memory import weight_bytes
    from qpruner.prune import load_pruned, prune_cached
    from qpruner.trial import pick_device

    prune = {**dataclasses.asdict(cfg.prune), "method": "apt", "ratio": 0.0, "sparsity": apt_sparsity(cfg)}
    apt_cfg = config_from_dict({**cfg.to_dict(), "prune": prune, "search": {**cfg.to_dict()["search"], "importance": "mi"}})
    # in the trials' compute dtype: float32 would double a 7B model's 13 GB of bf16 weights
    model, tokenizer = load_pruned(prune_cached(apt_cfg, progress=False).path, dtype=cfg.quant.compute_dtype,
                                   device=pick_device(cfg))
    ev = evaluate_model(model, tokenizer, cfg.eval, tasks=tasks.names, include_paths=tasks.include_paths, skip=tasks.held_out)
    bits = [16] * len(model.model.layers)
    return row(cfg, "apt", bits, ev["mean_acc"], eval_record(ev), None, weight_bytes(model, bits, cfg.quant)["total"])


def unpruned(cfg: Config, tasks) -> dict:
    """The source model before pruning, evaluated zero-shot as loaded; memory is its weights only."""
    from qpruner.evaluate import eval_record, evaluate_model
    from qpruner.memory import weight_bytes
    from qpruner.model import load_model
    from qpruner.trial import pick_device

    model, tokenizer = load_model(cfg.model.name, cfg.model.dtype, cfg.output.cache, cfg.model.trust_remote_code,
                                  pick_device(cfg), allow_pickle=cfg.model.allow_pickle)
    ev = evaluate_model(model, tokenizer, cfg.eval, tasks=tasks.names, include_paths=tasks.include_paths, skip=tasks.held_out)
    weights = weight_bytes(model, [16] * len(model.model.layers), cfg.quant)["total"]
    return row(cfg, "unpruned", [16] * len(model.model.layers), ev["mean_acc"], eval_record(ev), None, weights)


def run_baselines(plan) -> dict[str, dict]:
    """Measure the configured baselines that baselines.json lacks, as parallel Ray tasks; returns them all.

    Each reserves a whole GPU where trials were packed fractionally (the search has ended, and a dense
    model needs more than a trial's share). One that runs out of memory is said in one line and left out
    (a rerun measures it again); the run goes on."""
    import ray

    from qpruner.errors import TrialOOM, ray_get
    from qpruner.plan import whole_gpu
    from qpruner.results import write_json_atomic

    cfg, out, resources = plan.cfg, Path(plan.out), {**plan.resources, "gpu": whole_gpu(plan.resources["gpu"])}
    done = load(out)
    todo = [b for b in cfg.search.baselines if b not in done]
    if not todo:
        return done
    print(f"[qpruner] baselines: measuring {', '.join(todo)}", flush=True)
    task = ray.remote(measure).options(num_cpus=resources["cpu"], num_gpus=resources["gpu"])
    pending = {task.remote(b, plan): b for b in todo}
    while pending:
        ready, _ = ray.wait(list(pending))
        name = pending.pop(ready[0])
        try:
            done[name] = ray_get(ready[0], what=f"the {name} baseline")
        except TrialOOM as exc:
            print(f"[qpruner] baseline {name} not measured: {exc}", flush=True)
            continue
        write_json_atomic(done, out / FILE)
    return done
