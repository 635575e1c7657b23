"""The search: per-layer bit-width space, the multi-objective Optuna searcher, and QPruner's
importance-aware first configurations (the "probabilistic decision").

Layer importance (computed in qpruner.importance) -> probability that a layer gets the higher
precision -> the first `n_init` bit vectors are drawn from those probabilities, spread over memory
budgets; Bayesian optimisation (OptunaSearch, multi-objective: the quality objective of
`search.objective` - accuracy or validation log-prob up, perplexity down - and memory down) refines from there.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from qpruner.config import Config
from qpruner.errors import ConfigError


def objectives(cfg: Config) -> tuple[list[str], list[str]]:
    """The searcher's (metrics, modes): search.objective's Tune metric and direction, then memory_gb (min)."""
    from qpruner.config import QUALITY

    quality = QUALITY[cfg.search.objective]
    return [quality.name, "memory_gb"], [quality.mode, "min"]


# ---------------------------------------------------------------------------------------------
# Search space: one categorical per unit ("b0".."b{U-1}"), optionally a LoRA rank each ("r0"..). A unit is
# a decoder layer, or with `search.layer_groups: N` one of N groups of consecutive layers that share one
# bit-width and rank. Everything outside the search (trials, results, report, export) sees per-layer bits.


def layer_groups(n_layers: int, n_groups: int) -> list[list[int]]:
    """`n_groups` runs of consecutive layer indices whose sizes differ by at most one (earlier runs larger)."""
    return [list(map(int, g)) for g in np.array_split(np.arange(n_layers), n_groups)]


def search_units(cfg: Config, n_layers: int) -> int:
    """How many bit-widths the search chooses: `search.layer_groups`, else one per decoder layer."""
    groups = cfg.search.layer_groups
    if groups is None:
        return n_layers
    if groups > n_layers:
        raise ConfigError("search.layer_groups", f"{groups} groups asked, but the pruned model has {n_layers} decoder "
                          f"layers; use at most {n_layers}, or null for one bit-width per layer")
    return groups


def expand(values: Sequence[int], n_layers: int) -> list[int]:
    """Per-unit values -> per-layer values (each group's value repeated over its layers)."""
    if len(values) == n_layers:
        return [int(v) for v in values]
    return [int(v) for v, group in zip(values, layer_groups(n_layers, len(values))) for _ in group]


def param_space(n_units: int, bits: Sequence[int], ranks: Optional[Sequence[int]] = None) -> dict:
    """Tune space: one categorical bit-width per unit, plus a LoRA rank per unit when `ranks`."""
    from ray import tune

    space = {f"b{i}": tune.choice(list(bits)) for i in range(n_units)}
    if ranks:
        space.update({f"r{i}": tune.choice(list(ranks)) for i in range(n_units)})
    return space


def _units(config: dict, prefix: str) -> list[int]:
    return [int(config[f"{prefix}{i}"]) for i in range(sum(1 for k in config if k[:1] == prefix and k[1:].isdigit()))]


def bits_from_config(config: dict, n_layers: int) -> list[int]:
    """The per-layer bit vector of a Tune config (a grouped config's bits repeated over each group's layers)."""
    return expand(_units(config, "b"), n_layers)


def ranks_from_config(config: dict, n_layers: int) -> Optional[list[int]]:
    """The per-layer LoRA ranks of a Tune config, or None when ranks are not searched."""
    return expand(_units(config, "r"), n_layers) if "r0" in config else None


def config_from_bits(bits: Sequence[int], ranks: Optional[Sequence[int]] = None) -> dict:
    """The Tune config of a per-unit bit vector (and ranks): the inverse of bits_from_config/ranks_from_config."""
    config = {f"b{i}": int(b) for i, b in enumerate(bits)}
    if ranks:
        config.update({f"r{i}": int(r) for i, r in enumerate(ranks)})
    return config


def make_searcher(cfg: Config, n_layers: int, points_to_evaluate: list[dict], record_path: Optional[str | Path] = None,
                  model_sampler=None):
    """Multi-objective OptunaSearch (`objectives`: search.objective's value, memory min), seeded, behind a
    ConcurrencyLimiter.

    The objectives are named here only: naming metric/mode in TuneConfig too would make the Optuna
    study single-objective. What Optuna hears (RecordedOptunaSearch below): a completed trial's final
    objective (test accuracy, validation log-prob after training, or perplexity) and memory; a trial
    stopped by ASHA is PRUNED (its quick validation signal mid-training is not the final value, so it never
    enters the objective); a crashed trial is FAIL. Repeat proposals are
    answered from the study's record instead of being trained again; TPE runs with constant_liar so
    pending trials steer it away. First points without rank keys get `lora.rank` (or the middle rank).
    `model_sampler` is the performance model's sampler (qpruner.predict.ModelSampler, built by the caller
    from the sensitivity table): `search.sampler: model` needs it.
    """
    import optuna
    from ray.tune.search import ConcurrencyLimiter

    seed = cfg.search.seed
    ranks = cfg.search.ranks
    if ranks:  # first points carry bits only; Tune rejects a point without every searched key
        rank = cfg.lora.rank if cfg.lora.rank in ranks else sorted(ranks)[len(ranks) // 2]
        points_to_evaluate = [{**{f"r{i}": rank for i in range(n_layers)}, **point} for point in points_to_evaluate]
    startup = max(2, len(points_to_evaluate))
    samplers: dict[str, Callable[[], optuna.samplers.BaseSampler]] = {
        "gp": lambda: optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup),
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=startup, constant_liar=True),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, cfg.search.concurrency * 2)),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),  # no constraint support: its draws ignore a budget
        "model": lambda: _required(model_sampler),
    }
    metrics, modes = objectives(cfg)
    searcher = RecordedOptunaSearch(
        metric=metrics,
        mode=modes,
        sampler=samplers[cfg.search.sampler](),
        points_to_evaluate=points_to_evaluate or None,
        seed=seed,
        choices={**{f"b{i}": sorted(set(cfg.quant.bits)) for i in range(n_layers)},
                 **({f"r{i}": sorted(set(ranks)) for i in range(n_layers)} if ranks else {})},
        record_path=record_path,
        max_memory_gb=cfg.search.max_memory_gb,
    )
    return ConcurrencyLimiter(searcher, max_concurrent=cfg.search.concurrency)


def _required(model_sampler):
    if model_sampler is None:
        raise ValueError("search.sampler: model needs its sampler (qpruner.predict.ModelSampler over the sensitivity table)")
    return model_sampler


def _optuna_search_class():
    """Ray's OptunaSearch, imported lazily (Ray is heavy and optional for the pure helpers here)."""
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch


def params_key(params: dict) -> tuple:
    """A hashable identity of one configuration (its bits and ranks)."""
    return tuple(sorted((k, int(v)) for k, v in params.items()))


BUDGET = "max_memory_gb"  # Optuna constraint name: memory_gb - search.max_memory_gb (<= 0 is feasible)
OOM_VIOLATION = 1.0  # the constraint of a trial that ran out of memory: +1 GB, plus how far over the budget it was
OOM_ATTR = "oom"  # Optuna user attribute of such a trial: its GPU fraction


def smallest_memory_gb(cfg: Config, pruned_config: dict) -> float:
    """A lower bound of the memory objective over the whole space: the pruned decoder layers with every
    layer at the lowest bit-width, from config.json shapes alone, before any trial (embeddings, LoRA,
    optimizer state and activations come on top, so the true smallest value is higher)."""
    from qpruner.memory import shapes_from_config, weight_bytes

    shapes = shapes_from_config(pruned_config)
    lowest = [min(cfg.quant.bits)] * len(shapes.layers)
    return weight_bytes(shapes, lowest, cfg.quant)["total"] / 1024**3


def check_memory_budget(cfg: Config, pruned_config: dict) -> None:
    """Refuse, before trials, a `search.max_memory_gb` that no configuration can meet."""
    budget = cfg.search.max_memory_gb
    if budget is None:
        return
    floor = smallest_memory_gb(cfg, pruned_config)
    if floor > budget:
        raise ConfigError("search.max_memory_gb", f"{budget:g} GB is below what any configuration needs: the "
                          f"all-{min(cfg.quant.bits)}-bit decoder layers alone take {floor:.4g} GB; raise it above that")


FROM_RECORD = "answered_from_record"  # Optuna user attribute of a repeat proposal answered from the record
CURVE_ATTR = "val_logprob_curve"  # Optuna user attribute: [[step, val_logprob], ...] of the trial's progress reports


class RecordedOptunaSearch(_optuna_search_class()):
    """OptunaSearch that tells Optuna one quantity per objective and never trains a configuration twice.

    - With `search.max_memory_gb`, every finished trial carries the Optuna constraint
      memory_gb - budget, so the constrained samplers (TPE, GP, NSGA-II) prefer feasible ones.
    - A trial whose last result is not the final evaluation (ASHA stopped it) is told PRUNED, not
      COMPLETE with its quick validation score as "accuracy".
    - A trial that ran out of memory itself (qpruner.errors.TrialOOM, which leaves qpruner.search.oom_marker
      in the run folder; Tune tells a searcher only "error") is told PRUNED with the constraint BUDGET at
      OOM_VIOLATION (+ its analytic memory over the budget) instead of FAIL, which samplers ignore: TPE
      ranks infeasible trials below every feasible one, so it learns to avoid the region. GP and NSGA-II
      read constraints of COMPLETE trials only and skip it as they skip a failure. A worker killed by Ray's
      memory monitor stays FAIL: that kill depends on what else ran on the node.
    - A proposal equal to a recorded trial is told at once with that trial's outcome (COMPLETE values,
      PRUNED or FAIL) and marked `answered_from_record`; one equal to a running trial is told FAIL (so
      the sampler does not learn from it). Then Optuna is asked again; after `redraws` repeats a seeded
      random configuration not yet seen is enqueued. The state lives in the Optuna study, which Tune
      checkpoints, so a resumed run knows every earlier trial too.
    """

    def __init__(self, *args, choices: Optional[dict] = None, record_path: Optional[str | Path] = None,
                 redraws: int = 20, max_memory_gb: Optional[float] = None, run_dir: Optional[str | Path] = None,
                 **kwargs):
        self._run_dir = str(run_dir) if run_dir else (str(Path(record_path).parent) if record_path else None)
        self._choices = choices or {}
        self._max_memory_gb = max_memory_gb
        self._record_path = str(record_path) if record_path else None
        self._redraws = redraws
        self._rng = random.Random(kwargs.get("seed"))
        super().__init__(*args, **kwargs)

    def suggest(self, trial_id: str):
        from optuna.trial import TrialState

        for attempt in range(self._redraws + 1):
            if attempt == self._redraws:
                fresh = self._unseen_config()
                if fresh is None:
                    from ray.tune.search import Searcher

                    return Searcher.FINISHED  # every configuration has been tried: nothing left to train
                self._ot_study.enqueue_trial(fresh)
            params = super().suggest(trial_id)
            if params is None:
                return None
            ot_trial = self._ot_trials[trial_id]
            earlier = self._recorded(params, exclude=ot_trial.number)
            if earlier is None:
                return params
            ot_trial.set_user_attr(FROM_RECORD, earlier.number)
            for name, value in earlier.constraints.items():
                ot_trial.set_constraint(name, value)
            if earlier.state == TrialState.COMPLETE:
                self._ot_study.tell(ot_trial, list(earlier.values))
            elif earlier.state == TrialState.PRUNED:
                self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
            else:  # running or failed: nothing to learn from a copy
                self._ot_study.tell(ot_trial, state=TrialState.FAIL)
            del self._ot_trials[trial_id]
            self._write_record()
        return None

    def on_trial_result(self, trial_id: str, result: dict):
        """Keep each progress report's validation log-prob on the Optuna trial (CURVE_ATTR): Optuna takes no
        intermediate values in a multi-objective study, and the model sampler enters ASHA-stopped trials at
        their fidelity from it (qpruner.predict.at_fidelity)."""
        self._keep_progress(trial_id, result)
        super().on_trial_result(trial_id, result)

    def _keep_progress(self, trial_id: str, result: Optional[dict]) -> None:
        """Append a progress report's (step, val_logprob) to the trial's CURVE_ATTR. Not for a trial Optuna was told
        of already (a killed trial retried by a resumed run keeps its id): a finished Optuna trial takes no update."""
        ot_trial = self._ot_trials.get(trial_id)
        if (ot_trial is None or trial_id in self._completed_trials or not result or result.get("final")
                or result.get("val_logprob") is None):
            return
        step = int(result.get("step") or result.get("steps") or 0)  # a row answered from the record has `steps`
        curve = list(ot_trial.user_attrs.get(CURVE_ATTR, []))
        if not curve or curve[-1][0] != step:
            ot_trial.set_user_attr(CURVE_ATTR, curve + [[step, float(result["val_logprob"])]])

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False):
        if trial_id in self._completed_trials:  # a killed trial retried by a resumed run: Optuna was told already
            return super().on_trial_complete(trial_id, result=result, error=error)
        if not error:  # the report at which ASHA stopped the trial reaches the searcher only here
            self._keep_progress(trial_id, result)
        oom = self._oom(trial_id) if error else None
        if oom is not None and trial_id in self._ot_trials:
            ot_trial = self._ot_trials[trial_id]
            over = 0.0
            if self._max_memory_gb and oom.get("memory_gb") is not None:
                over = max(0.0, float(oom["memory_gb"]) - self._max_memory_gb)
            ot_trial.set_constraint(BUDGET, OOM_VIOLATION + over)
            ot_trial.set_user_attr(OOM_ATTR, oom.get("gpu_fraction"))
            return super().on_trial_complete(trial_id, result=None, error=False)  # PRUNED, infeasible
        if self._max_memory_gb and result and result.get("memory_gb") is not None and trial_id in self._ot_trials:
            # Optuna 5's constraint support (constraints_func is deprecated): TPE, GP and NSGA-II read it;
            # a stopped trial is judged by its last report's (analytic) memory
            self._ot_trials[trial_id].set_constraint(BUDGET, float(result["memory_gb"]) - self._max_memory_gb)
        if result is not None and not error and not result.get("final"):
            result = None  # stopped early: PRUNED (Ray's OptunaSearch tells PRUNED for a missing result)
        super().on_trial_complete(trial_id, result=result, error=error)

    def _oom(self, trial_id: str) -> Optional[dict]:
        """The trial's TrialOOM record (qpruner.search.oom_marker), or None."""
        run_dir = getattr(self, "_run_dir", None)  # a searcher pickled by an earlier version has none
        if not run_dir:
            return None
        return read_oom_marker(run_dir, trial_id)

    def answered_from_record(self) -> int:
        """How many proposals were answered from the record instead of being trained."""
        return sum(FROM_RECORD in t.user_attrs for t in self._ot_study.get_trials(deepcopy=False))

    def _recorded(self, params: dict, exclude: int):
        """The first earlier study trial (not itself a repeat) with these parameters, or None."""
        key = params_key(params)
        for t in self._ot_study.get_trials(deepcopy=False):
            if t.number != exclude and FROM_RECORD not in t.user_attrs and t.params and params_key(t.params) == key:
                return t
        return None

    def _unseen_config(self) -> Optional[dict]:
        """A seeded random configuration that no study trial holds (None if the space is exhausted)."""
        seen = {params_key(t.params) for t in self._ot_study.get_trials(deepcopy=False) if t.params}
        names = sorted(self._choices)
        for _ in range(1000):
            config = {k: self._rng.choice(self._choices[k]) for k in names}
            if params_key(config) not in seen:
                return config
        return None

    def _write_record(self) -> None:
        if self._record_path:
            Path(self._record_path).write_text(json.dumps({"answered_from_record": self.answered_from_record()}))


# ---------------------------------------------------------------------------------------------
# First configurations.


def importance_configs(cfg: Config, pruned_config: dict, importance: Sequence[float]) -> list[dict]:
    """The first Tune configs of `search.init: importance` from the measured per-layer importance: the anchors
    and `search.n_init` bit vectors (initial_configs), with per-unit ranks drawn the same way when ranks are
    searched (anchors keep lora.rank). With `search.layer_groups` a group's importance is its layers' mean
    and its memory their sum; memory comes from the pruned layers' shapes (`pruned_config`: its config.json)."""
    from qpruner.memory import shapes_from_config, weight_bytes

    search, n_layers = cfg.search, len(pruned_config["qpruner_layers"])
    unit_importance = [float(sum(importance[i] for i in g) / len(g)) for g in layer_groups(n_layers, search_units(cfg, n_layers))]
    shapes = shapes_from_config(pruned_config)
    bits = initial_configs(unit_importance, cfg.quant.bits, search.n_init, search.temperature, search.seed,
                           anchors=search.anchors,  # pruned layers differ in size: memory from their shapes
                           weight_fn=lambda b: weight_bytes(shapes, expand(b, n_layers), cfg.quant)["total"])
    ranks = [None] * len(bits)
    if search.ranks:
        n_anchors = 2 if search.anchors and len(set(cfg.quant.bits)) > 1 else 0
        ranks = ranks[:n_anchors] + initial_ranks(unit_importance, search.ranks, len(bits) - n_anchors,
                                                  search.temperature, search.seed)
    return [config_from_bits(b, r) for b, r in zip(bits, ranks)]


def random_configs(n_layers: int, bits: Sequence[int], n: int, seed: int) -> list[list[int]]:
    """The ablation (`search.init: random`): n uniformly random bit vectors, seeded."""
    rng = random.Random(seed)
    return [[rng.choice(list(bits)) for _ in range(n_layers)] for _ in range(n)]


def bit_probabilities(importance: Sequence[float], temperature: float) -> np.ndarray:
    """Per-layer probability of the higher precision: a logistic of the importance z-score / temperature.

    Equal importances give 0.5 everywhere; a lower temperature makes the decision sharper.
    """
    x = np.asarray(importance, dtype=np.float64)
    spread = x.std()
    z = (x - x.mean()) / spread if spread > 0 else np.zeros_like(x)
    return 1.0 / (1.0 + np.exp(-z / temperature))


def initial_configs(importance: Sequence[float], bits: Sequence[int], n_init: int, temperature: float, seed: int,
                    anchors: bool = True, weight_fn: Optional[Callable[[list[int]], float]] = None) -> list[list[int]]:
    """The probabilistic decision: `n_init` distinct bit vectors drawn from the layer probabilities and
    spread over memory budgets, after the uniform-lowest and uniform-highest anchors.

    Draw i aims at a memory budget q_i (from 20% to 80% of the way from all-lowest to all-highest):
    the layer logits are shifted by one constant until the expected memory is q_i, so every budget
    keeps the ranking of layers by importance. Memory is `weight_fn(bits) -> bytes` (pass it when
    pruned layers differ in size; default the bit sum). With more than two bit-widths a layer's
    probability p is its expected position in the sorted set: index = floor(p * (k-1) + u).
    """
    levels = sorted(set(bits))
    n_layers = len(importance)
    if len(levels) == 1:
        return [[levels[0]] * n_layers]
    rng = np.random.default_rng(seed)
    p = np.clip(bit_probabilities(importance, temperature), 1e-4, 1 - 1e-4)
    logit = np.log(p / (1 - p))
    costs = _level_costs(n_layers, levels, weight_fn or sum)
    out = [[levels[0]] * n_layers, [levels[-1]] * n_layers] if anchors else []
    targets = np.linspace(0.2, 0.8, n_init) if n_init > 1 else np.full(n_init, 0.5)
    for target in targets:
        probs = _shift_to_budget(logit, costs, target * costs[:, -1].sum())
        for _ in range(20):  # redraw a duplicate a few times
            vec = _draw_levels(probs, levels, rng)
            if vec not in out:
                out.append(vec)
                break
    return out


def initial_ranks(importance: Sequence[float], ranks: Sequence[int], n: int, temperature: float, seed: int) -> list[list[int]]:
    """RankAdaptor's first guess for `n` points: each layer's LoRA rank drawn like its bits, so layers
    that matter more start with more adapter capacity (index = floor(p * (k-1) + u), p from importance)."""
    levels = sorted(set(ranks))
    rng = np.random.default_rng(seed + 1)
    p = bit_probabilities(importance, temperature)
    return [_draw_levels(p, levels, rng) for _ in range(n)]


def _draw_levels(probs: np.ndarray, levels: list[int], rng: np.random.Generator) -> list[int]:
    """Randomised rounding of each layer's position probs * (k-1) in the sorted `levels`."""
    idx = np.floor(probs * (len(levels) - 1) + rng.random(len(probs))).clip(0, len(levels) - 1).astype(int)
    return [levels[i] for i in idx]


def _level_costs(n_layers: int, levels: list[int], weight_fn: Callable[[list[int]], float]) -> np.ndarray:
    """(layers, levels) extra memory of putting one layer at each level, the others at the lowest."""
    lowest = [levels[0]] * n_layers
    base = weight_fn(lowest)
    rows = [[weight_fn(lowest[:i] + [b] + lowest[i + 1:]) - base for b in levels] for i in range(n_layers)]
    return np.asarray(rows, dtype=np.float64)


def _expected_cost(probs: np.ndarray, costs: np.ndarray) -> float:
    """Expected extra memory when layer l's level index is the randomised rounding of probs[l] * (k-1)."""
    pos = probs * (costs.shape[1] - 1)
    lo = np.minimum(np.floor(pos).astype(int), costs.shape[1] - 2)
    frac = pos - lo
    rows = np.arange(len(probs))
    return float(((1 - frac) * costs[rows, lo] + frac * costs[rows, lo + 1]).sum())


def _shift_to_budget(logit: np.ndarray, costs: np.ndarray, budget: float) -> np.ndarray:
    """Probabilities sigmoid(logit + c), c found by bisection so that the expected extra memory is `budget`."""
    lo, hi = -50.0, 50.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if _expected_cost(1 / (1 + np.exp(-(logit + mid))), costs) < budget:
            lo = mid
        else:
            hi = mid
    return 1 / (1 + np.exp(-(logit + (lo + hi) / 2)))


# ---------------------------------------------------------------------------------------------
# Out-of-memory markers: written by the trial (qpruner.results.write_oom_marker), read by the searcher.


OOM_DIR = "oom"  # <out>/oom/<trial id>.json: a trial that ran out of memory itself, for the searcher


def oom_marker(out: str | Path, trial_id: str) -> Path:
    """Where a trial that raised TrialOOM leaves its GPU fraction, stage and analytic memory (written by the trial on
    whichever node ran it, read by the searcher on the driver: Tune tells a searcher only that a trial errored)."""
    return Path(out) / OOM_DIR / f"{trial_id}.json"


def read_oom_marker(out: str | Path, trial_id: str) -> Optional[dict]:
    """The TrialOOM record of a trial, or None (no marker, or unreadable)."""
    try:
        return json.loads(oom_marker(out, trial_id).read_text())
    except (OSError, ValueError):
        return None
