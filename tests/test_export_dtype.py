"""Export rebuilds the trial's own base (issue 25, item 5): with quant.compute_dtype bfloat16 and
lora.loftq_iters 2, the exported folder reloads to exactly the quantized weights the trial trained on."""

from __future__ import annotations

import importlib.util

import torch

from qpruner.plan import resolved_config

BITS = [4, 8, 16, 4, 8, 4]


def _quantized_state(model) -> dict:
    """Every decoder Linear's stored weight as the trial holds it: NF4 bytes and absmax, int8 rows and their
    scales, or the 16-bit weight; plus the LoRA factors."""
    state = {}
    for name, module in model.named_modules():
        name = name.removeprefix("base_model.model.")
        weight = getattr(module, "weight", None)
        if ".layers." not in name or weight is None or "lora" in name or hasattr(module, "base_layer"):
            continue
        state[name] = weight.data.clone()
        quant_state = getattr(weight, "quant_state", None)
        if quant_state is not None:
            state[name + ".absmax"] = quant_state.absmax.clone()
        scales = getattr(weight, "SCB", None)
        if scales is None and hasattr(module, "state"):  # Linear8bitLt moves SCB into .state at its first forward
            scales = module.state.SCB
        if scales is not None:
            state[name + ".SCB"] = scales.clone()
    for name, param in model.named_parameters():
        if "lora_" in name:
            state[name.removeprefix("base_model.model.")] = param.detach().clone()
    return state


def test_export_reloads_the_trials_weights_under_bf16_and_two_loftq_iterations(cache, tmp_path):
    from qpruner.export import export_trial
    from qpruner.prune import prune_cached
    from qpruner.trial import run_trial

    cfg = resolved_config({
        "prune": {"ratio": 0.2}, "quant": {"compute_dtype": "bfloat16", "bits": [4, 8, 16]}, "lora": {"rank": 4, "loftq_iters": 2},
        "finetune": {"steps": 1, "report_every": 1, "val_limit": 4, "max_length": 64},
        "eval": {"limit": 8}, "output": {"cache_dir": str(cache)},
    })
    pruned = prune_cached(cfg, progress=False).path
    seen = {}
    result = run_trial(cfg, pruned, BITS, adapter_dir=tmp_path / "adapter",
                       measure=lambda model, tokenizer: seen.update(_quantized_state(model)) or {})
    out = export_trial(cfg, pruned, tmp_path / "adapter", {**result, "trial_id": "t0"}, tmp_path / "export")
    spec = importlib.util.spec_from_file_location("load_qpruner_bf16", out / "load_qpruner.py")
    standalone = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(standalone)
    model, _ = standalone.load(out, device="cpu")
    exported = _quantized_state(model)

    assert exported.keys() == seen.keys(), sorted(exported.keys() ^ seen.keys())[:6]
    assert any(k.endswith(".absmax") for k in seen) and any(k.endswith(".SCB") for k in seen)
    differ = [k for k in seen if not torch.equal(exported[k], seen[k])]
    assert not differ, f"{len(differ)} of {len(seen)} tensors differ, e.g. {differ[:3]}"
