"""Layer importance: one positive score per decoder layer of the pruned model, higher = needs more
precision. It feeds the search's first configurations (`search.bit_probabilities`).

Methods (`search.importance`): `mi` (mutual information between a layer's output and the model's
prediction), `quant_loss` (loss increase when only that layer is quantized), `taylor` (the pruner's
stored Taylor score).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from qpruner.config import Config
from qpruner.errors import ConfigError


def importance_task(cfg_dict: dict, pruned_path: str) -> list[float]:
    """Ray task body: the pruned model's per-layer importance with the configured method."""
    import torch

    from qpruner.config import config_from_dict
    from qpruner.prune import load_pruned

    cfg = config_from_dict(cfg_dict)
    if cfg.search.importance == "taylor":
        return taylor_importance(pruned_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_pruned(pruned_path, dtype=cfg.quant.compute_dtype, device=device)
    return layer_importance(model, tokenizer, cfg, cfg.search.importance, pruned_path=pruned_path)


def layer_importance(model, tokenizer, cfg: Config, method: str, cache_dir: Optional[str | Path] = None,
                     pruned_path: Optional[str] = None) -> list[float]:
    """One score per decoder layer, higher = needs more precision (methods: mi, quant_loss, taylor)."""
    if method == "taylor":
        return taylor_importance(pruned_path)
    if method == "quant_loss":
        return quant_loss_importance(model, tokenizer, cfg, cache_dir)
    if method == "mi":
        return mi_importance(model, tokenizer, cfg, cache_dir)
    raise ConfigError("search.importance", f"unknown method {method!r}; use mi, quant_loss or taylor")


def taylor_importance(pruned_path: Optional[str]) -> list[float]:
    """The pruner's per-layer Taylor score (sum over the layer's groups), stored with the pruned model."""
    meta = json.loads((Path(pruned_path) / "qpruner_prune.json").read_text())
    return [float(x) for x in meta["layer_importance"]]


def labelled_prompts(cfg: Config, limit: int, cache_dir: Optional[str | Path] = None) -> list[tuple[str, int, int]]:
    """(prompt, label, task index) from the validation tasks' docs: the task signal for MI.

    lm-eval's own task objects give the docs, so any lm-eval task (builtin YAML or hub) works the
    same way, with its own prompt template and gold answer; the held-out *_val twins keep the test
    split unseen.
    """
    from qpruner.evaluate import load_tasks, validation_tasks

    tasks = load_tasks(*validation_tasks(cfg, cache_dir))
    rows = []
    for t_index, task in enumerate(tasks["tasks"].values()):
        for doc in list(task.eval_docs)[:limit]:
            target = task.doc_to_target(doc)
            label = target if isinstance(target, int) else task.doc_to_choice(doc).index(target)
            rows.append((task.doc_to_text(doc), int(label), t_index))
    return rows


def mi_importance(model, tokenizer, cfg: Config, cache_dir: Optional[str | Path] = None, components: int = 8,
                  limit: int = 128) -> list[float]:
    """Mutual-information importance: how much task information each layer ADDS to the residual stream.

    For labelled task prompts, take each layer's output at the last prompt token, project it to a few
    principal components, and estimate I(h_l; y) with sklearn's kNN estimator (summed over
    components, averaged over tasks). A layer's importance is its gain I(h_l; y) - I(h_{l-1}; y)
    (clipped at a small floor): layers that create task-relevant features need precision most.
    """
    import torch
    from sklearn.decomposition import PCA
    from sklearn.feature_selection import mutual_info_classif

    rows = labelled_prompts(cfg, limit, cache_dir)
    device = next(model.parameters()).device
    states: list[list[np.ndarray]] = []
    model.eval()
    with torch.no_grad():
        for prompt, _, _ in rows:
            ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
            states.append([h[0, -1].float().cpu().numpy() for h in hidden])
    labels = np.array([r[1] for r in rows])
    tasks = np.array([r[2] for r in rows])
    n_layers = model.config.num_hidden_layers
    mi = np.zeros(n_layers + 1)  # index 0 = embeddings
    for t in np.unique(tasks):
        pick = tasks == t
        for layer in range(n_layers + 1):
            x = np.stack([s[layer] for s, keep in zip(states, pick) if keep])
            k = min(components, x.shape[0] - 1, x.shape[1])
            x = PCA(n_components=k, random_state=0).fit_transform(x)
            mi[layer] += mutual_info_classif(x, labels[pick], random_state=0, n_neighbors=3).sum()
    mi /= len(np.unique(tasks))
    gain = np.diff(mi)
    floor = 1e-3 * max(float(np.abs(gain).max()), 1e-9)
    return [float(max(g, floor)) for g in gain]


def quant_loss_importance(model, tokenizer, cfg: Config, cache_dir: Optional[str | Path] = None) -> list[float]:
    """Increase in LM loss on calibration text when only that layer is quantized to the lowest bit-width."""
    import copy

    import torch

    from qpruner.data import calibration_texts
    from qpruner.quantize import quantize_model

    texts = calibration_texts(cfg.prune.calibration, Path(cache_dir or cfg.output.cache))
    device = next(model.parameters()).device
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=cfg.prune.calibration.seq_len)
    batch = {k: v.to(device) for k, v in batch.items()}
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    def loss_of(m) -> float:
        with torch.no_grad():
            return float(m(**batch, labels=labels).loss)

    base = loss_of(model)
    low = min(cfg.quant.bits)
    n_layers = model.config.num_hidden_layers
    scores = []
    for layer in range(n_layers):
        one = copy.deepcopy(model)
        bits = [16] * n_layers
        bits[layer] = low
        quantize_model(one, bits, cfg.quant, device=str(device))
        scores.append(max(loss_of(one) - base, 0.0) + 1e-6)
        del one
    return scores
