"""LLM-Pruner's block-wise structured pruning: Taylor importance of coupled groups on calibration text.

Per weight, first order |w * dL/dw|; second order adds LLM-Pruner's diagonal term,
|w*g - 1/2 * w^2 * H_kk| with H_kk ~ mean over samples of g^2 (Fisher, as LLM-Pruner's acc_grad / N).
As in LLM-Pruner, each coupled module's salience is summed per group/channel, then reduced across the
modules (sum, mean, max, prod or last); groups are ranked within each layer. Each gradient is reduced to
those per-row/per-column sums as soon as autograd writes it, then freed (weight_scores), so pruning needs
little more memory than the model and one forward's activations.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from qpruner.config import PruneConfig
from qpruner.errors import ConfigError
from qpruner.prune.structure import (
    LayerShape,
    channel_params,
    group_params,
    group_rows,
    head_dim_of,
    keep_channels,
    keep_groups,
    layer_shape,
)

MICRO_BATCH = 8  # calibration rows per forward/backward for first-order importance


@dataclass
class Plan:
    """How many attention groups and MLP channels each prunable layer loses."""

    layers: list[int]
    groups: int
    channels: int
    removed: int  # parameters
    block_ratio: float  # removed / parameters of the prunable layers


def prunable_layers(n_layers: int, pcfg: PruneConfig) -> list[int]:
    """LLM-Pruner prunes layers 4..30 of 32: the same share of depth, keeping at least one at each end."""
    first = pcfg.first_layer if pcfg.first_layer is not None else max(1, round(4 / 32 * n_layers))
    last = pcfg.last_layer if pcfg.last_layer is not None else min(n_layers - 1, round(30 / 32 * n_layers))
    if last > n_layers:
        raise ConfigError("prune.last_layer", f"is {last} but the model has {n_layers} decoder layers")
    if first >= last:
        raise ConfigError("prune.first_layer", f"leaves no layer to prune ({first}..{last} of {n_layers}); set prune.first_layer/last_layer")
    return list(range(first, last))


def channel_options(width: int, channels: int, round_to: int) -> list[int]:
    """Channel counts to remove near `channels` (prune.round_to): the exact count, and those that leave the
    multiple of `round_to` just below and just above the exact kept width (at least one multiple, at most
    the width). Only the exact count when nothing is removed, round_to is 1 or the layer is narrower."""
    if channels == 0 or round_to <= 1 or width < round_to:
        return [channels]
    kept = width - channels
    low = max(round_to, kept // round_to * round_to)
    high = min(width // round_to * round_to, -(-kept // round_to) * round_to)
    return sorted({channels, width - low, width - max(low, high)})


def aligned(width: int, channels: int, round_to: int) -> bool:
    """Whether a layer keeps a multiple of round_to channels (a layer left whole counts as aligned)."""
    return channels == 0 or round_to <= 1 or (width - channels) % round_to == 0


def plan_pruning(model: nn.Module, pcfg: PruneConfig) -> Plan:
    """Choose per-layer group and channel counts so the WHOLE model loses `ratio` of its parameters.

    Heads come in coarse steps, so for each possible number of removed groups the channel count is
    solved exactly; the choice whose head and channel fractions are closest (LLM-Pruner prunes both
    at one ratio) wins. With prune.round_to, the kept width is also tried at the neighbouring multiples,
    and among the choices within 1 point of the ratio one that keeps a multiple wins; the ratio comes
    first: when no multiple is within 1 point, the exact width is kept.
    """
    total = sum(p.numel() for p in model.parameters())
    layers = prunable_layers(model.config.num_hidden_layers, pcfg)
    hidden, head_dim = model.config.hidden_size, head_dim_of(model)
    target = pcfg.ratio * total
    if target == 0:
        return Plan(layers, 0, 0, 0, 0.0)
    shapes = {layer_shape(model.model.layers[i], head_dim) for i in layers}
    if len(shapes) > 1:
        raise ConfigError("prune.first_layer", "the prunable layers differ in shape (an already pruned model); prune the original model instead")
    shape: LayerShape = shapes.pop()
    per_group, per_channel = group_params(shape, head_dim, hidden), channel_params(hidden)
    block = sum(sum(p.numel() for p in model.model.layers[i].parameters()) for i in layers)
    max_groups = shape.num_key_value_heads - 1 if pcfg.prune_attention else 0
    max_channels = shape.intermediate_size - 1 if pcfg.prune_mlp else 0
    best = None
    for groups in range(max_groups + 1):
        rest = target - groups * per_group * len(layers)
        exact = min(max(round(rest / (per_channel * len(layers))), 0), max_channels) if pcfg.prune_mlp else 0
        for channels in channel_options(shape.intermediate_size, exact, pcfg.round_to):
            removed = (groups * per_group + channels * per_channel) * len(layers)
            miss = abs(removed - target) / total
            balance = abs(groups / shape.num_key_value_heads - channels / shape.intermediate_size)
            odd = not aligned(shape.intermediate_size, channels, pcfg.round_to)
            key = (0, odd, balance if pcfg.prune_mlp and pcfg.prune_attention else 0) if miss <= 0.01 else (1, miss, odd)
            if best is None or key < best[0]:
                best = (key, Plan(layers, groups, channels, removed, removed / block))
    reachable = (max_groups * per_group + max_channels * per_channel) * len(layers) / total
    if abs(best[1].removed - target) > 0.02 * total:
        why = f"at most {reachable:.3f} is reachable" if pcfg.ratio > reachable else "whole head groups miss it by more than 2 points"
        raise ConfigError(
            "prune.ratio",
            f"{pcfg.ratio} cannot be reached by pruning layers {layers[0]}..{layers[-1]} ({why}); "
            "change the ratio or widen prune.first_layer/last_layer",
        )
    return best[1]


# Pruning removes rows of these projections (a query/key/value head, an MLP channel) and columns of these.
COLUMN_PRUNED = ("o_proj", "down_proj")


def channel_sums(name: str, salience: torch.Tensor) -> torch.Tensor:
    """One weight's per-weight salience summed into the units pruning removes: per output row for q/k/v/gate/up,
    per input column for o_proj/down_proj. Every later use (group scores, layer totals on kept weights) only
    needs these sums, so no full-size score tensor outlives its gradient."""
    return salience.sum(0 if name.split(".")[-2] in COLUMN_PRUNED else 1)


class LossScale:
    """Dynamic loss scaling for a float16 backward (bf16/fp32 need none: their exponent range holds LLM
    gradients): the loss is multiplied by `value` (GradScaler's start, 2**16) so small gradients do not
    underflow to zero in fp16; each gradient is divided back in float32, and a pass whose gradients
    overflowed is repeated at half the scale. For other dtypes the scale is 1 and nothing is repeated."""

    def __init__(self, dtype: torch.dtype):
        self.value = 2.0**16 if dtype == torch.float16 else 1.0
        self.active = dtype == torch.float16

    def unscale(self, grad: torch.Tensor) -> Optional[torch.Tensor]:
        """The gradient in float32 without the scale; None when an fp16 pass overflowed (inf/nan)."""
        if not self.active:
            return grad.float()  # no copy for float32
        g = grad.float() / self.value
        return g if bool(torch.isfinite(g).all()) else None

    def backoff(self) -> None:
        """Halve the scale after an overflow; below 1 fp16 cannot represent these gradients at all."""
        self.value /= 2
        if self.value < 1:
            raise RuntimeError("float16 Taylor gradients overflow even unscaled; load the model in bfloat16 or float32 (model.dtype)")


def weight_scores(model: nn.Module, batches: list[torch.Tensor], order: str, progress: bool,
                  budget_bytes: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Taylor importance of every decoder projection weight, as channel_sums of LLM-Pruner's per-weight salience.

    `batches` are (1, L) token rows. g is the gradient of the mean over micro-batches (MICRO_BATCH rows) of
    each micro-batch's mean LM loss; for `second` the Fisher diagonal is the mean over samples of each
    sample's squared gradient (one backward per sample, as LLM-Pruner does: acc_grad / N) and g is the mean
    of those per-sample gradients. Memory: each gradient is reduced by a post-accumulate-grad hook as soon
    as autograd has written it, then freed, so the model never sits beside all of its gradients. The
    salience takes the absolute value after the sum over samples, so the sums must be whole first: the
    first order does it in one backward through all micro-batches (autograd sums them per weight; decoder
    layers checkpointed so all rows' activations cost little); the second order keeps float32 g and g^2
    sums only for a chunk of weights at a time (at most `budget_bytes` together, default a quarter of the
    decoder weights' bytes) and repeats the per-sample passes per chunk. Backward runs in the model's dtype: bf16/fp32 as is,
    float16 with dynamic loss scaling (LossScale).
    """
    params = {n: p for n, p in model.named_parameters() if ".layers." in n and n.endswith("proj.weight")}
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    model.eval()
    scale = LossScale(next(iter(params.values())).dtype)
    try:
        if order == "second":
            return _second_order(model, params, batches, scale, progress, budget_bytes)
        return _first_order(model, params, batches, scale, progress)
    finally:
        for p in params.values():
            p.grad = None
            p.requires_grad_(False)


def _micro_batch_loss(model: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    """Mean over micro-batches of MICRO_BATCH rows of each one's mean next-token loss, from ONE forward of
    all rows: the same gradient as a backward per micro-batch summed and divided by their number, but one
    graph, so each weight's gradient is complete when autograd accumulates it (once). The decoder layers are
    checkpointed, so the rows' activations cost about one layer's worth plus every layer's input."""
    inputs = _padded(batches)
    with _checkpointed_layers(model):
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False).logits
    labels = inputs["labels"][:, 1:]
    token_loss = nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100,
                                             reduction="none")
    valid = (labels != -100).float()
    per_step = [token_loss[i : i + MICRO_BATCH].sum() / valid[i : i + MICRO_BATCH].sum()
                for i in range(0, len(batches), MICRO_BATCH)]
    return torch.stack(per_step).mean()


def _take_grad(p: torch.Tensor, name: str, scale: LossScale, overflow: list) -> Optional[torch.Tensor]:
    """In a hook: p's gradient unscaled, and p.grad freed; None (and `name` noted in `overflow`) when an fp16
    loss-scaled pass overflowed."""
    g = scale.unscale(p.grad)
    p.grad = None
    if g is None:
        overflow.append(name)
    return g


def _first_order(model, params, batches, scale: LossScale, progress: bool) -> dict[str, torch.Tensor]:
    """channel_sums(|w * g|) per weight from one backward, each gradient reduced and freed in its hook."""
    while True:
        scores: dict[str, torch.Tensor] = {}
        overflow = []

        def reduce(p: torch.Tensor, name: str, scores=scores, overflow=overflow) -> None:
            g = _take_grad(p, name, scale, overflow)
            if g is not None:
                scores[name] = channel_sums(name, (p.detach().float() * g).abs_())

        with _hooks(params, reduce), tqdm(total=1, desc="calibration (Taylor importance)", disable=not progress) as bar:
            (_micro_batch_loss(model, batches) * scale.value).backward()
            bar.update()
        if not overflow:
            return scores
        scale.backoff()


def _second_order(model, params, batches, scale: LossScale, progress: bool,
                  budget_bytes: Optional[int]) -> dict[str, torch.Tensor]:
    """channel_sums(|w*g - 1/2 w^2 F|) per weight, chunk by chunk: per sample, the hooks add each chunk
    weight's float32 gradient and its square to the chunk's sums and free the gradient."""
    chunks = _chunks(params, budget_bytes, staged=scale.active)
    scores: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(chunks) * len(batches), desc="calibration (Taylor importance)", disable=not progress)
    for chunk in chunks:
        grad_sum = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in chunk}
        fisher = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in chunk}
        for b in batches:
            _sample_pass(model, {n: params[n] for n in chunk}, b, scale, grad_sum, fisher)
            bar.update()
        for n in chunk:
            w = params[n].detach().float()
            salience = (w * (grad_sum.pop(n) / len(batches)) - 0.5 * w * w * (fisher.pop(n) / len(batches))).abs()
            scores[n] = channel_sums(n, salience)
    bar.close()
    return scores


def _sample_pass(model, chunk: dict, sample: torch.Tensor, scale: LossScale, grad_sum: dict, fisher: dict) -> None:
    """One sample's backward into the chunk's sums of g and g^2. With fp16 loss scaling the pass's gradients
    are held until the pass is known free of overflow, then added (else the pass repeats at half scale)."""
    while True:
        staged: dict[str, torch.Tensor] = {}
        overflow = []

        def add(p: torch.Tensor, name: str, staged=staged, overflow=overflow) -> None:
            g = _take_grad(p, name, scale, overflow)
            if g is None:
                return
            if scale.active:
                staged[name] = g
            else:
                grad_sum[name] += g
                fisher[name] += g * g

        with _hooks(chunk, add):
            (model(**_padded([sample]), use_cache=False).loss * scale.value).backward()
        if not overflow:
            for name, g in staged.items():
                grad_sum[name] += g
                fisher[name] += g * g
            return
        scale.backoff()


def _chunks(params: dict, budget_bytes: Optional[int], staged: bool) -> list[list[str]]:
    """Split the weights, in model order, into groups whose float32 g and g^2 sums (plus the staged fp16-pass
    gradients) fit `budget_bytes`; default a quarter of the weights' own bytes. A weight larger than the
    budget gets a chunk of its own."""
    per_param = 4 * (3 if staged else 2)
    if budget_bytes is None:
        budget_bytes = sum(p.numel() * p.element_size() for p in params.values()) // 4
    chunks, size = [[]], 0
    for name, p in params.items():
        cost = p.numel() * per_param
        if chunks[-1] and size + cost > budget_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(name)
        size += cost
    return chunks


@contextmanager
def _hooks(params: dict, fn):
    """Only `params` require grad, each with a post-accumulate-grad hook fn(param, name); on exit the hooks are
    removed and the weights stop requiring grad."""
    handles = []
    for name, p in params.items():
        p.requires_grad_(True)
        handles.append(p.register_post_accumulate_grad_hook(lambda p, name=name: fn(p, name)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for p in params.values():
            p.grad = None
            p.requires_grad_(False)


@contextmanager
def _checkpointed_layers(model: nn.Module):
    """Each decoder layer's forward runs under torch.utils.checkpoint (non-reentrant): the backward keeps only
    every layer's input and recomputes one layer at a time, so the single first-order backward through all
    calibration rows holds one layer's activations, not all of them. The model stays in eval mode (no
    dropout), so the recompute equals the forward."""
    saved = [(layer, layer.__dict__.get("forward")) for layer in model.model.layers]  # an instance forward (hooks)
    for layer, _ in saved:
        layer.forward = partial(checkpoint, layer.forward, use_reentrant=False)
    try:
        yield
    finally:
        for layer, own in saved:
            if own is None:
                del layer.forward
            else:
                layer.forward = own


def _padded(samples: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Right-pad (1, L) token rows into one batch; padding is masked out of attention and loss."""
    width = max(x.shape[1] for x in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long, device=samples[0].device)
    mask = torch.zeros_like(ids)
    for i, x in enumerate(samples):
        ids[i, : x.shape[1]], mask[i, : x.shape[1]] = x[0], 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _reduce(per_module: list[torch.Tensor], how: str) -> torch.Tensor:
    """LLM-Pruner's group reduction across the coupled modules' per-channel salience sums.

    Each entry holds, per channel (group or MLP channel), the sum of the salience of that module's
    weights in it; sum / mean / max / prod reduce across the modules (prod in log space, same ranking)
    and `last` keeps the module the channel leaves through (o_proj, down_proj).
    """
    stacked = torch.stack(per_module)
    if how == "sum":
        return stacked.sum(0)
    if how == "mean":
        return stacked.mean(0)
    if how == "max":
        return stacked.max(0).values
    if how == "last":
        return stacked[-1]
    return torch.log(stacked.clamp_min(1e-30)).sum(0)  # prod


def group_scores(model: nn.Module, scores: dict[str, torch.Tensor], layer: int, how: str) -> tuple[list[float], torch.Tensor]:
    """(score of each attention group, score of each MLP channel) for one layer, from channel_sums scores."""
    head_dim = head_dim_of(model)
    shape = layer_shape(model.model.layers[layer], head_dim)
    pre = f"model.layers.{layer}."
    q, k, v, o = (scores[pre + f"self_attn.{m}_proj.weight"] for m in "qkvo")
    per_group = shape.num_attention_heads // shape.num_key_value_heads
    rows = [group_rows(g, per_group, head_dim) for g in range(shape.num_key_value_heads)]
    per_module = [torch.stack([q[qr].sum() for qr, _ in rows]), torch.stack([k[kr].sum() for _, kr in rows]),
                  torch.stack([v[kr].sum() for _, kr in rows]), torch.stack([o[qr].sum() for qr, _ in rows])]
    heads = _reduce(per_module, how).tolist()
    gate, up, down = (scores[pre + f"mlp.{m}_proj.weight"] for m in ("gate", "up", "down"))
    channels = _reduce([gate, up, down], how)
    return heads, channels


def layer_totals(scores: dict[str, torch.Tensor], n_layers: int, removed: Optional[dict] = None) -> list[float]:
    """Per-layer Taylor importance: the sum of the scores of the weights pruning keeps (the search's option).

    `scores` are channel_sums (a removed group or channel is a whole row or column, so the kept weights are
    the kept entries); `removed` is apply_plan's {layer: (groups removed, MLP channels removed, query heads per
    group, head_dim)}.
    """
    totals = [0.0] * n_layers
    for name, s in scores.items():
        i = int(name.split(".layers.")[1].split(".")[0])
        module = name.split(".")[-2]
        keep = torch.ones_like(s, dtype=torch.bool)
        groups, channels, per_group, head_dim = (removed or {}).get(i, ([], [], 1, 1))
        for g in groups:
            q_rows, kv_rows = group_rows(g, per_group, head_dim)
            if module in ("q_proj", "o_proj"):
                keep[q_rows] = False
            elif module in ("k_proj", "v_proj"):
                keep[kv_rows] = False
        if module in ("gate_proj", "up_proj", "down_proj"):
            keep[channels] = False
        totals[i] += float(s[keep].sum())
    return totals


def apply_plan(model: nn.Module, plan: Plan, head_rank, channel_rank) -> dict:
    """Remove the lowest-ranked groups/channels in each planned layer (rank functions give scores).

    Returns {layer: (groups removed, MLP channels removed, query heads per group, head_dim)}, in the
    unpruned indexing, so importance totals can be taken on the kept weights.
    """
    head_dim = head_dim_of(model)
    removed = {}
    for i in plan.layers:
        layer = model.model.layers[i]
        shape = layer_shape(layer, head_dim)
        groups: list[int] = []
        channels = torch.zeros(0, dtype=torch.long)
        if plan.groups:
            order = sorted(range(shape.num_key_value_heads), key=lambda g: head_rank(i)[g])
            groups = order[: plan.groups]
            keep_groups(layer, sorted(order[plan.groups:]), head_dim)
        if plan.channels:
            ranked = torch.argsort(channel_rank(i), descending=True)
            channels = ranked[shape.intermediate_size - plan.channels :]
            keep_channels(layer, ranked[: shape.intermediate_size - plan.channels])
        removed[i] = (groups, channels, shape.num_attention_heads // shape.num_key_value_heads, head_dim)
    return removed


def prune_model(model: nn.Module, batches: list[torch.Tensor], pcfg: PruneConfig, progress: bool = True) -> dict:
    """Prune in place by `pcfg.method` (taylor or random); returns what happened, for the metadata."""
    plan = plan_pruning(model, pcfg)
    n_layers = model.config.num_hidden_layers
    if pcfg.method == "random":
        gen = torch.Generator().manual_seed(pcfg.calibration.seed)
        shapes = {i: layer_shape(model.model.layers[i], head_dim_of(model)) for i in plan.layers}
        head_r = {i: torch.rand(shapes[i].num_key_value_heads, generator=gen).tolist() for i in plan.layers}
        chan_r = {i: torch.rand(shapes[i].intermediate_size, generator=gen) for i in plan.layers}
        apply_plan(model, plan, head_r.__getitem__, chan_r.__getitem__)
        totals = []  # no importance measured: the search cannot use `importance: taylor` here
    else:
        scores = weight_scores(model, batches, pcfg.taylor_order, progress)
        ranked = {i: group_scores(model, scores, i, pcfg.aggregation) for i in plan.layers}
        removed = apply_plan(model, plan, lambda i: ranked[i][0], lambda i: ranked[i][1])
        totals = layer_totals(scores, n_layers, removed)
    return {"layers": plan.layers, "groups_removed": plan.groups, "channels_removed": plan.channels,
            "block_ratio": plan.block_ratio, "layer_importance": totals,
            "round_to_met": all(model.model.layers[i].mlp.gate_proj.out_features % pcfg.round_to == 0 for i in plan.layers
                                if plan.channels)}
