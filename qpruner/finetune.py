"""LoRA recovery fine-tuning on Alpaca-format data: a plain, seeded PyTorch loop (no HF Trainer).

Schedule: linear warmup over `finetune.warmup_steps`, then cosine decay to 0 at `finetune.steps`.
Loss: mean cross-entropy over response tokens only (the prompt is masked with -100), normalised over
the whole global batch so gradient accumulation equals one big batch. Trials run many at once, so
nothing is printed unless `progress=True`.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qpruner.config import Config
from qpruner.errors import ConfigError, QPrunerError
from qpruner.memory import TrainingPeak, paged_optimizer_bytes

RECORD_FORMAT = '{"instruction": str, "input": str (optional), "output": str}'
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
MAX_GRAD_NORM = 1.0  # as in LLM-Pruner's / alpaca-lora's HF Trainer default


class TrainingDiverged(QPrunerError):
    """The training loss became NaN or inf; the search records the trial as failed."""


@dataclass
class FinetuneResult:
    """What a fine-tuning run did: the search reports these (the last validation is ASHA's last signal)."""

    steps: int  # optimizer steps completed
    losses: list[float]  # mean response-token loss of each optimizer step
    seconds: float
    validations: list[dict] = field(default_factory=list)  # {"val_logprob", "val_acc"} per report with a validator
    loss_scale: Optional[float] = None  # float16 compute: GradScaler's scale at the end (None: no loss scaling)
    skipped_steps: int = 0  # float16 compute: optimizer steps GradScaler skipped for inf/nan gradients
    peak_allocated_bytes: Optional[int] = None  # CUDA: max_memory_allocated over the training steps (TrainingPeak)
    paged_optimizer_bytes: int = 0  # optimizer state in CUDA managed memory (qpruner.memory.paged_optimizer_bytes)

    @property
    def last_validation(self) -> dict:
        return self.validations[-1] if self.validations else {"val_logprob": None, "val_acc": None}


# ---------------------------------------------------------------------------------------------
# Data


def load_alpaca(source: str, cache_dir: Optional[str | Path] = None, max_examples: Optional[int] = None) -> list[dict]:
    """Alpaca records from a local .json/.jsonl file or a hub dataset id, checked field by field.

    `builtin` was already resolved to the tiny model's file at config load (qpruner.builtin.resolve_builtin).
    """
    if source.startswith((".", "/", "~")) or Path(source).suffix in (".json", ".jsonl") or Path(source).expanduser().is_file():
        records = _read_local(Path(source).expanduser())
    else:
        records = _read_hub(source)
    if max_examples is not None:
        records = records[:max_examples]
    if not records:
        raise ConfigError("finetune.data", f"{source!r} holds no records; expected a list of {RECORD_FORMAT}")
    return [_check_record(r, i, source) for i, r in enumerate(records)]


def _read_local(path: Path) -> list:
    if not path.is_file():
        raise ConfigError("finetune.data", f"file {str(path)!r} does not exist; give a local .json/.jsonl file, a hub dataset id or 'builtin'")
    text = path.read_text()
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError("finetune.data", f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); expected records {RECORD_FORMAT}") from None
    if not isinstance(data, list):
        raise ConfigError("finetune.data", f"{path} must hold a JSON list of records {RECORD_FORMAT} (or use .jsonl, one per line)")
    return data


def _read_hub(dataset_id: str) -> list:
    import datasets

    try:
        return list(datasets.load_dataset(dataset_id, split="train"))
    except Exception as exc:  # offline, not found, gated: all end as one line naming the field
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(
            "finetune.data", f"cannot load hub dataset {dataset_id!r} ({first}); check the id and network, "
            "or give a local .json/.jsonl file or 'builtin'"
        ) from None


def _check_record(record, index: int, source: str) -> dict:
    if not isinstance(record, dict):
        raise ConfigError("finetune.data", f"record {index} of {source!r} is a {type(record).__name__}, not an object; expected {RECORD_FORMAT}")
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str):
            raise ConfigError("finetune.data", f"record {index} of {source!r} has no string {key!r}; expected {RECORD_FORMAT}")
    extra = record.get("input") or ""
    if not isinstance(extra, str):
        raise ConfigError("finetune.data", f"record {index} of {source!r} has a non-string 'input'; expected {RECORD_FORMAT}")
    return {"instruction": record["instruction"], "input": extra, "output": record["output"]}


def alpaca_prompt(record: dict) -> str:
    """The standard Alpaca prompt (with or without the input block), ending right before the response."""
    if record.get("input"):
        return PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return PROMPT_NO_INPUT.format(instruction=record["instruction"])


def tokenize_dataset(records: list[dict], tokenizer, max_length: int, train_on_prompt: bool = False) -> list[dict[str, list[int]]]:
    """Prompt + response + EOS per record, truncated to max_length, labels -100 on the prompt (batched tokenizer calls).

    Records whose response is cut off entirely are dropped.
    """
    prompts = tokenizer([alpaca_prompt(r) for r in records])["input_ids"]
    responses = tokenizer([r["output"] for r in records], add_special_tokens=False)["input_ids"]
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    examples = []
    for prompt, response in zip(prompts, responses):
        ids = (prompt + response + eos)[:max_length]
        if len(ids) > len(prompt):
            labels = ids if train_on_prompt else [-100] * len(prompt) + ids[len(prompt) :]
            examples.append({"input_ids": ids, "labels": list(labels)})
    if not examples:
        raise ConfigError("finetune.max_length", f"{max_length} tokens leave no room for any response after the prompt; raise it (e.g. 256)")
    return examples


def collate(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to its longest example; padding is masked out of attention and loss."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------------------------------------
# Training


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine decay to 0."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(params: list[torch.nn.Parameter], name: str, lr: float) -> torch.optim.Optimizer:
    """`auto`: bitsandbytes paged AdamW 32-bit on CUDA, torch AdamW on CPU (no weight decay, as alpaca-lora)."""
    on_cuda = params[0].is_cuda
    if name == "paged_adamw_32bit" and not on_cuda:
        raise ConfigError("finetune.optimizer", "paged_adamw_32bit needs the model on a CUDA GPU; use 'auto' or 'adamw' on CPU")
    if name == "paged_adamw_32bit" or (name == "auto" and on_cuda):
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW32bit(params, lr=lr, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def make_scaler(compute_dtype: str, device: torch.device, params: list[torch.nn.Parameter]) -> torch.amp.GradScaler:
    """Loss scaling for quant.compute_dtype float16 (GPUs without bf16: T4, V100): fp16 activation gradients
    of a per-token-normalised loss underflow to zero (fp16's smallest subnormal is 6e-8), so GradScaler
    multiplies the loss, unscales the gradients before clipping, skips a step whose gradients overflowed and
    adapts the scale. A pass-through for bfloat16 / float32, whose exponent range is float32's. The trained
    (LoRA) weights must be float32 masters: GradScaler cannot unscale fp16 gradients."""
    fp16 = compute_dtype == "float16"
    if fp16 and any(p.dtype == torch.float16 for p in params):
        raise ConfigError("quant.compute_dtype", "float16 training needs float32 LoRA weights (peft's default "
                          "autocast_adapter_dtype=True); keep them float32 or use bfloat16")
    return torch.amp.GradScaler(device.type, enabled=fp16)


def micro_batches(n_examples: int, batch_size: int, micro_batch_size: int, seed: int):
    """Yield, for each optimizer step, its list of micro-batches of example indices (seeded reshuffle per epoch)."""
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        step: list[int] = []
        while len(step) < batch_size:
            if not order:
                order = list(range(n_examples))
                rng.shuffle(order)
            step.append(order.pop())
        yield [step[i : i + micro_batch_size] for i in range(0, batch_size, micro_batch_size)]


def finetune(
    model: torch.nn.Module,
    tokenizer,
    cfg: Config,
    report: Optional[Callable[[dict], None]] = None,
    validate: Optional[Callable[[], dict]] = None,
    progress: bool = False,
) -> FinetuneResult:
    """Train the model's trainable (LoRA) parameters on `cfg.finetune.data` for `finetune.steps` optimizer steps.

    Every `report_every` steps: validate() (if given; qpruner.evaluate.make_validator gives val_logprob and
    val_acc), then report(step, train_loss, val_logprob, val_acc), where train_loss is the mean over those
    steps (ASHA stops a trial from outside, between reports). NaN/inf loss raises TrainingDiverged. Leaves the
    model in eval mode.
    """
    fcfg = cfg.finetune
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise QPrunerError("finetune: the model has no trainable parameters; wrap it with LoRA (peft.get_peft_model) first")
    records = load_alpaca(fcfg.data, cfg.output.cache, fcfg.max_examples)
    train_on_prompt = getattr(fcfg, "train_on_prompt", False)
    examples = tokenize_dataset(records, tokenizer, fcfg.max_length, train_on_prompt)
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)

    torch.manual_seed(fcfg.seed)
    optimizer = make_optimizer(params, fcfg.optimizer, fcfg.lr)
    device = model.get_input_embeddings().weight.device
    scaler = make_scaler(cfg.quant.compute_dtype, device, params)
    skipped = 0
    window = TrainingPeak(device)  # the memory objective: training steps only
    batches = micro_batches(len(examples), fcfg.batch_size, fcfg.micro_batch_size, fcfg.seed)
    losses: list[float] = []
    validations: list[dict] = []
    started = time.perf_counter()
    model.train()
    with tqdm(total=fcfg.steps, desc="fine-tune", unit="step", disable=not progress) as bar:
        for step in range(fcfg.steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, fcfg.lr, fcfg.warmup_steps, fcfg.steps)
            scale = scaler.get_scale() if scaler.is_enabled() else None
            losses.append(train_step(model, optimizer, params, [collate([examples[i] for i in idx], pad_id) for idx in next(batches)],
                                     device, scaler))
            skipped += scale is not None and scaler.get_scale() < scale  # GradScaler lowers the scale when it skips
            if not math.isfinite(losses[-1]):
                raise TrainingDiverged(
                    f"finetune: training diverged at step {step + 1} (loss {losses[-1]}); lower finetune.lr (now {fcfg.lr}) or use more bits"
                )
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")

            done = step + 1
            if done % fcfg.report_every:
                continue
            metrics = {"step": done, "train_loss": sum(losses[-fcfg.report_every :]) / fcfg.report_every,
                       "val_logprob": None, "val_acc": None}
            if validate is not None:
                window.pause()
                validations.append(validate())
                window.resume()
                metrics.update(validations[-1])
                model.train()  # lm-eval switches the model to eval mode
            if report is not None:
                report(metrics)
    model.eval()
    return FinetuneResult(len(losses), losses, time.perf_counter() - started, validations,
                          scaler.get_scale() if scaler.is_enabled() else None, skipped, window.read(),
                          paged_optimizer_bytes(optimizer))


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, params: list, chunks: list[dict], device,
               scaler: Optional[torch.amp.GradScaler] = None) -> float:
    """One optimizer step over the micro-batches of a global batch; returns its mean response-token loss.

    Each micro-batch's summed loss is divided by the global batch's token count, so accumulation matches
    one big batch. A non-finite loss skips the update (the caller raises). With an enabled `scaler` (float16
    compute, make_scaler) the forward runs under autocast(float16) and the backward on the scaled loss;
    gradients are unscaled before clipping, and a step with overflowed gradients is skipped by the scaler.
    """
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    n_tokens = max(1, sum(int((c["labels"][:, 1:] != -100).sum()) for c in chunks))
    total = 0.0
    for chunk in chunks:
        with torch.autocast(torch.device(device).type, dtype=torch.float16, enabled=scaler.is_enabled()):
            loss = response_loss(model, {k: v.to(device) for k, v in chunk.items()}) / n_tokens
        total += loss.item()
        if not math.isfinite(total):
            optimizer.zero_grad(set_to_none=True)
            return total
        scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total


def response_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled (response) tokens of one micro-batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logits = logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum")
