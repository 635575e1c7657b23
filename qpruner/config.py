"""One typed configuration for every stage, loaded from YAML and validated at load time.

A config file has the sections below; every key is optional and falls back to the default here.
`load_config(path)` raises `ConfigError` naming the field path (e.g. `prune.ratio`) and what is
allowed, so every CLI can print one line and exit 2 instead of a traceback. Parsing reads nothing but
the YAML: checks against the disk (`check_local_paths`) and `builtin` run once on the driver
(qpruner.plan.resolve_config).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import yaml

from qpruner.errors import ConfigError

ALLOWED_BITS = (4, 8, 16)  # bitsandbytes NF4, LLM.int8; 16 = keep the layer in the compute dtype
BUILTIN_PREFIX = "builtin:"
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")  # what eval.local_data / eval.val_data files may be
SPARSE_METHODS = ("apt", "magnitude", "wanda", "sparsegpt")  # unstructured / N:M, amount in prune.sparsity


@dataclass
class ModelConfig:
    """Which model to compress: a hub id, a local folder, a `.gguf` file, or `builtin:tiny`."""

    name: str = "builtin:tiny"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False  # never on unless the user asks for it
    allow_pickle: bool = False  # load weights stored only as pickles (pytorch_model.bin): loading them runs code

    def validate(self, path: str) -> None:
        if self.name.startswith(BUILTIN_PREFIX) and self.name != "builtin:tiny":
            raise ConfigError(f"{path}.name", f"unknown built-in model {self.name!r}; the built-in model is 'builtin:tiny'")

    def check_paths(self, path: str) -> None:
        local = Path(self.name).expanduser()
        if local.suffix == ".gguf":
            if not local.is_file():
                raise ConfigError(f"{path}.name", f"GGUF file {self.name!r} does not exist; give the path of a .gguf file")
            return
        # a hub id is "org/name": a name with more parts is a folder
        looks_local = self.name.startswith((".", "/", "~")) or self.name.count("/") > 1 or local.exists()
        if looks_local and not self.name.startswith(BUILTIN_PREFIX):
            if not local.is_dir():
                raise ConfigError(f"{path}.name", f"model folder {self.name!r} does not exist; give a hub id, a folder or 'builtin:tiny'")
            if not (local / "config.json").is_file():
                raise ConfigError(f"{path}.name", f"model folder {self.name!r} has no config.json; point at a Hugging Face model folder")


@dataclass
class CalibrationConfig:
    """Text used to measure importance: `builtin` (the tiny corpus), a hub dataset id, or a local text/json file."""

    source: str = "builtin"
    text_field: str = "text"
    n_samples: int = 16
    seq_len: int = 64
    seed: int = 0

    def validate(self, path: str) -> None:
        _positive(self.n_samples, f"{path}.n_samples")
        _positive(self.seq_len, f"{path}.seq_len")

    def check_paths(self, path: str) -> None:
        _check_local_file(self.source, f"{path}.source")


@dataclass
class PruneConfig:
    """Structured pruning (Taylor importance, SlimGPT's layer-wise OBS, random) or, with `sparsity`,
    post-training unstructured / N:M pruning (APT and its baselines magnitude, Wanda, SparseGPT-style)."""

    method: Literal["taylor", "random", "slimgpt", "apt", "magnitude", "wanda", "sparsegpt"] = "taylor"
    ratio: float = 0.2  # structured: fraction of the WHOLE model's parameters removed (0 for the sparse methods)
    # Sparse methods only: fraction of each decoder Linear's weights set to zero (0.5), or "N:M" (at most N
    # nonzero weights in every M consecutive inputs: "2:4", "4:8"). Stored dense, zeros included.
    sparsity: Union[float, str] = 0.0
    # Prunable decoder layers [first, last); null = LLM-Pruner's default scaled to depth.
    first_layer: Optional[int] = None
    last_layer: Optional[int] = None
    prune_attention: bool = True
    prune_mlp: bool = True
    # Each pruned layer keeps a multiple of this many MLP channels (LLM-Pruner's round_to), the ratio still
    # honoured: 32 is the block of GGUF's Q4_0/Q8_0 and of bitsandbytes' CPU 4-bit kernel; 1 = no rounding.
    round_to: int = 32
    taylor_order: Literal["first", "second"] = "first"  # second adds the Fisher-diagonal term
    aggregation: Literal["sum", "mean", "max", "prod", "last"] = "sum"  # across coupled modules (LLM-Pruner)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def validate(self, path: str) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ConfigError(f"{path}.ratio", f"must be in [0, 1), got {self.ratio}")
        for name in ("first_layer", "last_layer"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{path}.{name}", f"must be >= 0 or null, got {value}")
        if self.first_layer is not None and self.last_layer is not None and self.first_layer >= self.last_layer:
            raise ConfigError(f"{path}.first_layer", "must be smaller than prune.last_layer")
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise ConfigError(f"{path}.round_to", f"must be an integer >= 1 (1 = no rounding), got {self.round_to!r}")
        if not (self.prune_attention or self.prune_mlp) and self.ratio > 0:
            raise ConfigError(f"{path}.prune_mlp", "at least one of prune_attention / prune_mlp must be true when ratio > 0")
        self.sparsity_spec(path)
        if self.method in SPARSE_METHODS and self.ratio > 0:
            raise ConfigError(f"{path}.ratio", f"is the structured fraction, unused by method {self.method!r}; set "
                              f"{path}.ratio: 0 and give the amount as {path}.sparsity (e.g. 0.5 or '2:4')")
        if self.method not in SPARSE_METHODS and self.sparsity != 0:
            raise ConfigError(f"{path}.sparsity", f"applies only to methods {', '.join(SPARSE_METHODS)}; "
                              f"method {self.method!r} uses {path}.ratio, so set {path}.sparsity: 0")

    def sparsity_spec(self, path: str = "prune") -> tuple[float, int, int]:
        """(fraction of weights zeroed, N, M); N = M = 0 for unstructured sparsity."""
        if isinstance(self.sparsity, float):
            if not 0.0 <= self.sparsity < 1.0:
                raise ConfigError(f"{path}.sparsity", f"must be a fraction in [0, 1) or 'N:M' such as '2:4'; got {self.sparsity}")
            return self.sparsity, 0, 0
        parts = self.sparsity.split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or not 0 < int(parts[0]) < int(parts[1]) <= 64:
            raise ConfigError(f"{path}.sparsity", f"must be a fraction in [0, 1) or 'N:M' with 0 < N < M <= 64 "
                              f"(e.g. '2:4', '4:8'); got {self.sparsity!r}")
        n, m = int(parts[0]), int(parts[1])
        return 1 - n / m, n, m

    @property
    def calibrates(self) -> bool:
        """Whether this pruning reads calibration text (random and magnitude do not, nor a no-op)."""
        amount = self.sparsity_spec()[0] if self.method in SPARSE_METHODS else self.ratio
        return amount > 0 and self.method not in ("random", "magnitude")


@dataclass
class QuantConfig:
    """Per-layer precision: the bit-widths the search may choose and how bitsandbytes stores them."""

    bits: list[int] = field(default_factory=lambda: [4, 8])
    double_quant: bool = True
    blocksize: int = 64
    quant_type: Literal["nf4", "fp4"] = "nf4"
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    int8_threshold: float = 6.0  # LLM.int8 outlier threshold for 8-bit layers; 0 = every input column int8

    def validate(self, path: str) -> None:
        if not self.bits:
            raise ConfigError(f"{path}.bits", f"must list at least one bit-width from {list(ALLOWED_BITS)}")
        bad = [b for b in self.bits if b not in ALLOWED_BITS]
        if bad:
            raise ConfigError(f"{path}.bits", f"{bad} not allowed; choose from {list(ALLOWED_BITS)} (16 = unquantized)")
        if len(set(self.bits)) != len(self.bits):
            raise ConfigError(f"{path}.bits", "lists a bit-width twice")
        self.bits = sorted(self.bits)
        if isinstance(self.int8_threshold, bool) or not isinstance(self.int8_threshold, (int, float)) \
                or self.int8_threshold < 0:
            raise ConfigError(f"{path}.int8_threshold", f"must be a number >= 0 (0 = no outlier columns), got {self.int8_threshold!r}")
        self.int8_threshold = float(self.int8_threshold)
        if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ConfigError(f"{path}.blocksize", f"must be a power of two in 32..4096, got {self.blocksize}")


@dataclass
class LoraConfig:
    """LoRA adapters initialised with LoftQ at each layer's bit-width."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    loftq_iters: int = 1  # 0 = plain LoRA init (B = 0)

    def validate(self, path: str) -> None:
        _positive(self.rank, f"{path}.rank")
        _positive(self.alpha, f"{path}.alpha")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{path}.dropout", f"must be in [0, 1), got {self.dropout}")
        if self.loftq_iters < 0:
            raise ConfigError(f"{path}.loftq_iters", f"must be >= 0, got {self.loftq_iters}")
        if not self.target_modules:
            raise ConfigError(f"{path}.target_modules", "must name at least one module, e.g. q_proj")


@dataclass
class FinetuneConfig:
    """LoRA recovery training on Alpaca-format data (instruction / input / output)."""

    data: str = "builtin"  # builtin, a hub dataset id (e.g. yahma/alpaca-cleaned) or a local json/jsonl
    lr: float = 3e-4
    batch_size: int = 8
    micro_batch_size: int = 4
    max_length: int = 256
    steps: int = 40  # optimizer steps; the search's ASHA max_t counts reports, see search.asha
    max_examples: Optional[int] = None  # cap on the training set (null = all)
    warmup_steps: int = 0
    report_every: int = 10
    # documents per task in the quick validation ASHA reads (gold log-probability); a task without a
    # disjoint split has this many documents held out of its final score
    val_limit: int = 64
    optimizer: Literal["auto", "adamw", "paged_adamw_32bit"] = "auto"  # auto: paged on CUDA, AdamW on CPU
    seed: int = 0

    def validate(self, path: str) -> None:
        if not self.lr > 0:
            raise ConfigError(f"{path}.lr", f"must be > 0, got {self.lr}")
        for name in ("batch_size", "micro_batch_size", "max_length", "steps", "report_every", "val_limit"):
            _positive(getattr(self, name), f"{path}.{name}")
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(f"{path}.batch_size", f"must be a multiple of micro_batch_size ({self.micro_batch_size})")
        if self.max_examples is not None:
            _positive(self.max_examples, f"{path}.max_examples")

    def check_paths(self, path: str) -> None:
        _check_local_file(self.data, f"{path}.data")


@dataclass
class EvalConfig:
    """Zero-shot evaluation with lm-evaluation-harness."""

    tasks: list[str] = field(default_factory=lambda: ["builtin"])  # `builtin` = the tiny model's local tasks
    include_path: Optional[str] = None  # folder of extra lm-eval YAML tasks
    limit: Optional[int] = None  # examples per task (null = all)
    batch_size: int = 16
    # {task: jsonl/json/parquet file} in the HF schema of the split lm-eval's stock task evaluates:
    # qpruner derives a task that includes lm-eval's YAML and reads this file instead of the hub.
    # A group (mmlu, mmlu_stem) takes a folder holding one file per subtask, named after it (docs/tasks.md).
    local_data: dict[str, str] = field(default_factory=dict)
    # {task: file}, same schema: the quick-validation split, evaluated as the derived twin `<task>_val`.
    val_data: dict[str, str] = field(default_factory=dict)
    # per-task accuracy behind the objective: `paper` = acc_norm for the tasks LLM-Pruner/QPruner report it
    # for (hellaswag, arc_easy, arc_challenge, openbookqa, piqa), acc elsewhere
    metric: Literal["paper", "acc", "acc_norm"] = "paper"

    def validate(self, path: str) -> None:
        if not self.tasks:
            raise ConfigError(f"{path}.tasks", "must name at least one lm-eval task, e.g. boolq")
        for name in ("local_data", "val_data"):
            for task, file in getattr(self, name).items():
                where = f"{path}.{name}.{task}"
                if Path(file).suffix and Path(file).suffix not in DATA_SUFFIXES:
                    raise ConfigError(where, f"{file!r} must end in {', '.join(DATA_SUFFIXES)} (HF dataset rows), "
                                      "or be a folder of one such file per subtask (a group such as mmlu)")
        if self.limit is not None:
            _positive(self.limit, f"{path}.limit")
        _positive(self.batch_size, f"{path}.batch_size")

    def check_paths(self, path: str) -> None:
        for name in ("local_data", "val_data"):
            for task, file in getattr(self, name).items():
                local = Path(file).expanduser()
                if not (local.is_file() or (not local.suffix and local.is_dir())):
                    raise ConfigError(f"{path}.{name}.{task}", f"file {file!r} does not exist; convert the data first "
                                      "(benchmarks/convert_data.py)")
        if self.include_path is not None and not Path(self.include_path).expanduser().is_dir():
            raise ConfigError(f"{path}.include_path", f"folder {self.include_path!r} does not exist")


@dataclass
class AshaConfig:
    """ASHA early stopping on the trial's quick validation signal `val_logprob` (time unit: reports): the
    mean log-probability of the gold answer on validation data disjoint from the final score (a task's
    other split, or documents held out of it; qpruner.evaluate.make_validator).

    Rungs lie only at reports made before the last training step: max_t defaults to the last such
    report, and trials past the top rung are not stopped, so ASHA never stops a fully trained trial.
    Stopped trials reach Optuna as PRUNED (no quick score enters the accuracy objective)."""

    enabled: bool = True
    grace_period: int = 1
    reduction_factor: int = 2
    max_t: Optional[int] = None  # null = the last report before the last training step (a cap otherwise)

    def validate(self, path: str) -> None:
        _positive(self.grace_period, f"{path}.grace_period")
        if self.reduction_factor < 2:
            raise ConfigError(f"{path}.reduction_factor", f"must be >= 2, got {self.reduction_factor}")
        if self.max_t is not None:
            _positive(self.max_t, f"{path}.max_t")


@dataclass
class SearchConfig:
    """Multi-objective Bayesian search over per-layer bit-widths: the quality objective (better: higher accuracy or
    validation log-prob, lower perplexity) against memory (lower)."""

    num_samples: int = 8
    concurrency: int = 2
    # The quality objective beside memory: `accuracy` (mean task accuracy, max), `val_logprob` (the quick
    # validation's gold-answer log-prob after fine-tuning, max) or `perplexity` (word perplexity of the first
    # perplexity task in eval.tasks, e.g. wikitext; min). At small budgets accuracy is noise and the other two rank.
    objective: Literal["accuracy", "val_logprob", "perplexity"] = "accuracy"
    sampler: Literal["gp", "tpe", "nsga2", "random", "model"] = "tpe"
    sensitivity: Literal["kl", "fisher"] = "kl"  # the `model` sampler's per-layer table: logit KL or AutoQuantize's score
    init: Literal["importance", "random"] = "importance"
    n_init: int = 4  # importance-drawn first configurations (plus the uniform anchors)
    anchors: bool = True  # also try uniform-lowest and uniform-highest bits first
    importance: Literal["mi", "quant_loss", "taylor"] = "mi"
    temperature: float = 1.0  # importance -> probability of high precision; lower = sharper
    ranks: Optional[list[int]] = None  # RankAdaptor: also search each layer's LoRA rank
    # Tie consecutive decoder layers into this many groups that share one bit-width (and rank): the search
    # space for deep models (LLaMA-2-70B has 80 layers); null = one choice per layer
    layer_groups: Optional[int] = None
    max_failures: int = 0  # Tune retries of a failed trial
    seed: int = 0
    # Reference rows measured after the search for the report: "unpruned" (zero-shot), "uniform-16" (LoRA) and
    # "apt" (the source model APT-pruned to matching sparsity, no retraining; see qpruner/baselines.py).
    baselines: list[str] = field(default_factory=lambda: ["unpruned", "uniform-16"])
    asha: AshaConfig = field(default_factory=AshaConfig)
    # What the memory objective measures: the fine-tuning peak (weights + LoRA + grads + AdamW +
    # activations) or the quantized weights alone (the deployed model).
    memory_objective: Literal["finetune_peak", "weights"] = "finetune_peak"
    max_memory_gb: Optional[float] = None  # budget on the memory objective, through the sampler's constraints_func

    def validate(self, path: str) -> None:
        _positive(self.num_samples, f"{path}.num_samples")
        if self.max_memory_gb is not None and not self.max_memory_gb > 0:
            raise ConfigError(f"{path}.max_memory_gb", f"must be null or > 0 GB, got {self.max_memory_gb}")
        _positive(self.concurrency, f"{path}.concurrency")
        if self.n_init < 0:
            raise ConfigError(f"{path}.n_init", f"must be >= 0, got {self.n_init}")
        if not self.temperature > 0:
            raise ConfigError(f"{path}.temperature", f"must be > 0, got {self.temperature}")
        if self.max_failures < 0:
            raise ConfigError(f"{path}.max_failures", f"must be >= 0, got {self.max_failures}")
        unknown = [b for b in self.baselines if b not in ("unpruned", "uniform-16", "apt")]
        if unknown:
            raise ConfigError(f"{path}.baselines", f"unknown baseline {unknown[0]!r}; use a subset of [unpruned, uniform-16, apt] or []")
        if self.layer_groups is not None:
            _positive(self.layer_groups, f"{path}.layer_groups")
        if self.ranks is not None:
            if not self.ranks or any(r <= 0 for r in self.ranks):
                raise ConfigError(f"{path}.ranks", "must be null or a list of positive LoRA ranks, e.g. [4, 8, 16]")


# The quality objectives search.objective names: the results column and Tune metric of each, its direction, its
# label, and its best possible value. qpruner.search, .results, .pareto, .report, .export and .predict read them here.


@dataclass(frozen=True)
class Objective:
    """The search's quality objective beside memory: a results column and the Tune metric of the same name,
    its direction, how plots and reports name it, and the best value it can take (the far side of the
    hypervolume's normalising box)."""

    name: str
    mode: str  # "max" or "min"
    label: str
    ideal: float

    def oriented(self, values):
        """Values turned so that higher is better (the front and hypervolume code maximises): a numpy array."""
        import numpy as np

        return np.asarray(values, dtype=float) * (1.0 if self.mode == "max" else -1.0)

    def best(self, rows: Sequence[dict]) -> Optional[dict]:
        """The row with the best value of this objective (None when no row has one)."""
        scored = [r for r in rows if r.get(self.name) is not None]
        return max(scored, key=lambda r: float(self.oriented(r[self.name]))) if scored else None


QUALITY = {
    "accuracy": Objective("accuracy", "max", "accuracy (mean over tasks)", 1.0),
    "val_logprob": Objective("val_logprob", "max", "validation log-prob of the gold answer (after fine-tuning)", 0.0),
    "perplexity": Objective("perplexity", "min", "word perplexity", 1.0),
}
@dataclass
class ResourcesConfig:
    """What one trial gets: CPUs and a (fractional) GPU; `gpu: auto` uses a GPU only where one exists."""

    cpu: float = 1
    gpu: Union[float, Literal["auto"]] = 0
    threads: Optional[int] = None  # torch threads per trial (null = cpu)
    # GPUs asked for but not in the cluster yet (an autoscaler booting GPU workers): seconds to wait for them
    gpu_wait_s: float = 900

    def validate(self, path: str) -> None:
        if not self.cpu > 0:
            raise ConfigError(f"{path}.cpu", f"must be > 0, got {self.cpu}")
        if self.gpu != "auto" and not 0 <= self.gpu <= 1:
            raise ConfigError(f"{path}.gpu", f"must be a fraction in (0, 1], 0 for CPU, or 'auto'; got {self.gpu}")
        if not self.gpu_wait_s >= 0:
            raise ConfigError(f"{path}.gpu_wait_s", f"must be >= 0 seconds (0 = fail at once), got {self.gpu_wait_s}")


@dataclass
class OutputConfig:
    """Where results go and what is kept."""

    dir: str = "runs/tiny"
    # Pruned models, the LoftQ cache and the built-in model; null = $QPRUNER_CACHE or ~/.cache/qpruner.
    cache_dir: Optional[str] = None
    keep_adapters: Literal["pareto", "all", "none"] = "pareto"

    @property
    def cache(self) -> Path:
        return default_cache_dir() if self.cache_dir is None else Path(self.cache_dir).expanduser()


@dataclass
class Config:
    """The whole recipe: every stage reads its own section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def validate(self, path: str) -> None:
        """Checks that span sections."""
        if self.search.importance == "taylor" and self.prune.ratio == 0:
            raise ConfigError("search.importance", "'taylor' reuses the pruner's scores, but prune.ratio is 0 (nothing is "
                              "pruned or scored); use 'mi' or 'quant_loss'")
        if self.search.importance == "taylor" and self.prune.method != "taylor":
            raise ConfigError("search.importance", f"'taylor' reuses the Taylor pruner's scores, but prune.method is "
                              f"{self.prune.method!r}; use 'mi' or 'quant_loss'")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_cache_dir() -> Path:
    """The shared cache folder: $QPRUNER_CACHE if set, else ~/.cache/qpruner."""
    return Path(os.environ.get("QPRUNER_CACHE", "~/.cache/qpruner")).expanduser()


def load_config(path: str | Path, overrides: Optional[dict[str, Any]] = None) -> Config:
    """Read a YAML recipe, apply dotted `overrides` ({"prune.ratio": 0.3}), validate, return a Config."""
    path = Path(path)
    text = read_text_file(path, "--config", "a YAML file such as tune_configs/tiny.yaml")
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError("--config", f"{path} does not parse{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError("--config", f"{path} must hold a mapping of sections (model, prune, ...)")
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    return config_from_dict(raw)


def read_text_file(path: Path, what: str, expected: str) -> str:
    """The UTF-8 text of a file the user named (`what`: the flag or field), or a ConfigError saying why it
    cannot be read as text: missing, a folder, a path too long, unreadable, binary, gzip, not UTF-8."""
    from qpruner.errors import check_path

    check_path(path, what)
    if path.is_dir():
        raise ConfigError(what, f"{str(path)!r} is a folder, not a file; pass {expected}")
    if not path.is_file():
        raise ConfigError(what, f"file {str(path)!r} not found; pass {expected}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(what, f"cannot read {str(path)!r} ({exc.strerror or exc}); pass {expected}") from None
    if data[:2] == b"\x1f\x8b":
        raise ConfigError(what, f"{str(path)!r} is a gzip file; decompress it (gunzip) and pass the YAML text")
    if b"\x00" in data[:8192]:
        raise ConfigError(what, f"{str(path)!r} is a binary file, not text; pass {expected}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(what, f"{str(path)!r} is not UTF-8 text (byte 0x{data[exc.start]:02x} at line {line}); "
                          "save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from plain data (YAML, JSON, a run plan). No side effects: it reads no
    disk and builds nothing; the driver checks local files and resolves `builtin` once
    (qpruner.plan.resolve_config)."""
    cfg = _build(Config, raw, "")
    _validate_all(cfg, "")
    return cfg


def check_local_paths(cfg: Config) -> None:
    """The checks that read the disk (local files and folders named in the config exist), run once on the
    driver by qpruner.plan.resolve_config, each a ConfigError naming the field."""
    for name in ("model", "finetune", "eval"):
        getattr(cfg, name).check_paths(name)
    cfg.prune.calibration.check_paths("prune.calibration")


# ---------------------------------------------------------------------------------------------
# Generic dataclass building: unknown keys, types, nested sections.


def _build(cls: type, raw: Any, path: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(path or "config", f"must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean {_join(path, close[0])!r}?" if close else f"valid keys: {', '.join(fields)}"
            raise ConfigError(where, f"unknown key; {hint}")
        kwargs[key] = _coerce(hints[key], value, where)
    return cls(**kwargs)


NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")  # a decimal number written as text


def _coerce(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, path)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, path)
            except ConfigError as exc:
                errors.append(exc.reason)
        raise ConfigError(path, " or ".join(errors))
    if origin is Literal:
        if value not in args:
            raise ConfigError(path, f"must be one of {', '.join(repr(a) for a in args)}; got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"must be a mapping, got {type(value).__name__} {value!r}")
        return {_coerce(args[0], k, f"{path} key {k!r}"): _coerce(args[1], v, f"{path}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(path, f"must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
            return float(value)  # PyYAML reads 3e-4 (no dot in the mantissa) as text
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint} at {path}")  # a bug in this module, not user input


def _validate_all(obj: Any, path: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _validate_all(value, _join(path, f.name))
    if hasattr(obj, "validate"):
        obj.validate(path or "config")


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(dotted, "cannot override inside a non-mapping value")
    node[parts[-1]] = value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _positive(value: float, path: str) -> None:
    if not value > 0:
        raise ConfigError(path, f"must be > 0, got {value}")


def _check_local_file(source: str, path: str) -> None:
    """A value that looks like a file path must exist; hub ids and `builtin` are checked when loaded."""
    if source == "builtin":
        return
    p = Path(source).expanduser()
    looks_like_file = source.startswith((".", "/", "~")) or p.suffix in (".json", ".jsonl", ".txt")
    if looks_like_file and not p.exists():
        raise ConfigError(path, f"file {source!r} does not exist; give a local .json/.jsonl/.txt file, a hub dataset id or 'builtin'")
