"""Layer importance: one positive score per decoder layer of the pruned model, higher = needs more
precision. It feeds the search's first configurations (`search.bit_probabilities`).

Methods (`search.importance`): `mi` (mutual information between each layer's output and the model's
own prediction, on lm-eval's requests of the validation tasks), `quant_loss` (loss increase when only
that layer is quantized), `taylor` (the pruner's stored Taylor score).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from qpruner.config import Config
from qpruner.errors import ConfigError


def importance_task(plan) -> list[float]:
    """Ray task body: the pruned model's per-layer importance from the driver's run plan (qpruner.plan.RunPlan)."""
    return pruned_importance(plan.cfg, plan.pruned_path)


def pruned_importance(cfg: Config, pruned_path: str) -> list[float]:
    """The pruned model's per-layer importance with the configured method (`search.importance`); inside
    Ray, a GPU only if Ray gave this task one."""
    from qpruner.plan import task_device
    from qpruner.prune import load_pruned

    if cfg.search.importance == "taylor":
        return taylor_importance(pruned_path)
    model, tokenizer = load_pruned(pruned_path, dtype=cfg.quant.compute_dtype, device=task_device())
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


def mi_importance(model, tokenizer, cfg: Config, cache_dir: Optional[str | Path] = None, docs: slice = slice(0, 64),
                  components: int = 4, n_neighbors: int = 5, seed: int = 0) -> list[float]:
    """Mutual-information importance (paper §3.2): I(X_l; Y) between each decoder layer's output X_l
    and the model's OWN prediction Y, on the validation tasks' docs `docs` (the per-task doc limit;
    default the first 64: under a second on the tiny model, ~1,800 short forward passes for the seven
    paper tasks), averaged over tasks.

    Samples per task type: `task_samples`. The score is I(h_l; Y) itself, as the paper defines it,
    not its gain over the previous layer: the gain is a difference of two noisy estimates and ranked
    the tiny model's layers less alike on disjoint docs. Floored at a small positive value.

    A task validated on documents held out of its final score (no disjoint split), and every subtask of
    a group, reads at most the documents quick validation holds out (`validation_limits`), so importance
    never reads a document the final score counts.
    """
    from qpruner.evaluate import load_tasks, validation_limits, validation_tasks

    tasks = load_tasks(*validation_tasks(cfg, cache_dir))["tasks"]
    held = {leaf: n for per_task in validation_limits(cfg, cache_dir).values() for leaf, n in per_task.items()}

    def window(name: str) -> slice:
        return slice(docs.start, min(docs.stop, held[name])) if name in held and docs.stop is not None else docs

    mi = np.mean([layer_information(*task_samples(model, tokenizer, task, window(name)), components=components,
                                    n_neighbors=n_neighbors, seed=seed) for name, task in tasks.items()], axis=0)
    floor = 1e-3 * max(float(mi.max()), 1e-9)
    return [float(max(m, floor)) for m in mi[1:]]  # mi[0] is the embeddings


def task_samples(model, tokenizer, task, docs: slice = slice(0, 64), positions: int = 8,
                 classes: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of one lm-eval task: x (samples, layers + 1, features) holds the embeddings' and every
    decoder layer's output read through the model's own final norm and unembedding ("logit lens"),
    y the model's own prediction.

    The requests are lm-eval's (`build_all_requests`, then `task.instances`), so every task type's
    prompt, choices and target delimiter are lm-eval's own. Docs are picked by their index in the
    evaluation split (`docs`), so disjoint slices give disjoint samples. generate_until is refused.
    """
    from qpruner.evaluate import quiet_lm_eval

    kind = task.OUTPUT_TYPE
    if kind == "generate_until":
        raise ConfigError("search.importance", f"'mi' needs loglikelihood or multiple-choice tasks, and "
                          f"{task.config.task!r} generates text; use search.importance: quant_loss, or drop it from eval.tasks")
    with quiet_lm_eval():
        task.build_all_requests(limit=docs.stop, rank=0, world_size=1)
    wanted = set(range(len(task.eval_docs))[docs])
    instances = [i for i in task.instances if i.doc_id in wanted]
    if kind == "multiple_choice":
        return choice_samples(model, tokenizer, instances)
    return token_samples(model, tokenizer, instances, positions=positions, classes=classes)


def choice_samples(model, tokenizer, instances) -> tuple[np.ndarray, np.ndarray]:
    """multiple_choice and multiple_input docs: one sample per (doc, choice).

    Y_doc = the choice with the highest summed continuation log-likelihood (what lm-eval's acc picks);
    the target is "this choice is Y_doc". X_l = the continuation's log-likelihood read from layer l's
    output (logit lens), minus its mean over the doc's choices so the doc's shared content cancels:
    what layer l already says about each choice, for choices outside the prompt too (PIQA, ARC,
    WinoGrande's contexts). The paper's X is the raw layer output; read raw at the last token it
    carried almost no choice information on the tiny model (split-half layer ranks uncorrelated).
    """
    seqs = [_encode_pair(tokenizer, *inst.arguments) for inst in instances]
    scored = [np.arange(len(ids) - n - 1, len(ids) - 1) for ids, n in seqs]  # positions that predict the continuation
    logp, _ = _forward(model, tokenizer, seqs, scored, next_token=True)
    owner = np.repeat(np.arange(len(seqs)), [len(p) for p in scored])
    loglik = np.zeros((len(seqs), logp.shape[1]))
    np.add.at(loglik, owner, logp[:, :, 0])
    doc_ids = np.array([inst.doc_id for inst in instances])
    x, y = np.empty_like(loglik), np.zeros(len(instances), dtype=np.int64)
    for doc in np.unique(doc_ids):
        rows = np.flatnonzero(doc_ids == doc)
        x[rows] = loglik[rows] - loglik[rows].mean(axis=0)
        y[rows[int(np.argmax(loglik[rows, -1]))]] = 1
    return x[:, :, None], y


def token_samples(model, tokenizer, instances, positions: int = 8, classes: int = 8,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """loglikelihood / loglikelihood_rolling docs (no choices): up to `positions` seeded token positions
    per doc. Y = the model's next-token argmax there, bucketed into the `classes` most frequent
    predicted tokens plus "other" so the kNN estimator sees few classes; X_l = layer l's logit-lens
    log-probabilities of those `classes` tokens."""
    rng = np.random.default_rng(seed)
    seqs = [_encode_pair(tokenizer, *inst.arguments) if len(inst.arguments) == 2 else
            _encode_pair(tokenizer, "", inst.arguments[0]) for inst in instances]
    picks = [np.sort(rng.choice(len(ids) - 1, size=min(positions, len(ids) - 1), replace=False)) for ids, _ in seqs]
    predicted = _forward(model, tokenizer, seqs, picks, next_token=True)[1]
    values, counts = np.unique(predicted, return_counts=True)
    top = np.sort(values[np.argsort(-counts, kind="stable")[:classes]])
    x, _ = _forward(model, tokenizer, seqs, picks, tokens=top)
    y = np.where(np.isin(predicted, top), np.searchsorted(top, predicted), len(top))
    return x, y


def _encode_pair(tokenizer, context: str, continuation: str, max_len: int = 512) -> tuple[list[int], int]:
    """(token ids, continuation length) the way lm-eval's HFLM encodes a request: trailing spaces of the
    context move to the continuation, the whole is encoded once and split; an empty context gets the
    BOS (else EOS) token as prefix. Left-truncated to `max_len` tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        return ([prefix] + cont)[-max_len:], min(len(cont), max_len - 1)
    whole = tokenizer.encode(context + continuation)
    n_ctx = len(tokenizer.encode(context))
    return whole[-max_len:], min(len(whole) - n_ctx, max_len - 1)


def padded_batches(sequences: Sequence[Sequence[int]], pad: int = 0, size: int = 16):
    """(first index, input ids, attention mask) of right-padded batches of token-id sequences, on the CPU:
    the one padder of the importance and sensitivity passes."""
    import torch

    for start in range(0, len(sequences), size):
        chunk = sequences[start:start + size]
        ids = torch.full((len(chunk), max(map(len, chunk))), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(chunk):
            ids[row, :len(seq)], mask[row, :len(seq)] = torch.tensor(list(seq)), 1
        yield start, ids, mask


def _forward(model, tokenizer, seqs: list[tuple[list[int], int]], picks: list[np.ndarray], next_token: bool = False,
             tokens: Optional[np.ndarray] = None, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Run (ids, continuation length) sequences, right-padded in batches; one row per picked position.

    Gives (read-outs, the model's argmax next token). Read-outs (rows, layers + 1, k) are each layer's
    logit-lens log-probabilities: of the actual next token (`next_token`, k = 1) or of `tokens`; the
    last hidden state is already normed, so it reads exactly the model's logits.
    """
    import torch

    device = next(model.parameters()).device
    norm, head = model.get_decoder().norm, model.get_output_embeddings()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    reads, argmax = [], []
    model.eval()
    with torch.no_grad():
        for start, ids, mask in padded_batches([seq for seq, _ in seqs], pad, batch_size):
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
            last = len(out.hidden_states) - 1
            for row in range(len(ids)):
                at = torch.as_tensor(picks[start + row], device=device)
                wanted = ids[row, at.cpu() + 1, None].to(device) if next_token else torch.as_tensor(tokens, device=device).expand(len(at), -1)
                per_layer = [torch.log_softmax(head(h[row, at] if i == last else norm(h[row, at])).float(), -1).gather(-1, wanted)
                             for i, h in enumerate(out.hidden_states)]
                reads.append(torch.stack(per_layer, dim=1).cpu().numpy())
                argmax.append(out.logits[row, at].argmax(-1).cpu().numpy())
    return np.concatenate(reads), np.concatenate(argmax)


def layer_information(x: np.ndarray, y: np.ndarray, components: int = 4, n_neighbors: int = 5,
                      seed: int = 0) -> np.ndarray:
    """I(X_l; Y) for each layer l of `x` (samples, layers, features), see `mutual_information`."""
    return np.array([mutual_information(x[:, layer], y, components, n_neighbors, seed) for layer in range(x.shape[1])])


def mutual_information(x: np.ndarray, y: np.ndarray, components: int = 4, n_neighbors: int = 5, seed: int = 0) -> float:
    """I(X; Y) in nats for continuous X (samples, features) and discrete Y: the kNN estimator of Ross
    (2014), the one sklearn's mutual_info_classif uses per feature, here on the JOINT standardised first
    `components` principal components (summing per-feature estimates would count shared information
    once per component). Seeded; clipped at 0; 0 for a constant X."""
    from scipy.special import digamma
    from sklearn.neighbors import KDTree, NearestNeighbors

    y = np.asarray(y)
    z = _project(np.asarray(x, dtype=np.float64).reshape(len(y), -1), components, seed)
    if z is None:
        return 0.0
    radius, k_used, class_size = np.zeros(len(y)), np.zeros(len(y)), np.zeros(len(y))
    for label in np.unique(y):
        rows = y == label
        class_size[rows] = rows.sum()
        if rows.sum() > 1:
            k_used[rows] = min(n_neighbors, rows.sum() - 1)
            nn = NearestNeighbors(n_neighbors=int(k_used[rows][0]), metric="chebyshev").fit(z[rows])
            radius[rows] = np.nextafter(nn.kneighbors()[0][:, -1], 0)
    keep = class_size > 1
    if keep.sum() < 2:
        return 0.0
    z, radius, k_used, class_size = z[keep], radius[keep], k_used[keep], class_size[keep]
    within = KDTree(z, metric="chebyshev").query_radius(z, radius, count_only=True)
    mi = digamma(len(z)) + digamma(k_used).mean() - digamma(class_size).mean() - digamma(within).mean()
    return float(max(mi, 0.0))


def _project(x: np.ndarray, components: int, seed: int) -> Optional[np.ndarray]:
    """The first `components` principal components of x, each scaled to unit variance, plus a 1e-10
    seeded jitter that breaks ties (as sklearn does); None when x is constant."""
    from sklearn.decomposition import PCA

    x = x[:, x.std(axis=0) > 1e-12]
    if x.shape[1] == 0:
        return None
    if x.shape[1] > components:
        x = PCA(n_components=min(components, len(x) - 1), random_state=seed).fit_transform(x)
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    return x + 1e-10 * np.random.default_rng(seed).standard_normal(x.shape)


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

