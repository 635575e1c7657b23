"""Per-layer bitsandbytes quantization: bit vectors, real bnb modules, peft's bnb LoRA layers, CPU training."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from qpruner.errors import ConfigError, QPrunerError
from qpruner.loftq import loftq_for_model, quant_dequant
from qpruner.plan import resolved_config
from qpruner.quantize import lora_config_for, parse_bits, quantize_model, validate_bits

torch.set_num_threads(1)


def irregular_llama(seed: int = 0):
    """A random 6-layer GQA LLaMA (hidden 128, 4 heads / 2 kv heads of 32) with hand-shrunk layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    for i, (heads, kv, inter) in {1: (2, 1, 96), 3: (4, 2, 161), 4: (2, 2, 64)}.items():
        attn, mlp = model.model.layers[i].self_attn, model.model.layers[i].mlp
        attn.q_proj, attn.o_proj = nn.Linear(128, heads * 32, bias=False), nn.Linear(heads * 32, 128, bias=False)
        attn.k_proj, attn.v_proj = nn.Linear(128, kv * 32, bias=False), nn.Linear(128, kv * 32, bias=False)
        attn.num_key_value_groups = heads // kv
        mlp.gate_proj, mlp.up_proj = nn.Linear(128, inter, bias=False), nn.Linear(128, inter, bias=False)
        mlp.down_proj = nn.Linear(inter, 128, bias=False)
    return model.eval()


def dequantized(module) -> torch.Tensor:
    """The float32 weight a bnb module computes with."""
    import bitsandbytes.functional as F

    if isinstance(module, bnb.nn.Linear4bit):
        return F.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    if isinstance(module, bnb.nn.Linear8bitLt):
        scb = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
        return F.int8_vectorwise_dequant(module.weight.data, scb).float()
    return module.weight.data.float()


def test_bad_bit_vectors_are_one_line():
    with pytest.raises(QPrunerError, match=r"^bits: got 3 entries, the pruned model has 6 decoder layers$"):
        validate_bits([4, 8, 4], 6, [4, 8])
    with pytest.raises(QPrunerError, match=r"^bits\[1\]=16 is not in quant.bits \[4, 8\]"):
        validate_bits([4, 16, 4, 4, 4, 4], 6, [4, 8])
    with pytest.raises(QPrunerError, match=r"^bits\[0\]=4.5 is not in quant.bits"):
        validate_bits([4.5, 8], 2, [4, 8])
    with pytest.raises(QPrunerError, match="comma-separated"):
        parse_bits("4,eight", 6, [4, 8])
    with pytest.raises(QPrunerError, match=r"bits\[0\]=5 is not in"):
        parse_bits("uniform:5", 3, [4, 8])
    assert parse_bits("uniform:8", 3, [4, 8]) == [8, 8, 8]
    assert parse_bits("4, 8,16", 3, [4, 8, 16]) == [4, 8, 16]
    assert validate_bits((8.0, 4), 2, [4, 8]) == [8, 4]


@pytest.mark.parametrize("quant_type,double_quant,blocksize", [("nf4", True, 64), ("fp4", False, 128)])
def test_every_decoder_linear_gets_its_layers_bnb_module(quant_type, double_quant, blocksize):
    qcfg = resolved_config({"quant": {"bits": [4, 8, 16], "quant_type": quant_type,
                                       "double_quant": double_quant, "blocksize": blocksize}}).quant
    model = irregular_llama()
    shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    bits = [4, 8, 16, 4, 8, 16]
    quantize_model(model, bits, qcfg)
    assert model.is_loaded_in_4bit and model.is_loaded_in_8bit
    for i, layer in enumerate(model.model.layers):
        linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
        assert len(linears) == 7
        for m in linears:
            if bits[i] == 4:
                assert type(m) is bnb.nn.Linear4bit and m.weight.bnb_quantized
                state = m.weight.quant_state
                assert (state.quant_type, state.blocksize, state.nested) == (quant_type, blocksize, double_quant)
                assert m.compute_dtype == torch.float32
            elif bits[i] == 8:
                assert isinstance(m, bnb.nn.Linear8bitLt) and m.weight.dtype == torch.int8
                assert m.state.threshold == 6.0 and not m.state.has_fp16_weights  # LLM.int8 by default
            else:
                assert type(m) is nn.Linear and m.weight.dtype == torch.float32
    for name, m in model.named_modules():  # shapes unchanged, even the hand-shrunk layers
        if isinstance(m, nn.Linear):
            assert (m.out_features, m.in_features) == shapes[name]
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_base_weight_is_exactly_what_loftq_assumed(tmp_path):
    """The bnb module's dequantized weight equals quant_dequant(W - B_{T-1} A_{T-1}) bit for bit."""
    cfg = resolved_config({"quant": {"bits": [4, 8, 16]}, "lora": {"loftq_iters": 2, "rank": 4}})
    model = irregular_llama()
    bits = [4, 8, 4, 8, 16, 4]
    inits, _ = loftq_for_model(model, bits, cfg, tmp_path, "irregular")
    expected = {n: quant_dequant(init.residual(model.get_submodule(n).weight.data), bits[int(n.split(".")[2])], cfg.quant)
                for n, init in inits.items()}
    assert all(init.prev_B is not None for init in inits.values())
    quantize_model(model, bits, cfg.quant, residual_weights=inits)
    for name, want in expected.items():
        assert torch.equal(dequantized(model.get_submodule(name)), want), name


def test_peft_wraps_bnb_layers_with_its_bnb_lora_classes_and_mixed_bits_train_on_cpu(tmp_path):
    from peft import get_peft_model
    from peft.tuners.lora import bnb as lora_bnb
    from peft.tuners.lora.layer import Linear as LoraLinear

    from qpruner.loftq import apply_loftq_adapters

    cfg = resolved_config({"quant": {"bits": [4, 8, 16]}})
    model = irregular_llama()
    bits = [4, 8, 16, 4, 8, 16]
    ranks = [8, 4, 8, 2, 8, 8]
    inits, _ = loftq_for_model(model, bits, cfg, tmp_path, "irregular", ranks=ranks)
    quantize_model(model, bits, cfg.quant, residual_weights=inits)
    peft_model = get_peft_model(model, lora_config_for(cfg.lora, model, ranks))
    apply_loftq_adapters(peft_model, inits, cfg.lora, ranks=ranks)
    layers = peft_model.base_model.model.model.layers
    for i, layer in enumerate(layers):
        adapted = [m for n, m in layer.named_modules() if n.split(".")[-1] in cfg.lora.target_modules]
        assert len(adapted) == 7
        for module in adapted:
            want = {4: lora_bnb.Linear4bit, 8: lora_bnb.Linear8bitLt, 16: LoraLinear}[bits[i]]
            assert type(module) is want, (i, type(module))
            assert module.lora_A["default"].weight.shape[0] == ranks[i]
    peft_model.train()
    ids = torch.randint(0, 256, (2, 16))
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert grads and all(n.count("lora_") == 1 for n in grads)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # LoftQ B is non-zero, so A gets gradients too on every quantized layer
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_A" in n and bits[int(n.split("layers.")[1].split(".")[0])] < 16)


def test_embedding_quantization_flags_are_gone_and_a_wrong_bit_count_is_one_line():
    """quant.quantize_embeddings / quantize_lm_head were accepted and then failed every trial: they are no
    longer config keys, so a config naming one is refused at once."""
    with pytest.raises(ConfigError, match="quant.quantize_lm_head"):
        resolved_config({"quant": {"quantize_lm_head": True}})
    with pytest.raises(QPrunerError, match="bits: got 2 entries"):
        quantize_model(irregular_llama(), [4, 8], resolved_config({}).quant)


def _outlier_layer_and_input(n: int = 256):
    """A Linear and an input whose first 6 features are 60x larger: the case LLM.int8 was made for."""
    torch.manual_seed(0)
    linear = nn.Linear(n, n, bias=False)
    x = torch.randn(8, n)
    x[:, :6] *= 60.0
    return linear, x


def _relative_error(linear: nn.Linear, x: torch.Tensor, threshold: float) -> float:
    from qpruner.standalone import quantize_linear

    module = quantize_linear(linear, 8, {"int8_threshold": threshold}, "cpu")
    with torch.no_grad():
        ref, out = linear(x), module(x)
    return float((out - ref).norm() / ref.norm())


def test_int8_with_outlier_threshold_beats_plain_int8_on_outlier_features():
    linear, x = _outlier_layer_and_input()
    plain, llm_int8 = _relative_error(linear, x, 0.0), _relative_error(linear, x, 6.0)
    assert llm_int8 < plain / 3, (llm_int8, plain)  # measured here: 0.0042 against 0.031


def test_int8_layer_computes_the_same_in_train_and_eval_mode():
    from qpruner.standalone import quantize_linear

    linear, x = _outlier_layer_and_input()
    module = quantize_linear(linear, 8, {"int8_threshold": 6.0}, "cpu")
    assert isinstance(module, bnb.nn.Linear8bitLt) and module.state.threshold == 6.0
    module.train()
    xt = x.clone().requires_grad_(True)
    trained = module(xt)
    trained.sum().backward()  # LoRA training needs the input gradient through the frozen int8 layer
    assert xt.grad is not None and torch.isfinite(xt.grad).all()
    module.eval()
    with torch.no_grad():
        evaluated = module(x)
    assert torch.equal(trained.detach(), evaluated)


def test_int8_threshold_is_validated_and_travels_with_the_settings():
    from qpruner.errors import ConfigError
    from qpruner.quantize import settings

    assert settings(resolved_config({}).quant)["int8_threshold"] == 6.0
    assert settings(resolved_config({"quant": {"int8_threshold": 0}}).quant)["int8_threshold"] == 0.0
    with pytest.raises(ConfigError, match="quant.int8_threshold"):
        resolved_config({"quant": {"int8_threshold": -1}})
