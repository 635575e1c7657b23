"""The built-in tiny model (`builtin:tiny`): a small LLaMA with grouped-query attention, its tokenizer,
fine-tuning set and lm-eval tasks, all generated and trained on first use (about a minute on 2 CPU
cores) and cached, so qpruner runs end to end with no model hub.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from qpruner.builtin import world

VERSION = "tiny-v1"
SEQ_LEN = 64
TRAIN_STEPS = 700
BATCH = 32
MODEL_SHAPE = dict(
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention: 2 query heads share each key/value head
    head_dim=32,
    max_position_embeddings=256,
)


@dataclass(frozen=True)
class TinyAssets:
    model_dir: Path  # HF folder: config.json + model.safetensors + tokenizer
    tasks_dir: Path  # lm-eval YAML tasks with absolute data_files; TaskManager include_path
    test_tasks: tuple[str, ...]
    val_tasks: tuple[str, ...]  # the same tasks on held-out validation docs
    alpaca_path: Path  # jsonl of {"instruction", "input", "output"}
    corpus_path: Path  # one document per line: calibration text


TASKS = tuple(f"tiny_{attribute}" for attribute in world.QUESTIONS)


def ensure_tiny(cache_dir: Path | str | None = None, progress: bool = True) -> TinyAssets:
    """Build (first use) or load the tiny model and its data under <cache>/builtin/tiny-v1/."""
    from filelock import FileLock

    from qpruner.config import default_cache_dir

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    home = root / "builtin" / VERSION
    if not (home / "COMPLETE").is_file():
        home.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(home) + ".lock"):
            if not (home / "COMPLETE").is_file():
                _build(home, progress)
    return TinyAssets(
        model_dir=home / "model",
        tasks_dir=home / "tasks",
        test_tasks=TASKS,
        val_tasks=tuple(f"{t}_val" for t in TASKS),
        alpaca_path=home / "alpaca.jsonl",
        corpus_path=home / "corpus.txt",
    )


def resolve_builtin(cfg) -> None:
    """Turn every `builtin` in a Config into the tiny assets' local paths (built on first use), in place.

    The one place that knows `builtin`: model.name, finetune.data, prune.calibration.source and
    eval.tasks (-> the tiny task names, eval.include_path -> their folder with the `*_val` twins).
    """
    from qpruner.errors import ConfigError

    ecfg = cfg.eval
    if not (cfg.model.name == "builtin:tiny" or cfg.finetune.data == "builtin"
            or cfg.prune.calibration.source == "builtin" or "builtin" in ecfg.tasks):
        return
    assets = ensure_tiny(cfg.output.cache, progress=sys.stderr.isatty())
    if cfg.model.name == "builtin:tiny":
        cfg.model.name = str(assets.model_dir)
    if cfg.finetune.data == "builtin":
        cfg.finetune.data = str(assets.alpaca_path)
    if cfg.prune.calibration.source == "builtin":
        cfg.prune.calibration.source = str(assets.corpus_path)
    if "builtin" in ecfg.tasks:
        if ecfg.include_path and Path(ecfg.include_path).expanduser().resolve() != assets.tasks_dir.resolve():
            raise ConfigError("eval.include_path", "cannot be combined with eval.tasks 'builtin' (it uses the built-in task "
                              "folder); name your tasks without 'builtin' or drop include_path")
        names: list[str] = []
        for name in ecfg.tasks:
            names += [t for t in (assets.test_tasks if name == "builtin" else (name,)) if t not in names]
        ecfg.tasks = names
        ecfg.include_path = str(assets.tasks_dir)


def _build(home: Path, progress: bool) -> None:
    """Generate data, train tokenizer and model in a temp folder, then rename into place (atomic)."""
    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=home.parent))
    try:
        creatures = world.make_world(seed=0)
        docs = world.corpus(creatures, n_docs=6000)
        (tmp / "corpus.txt").write_text("\n".join(docs) + "\n")
        records = world.alpaca_records(creatures)
        (tmp / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        tokenizer = _train_tokenizer(docs, records)
        _write_tasks(home / "tasks", tmp / "tasks", creatures)
        model = _train_model(tokenizer, docs, progress)
        model.save_pretrained(tmp / "model", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "model")
        (tmp / "COMPLETE").write_text(json.dumps({"version": VERSION, "seconds": round(time.time() - started, 1)}))
        if home.exists():
            shutil.rmtree(home)
        os.replace(tmp, home)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _train_tokenizer(docs: list[str], records: list[dict]):
    """A byte-level BPE tokenizer trained on the world's text, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from qpruner.finetune import alpaca_prompt

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<pad>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=768, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = docs + [alpaca_prompt(r) + r["output"] for r in records]
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", model_max_length=256)


def _write_tasks(final_dir: Path, out: Path, creatures: list[world.Creature]) -> None:
    """lm-eval YAML tasks (absolute paths into final_dir) with test and held-out validation docs."""
    out.mkdir(parents=True)
    test, val = creatures[: world.N_TEST], creatures[world.N_TEST :]
    for attribute, (prompt, _) in world.QUESTIONS.items():
        name = f"tiny_{attribute}"
        for split, group in (("test", test), ("validation", val)):
            rows = world.task_docs(group, attribute)
            (out / f"{name}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        files = {s: str(final_dir / f"{name}_{s}.jsonl") for s in ("test", "validation")}
        template = prompt.replace("{name}", "{{name}}")
        for task, split in ((name, "test"), (f"{name}_val", "validation")):
            (out / f"{task}.yaml").write_text(_task_yaml(task, files, split, template))


def _task_yaml(task: str, files: dict, split: str, template: str) -> str:
    return (
        f"task: {task}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {files['test']}\n    validation: {files['validation']}\n"
        "output_type: multiple_choice\n"
        f"test_split: {split}\n"
        f"doc_to_text: {json.dumps(template)}\n"
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )


def _train_model(tokenizer, docs: list[str], progress: bool):
    """Train a GQA LLaMA on packed corpus text: seeded AdamW with cosine decay."""
    import torch
    from tqdm.auto import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **MODEL_SHAPE,
    )
    model = LlamaForCausalLM(config)
    ids = []
    for doc in docs:
        ids += [tokenizer.bos_token_id] + tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]
    data = torch.tensor(ids[: len(ids) // SEQ_LEN * SEQ_LEN]).view(-1, SEQ_LEN)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(0)
    model.train()
    bar = tqdm(range(TRAIN_STEPS), desc="training builtin:tiny (first use only)", disable=not progress)
    for step in bar:
        lr = 3e-3 * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / TRAIN_STEPS))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = data[torch.randint(len(data), (BATCH,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model
