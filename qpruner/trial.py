"""One trial of the search: quantize the pruned model per layer, LoftQ-initialise LoRA, fine-tune, evaluate.

Plain functions that run with or without Ray: the Tune trainable in `qpruner.tune` calls `run_trial`
with `tune.report` as the report callback. `python -m qpruner.trial --config X --bits 4,8,...` runs one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch

from qpruner.config import Config

if TYPE_CHECKING:
    from qpruner.plan import TaskPlan

Report = Callable[[dict], None]


def pick_device(cfg: Config) -> str:
    """CUDA when the trial was given a GPU (or gpu: auto) and one is usable here: inside Ray, only a GPU
    that Ray assigned to this task (qpruner.plan.task_device)."""
    from qpruner.plan import task_device

    return task_device(wants_gpu=cfg.resources.gpu == "auto" or cfg.resources.gpu > 0)


def run_trial(
    cfg: Config,
    pruned_path: str | Path,
    bits: Sequence[int],
    ranks: Optional[Sequence[int]] = None,
    report: Optional[Report] = None,
    adapter_dir: Optional[str | Path] = None,
    progress: bool = False,
    measure: Optional[Callable[[torch.nn.Module, object], dict]] = None,
    tasks: Optional["TaskPlan"] = None,
) -> dict:
    """Run one configuration end to end and return every metric and timing as a flat dict.

    Running out of memory (torch.cuda.OutOfMemoryError; torch's CPU allocator or MemoryError on the host)
    raises qpruner.errors.TrialOOM naming the stage, the GPU fraction and the bits: an outcome of the
    configuration at its packing, which the search records as `oom` (see qpruner.tune.trial_trainable).
    """
    state: dict = {"stage": "load", "memory_bytes": None}
    try:
        return _run_trial(cfg, pruned_path, bits, ranks, report, adapter_dir, progress, measure, tasks, state)
    except torch.cuda.OutOfMemoryError as exc:
        raise _oom(cfg, bits, state, exc, host=False) from exc
    except MemoryError as exc:
        raise _oom(cfg, bits, state, exc, host=True) from exc
    except RuntimeError as exc:
        if HOST_OOM in str(exc):
            raise _oom(cfg, bits, state, exc, host=True) from exc
        raise


HOST_OOM = "DefaultCPUAllocator: can't allocate memory"  # torch's CPU allocator, as a plain RuntimeError


def gpu_fraction(cfg: Config) -> float:
    """The share of a GPU this trial holds: what Ray assigned to this task, else resources.gpu (auto: 1 on a
    usable GPU, 0 without)."""
    try:
        import ray

        if ray.is_initialized():
            assigned = ray.get_runtime_context().get_assigned_resources().get("GPU")
            if assigned is not None:
                return float(assigned)
    except Exception:  # outside a Ray worker
        pass
    if cfg.resources.gpu == "auto":
        return 1.0 if pick_device(cfg) == "cuda" else 0.0
    return float(cfg.resources.gpu)


def _oom(cfg: Config, bits: Sequence[int], state: dict, exc: BaseException, host: bool):
    from qpruner.errors import TrialOOM

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    oom = TrialOOM(state["stage"], gpu_fraction(cfg), [int(b) for b in bits], detail=str(exc) or type(exc).__name__,
                   host=host)
    oom.memory_bytes = state["memory_bytes"]  # the analytic peak, once known (None before quantization)
    return oom


def _run_trial(cfg, pruned_path, bits, ranks, report, adapter_dir, progress, measure, tasks, state: dict) -> dict:
    """run_trial's body; `state["stage"]` says which step runs (the TrialOOM names it).

    `report`, if given, is called every `finetune.report_every` steps with step, train_loss, val_logprob
    (ASHA's signal: see qpruner.evaluate.make_validator), val_acc, `accuracy` None (it is the final test accuracy only) and `memory_gb` (the analytic
    peak, see progress_memory), so that ASHA can stop the trial; the searcher then tells Optuna PRUNED.
    `measure`, if given, is called as measure(trained peft model, tokenizer) in eval mode after the evaluation; its dict
    joins the result as "measured" (benchmarks use it for perplexity on text that lm-eval does not hold).
    `tasks` is the run plan's resolved tasks (qpruner.plan.TaskPlan); without it (one trial on its own
    machine) they are resolved here.
    """
    from peft import get_peft_model

    from qpruner.evaluate import eval_mode, eval_record, evaluate_model, held_out_docs, make_validator
    from qpruner.finetune import finetune
    from qpruner.loftq import apply_loftq_adapters, loftq_for_model
    from qpruner.memory import memory_report, weight_storage
    from qpruner.prune import load_pruned
    from qpruner.quantize import lora_config_for, quantize_model, validate_bits
    from qpruner.results import objective_perplexity

    if cfg.resources.threads or cfg.resources.cpu >= 1:
        torch.set_num_threads(int(cfg.resources.threads or cfg.resources.cpu))
    device = pick_device(cfg)
    timings: dict[str, float] = {}
    started = time.time()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    model, tokenizer = load_pruned(pruned_path, dtype=cfg.quant.compute_dtype)
    n_layers = model.config.num_hidden_layers
    bits = validate_bits(bits, n_layers, cfg.quant.bits)
    ranks = list(ranks) if ranks is not None else None
    model_key = Path(pruned_path).name

    state["stage"] = "loftq"
    t = time.perf_counter()
    inits, loftq_stats = loftq_for_model(model, bits, cfg, cfg.output.cache, model_key, ranks=ranks, device=device)
    timings["loftq_s"] = time.perf_counter() - t

    state["stage"] = "quantize"
    t = time.perf_counter()
    quantize_model(model, bits, cfg.quant, residual_weights=inits, device=device)
    timings["quantize_s"] = time.perf_counter() - t

    peft_model = get_peft_model(model, lora_config_for(cfg.lora, model, ranks))
    apply_loftq_adapters(peft_model, inits, cfg.lora, ranks=ranks)
    memory = memory_report(peft_model, bits, cfg, device=device)
    state["memory_bytes"] = progress_memory(memory, cfg.search.memory_objective)["memory_bytes"]

    def report_progress(metrics: dict) -> None:
        if report is not None:
            # accuracy is the final test accuracy only: None until then (Tune requires the key in every report)
            # (and perplexity: the searcher's metric may be either, and Tune wants it in every report)
            report({**metrics, "accuracy": None, "perplexity": None, **progress_memory(memory, cfg.search.memory_objective),
                    "max_steps": cfg.finetune.steps, "final": False})

    state["stage"] = "finetune"
    inject_fault(peft_model, bits)
    t = time.perf_counter()
    validator = make_validator(peft_model, tokenizer, cfg, plan=tasks)
    ft = finetune(peft_model, tokenizer, cfg, report=report_progress, validate=validator, progress=progress)
    timings["finetune_s"] = time.perf_counter() - t
    if cfg.search.objective == "val_logprob" and ft.steps % cfg.finetune.report_every:
        ft.validations.append(validator())  # the objective is the validation after the last step, not before it

    state["stage"] = "eval"
    t = time.perf_counter()
    if tasks is not None:  # resolved on the driver
        ev = evaluate_model(peft_model, tokenizer, cfg.eval, tasks=tasks.names, include_paths=tasks.include_paths,
                            skip=tasks.held_out)
    else:
        ev = evaluate_model(peft_model, tokenizer, cfg.eval, cache_dir=cfg.output.cache, skip=held_out_docs(cfg))
    timings["eval_s"] = time.perf_counter() - t

    measured = None
    if measure is not None:
        with eval_mode(peft_model), torch.no_grad():
            measured = measure(peft_model, tokenizer)
    memory = memory_report(peft_model, bits, cfg, device=device, finetune=ft)  # the fine-tuning window, measured on CUDA
    if adapter_dir is not None:
        save_adapter(peft_model, bits, ranks, adapter_dir)

    return {
        "bits": list(bits),
        "ranks": ranks,
        "accuracy": ev["mean_acc"],
        "perplexity": objective_perplexity(ev["task_ppl"], cfg.eval.tasks),
        **eval_record(ev),  # task_acc, task_acc_norm, task_ppl, subtask_acc, subtask_acc_norm, task_docs
        **ft.last_validation,
        "train_loss": ft.losses[-1] if ft.losses else None,
        "steps": ft.steps,
        "max_steps": cfg.finetune.steps,
        "memory_gb": memory.objective(cfg.search.memory_objective) / 1024**3,
        "memory_bytes": memory.objective(cfg.search.memory_objective),
        "memory_source": memory.source,
        "memory_measured": memory.measured,
        "weight_storage": weight_storage(pruned_path),
        "weight_bytes": memory.weight_bytes,
        "lora_bytes": memory.lora_bytes,
        "peak_estimate_bytes": memory.peak_estimate_bytes,
        "peak_measured_bytes": memory.peak_measured_bytes,
        "loftq_svds": loftq_stats.svds,
        "loftq_cache_hits": loftq_stats.hits,
        "device": device,
        "wall_seconds": time.time() - started,
        **timings,
        "final": True,
        **({"measured": measured} if measured is not None else {}),
    }


def progress_memory(memory, objective: str = "finetune_peak") -> dict:
    """The memory an intermediate report carries: the analytic fine-tuning peak, or the measured peak
    if that is larger. Before training ends a CUDA measurement lacks activations and optimizer state,
    so a stopped trial would look cheaper than it is; the measured training peak is only final."""
    if objective == "weights":  # exact before and after training
        return {"memory_gb": memory.weight_bytes / 1024**3, "memory_bytes": memory.weight_bytes, "memory_source": "estimated"}
    measured = memory.peak_measured_bytes or 0
    used = max(memory.peak_estimate_bytes, measured)
    source = "measured" if measured > memory.peak_estimate_bytes else "estimated"
    return {"memory_gb": used / 1024**3, "memory_bytes": used, "memory_source": source}


FAULT_ENV = "QPRUNER_INJECT_NAN_BITS"
OOM_ENV = "QPRUNER_INJECT_OOM_BITS"


def inject_fault(peft_model, bits: Sequence[int]) -> None:
    """Fault injection for reliability tests: if $QPRUNER_INJECT_NAN_BITS equals these bits
    (comma-separated), poison the LoRA weights so fine-tuning really diverges (NaN loss); if
    $QPRUNER_INJECT_OOM_BITS does, raise a real torch.cuda.OutOfMemoryError as the fine-tuning starts (as
    the CUDA caching allocator does when the trial's share of the GPU is full)."""
    import os

    wanted = os.environ.get(OOM_ENV)
    if wanted and [int(b) for b in wanted.split(",")] == list(bits):
        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (injected by ${OOM_ENV})")
    wanted = os.environ.get(FAULT_ENV)
    if wanted and [int(b) for b in wanted.split(",")] == list(bits):
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.fill_(float("nan"))


def save_adapter(peft_model, bits: Sequence[int], ranks: Optional[Sequence[int]], out: str | Path) -> Path:
    """Keep the trained LoRA adapter (safetensors) and the per-layer bits beside it, for export."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out, safe_serialization=True)
    (out / "qpruner_bits.json").write_text(json.dumps({"bits": list(bits), "ranks": ranks}))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    from qpruner.cli import base_parser, load_cli_config, set_offline_defaults
    from qpruner.plan import preflight, resolve_config
    from qpruner.prune import prune_cached
    from qpruner.quantize import parse_bits

    set_offline_defaults(argv)
    parser = base_parser("python -m qpruner.trial", "Run one trial: quantize per layer, LoftQ, fine-tune, evaluate.")
    parser.add_argument("--bits", required=True, help="one bit-width per decoder layer, e.g. 4,8,8,4, or uniform:4")
    parser.add_argument("--ranks", default=None, help="optional LoRA rank per layer, e.g. 8,8,16,4")
    parser.add_argument("--adapter-out", default=None, help="folder to save the trained adapter in")
    args = parser.parse_args(argv)
    if args.adapter_out is not None:
        from qpruner.errors import check_out_path

        check_out_path(args.adapter_out, "--adapter-out")
    cfg = resolve_config(load_cli_config(args))
    tasks = preflight(cfg)
    pruned = prune_cached(cfg)
    from qpruner.prune import pruned_layer_count
    from qpruner.quantize import check_lora_fits, parse_ranks

    n_layers = pruned_layer_count(pruned.path)
    bits = parse_bits(args.bits, n_layers, cfg.quant.bits)
    ranks = parse_ranks(args.ranks, n_layers) if args.ranks else None
    check_lora_fits(cfg, json.loads((Path(pruned.path) / "config.json").read_text()), ranks)
    result = run_trial(cfg, pruned.path, bits, ranks=ranks, adapter_dir=args.adapter_out, progress=True, tasks=tasks)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    from qpruner.cli import run_cli

    run_cli(main)
