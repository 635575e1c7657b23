"""prune.round_to: each pruned layer keeps a multiple of round_to MLP channels while the ratio holds (the
ratio first: when no multiple is within a point of it, the exact width is kept)."""

from __future__ import annotations

import pytest

from qpruner.config import PruneConfig
from qpruner.errors import ConfigError


def meta_model(**shape):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape))
    model.tie_weights()  # SmolLM2's embeddings are tied: counted once
    return model


SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, tie_word_embeddings=True)
TINY = dict(vocab_size=768, hidden_size=128, intermediate_size=352, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32)


@pytest.mark.parametrize("shape,ratio,round_to,kept", [
    (SMOLLM2, 0.2, 1, 1058), (SMOLLM2, 0.2, 32, 1056), (SMOLLM2, 0.2, 64, 1088), (SMOLLM2, 0.3, 32, 736),
    (TINY, 0.3, 1, 161), (TINY, 0.3, 32, 160),
    (TINY, 0.2, 32, 246),  # no multiple of 32 within 1 point of 20% on 4 layers of 128: the exact width
])
def test_taylor_plan_keeps_multiples_and_the_ratio(shape, ratio, round_to, kept):
    from qpruner.prune.taylor import plan_pruning

    model = meta_model(**shape)
    total = sum(p.numel() for p in model.parameters())
    plan = plan_pruning(model, PruneConfig(ratio=ratio, round_to=round_to))
    assert shape["intermediate_size"] - plan.channels == kept
    assert abs(plan.removed / total - ratio) <= 0.01


def test_slimgpt_plan_rounds_each_layer_or_falls_back_to_exact_widths():
    from qpruner.prune.slimgpt import plan_layers

    model = meta_model(**SMOLLM2)
    total = sum(p.numel() for p in model.parameters())
    for round_to in (1, 32):
        plan = plan_layers(model, PruneConfig(ratio=0.2, round_to=round_to, method="slimgpt"))
        kept = [1536 - channels for _, channels in plan.values()]
        removed = sum(g * (2 * 3 * 64 * 576 + 2 * 64 * 576) + c * 3 * 576 for g, c in plan.values())
        assert abs(removed / total - 0.2) <= 0.01
        assert all(k % 32 == 0 for k in kept) == (round_to == 32)
    tiny = plan_layers(meta_model(**TINY), PruneConfig(ratio=0.2, round_to=32, method="slimgpt"))
    assert tiny == plan_layers(meta_model(**TINY), PruneConfig(ratio=0.2, round_to=1, method="slimgpt"))


def test_pruned_model_records_whether_the_widths_are_multiples(tiny_assets):
    import torch

    from qpruner.model import load_model
    from qpruner.prune.taylor import prune_model

    for round_to, met, width in ((32, True, 160), (1, True, 161)):
        model, _ = load_model(str(tiny_assets.model_dir))
        torch.manual_seed(0)
        info = prune_model(model, [], PruneConfig(ratio=0.3, round_to=round_to, method="random"), progress=False)
        assert info["round_to_met"] is met
        assert {model.model.layers[i].mlp.gate_proj.out_features for i in info["layers"]} == {width}


@pytest.mark.parametrize("value", [0, -32, 1.5, True])
def test_round_to_must_be_a_positive_integer(value):
    from qpruner.plan import resolved_config

    with pytest.raises(ConfigError, match=r"^prune\.round_to: must be an integer"):
        resolved_config({"prune": {"round_to": value}})
