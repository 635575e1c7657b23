"""Predict before you train: a per-layer sensitivity table, a performance model, and its front.

Every configuration the search trains costs a LoftQ + fine-tune + evaluation. AutoMixQ and RankAdaptor
replace most of that with a lightweight performance model; this module is qpruner's:

1. **Sensitivity table** (`sensitivity_table`, a Ray task in a run): for every decoder layer and every
   choice (bit-width, and LoRA rank when ranks are searched), with ONLY that layer at its LoftQ
   initialisation (dequantized weight + B A, what the adapted layer computes at step 0) and every
   other layer unquantized, two numbers on the validation documents (the quick validator's requests,
   prompt + answer):
   - `kl`: mean per-token KL(p_pruned || p_changed) of the next-token distributions;
   - `fisher`: NVIDIA ModelOpt AutoQuantize's score sum (g * (Y - Y_q))^2 over the layer's adapted
     Linears, g the LM-loss gradient w.r.t. each Linear's output on the pruned model (one backward
     pass), Y - Y_q = x (W - W_q)^T.
   Cached like LoftQ, once per pruned model, settings and documents, with what it cost.
2. **Performance model** (`PerformanceModel`): Bayesian linear regression of the search objective on
   [1, S(x), one-hot per unit and choice], S(x) the configuration's summed sensitivity. Until MIN_FIT
   trials have completed it ranks by -S alone; then each finished trial refits it (hyperparameters by marginal likelihood on
   a small grid), the one-hot terms learning what the table misses. Its predictive standard deviation
   is the uncertainty. Memory needs no model: it adds up per layer exactly (`UnitTable.memory_bytes`).
3. **Predicted front** (`predicted_front`): the configurations of best predicted objective for every
   memory budget, solved exactly by a Pareto dynamic program over units (the prediction's mean and
   memory are both sums over units).
4. **`search.sampler: model`** (`ModelSampler`, an Optuna sampler): Thompson sampling: draw the
   coefficients from the posterior, solve the front for that draw, and train the unseen configuration
   of largest hypervolume gain under it, so the model explores where it is unsure.

Trials that ASHA stopped enter the sampler's model only when the objective is val_logprob, at their last
validation plus the completed trials' mean gain from that step (`at_fidelity`): for accuracy and perplexity
a stopped trial has no value of the objective at any fidelity. The report's model (`run_model`) fits the
completed trials only (results.parquet keeps no per-step curves).

    python -m qpruner.predict --run runs/tiny --max-memory-gb 0.05      # from a finished run
    python -m qpruner.predict --config tune_configs/tiny.yaml --max-memory-gb 0.05 [--train]
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from qpruner.config import Config
from qpruner.results import write_json_atomic

SENSITIVITY_VERSION = 1  # bump when the stored numbers change meaning
MAX_TOKENS = 2048  # validation tokens the table reads (first documents first)
MIN_FIT = 3  # completed trials before the model is fitted; with fewer it ranks by the table alone
Choice = tuple[int, Optional[int]]  # (bits, LoRA rank or None when ranks are not searched)


# ---------------------------------------------------------------------------------------------
# 1. The sensitivity table


@dataclass
class SensitivityTable:
    """Per decoder layer and choice: kl, fisher, and the bytes the layer adds to the memory objective."""

    choices: list[list]  # [[bits, rank or None], ...]
    kl: list[list[float]]  # (layers, choices)
    fisher: list[list[float]]  # (layers, choices)
    layer_bytes: list[list[int]]  # (layers, choices): the layer's share of the memory objective
    offset_bytes: int  # the memory objective's part that no choice changes (embeddings, activations...)
    memory_objective: str
    tokens: int
    seconds: float
    settings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "SensitivityTable":
        return cls(**data)


def search_choices(cfg: Config) -> list[Choice]:
    """Every per-unit choice the search can make: bit-widths, times LoRA ranks when ranks are searched."""
    ranks = sorted(set(cfg.search.ranks)) if cfg.search.ranks else [None]
    return [(int(b), r) for b in sorted(set(cfg.quant.bits)) for r in ranks]


def sensitivity_task(plan) -> dict:
    """Ray task body: the pruned model's sensitivity table (as JSON data) from the driver's run plan."""
    from qpruner.plan import task_device
    from qpruner.prune import load_pruned

    cfg = plan.cfg
    model, tokenizer = load_pruned(plan.pruned_path, dtype=cfg.quant.compute_dtype, device=task_device())
    return sensitivity_table(model, tokenizer, cfg, Path(plan.pruned_path).name, tasks=plan.tasks).to_json()


def sensitivity_table(model, tokenizer, cfg: Config, model_key: str, tasks=None,
                      max_tokens: int = MAX_TOKENS) -> SensitivityTable:
    """The table for this pruned model (module docstring), from the cache when it was measured before."""
    import torch

    if cfg.resources.threads:
        torch.set_num_threads(int(cfg.resources.threads))
    sequences = validation_sequences(model, tokenizer, cfg, tasks, max_tokens)
    choices = search_choices(cfg)
    settings = {"version": SENSITIVITY_VERSION, "choices": choices, "quant": _quant_key(cfg),
                "lora": [cfg.lora.rank, cfg.lora.loftq_iters, sorted(cfg.lora.target_modules), cfg.lora.dropout],
                "memory": [cfg.search.memory_objective, cfg.finetune.micro_batch_size, cfg.finetune.max_length],
                "sequences": hashlib.sha256(json.dumps(sequences).encode()).hexdigest()[:16]}
    path = Path(cfg.output.cache) / "sensitivity" / model_key / (
        hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24] + ".json")
    if path.is_file():
        try:
            return SensitivityTable.from_json(json.loads(path.read_text()))
        except (ValueError, TypeError):  # half-written or from another version: measure again
            pass
    started = time.perf_counter()
    deltas = weight_deltas(model, cfg, choices, model_key)
    kl = kl_scores(model, sequences, deltas, len(choices))
    fisher = fisher_scores(model, sequences, deltas, len(choices))
    layer_bytes, offset = memory_terms(model, cfg, choices)
    table = SensitivityTable([list(c) for c in choices], kl, fisher, layer_bytes, offset, cfg.search.memory_objective,
                             sum(len(s) for s in sequences), time.perf_counter() - started, settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(table.to_json(), path)
    return table


def _quant_key(cfg: Config) -> list:
    q = cfg.quant
    return [q.quant_type, q.blocksize, q.double_quant, q.compute_dtype]


def validation_sequences(model, tokenizer, cfg: Config, tasks=None, max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    """Token ids of the quick validator's requests (prompt + answer as lm-eval encodes them), distinct,
    in order, up to `max_tokens` tokens in all: the documents ASHA already ranks configurations on,
    never a document the final score counts."""
    from qpruner.evaluate import gold_requests, load_tasks, validated_tasks, validation_limits
    from qpruner.importance import _encode_pair

    if tasks is None:
        loaded, limits = validated_tasks(cfg, cfg.output.cache), validation_limits(cfg, cfg.output.cache)
    else:
        from qpruner.evaluate import VALIDATED_TYPES

        loaded = {n: t for n, t in load_tasks(tuple(tasks.val_names), tuple(tasks.include_paths))["tasks"].items()
                  if t.OUTPUT_TYPE in VALIDATED_TYPES}
        limits = tasks.val_limits
    per_leaf = {leaf: n for per_task in limits.values() for leaf, n in per_task.items()}
    seen, out, total = set(), [], 0
    for leaf, task in loaded.items():
        instances, _ = gold_requests(task, per_leaf.get(leaf, cfg.finetune.val_limit))
        for inst in instances:
            ids, _ = _encode_pair(tokenizer, *inst.arguments, max_len=cfg.finetune.max_length)
            key = tuple(ids)
            if len(ids) < 2 or key in seen:
                continue
            if total + len(ids) > max_tokens:
                return out
            seen.add(key)
            out.append(list(ids))
            total += len(ids)
    return out


def weight_deltas(model, cfg: Config, choices: Sequence[Choice], model_key: str) -> list[dict]:
    """Per choice {module name: W_q - W in float32}: W_q is the LoftQ initialisation at that choice
    (dequant(Q) + B A, qpruner.loftq.approximation; dequant(Q) alone when lora.loftq_iters is 0).
    LoftQ factors come from (and go to) the same cache the trials use."""
    from qpruner.loftq import approximation, loftq_for_model, quant_dequant, target_linears

    n_layers = model.config.num_hidden_layers
    linears = {name: linear for _, name, linear in target_linears(model, cfg.lora.target_modules)}
    out = []
    for bits, rank in choices:
        ranks = [rank] * n_layers if rank is not None else None
        inits, _ = loftq_for_model(model, [bits] * n_layers, cfg, cfg.output.cache, model_key, ranks=ranks)
        deltas = {}
        for name, linear in linears.items():
            w = linear.weight.data
            changed = approximation(w, inits[name], bits, cfg.quant) if name in inits else quant_dequant(w, bits, cfg.quant)
            deltas[name] = (changed.to(w.device) - w.float())
        out.append(deltas)
    return out


def _batches(sequences: list[list[int]], device, size: int = 64):
    """(input ids, attention mask) right-padded batches of the sequences (qpruner.importance.padded_batches), on `device`."""
    from qpruner.importance import padded_batches

    for _, ids, mask in padded_batches(sequences, 0, size):
        yield ids.to(device), mask.to(device)


def _layer_of(name: str) -> int:
    return int(name.split("model.layers.")[1].split(".")[0])


def kl_scores(model, sequences: list[list[int]], deltas: list[dict], n_choices: int) -> list[list[float]]:
    """(layers, choices) mean per-token KL(p_pruned || p_changed), one layer changed at a time."""
    import torch

    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        batches = list(_batches(sequences, device))  # padded once, read by every (layer, choice) pass
        base = [torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1) for ids, mask in batches]
        masks = [mask.bool() for _, mask in batches]
        n_tokens = float(sum(int(m.sum()) for m in masks))
        modules = dict(model.named_modules())
        out = np.zeros((model.config.num_hidden_layers, n_choices))
        for layer in range(out.shape[0]):
            for c in range(n_choices):
                names = [n for n in deltas[c] if _layer_of(n) == layer]
                saved = {n: modules[n].weight.data.clone() for n in names}
                for n in names:
                    w = modules[n].weight.data
                    w.copy_((w.float() + deltas[c][n].to(w.device)).to(w.dtype))
                total = 0.0
                for (ids, mask), logp, keep in zip(batches, base, masks):
                    logq = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
                    total += float((logp.exp() * (logp - logq)).sum(-1)[keep].sum())
                for n in names:
                    modules[n].weight.data.copy_(saved[n])
                out[layer, c] = max(total / n_tokens, 0.0)
    return out.tolist()


def fisher_scores(model, sequences: list[list[int]], deltas: list[dict], n_choices: int) -> list[list[float]]:
    """(layers, choices) AutoQuantize score: sum over the layer's Linears and tokens of (g * x dW^T)^2.

    g is d(summed next-token loss / tokens)/dY for each Linear's output Y on the pruned model, taken by
    tensor hooks during one backward pass per batch (inputs_embeds carries the gradient; no weight
    gradient is kept); each choice's output change is x (W_q - W)^T on the same inputs."""
    import torch

    device = next(model.parameters()).device
    modules = dict(model.named_modules())
    names = list(deltas[0])
    out = np.zeros((model.config.num_hidden_layers, n_choices))
    n_tokens = float(sum(max(len(s) - 1, 0) for s in sequences))
    inputs: dict[str, Any] = {}

    def keep_input(name):
        def hook(module, args, output):
            x = args[0].detach()
            inputs[name] = x

            def on_grad(g, name=name, x=x):
                for c in range(n_choices):
                    dy = x.float() @ deltas[c][name].to(x.device).T
                    out[_layer_of(name), c] += float(((g.float() * dy) ** 2).sum())

            if output.requires_grad:
                output.register_hook(on_grad)
        return hook

    handles = [modules[n].register_forward_hook(keep_input(n)) for n in names]
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        embed = model.get_input_embeddings()
        for ids, mask in _batches(sequences, device):
            embeds = embed(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=embeds, attention_mask=mask).logits.float()
            labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                     ignore_index=-100, reduction="sum") / n_tokens
            loss.backward()
            inputs.clear()
    finally:
        for h in handles:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(requires[n])
    return out.tolist()


def memory_terms(model, cfg: Config, choices: Sequence[Choice]) -> tuple[list[list[int]], int]:
    """((layers, choices) bytes each layer adds to the memory objective, the constant rest).

    weights: the layer's quantized Linears (qpruner.memory.weight_bytes). finetune_peak adds the
    layer's LoRA factors at the choice's rank, their gradients and AdamW's two fp32 states (peft keeps
    adapters in float32: 16 bytes per trainable element), and puts the embeddings and the activations
    (qpruner.memory.activation_bytes) in the constant, as qpruner.memory.finetune_peak_estimate counts."""
    from qpruner.loftq import target_linears
    from qpruner.memory import activation_bytes, model_shapes, weight_bytes

    shapes = model_shapes(model)
    n_layers = len(shapes.layers)
    sides = [0] * n_layers  # per layer: sum of in + out over the adapted Linears
    for layer, _, linear in target_linears(model, cfg.lora.target_modules):
        sides[layer] += linear.in_features + linear.out_features
    table = []
    for bits, rank in choices:
        per_layer = weight_bytes(shapes, [bits] * n_layers, cfg.quant)["layers"]
        if cfg.search.memory_objective == "finetune_peak":
            r = rank if rank is not None else cfg.lora.rank
            per_layer = [b + 16 * r * s for b, s in zip(per_layer, sides)]
        table.append(per_layer)
    offset = shapes.other_bytes
    if cfg.search.memory_objective == "finetune_peak":
        offset += activation_bytes(model, cfg)
    return [list(map(int, row)) for row in np.array(table).T], int(offset)


# ---------------------------------------------------------------------------------------------
# Per search unit (a layer, or a group of layers with search.layer_groups)


@dataclass
class UnitTable:
    """The table summed over each search unit's layers: score and bytes per (unit, choice)."""

    choices: list[Choice]
    score: np.ndarray  # (units, choices)
    cost: np.ndarray  # (units, choices) bytes
    offset: float  # bytes no choice changes

    @classmethod
    def from_table(cls, table: SensitivityTable, n_units: int, kind: str = "kl") -> "UnitTable":
        from qpruner.search import layer_groups

        per_layer = np.asarray(getattr(table, kind), dtype=np.float64)
        costs = np.asarray(table.layer_bytes, dtype=np.float64)
        groups = layer_groups(per_layer.shape[0], n_units)
        choices = [(int(b), None if r is None else int(r)) for b, r in table.choices]
        return cls(choices, np.array([per_layer[g].sum(0) for g in groups]), np.array([costs[g].sum(0) for g in groups]),
                   float(table.offset_bytes))

    def index(self, config: dict) -> list[int]:
        """Per unit, the index of the configuration's choice (Tune/Optuna params b0.., r0..)."""
        n = self.score.shape[0]
        keys = [(int(config[f"b{u}"]), int(config[f"r{u}"]) if f"r{u}" in config else None) for u in range(n)]
        lookup = {c: i for i, c in enumerate(self.choices)}
        return [lookup[k] if k in lookup else lookup[(k[0], None)] for k in keys]

    def params(self, idx: Sequence[int]) -> dict:
        """Tune/Optuna params of per-unit choice indices (the inverse of `index`)."""
        out = {f"b{u}": self.choices[c][0] for u, c in enumerate(idx)}
        out.update({f"r{u}": self.choices[c][1] for u, c in enumerate(idx) if self.choices[c][1] is not None})
        return out

    def memory_bytes(self, idx: Sequence[int], offset: Optional[float] = None) -> float:
        return float((self.offset if offset is None else offset) + self.cost[np.arange(len(idx)), idx].sum())

    def total_score(self, idx: Sequence[int]) -> float:
        return float(self.score[np.arange(len(idx)), idx].sum())


# ---------------------------------------------------------------------------------------------
# 2. The performance model


class PerformanceModel:
    """Bayesian linear regression of the objective (higher is better) on per-unit choices.

    Features: intercept, the summed sensitivity S(x) scaled to [0, 1] over the space, and one-hot
    (unit, choice) indicators beyond each unit's first choice. Prior N(0, 10) on the intercept and
    N(-1, 10) on S's slope (in standard deviations of the objective: more sensitivity, lower
    objective), N(0, tau^2) on the one-hot terms; noise sigma^2. tau and sigma are picked on a grid by
    marginal likelihood. Objective values are standardised before fitting.
    """

    TAUS = (0.03, 0.1, 0.3, 1.0)
    SIGMAS = (0.05, 0.15, 0.4, 1.0)

    def __init__(self, units: UnitTable):
        self.units = units
        s = units.score
        self._s_lo = float(s.min(1).sum())
        self._s_span = max(float(s.max(1).sum()) - self._s_lo, 1e-12)
        self.fitted = False

    def features(self, idx: np.ndarray) -> np.ndarray:
        """(configs, features) of per-unit choice indices (configs, units)."""
        idx = np.atleast_2d(idx)
        n_units, n_choices = self.units.score.shape
        s = self.units.score[np.arange(n_units), idx].sum(1)
        onehot = np.zeros((len(idx), n_units, n_choices))
        onehot[np.arange(len(idx))[:, None], np.arange(n_units), idx] = 1.0
        return np.column_stack([np.ones(len(idx)), (s - self._s_lo) / self._s_span, onehot[:, :, 1:].reshape(len(idx), -1)])

    def fit(self, idx: Sequence[Sequence[int]], y: Sequence[float]) -> "PerformanceModel":
        y = np.asarray(y, dtype=np.float64)
        self.n = len(y)
        if self.n < MIN_FIT:  # an intercept, a slope and a noise level need more than two points
            self.fitted = False
            return self
        self._mu, self._sd = float(y.mean()), float(y.std()) if self.n > 1 and y.std() > 0 else 1.0
        z = (y - self._mu) / self._sd
        x = self.features(np.asarray(idx))
        best = None
        for tau in self.TAUS:
            for sigma in self.SIGMAS:
                post = self._posterior(x, z, tau, sigma)
                if best is None or post[3] > best[3]:
                    best = post
        self._mean, self._cov, self._sigma, _ = best
        self.fitted = True
        return self

    def _posterior(self, x: np.ndarray, z: np.ndarray, tau: float, sigma: float):
        """Posterior mean and covariance of the weights, and the log marginal likelihood."""
        p = x.shape[1]
        prior_mean = np.zeros(p)
        prior_mean[1] = -1.0
        prior_var = np.full(p, tau**2)
        prior_var[:2] = 10.0
        k = x @ (prior_var[:, None] * x.T) + sigma**2 * np.eye(len(z))  # marginal covariance of z
        resid = z - x @ prior_mean
        chol = np.linalg.cholesky(k)
        alpha = np.linalg.solve(chol.T, np.linalg.solve(chol, resid))
        evidence = -0.5 * resid @ alpha - np.log(np.diag(chol)).sum()
        gain = (prior_var[:, None] * x.T) @ np.linalg.inv(k)  # (p, n)
        mean = prior_mean + gain @ resid
        cov = np.diag(prior_var) - gain @ x @ np.diag(prior_var)
        return mean, (cov + cov.T) / 2, sigma, float(evidence)

    def unit_values(self, weights: Optional[np.ndarray] = None) -> tuple[float, np.ndarray]:
        """(constant, (units, choices) additive contributions) of the predicted objective, in its units;
        the prior ranking (-S) when nothing is fitted."""
        n_units, n_choices = self.units.score.shape
        if not self.fitted:
            return 0.0, -self.units.score
        w = self._mean if weights is None else weights
        per = w[1] * self.units.score / self._s_span
        per[:, 1:] += w[2:].reshape(n_units, n_choices - 1)
        return self._mu + self._sd * (w[0] - w[1] * self._s_lo / self._s_span), self._sd * per

    def predict(self, idx: Sequence[Sequence[int]]) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """(mean, standard deviation of a measurement) per configuration: the posterior's uncertainty
        of the mean plus the fitted trial-to-trial noise. Before any fit: (-S, None)."""
        idx = np.atleast_2d(np.asarray(idx))
        if not self.fitted:
            return -self.units.score[np.arange(idx.shape[1]), idx].sum(1), None
        x = self.features(idx)
        var = np.maximum(np.einsum("ij,jk,ik->i", x, self._cov, x), 0) + self._sigma**2
        return self._mu + self._sd * (x @ self._mean), self._sd * np.sqrt(var)

    def sample_weights(self, rng: np.random.Generator) -> np.ndarray:
        return rng.multivariate_normal(self._mean, self._cov, method="eigh")


def loo_spearman(units: UnitTable, idx: Sequence[Sequence[int]], y: Sequence[float]) -> Optional[float]:
    """Leave-one-out Spearman correlation of the model's predictions with the measured objective (each
    trial predicted from all the others); None with fewer than 4 trials or a constant objective."""
    idx, y = np.asarray(idx), np.asarray(y, dtype=np.float64)
    if len(y) < 4 or np.ptp(y) == 0:
        return None
    pred = [PerformanceModel(units).fit(np.delete(idx, i, 0), np.delete(y, i)).predict(idx[i:i + 1])[0][0]
            for i in range(len(y))]
    return _spearman(pred, y)


def prior_spearman(units: UnitTable, idx: Sequence[Sequence[int]], y: Sequence[float]) -> Optional[float]:
    """Spearman correlation of the table alone (-S) with the measured objective."""
    if len(y) < 3 or np.ptp(y) == 0:
        return None
    return _spearman(PerformanceModel(units).predict(np.asarray(idx))[0], y)


def _spearman(a, b) -> Optional[float]:
    from scipy.stats import spearmanr

    rho = spearmanr(a, b).statistic
    return None if np.isnan(rho) else float(rho)


# ---------------------------------------------------------------------------------------------
# 3. The predicted front


def pareto_dp(values: np.ndarray, cost: np.ndarray, max_states: int = 4096) -> list[tuple[float, float, list[int]]]:
    """Every non-dominated (total cost, total value, per-unit choice indices) of a sum over units.

    Exact multiple-choice knapsack front: extend the states unit by unit and drop every state that a
    cheaper (or equal) one matches in value. Should the front outgrow `max_states`, it is thinned to
    the best state per cost bin (never happens for the models measured; said in the result's length).
    """
    states = [(0.0, 0.0, [])]
    for u in range(values.shape[0]):
        grown = sorted(((c + cost[u, k], v + values[u, k], path + [k]) for c, v, path in states
                        for k in range(values.shape[1])), key=lambda s: (s[0], -s[1]))
        states, best = [], -np.inf
        for s in grown:
            if s[1] > best + 1e-15:
                states.append(s)
                best = s[1]
        if len(states) > max_states:
            bins = np.linspace(states[0][0], states[-1][0], max_states)
            keep = {}
            for s in states:
                b = int(np.searchsorted(bins, s[0]))
                if b not in keep or s[1] > keep[b][1]:
                    keep[b] = s
            states = sorted(keep.values(), key=lambda s: s[0])
    return states


def predicted_front(model: PerformanceModel, offset: Optional[float] = None) -> list[dict]:
    """The model's front: for every memory budget the configuration of best predicted objective, with
    its memory (bytes, GB), predicted mean and standard deviation, per-unit choice indices."""
    per = model.unit_values()[1]
    units = model.units
    rows = []
    for _, _, idx in pareto_dp(per, units.cost):
        mean, std = model.predict([idx])
        memory = units.memory_bytes(idx, offset)
        rows.append({"memory_bytes": memory, "memory_gb": memory / 1024**3, "predicted": float(mean[0]),
                     "predicted_std": None if std is None else float(std[0]), "choices": idx})
    return rows


def to_target(objective: str, values) -> np.ndarray:
    """What the performance model fits for search.objective's values: higher is better, and perplexity as
    -log(perplexity), the scale on which one layer's logit KL adds up (a layer's KL raises the log-perplexity,
    not the perplexity, by about its size)."""
    values = np.asarray(values, dtype=float)
    if objective == "perplexity":
        return -np.log(values)
    from qpruner.config import QUALITY

    return QUALITY[objective].oriented(values)


def from_target(objective: str, target) -> np.ndarray:
    """The inverse of `to_target`: a model prediction in the objective's own units."""
    target = np.asarray(target, dtype=float)
    if objective == "perplexity":
        return np.exp(-target)
    from qpruner.config import QUALITY

    return QUALITY[objective].oriented(target)


def best_under(front: list[dict], max_memory_gb: float) -> Optional[dict]:
    """The front's configuration of best predicted objective within `max_memory_gb` (None if none fits)."""
    fits = [r for r in front if r["memory_gb"] <= max_memory_gb]
    return max(fits, key=lambda r: r["predicted"]) if fits else None


def memory_offset(units: UnitTable, idx: Sequence[Sequence[int]], memory_bytes: Sequence[float]) -> float:
    """The memory objective's constant part, from finished trials (median of measured - per-unit sum)
    where there are any, else the table's analytic one."""
    if len(memory_bytes) == 0:
        return units.offset
    return float(np.median([m - units.memory_bytes(i, 0.0) for i, m in zip(idx, memory_bytes)]))


# ---------------------------------------------------------------------------------------------
# 4. The sampler


def _optuna_sampler_base():
    import optuna

    return optuna.samplers.BaseSampler


class ModelSampler(_optuna_sampler_base()):
    """`search.sampler: model`: proposes from the performance model, as an Optuna sampler, so the
    multi-objective study, the memory constraint, the record of earlier trials, ASHA and resume work as
    with any other sampler.

    Per trial it fits the model on the study's completed trials (objective = values[0], memory =
    values[1] in GB) and, when the objective is val_logprob, on the trials ASHA stopped, at their last
    validation plus the completed trials' mean gain from that step (`at_fidelity`); draws the coefficients
    from the posterior (Thompson sampling: where the model is
    unsure, draws disagree, and the search goes there), solves that draw's front exactly
    (`pareto_dp`), and proposes the configuration not yet in the study with the largest hypervolume
    gain over the measured front, under `max_memory_gb`. Until MIN_FIT trials completed it walks the
    table's own front. The whole proposal is made at the first parameter Optuna asks for and read back
    for the others, so it works with the fixed search space Ray Tune hands Optuna.
    """

    objective = "accuracy"  # a sampler pickled by a version before search.objective restores with this

    def __init__(self, units: UnitTable, seed: int = 0, max_memory_gb: Optional[float] = None, objective: str = "accuracy"):
        from optuna.samplers import RandomSampler

        self.units = units
        self.objective = objective  # search.objective: what values[0] is (see to_target)
        self._rng = np.random.default_rng(seed)
        self._fallback = RandomSampler(seed=seed)
        self._max_memory_gb = max_memory_gb
        self._proposals: dict[int, dict] = {}

    def reseed_rng(self) -> None:
        self._rng = np.random.default_rng()
        self._fallback.reseed_rng()

    def infer_relative_search_space(self, study, trial) -> dict:
        return {}

    def sample_relative(self, study, trial, search_space) -> dict:
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        if trial.number not in self._proposals:
            self._proposals[trial.number] = self.propose(study) or {}
        value = self._proposals[trial.number].get(param_name)
        if value is None or value not in getattr(param_distribution, "choices", ()):
            return self._fallback.sample_independent(study, trial, param_name, param_distribution)
        return value

    def after_trial(self, study, trial, state, values) -> None:
        self._proposals.pop(trial.number, None)

    def propose(self, study) -> Optional[dict]:
        """The next configuration's params, or None when no unseen configuration fits the budget."""
        from qpruner.search import params_key

        trials = study.get_trials(deepcopy=False)
        seen = {params_key(t.params) for t in trials if t.params}
        done = _completed(trials)
        fit_idx, fit_y = self.training_data(trials)
        idx, y = fit_idx[:len(done)], fit_y[:len(done)]  # the measured points
        mem = [t.values[1] * 1024**3 for t in done]
        model = PerformanceModel(self.units).fit(fit_idx, fit_y)
        offset = memory_offset(self.units, idx, mem)
        const, per = model.unit_values(model.sample_weights(self._rng)) if model.fitted else (0.0, -self.units.score)
        front = [(offset + c, v, path) for c, v, path in pareto_dp(per, self.units.cost)]
        fresh = [s for s in front if self._fits(s[0]) and params_key(self.units.params(s[2])) not in seen]
        if not fresh:  # the draw's front is taken (or over budget): other unseen configurations within budget
            fresh = self._unseen(per, offset, seen)
        if not fresh:
            return None
        if not model.fitted:  # too few measurements: spread over the table's front
            return self.units.params(fresh[int(self._rng.integers(len(fresh)))][2])
        gains = [hypervolume_gain(y, mem, const + v, m) for m, v, _ in fresh]
        return self.units.params(fresh[int(np.argmax(gains))][2])

    def training_data(self, trials) -> tuple[list[list[int]], list[float]]:
        """(choice indices, targets) the model is fitted on: the completed trials first (not repeats answered from
        the record), then, for the val_logprob objective, the ASHA-stopped ones at their fidelity (`at_fidelity`)."""
        from optuna.trial import TrialState

        from qpruner.search import CURVE_ATTR, FROM_RECORD

        done = _completed(trials)
        idx = [self.units.index(t.params) for t in done]
        y = [float(v) for v in to_target(self.objective, [t.values[0] for t in done])]
        if self.objective != "val_logprob":
            return idx, y
        stopped = [t for t in trials if t.state == TrialState.PRUNED and FROM_RECORD not in t.user_attrs
                   and t.user_attrs.get(CURVE_ATTR) and t.params]
        shifted = at_fidelity([(t.user_attrs.get(CURVE_ATTR, []), t.values[0]) for t in done],
                              [t.user_attrs[CURVE_ATTR] for t in stopped])
        kept = [(t, v) for t, v in zip(stopped, shifted) if v is not None]
        return idx + [self.units.index(t.params) for t, _ in kept], y + [v for _, v in kept]

    def _fits(self, memory_bytes: float) -> bool:
        return self._max_memory_gb is None or memory_bytes / 1024**3 <= self._max_memory_gb

    def _unseen(self, per: np.ndarray, offset: float, seen: set, draws: int = 2000) -> list:
        """Up to `draws` seeded random configurations not in the study and within budget, as (memory, value, idx)."""
        from qpruner.search import params_key

        n_units, n_choices = per.shape
        out, keys = [], set()
        for _ in range(draws):
            idx = [int(c) for c in self._rng.integers(n_choices, size=n_units)]
            key = params_key(self.units.params(idx))
            memory = self.units.memory_bytes(idx, offset)
            if key not in seen and key not in keys and self._fits(memory):
                keys.add(key)
                out.append((memory, float(per[np.arange(n_units), idx].sum()), idx))
        return out


def _completed(trials) -> list:
    """The study's completed trials, less repeats answered from the record (they would count a measurement twice)."""
    from optuna.trial import TrialState

    from qpruner.search import FROM_RECORD

    return [t for t in trials if t.state == TrialState.COMPLETE and FROM_RECORD not in t.user_attrs and t.values]


def at_fidelity(completed: Sequence[tuple[Sequence, float]], stopped: Sequence[Sequence]) -> list[Optional[float]]:
    """Stopped trials' estimated final validation log-prob: each one's last report plus the mean gain from that
    report step to the end among completed trials (`completed`: (curve, final value); a curve is [[step, value],
    ...]) that reported at the same step; None where none did.

    Measured on the tiny table (benchmarks/predictor_tiny.py, `fidelity`): with 4 completed and 4 stopped trials
    at ASHA's first rung, the model's Spearman on the unseen configurations is 0.17 ± 0.76 from the completed
    ones alone, 0.95 ± 0.05 with the stopped ones as if final, 0.98 ± 0.02 shifted like this (0.98 ± 0.01 had all 8
    been trained)."""
    gains: dict[int, list[float]] = {}
    for curve, final in completed:
        for step, value in curve:
            gains.setdefault(int(step), []).append(float(final) - float(value))
    out: list[Optional[float]] = []
    for curve in stopped:
        step, value = curve[-1]
        out.append(float(value) + float(np.mean(gains[int(step)])) if gains.get(int(step)) else None)
    return out


def hypervolume_gain(y: Sequence[float], mem: Sequence[float], y_new: float, mem_new: float) -> float:
    """Hypervolume (objective up, memory down) that (y_new, mem_new) adds to the measured points; the
    reference is the worst measured objective minus half its range and 1.1 x the largest memory."""
    from qpruner.pareto import hypervolume

    ys, ms = list(y) + [y_new], list(mem) + [mem_new]
    span = max(np.ptp(ys), 1e-9)
    ref = (min(ys) - 0.5 * span, 1.1 * max(ms))
    return hypervolume(ys, ms, *ref) - (hypervolume(list(y), list(mem), *ref) if y else 0.0)


def first_points(units: UnitTable, n: int, anchors: bool = True) -> list[dict]:
    """`search.sampler: model`'s first configurations: the uniform lowest and highest choices (anchors),
    then `n` points of the table's own front (-S against memory) at evenly spaced memory."""
    n_units, n_choices = units.score.shape
    out = [units.params([0] * n_units), units.params([n_choices - 1] * n_units)] if anchors and n_choices > 1 else []
    front = pareto_dp(-units.score, units.cost)
    inner = front[1:-1] or front
    for i in np.unique(np.linspace(0, len(inner) - 1, n).round().astype(int)) if n > 0 else []:
        params = units.params(inner[i][2])
        if params not in out:
            out.append(params)
    return out


def table_path(run: str | Path) -> Path:
    """Where a run keeps its sensitivity table (written by qpruner.tune when the sampler is `model`)."""
    return Path(run) / "sensitivity.json"


# ---------------------------------------------------------------------------------------------
# 5. What a finished run says about its model


def run_model(run: str | Path) -> Optional[dict]:
    """The performance model of a run that kept a sensitivity table, fitted on its completed trials: the
    unit table, the fitted model, the trials' choice indices, objective and memory, and the memory
    offset; None for a run without a table."""
    from qpruner.config import config_from_dict
    from qpruner.pareto import completed
    from qpruner.runfolder import read_json, read_results
    from qpruner.search import search_units

    run = Path(run)
    if not table_path(run).is_file():
        return None
    table = SensitivityTable.from_json(read_json(table_path(run)))
    cfg = config_from_dict(read_json(run / "run.json")["config"])
    n_layers = len(table.kl)
    units = UnitTable.from_table(table, search_units(cfg, n_layers), cfg.search.sensitivity)
    done = [r for r in completed(read_results(run)).to_pylist() if not str(r["trial_id"]).startswith("baseline:")]
    done.sort(key=lambda r: r.get("finished_at") or r.get("started_at") or 0)  # in the order they arrived
    idx = [units.index(_unit_params(r, units)) for r in done]
    y = [float(v) for v in to_target(cfg.search.objective, [r[cfg.search.objective] for r in done])]
    mem = [float(r["memory_bytes"]) for r in done]
    return {"table": table, "units": units, "model": PerformanceModel(units).fit(idx, y), "idx": idx, "y": y,
            "memory": mem, "offset": memory_offset(units, idx, mem), "trials": [r["trial_id"] for r in done],
            "kind": cfg.search.sensitivity, "objective": cfg.search.objective}


def _unit_params(row: dict, units: UnitTable) -> dict:
    """A results row's per-layer bits (and ranks) as per-unit params (a group's first layer speaks for it)."""
    from qpruner.search import layer_groups

    groups = layer_groups(len(row["bits"]), units.score.shape[0])
    params = {f"b{u}": int(row["bits"][g[0]]) for u, g in enumerate(groups)}
    if row.get("ranks"):
        params.update({f"r{u}": int(row["ranks"][g[0]]) for u, g in enumerate(groups)})
    return params


def write_predictions(run: str | Path) -> Optional[dict]:
    """predicted_front.parquet and performance_model.json in the run folder (None without a table):
    the predicted front with its uncertainty, and the model's quality (leave-one-out Spearman against
    the measured objective, and the table's own ranking's)."""
    import pyarrow as pa

    from qpruner.results import write_parquet_atomic
    from qpruner.search import expand

    fitted = run_model(run)
    if fitted is None:
        return None
    run, units, n_layers = Path(run), fitted["units"], len(fitted["table"].kl)
    front = predicted_front(fitted["model"], fitted["offset"])
    rows = [{"memory_gb": r["memory_gb"], "memory_bytes": int(r["memory_bytes"]), **in_units(fitted["objective"], r),
             "bits": expand([units.choices[c][0] for c in r["choices"]], n_layers),
             "ranks": expand([units.choices[c][1] for c in r["choices"]], n_layers) if units.choices[0][1] else None}
            for r in front]
    write_parquet_atomic(pa.Table.from_pylist(rows), run / "predicted_front.parquet")
    idx, y = fitted["idx"], fitted["y"]
    quality = {"sensitivity": fitted["kind"], "objective": fitted["objective"], "trials": len(y),
               "loo_spearman": loo_spearman(units, idx, y),
               # as trials arrived (completion order): the leave-one-out figure over the first k completed trials
               "loo_spearman_by_trials": {k: loo_spearman(units, idx[:k], y[:k]) for k in range(4, len(y) + 1)},
               "table_spearman": prior_spearman(units, fitted["idx"], fitted["y"]),
               "table_seconds": fitted["table"].seconds, "table_tokens": fitted["table"].tokens,
               "fitted": fitted["model"].fitted}
    write_json_atomic(quality, run / "performance_model.json")
    return {"front": rows, "quality": quality}


def in_units(objective: str, row: dict) -> dict:
    """A predicted front row's value in the objective's own units: `predicted`, `predicted_std` (in the
    model's space, see to_target), and `predicted_low` / `predicted_high`, the ±1 standard deviation band
    mapped back (a perplexity band is not symmetric). Before the model is fitted (std None) `predicted` is the
    table's score -S, which has no units: it stays as it is."""
    mean, std = row["predicted"], row["predicted_std"]
    if std is None:
        return {"predicted": mean, "predicted_std": None, "predicted_low": None, "predicted_high": None}
    ends = sorted(float(v) for v in from_target(objective, [mean - std, mean + std]))
    return {"predicted": float(from_target(objective, mean)), "predicted_std": std,
            "predicted_low": ends[0], "predicted_high": ends[1]}


def quality_lines(quality: dict, trial_seconds: Optional[float] = None) -> list[str]:
    """report.md's lines on the performance model."""
    def rho(x):
        return "n/a (fewer than 4 completed trials, or all equal)" if x is None else f"{x:+.2f}"

    cost = f"{quality['table_seconds']:.0f}s on {quality['table_tokens']} validation tokens"
    if trial_seconds:
        cost += f" (a completed trial took {trial_seconds:.0f}s on average)"
    arrived = ", ".join(f"{k}: {rho(v)}" for k, v in quality.get("loo_spearman_by_trials", {}).items() if v is not None)
    return [f"- Sensitivity table (`{quality['sensitivity']}`): {cost}.",
            f"- Predictor quality over {quality['trials']} completed trials: leave-one-out Spearman {rho(quality['loo_spearman'])} "
            f"against the measured {quality.get('objective', 'accuracy')}; the table alone ranks them at {rho(quality['table_spearman'])}."
            + (f" As trials arrived (completed trials: Spearman): {arrived}." if arrived else ""),
            "- Predicted front (dashed in pareto.png, band = ±1 standard deviation): `predicted_front.parquet`; "
            "`qpruner predict --run <this folder> --max-memory-gb X` gives the best configuration under X GB."]


# ---------------------------------------------------------------------------------------------
# `qpruner predict`


def _from_run(run: str) -> tuple[Config, str, PerformanceModel, float]:
    """(config, pruned model path, fitted model, memory offset) of a finished run with a sensitivity table."""
    from qpruner.config import config_from_dict
    from qpruner.errors import QPrunerError
    from qpruner.plan import resolve_config
    from qpruner.runfolder import check_run_dir, read_json

    folder = check_run_dir(run)
    fitted = run_model(folder)
    if fitted is None:
        raise QPrunerError(f"--run: {folder} has no sensitivity.json (its search did not use search.sampler: model); "
                           f"predict from its recipe instead: qpruner predict --config <its config.yaml> --max-memory-gb X")
    marker = read_json(folder / "run.json")
    return resolve_config(config_from_dict(marker["config"])), marker["pruned_path"], fitted["model"], fitted["offset"]


def _from_config(cfg: Config, tasks) -> tuple[str, PerformanceModel, float]:
    """(pruned model path, unfitted model, analytic memory offset) from the recipe alone: prune (cached)
    and measure the sensitivity table (cached), no training."""
    from qpruner.prune import load_pruned, prune_cached
    from qpruner.search import search_units

    pruned = prune_cached(cfg)
    model, tokenizer = load_pruned(str(pruned.path), dtype=cfg.quant.compute_dtype)
    table = sensitivity_table(model, tokenizer, cfg, Path(pruned.path).name, tasks=tasks)
    print(f"[qpruner] sensitivity table: {table.seconds:.1f}s when measured, {table.tokens} validation tokens", flush=True)
    units = UnitTable.from_table(table, search_units(cfg, len(table.kl)), cfg.search.sensitivity)
    return str(pruned.path), PerformanceModel(units), units.offset


def main(argv: Optional[Sequence[str]] = None) -> int:
    from qpruner.cli import base_parser, load_cli_config, set_offline_defaults
    from qpruner.errors import ConfigError, QPrunerError
    from qpruner.pareto import compact_bits
    from qpruner.search import expand

    set_offline_defaults(argv)
    parser = base_parser("qpruner predict", "The best configuration under a memory budget, from the performance model "
                         "of a finished run (--run) or from the sensitivity table alone (--config), without training.",
                         config_required=False)
    parser.add_argument("--run", default=None, help="a finished run folder whose search used search.sampler: model")
    parser.add_argument("--max-memory-gb", type=float, required=True, help="the memory objective's budget in GB")
    parser.add_argument("--train", action="store_true", help="also train and evaluate that configuration (one trial)")
    args = parser.parse_args(argv)
    if (args.run is None) == (args.config is None):
        raise ConfigError("--run/--config", "give exactly one: a finished run folder, or a recipe to predict from its table alone")
    if not args.max_memory_gb > 0:
        raise ConfigError("--max-memory-gb", f"must be > 0 GB, got {args.max_memory_gb}")
    tasks = None
    if args.run is not None:
        cfg, pruned_path, model, offset = _from_run(args.run)
    else:
        from qpruner.plan import preflight, resolve_config

        cfg = resolve_config(load_cli_config(args))
        tasks = preflight(cfg)
        pruned_path, model, offset = _from_config(cfg, tasks)
    front = predicted_front(model, offset)
    best = best_under(front, args.max_memory_gb)
    if best is None:
        raise QPrunerError(f"--max-memory-gb: {args.max_memory_gb:g} GB is below every configuration; the smallest "
                           f"needs {front[0]['memory_gb']:.4g} GB ({cfg.search.memory_objective}); raise it")
    units = model.units
    bits = [units.choices[c][0] for c in best["choices"]]
    ranks = [units.choices[c][1] for c in best["choices"]] if units.choices[0][1] else None
    from qpruner.prune import pruned_layer_count

    n_layers = pruned_layer_count(pruned_path)
    layer_bits, layer_ranks = expand(bits, n_layers), expand(ranks, n_layers) if ranks else None
    objective = cfg.search.objective
    if best["predicted_std"] is None:
        value = (f"table score -{-best['predicted']:.4g} (sum of `{cfg.search.sensitivity}` sensitivity; no trial to "
                 f"calibrate {objective})")
    else:
        shown = in_units(objective, best)
        value = f"predicted {objective} {shown['predicted']:.4g} (±1 std: {shown['predicted_low']:.4g} .. {shown['predicted_high']:.4g})"
    print(f"best under {args.max_memory_gb:g} GB: {best['memory_gb']:.4g} GB ({cfg.search.memory_objective}), {value}")
    print(f"bits per layer: {compact_bits(layer_bits)}" + (f"  ranks: {compact_bits(layer_ranks)}" if layer_ranks else ""))
    print(f"train it: qpruner trial --config <recipe> --bits {','.join(map(str, layer_bits))}"
          + (f" --ranks {','.join(map(str, layer_ranks))}" if layer_ranks else ""))
    if args.train:
        from qpruner.trial import run_trial

        result = run_trial(cfg, pruned_path, layer_bits, ranks=layer_ranks, progress=True, tasks=tasks)
        measured = result.get(objective)
        accuracy = result.get("accuracy")
        print(f"measured: {objective} {'-' if measured is None else f'{measured:.4g}'}, accuracy "
              f"{'-' if accuracy is None else f'{accuracy:.3f}'}, memory {result['memory_gb']:.4g} GB")
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}))
    return 0


if __name__ == "__main__":
    from qpruner.cli import run_cli

    run_cli(main)
