"""LoftQ at each layer's bit-width on the real trained tiny model, pruned 30%: error, cache, peft adapters."""

from __future__ import annotations

import pytest
import torch

from qpruner.loftq import apply_loftq_adapters, approximation, cache_file, loftq_for_model, loftq_matrix, quant_dequant
from qpruner.plan import resolved_config
from qpruner.prune import load_pruned, prune_cached
from qpruner.quantize import lora_config_for, quantize_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pruned(tiny_assets):
    cfg = resolved_config({"prune": {"ratio": 0.3}, "quant": {"bits": [4, 8, 16]}})
    return cfg, prune_cached(cfg, progress=False).path


@pytest.mark.parametrize("bits", [4, 8])
def test_loftq_beats_plain_quantization_and_more_iterations_do_not_hurt(pruned, bits):
    cfg, path = pruned
    model, _ = load_pruned(path)
    assert model.model.layers[2].mlp.down_proj.in_features < model.config.intermediate_size  # really pruned
    for layer in (0, 2):
        for name in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"):
            w = model.model.layers[layer].get_submodule(name).weight.data
            plain = (w - quant_dequant(w, bits, cfg.quant)).norm().item()
            errors = [(w - approximation(w, loftq_matrix(w, bits, 8, iters, cfg.quant), bits, cfg.quant)).norm().item()
                      for iters in (1, 2, 4)]
            print(f"{bits}-bit layer {layer} {name}: plain {plain:.5f} loftq T=1,2,4 {errors}")
            assert errors[0] < 0.95 * plain
            assert errors[1] <= errors[0] * 1.001 and errors[2] <= errors[1] * 1.001


def test_residual_is_w_for_one_iteration_and_factors_have_the_requested_rank(pruned):
    cfg, path = pruned
    model, _ = load_pruned(path)
    w = model.model.layers[1].self_attn.k_proj.weight.data  # 32 x 128 after pruning to one kv head
    one = loftq_matrix(w, 4, 8, 1, cfg.quant)
    assert one.prev_B is None and one.residual(w) is w
    assert one.lora_A.shape == (8, w.shape[1]) and one.lora_B.shape == (w.shape[0], 8)
    wide = loftq_matrix(w, 4, w.shape[0] + 4, 1, cfg.quant)  # rank above min(out, in): zero padding
    assert wide.lora_B[:, w.shape[0]:].abs().sum() == 0
    assert torch.allclose(approximation(w, wide, 4, cfg.quant), w, atol=1e-4)  # full rank fixes everything


def test_cache_second_trial_runs_no_svd_for_seen_layer_bits(pruned, tmp_path):
    cfg, path = pruned
    model, _ = load_pruned(path)
    first, s1 = loftq_for_model(model, [4, 4, 8, 8, 4, 16], cfg, tmp_path, "k")
    assert s1.svds == len(first) == 5 * 7 and s1.hits == 0  # layer 5 at 16 bits: plain LoRA init
    second, s2 = loftq_for_model(model, [4, 4, 8, 8, 8, 8], cfg, tmp_path, "k")
    assert {int(n.split(".")[2]) for n in s2.computed} == {4, 5}
    assert s2.svds == 2 * 7 and s2.hits == 4 * 7
    for name in second:
        if int(name.split(".")[2]) < 4:
            assert torch.equal(second[name].lora_A, first[name].lora_A)
            assert torch.equal(second[name].lora_B, first[name].lora_B)
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temp files
    third, s3 = loftq_for_model(model, [4, 4, 8, 8, 8, 8], cfg, tmp_path, "other-model")
    assert s3.hits == 0 and s3.svds == 6 * 7  # the key includes the model
    iters0 = resolved_config({"lora": {"loftq_iters": 0}})
    assert loftq_for_model(model, [4] * 6, iters0, tmp_path, "k") == ({}, type(s1)())


def test_corrupt_cache_entry_is_recomputed(pruned, tmp_path):
    cfg, path = pruned
    model, _ = load_pruned(path)
    first, _ = loftq_for_model(model, [4] * 6, cfg, tmp_path, "k")
    name = "model.layers.0.self_attn.q_proj"
    w = model.get_submodule(name).weight
    entry = cache_file(tmp_path, "k", name, tuple(w.shape), 4, cfg.lora.rank, cfg.lora.loftq_iters, cfg.quant)
    entry.write_bytes(b"half-written")
    again, stats = loftq_for_model(model, [4] * 6, cfg, tmp_path, "k")
    assert stats.computed == [name] and stats.svds == 1
    assert torch.equal(again[name].lora_A, first[name].lora_A)


@pytest.mark.parametrize("alpha,iters", [(16, 1), (32, 2)])
def test_loftq_adapters_bring_the_peft_model_closer_to_full_precision(pruned, tmp_path, alpha, iters):
    from peft import get_peft_model

    cfg, path = pruned
    cfg = resolved_config({"prune": {"ratio": 0.3}, "lora": {"alpha": alpha, "loftq_iters": iters, "dropout": 0.0}})
    full, tok = load_pruned(path)
    ids = tok("the bakof lives in the forest . the bakof eats fish .", return_tensors="pt").input_ids
    with torch.no_grad():
        target = full(ids).logits
    errors = {}
    for use_loftq in (False, True):
        model, _ = load_pruned(path)
        inits, _ = loftq_for_model(model, [4, 8, 4, 4, 8, 4], cfg, tmp_path, "k") if use_loftq else ({}, None)
        quantize_model(model, [4, 8, 4, 4, 8, 4], cfg.quant, residual_weights=inits)
        peft_model = get_peft_model(model, lora_config_for(cfg.lora, model)).eval()
        apply_loftq_adapters(peft_model, inits, cfg.lora)
        if use_loftq:  # scaling-aware: the adapter's effective delta is B_T A_T whatever alpha is
            name = "model.layers.0.mlp.up_proj"
            module = peft_model.base_model.model.get_submodule(name)
            delta = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
            assert torch.allclose(delta, inits[name].lora_B @ inits[name].lora_A, atol=1e-6)
        with torch.no_grad():
            errors[use_loftq] = (peft_model(ids).logits - target).norm().item()
    print(f"alpha {alpha} T={iters}: logit error plain {errors[False]:.4f} loftq {errors[True]:.4f}")
    assert errors[True] < 0.9 * errors[False]
