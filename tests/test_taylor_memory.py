"""Taylor importance with gradients reduced in their post-accumulate hooks (issue 25, item 1): the same scores
and ranking as the full-gradient computation it replaced, no full-size score or gradient left behind, and a
float16 backward protected by loss scaling."""

from __future__ import annotations

import pytest
import torch

from qpruner.prune.taylor import (
    MICRO_BATCH,
    LossScale,
    _padded,
    apply_plan,
    channel_sums,
    group_scores,
    plan_pruning,
    weight_scores,
)


def _small_llama(dtype=torch.float32):
    """A random LLaMA-shaped model with GQA (4 query heads in 2 groups), 4 layers: fast on a CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    return LlamaForCausalLM(config).to(dtype)


def _rows(n: int) -> list[torch.Tensor]:
    """n token rows of uneven lengths, more than one micro-batch when n > MICRO_BATCH."""
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (1, 6 + i % 5), generator=gen) for i in range(n)]


def _reference(model, batches, order):
    """The computation before the hooks: backward per micro-batch (first order) or per sample (second), the
    whole gradient of every weight accumulated, full-size |w g| (- 1/2 w^2 F) per weight, then channel_sums."""
    params = {n: p for n, p in model.named_parameters() if ".layers." in n and n.endswith("proj.weight")}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    steps = [[b] for b in batches] if order == "second" else [batches[i : i + MICRO_BATCH] for i in range(0, len(batches), MICRO_BATCH)]
    g_sum = {n: torch.zeros_like(p) for n, p in params.items()}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    model.eval()
    for step in steps:
        model(**_padded(step)).loss.backward()
        for n, p in params.items():
            g_sum[n] += p.grad.float()
            fisher[n] += p.grad.float() ** 2
            p.grad = None
    out = {}
    for n, p in params.items():
        w = p.detach().float()
        s = w * g_sum[n] / len(steps)
        if order == "second":
            s = s - 0.5 * w * w * fisher[n] / len(steps)
        out[n] = channel_sums(n, s.abs())
        p.requires_grad_(False)
    return out


def _ranking(model, scores, layers):
    """Per layer: attention groups and MLP channels in ascending importance (what apply_plan removes first)."""
    ranks = {}
    for i in layers:
        heads, channels = group_scores(model, scores, i, "sum")
        ranks[i] = (sorted(range(len(heads)), key=heads.__getitem__), torch.argsort(channels).tolist())
    return ranks


@pytest.mark.parametrize("order, budget", [("first", None), ("second", None), ("second", 1)])
def test_hooked_scores_equal_the_full_gradient_computation(order, budget):
    """Same per-channel scores (float32 rounding) and the same ranking in every layer; a budget of 1 byte puts
    each weight in its own chunk of the second order's sums."""
    model = _small_llama()
    batches = _rows(MICRO_BATCH + 3 if order == "first" else 5)
    expected = _reference(model, batches, order)
    got = weight_scores(model, batches, order, progress=False, budget_bytes=budget)
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].dim() == 1  # per row / column, never a full-size score
        torch.testing.assert_close(got[name], expected[name], rtol=2e-4, atol=1e-9)
    layers = range(model.config.num_hidden_layers)
    assert _ranking(model, got, layers) == _ranking(model, expected, layers)
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert not any("forward" in layer.__dict__ for layer in model.model.layers), "checkpointing is undone"


def test_no_gradient_outlives_its_hook():
    """While the backward runs, at most a handful of decoder weights hold a gradient at once (the one autograd
    just wrote is reduced and freed); before, every weight held its gradient until the end."""
    model = _small_llama()
    params = [p for n, p in model.named_parameters() if ".layers." in n and n.endswith("proj.weight")]
    live = []

    def count(_):
        live.append(sum(p.grad is not None for p in params))

    handles = [p.register_post_accumulate_grad_hook(count) for p in params]  # run before qpruner's own hooks
    try:
        weight_scores(model, _rows(4), "first", progress=False)
    finally:
        for h in handles:
            h.remove()
    assert len(live) == len(params) and max(live) == 1


def test_second_order_chunks_fit_the_budget():
    from qpruner.prune.taylor import _chunks

    model = _small_llama()
    params = {n: p for n, p in model.named_parameters() if ".layers." in n and n.endswith("proj.weight")}
    one = max(p.numel() for p in params.values()) * 8
    chunks = _chunks(params, 2 * one, staged=False)
    assert [n for c in chunks for n in c] == list(params)
    assert all(sum(params[n].numel() * 8 for n in c) <= 2 * one for c in chunks) and len(chunks) > 1
    assert len(_chunks(params, None, staged=False)) >= 2  # default: a quarter of the weights' bytes


def test_float16_backward_is_loss_scaled_and_keeps_the_ranking():
    """fp16 gradients of a small loss underflow; scaled by 2**16 and divided back in float32 they keep the
    float32 ranking of the MLP channels."""
    assert LossScale(torch.bfloat16).value == 1 and not LossScale(torch.float32).active
    scale = LossScale(torch.float16)
    assert scale.value == 2.0**16
    assert scale.unscale(torch.tensor([float("inf")], dtype=torch.float16)) is None
    scale.backoff()
    assert scale.value == 2.0**15
    model32 = _small_llama()
    model16 = _small_llama(torch.float16)
    batches = _rows(4)
    ref = weight_scores(model32, batches, "first", progress=False)
    got = weight_scores(model16, batches, "first", progress=False)
    name = "model.layers.1.mlp.gate_proj.weight"
    assert (got[name] > 0).all()
    top = set(torch.topk(ref[name], 24).indices.tolist())
    assert len(top & set(torch.topk(got[name], 24).indices.tolist())) >= 20


def test_prune_model_removes_what_the_reference_ranks_lowest():
    """End to end: the channels prune_model removes are the reference computation's lowest-ranked ones."""
    from qpruner.config import PruneConfig
    from qpruner.prune.taylor import prune_model

    pcfg = PruneConfig(ratio=0.2, round_to=1)
    model, batches = _small_llama(), _rows(MICRO_BATCH + 2)
    plan = plan_pruning(model, pcfg)
    ranked = _ranking(model, _reference(model, batches, "first"), plan.layers)
    info = prune_model(model, batches, pcfg, progress=False)
    assert info["channels_removed"] == plan.channels > 0
    reference = _small_llama()
    expected = apply_plan(reference, plan, lambda i: [ranked[i][0].index(g) for g in range(2)],
                          lambda i: torch.tensor([float(ranked[i][1].index(c)) for c in range(96)]))
    for i in plan.layers:
        torch.testing.assert_close(model.model.layers[i].mlp.gate_proj.weight, reference.model.layers[i].mlp.gate_proj.weight)
        assert expected[i][1].numel() == plan.channels
