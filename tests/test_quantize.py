"""Per-layer quantization, LoftQ at each layer's bits, and memory accounting on real pruned tiny weights."""

from __future__ import annotations

import pytest
import torch

from qpruner.config import config_from_dict
from qpruner.errors import QPrunerError
from qpruner.loftq import loftq_for_model, loftq_matrix, quant_dequant
from qpruner.memory import linear_bytes, weight_bytes
from qpruner.prune import load_pruned, prune_cached
from qpruner.quantize import lora_config_for, parse_bits, quantize_model, validate_bits


@pytest.fixture(scope="module")
def pruned(tiny_assets):
    cfg = config_from_dict({"prune": {"ratio": 0.3}})
    return cfg, prune_cached(cfg, progress=False).path


def held_bytes(model) -> int:
    """Bytes actually held by the quantized model's tensors, bitsandbytes constants included."""
    total = 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            total += p.numel() * p.element_size()
            state = getattr(p, "quant_state", None)
            if state is not None:
                total += state.absmax.numel() * state.absmax.element_size() + state.code.numel() * 4
                if state.nested:
                    s2 = state.state2
                    total += s2.absmax.numel() * 4 + s2.code.numel() * 4 + 4  # + fp32 offset
            scb = getattr(p, "SCB", None)
            if scb is not None:
                total += scb.numel() * scb.element_size()
    return total


@pytest.mark.parametrize("bits", [[4] * 6, [8] * 6, [16] * 6, [4, 8, 16, 4, 8, 16]])
def test_weight_bytes_are_exact(pruned, bits):
    cfg, path = pruned
    cfg = config_from_dict({"quant": {"bits": [4, 8, 16]}})
    model, _ = load_pruned(path)
    quantize_model(model, bits, cfg.quant)
    assert weight_bytes(model, bits, cfg.quant) == held_bytes(model)


def test_weight_bytes_grow_with_any_layer_and_sum_over_layers(pruned):
    cfg, path = pruned
    model, _ = load_pruned(path)
    base = [4] * 6
    for layer in range(6):
        sizes = []
        for b in (4, 8, 16):
            bits = list(base)
            bits[layer] = b
            sizes.append(weight_bytes(model, bits, cfg.quant))
        assert sizes[0] < sizes[1] < sizes[2]
        per_layer = sum(linear_bytes(m.out_features, m.in_features, 8, cfg.quant) - linear_bytes(m.out_features, m.in_features, 4, cfg.quant)
                        for m in model.model.layers[layer].modules() if isinstance(m, torch.nn.Linear))
        assert sizes[1] - sizes[0] == per_layer


@pytest.mark.parametrize("bits", [4, 8])
def test_loftq_beats_plain_quantization_and_more_iterations_do_not_hurt(pruned, bits):
    cfg, path = pruned
    model, _ = load_pruned(path)
    errors = []
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        w = model.model.layers[2].get_submodule(name).weight.data
        plain = (w - quant_dequant(w, bits, cfg.quant)).norm().item()
        by_iters = []
        for iters in (1, 2, 4):
            init = loftq_matrix(w, bits, 8, iters, cfg.quant, scaling=2.0)
            approx = quant_dequant(init.residual(w), bits, cfg.quant) + 2.0 * init.lora_B @ init.lora_A
            by_iters.append((w - approx).norm().item())
        errors.append((name, plain, by_iters))
        assert by_iters[0] < plain
        assert by_iters[1] <= by_iters[0] * 1.001 and by_iters[2] <= by_iters[1] * 1.001
    print(bits, errors)


def test_loftq_cache_reuses_seen_layer_bits(pruned, tmp_path):
    cfg, path = pruned
    model, _ = load_pruned(path)
    first, s1 = loftq_for_model(model, [4, 4, 8, 8, 4, 4], cfg, tmp_path, "k")
    assert s1.svds == len(first) and s1.hits == 0
    second, s2 = loftq_for_model(model, [4, 4, 8, 8, 8, 8], cfg, tmp_path, "k")  # layers 0-3 seen at these bits
    layers_done = {int(n.split(".")[2]) for n in s2.computed}
    assert layers_done == {4, 5}
    assert s2.hits == sum(1 for n in second if int(n.split(".")[2]) < 4)
    for name in second:
        if int(name.split(".")[2]) < 4:
            assert torch.equal(second[name].lora_A, first[name].lora_A)


def test_peft_uses_bnb_lora_layers_and_trains_mixed_bits(pruned):
    from peft import get_peft_model
    from peft.tuners.lora import bnb as lora_bnb

    cfg, path = pruned
    model, tok = load_pruned(path)
    bits = [4, 8, 4, 8, 16, 8]
    inits, _ = loftq_for_model(model, bits, cfg, cfg.output.cache, path.name)
    quantize_model(model, bits, cfg.quant, residual_weights=inits)
    peft_model = get_peft_model(model, lora_config_for(cfg.lora, model))
    layers = peft_model.base_model.model.model.layers
    assert isinstance(layers[0].self_attn.q_proj, lora_bnb.Linear4bit)
    assert isinstance(layers[1].mlp.up_proj, lora_bnb.Linear8bitLt)
    assert not isinstance(layers[4].self_attn.q_proj, (lora_bnb.Linear4bit, lora_bnb.Linear8bitLt))
    ids = tok("the bakof lives in the forest .", return_tensors="pt").input_ids
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_loftq_adapters_bring_the_quantized_model_closer(pruned):
    from peft import get_peft_model

    from qpruner.loftq import apply_loftq_adapters

    cfg, path = pruned
    full, tok = load_pruned(path)
    ids = tok("the bakof lives in the forest . the bakof eats fish .", return_tensors="pt").input_ids
    target = full(ids).logits
    outputs = {}
    for use_loftq in (False, True):
        model, _ = load_pruned(path)
        inits, _ = loftq_for_model(model, [4] * 6, cfg, cfg.output.cache, path.name) if use_loftq else ({}, None)
        quantize_model(model, [4] * 6, cfg.quant, residual_weights=inits)
        peft_model = get_peft_model(model, lora_config_for(cfg.lora, model))
        apply_loftq_adapters(peft_model, inits)
        outputs[use_loftq] = (peft_model(ids).logits - target).norm().item()
    assert outputs[True] < outputs[False]


def test_bad_bit_vectors_are_one_line():
    with pytest.raises(QPrunerError, match="got 3 entries, the pruned model has 6 decoder layers"):
        validate_bits([4, 8, 4], 6, [4, 8])
    with pytest.raises(QPrunerError, match=r"bits\[1\]=16 is not in quant.bits \[4, 8\]"):
        validate_bits([4, 16, 4, 4, 4, 4], 6, [4, 8])
    with pytest.raises(QPrunerError, match="comma-separated"):
        parse_bits("4,eight", 6, [4, 8])
    assert parse_bits("uniform:8", 3, [4, 8]) == [8, 8, 8]
