"""Convert the original dataset releases in ../shared/data into the HF schemas lm-eval's stock tasks read.

`python -m benchmarks.convert_data [--out DIR] [--check]` writes one jsonl per task (default
~/.cache/qpruner/benchmark_data/<task>.jsonl) for `eval.local_data`, and with --check loads every
file through qpruner's derived lm-eval tasks and prints each task's first document as lm-eval sees it.
Never imported by the product; ../shared is found relative to this repository.

Format quirks (see also ../shared/data/PROVENANCE.md):
- boolq: Google's dev.jsonl has `answer` as a JSON bool and a `title`; super_glue boolq wants
  question/passage/idx/label (label 1 = true). idx is the row number.
- piqa: goal/sol1/sol2 rows, labels in a separate valid-labels.lst (one 0/1 a line, same order).
- winogrande: one CSV with every split (`Split` column); only the dev rows are the official
  validation split (lm-eval's winogrande_xl validation, 1267 rows), labelled by the official
  dev-labels.lst (checked against the CSV's `Answer` column; a mismatch aborts).
- openbookqa: nested question.stem / question.choices[{text,label}] flattened to question_stem and
  choices{text[],label[]}; lm-eval scores the test split (test.jsonl).
- hellaswag: llama.cpp's 6-line text export (`activity_label: ctx`, gold 0-3, four endings) has no
  ctx_a/ctx_b split. lm-eval builds `ctx_a + " " + ctx_b.capitalize()`; ctx_b is recovered as the
  trailing lower-case fragment after the last sentence end ("... on a roof. he" -> ctx_b "he"),
  else empty. The exporter already removed the [header]/[title]/[step] markers, so lm-eval's
  preprocess has little left to do; spacing may differ slightly from the original.
- arc_easy / arc_challenge: LLM-Adapters' instruction export hides question and choices inside
  `instruction` ("...question: Q\\n\\nAnswer1: a Answer2: b ...\\n\\nAnswer format: ..."), the gold is
  `answer` = "answerN". The original ids and choice labels are gone: ids are `<task>-<row>` and labels
  A, B, C... (lm-eval only uses the label to find the gold's index). Some items have 3 or 5 choices.
- wikitext: the raw test file (CRLF, blank lines dropped in this re-export) is cut into articles at
  top-level ` = Title = ` headings, one `page` per article as in EleutherAI/wikitext_document_level;
  line breaks are \\n. Perplexities therefore shift slightly from figures on the original file.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import json
import re
import sys
from pathlib import Path

from benchmarks.common import shared_data

TASKS = ("boolq", "piqa", "winogrande", "openbookqa", "hellaswag", "arc_easy", "arc_challenge", "wikitext")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def boolq(src: Path) -> list[dict]:
    return [{"question": r["question"], "passage": r["passage"], "idx": i, "label": int(bool(r["answer"]))}
            for i, r in enumerate(_jsonl(src / "boolq" / "dev.jsonl"))]


def piqa(src: Path) -> list[dict]:
    rows = _jsonl(src / "piqa" / "valid.jsonl")
    labels = [int(x) for x in (src / "piqa" / "valid-labels.lst").read_text().split()]
    assert len(rows) == len(labels), "piqa: rows and labels differ in length"
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": y} for r, y in zip(rows, labels)]


def winogrande(src: Path) -> list[dict]:
    with open(src / "winogrande" / "winogrande.csv", newline="", encoding="utf-8") as fh:
        dev = [r for r in csv.DictReader(fh) if r["Split"] == "dev"]
    labels = (src / "winogrande" / "dev-labels.lst").read_text().split()
    assert len(dev) == len(labels), f"winogrande: {len(dev)} dev rows but {len(labels)} labels"
    bad = sum(r["Answer"].strip() != y for r, y in zip(dev, labels))
    assert bad == 0, f"winogrande: {bad} CSV answers disagree with dev-labels.lst"
    return [{"sentence": r["English Sentence"], "option1": r["English Option 1"], "option2": r["English Option 2"], "answer": y}
            for r, y in zip(dev, labels)]


def openbookqa(src: Path) -> list[dict]:
    return [{"id": r["id"], "question_stem": r["question"]["stem"],
             "choices": {"text": [c["text"] for c in r["question"]["choices"]], "label": [c["label"] for c in r["question"]["choices"]]},
             "answerKey": r["answerKey"]} for r in _jsonl(src / "openbookqa" / "test.jsonl")]


def split_ctx(ctx: str) -> tuple[str, str]:
    """(ctx_a, ctx_b): the trailing lower-case fragment after the last sentence end is ctx_b."""
    match = re.match(r"^(.*[.!?])\s+([a-z][^.!?]*)$", ctx)
    return (match.group(1), match.group(2)) if match else (ctx, "")


def hellaswag(src: Path) -> list[dict]:
    lines = bz2.decompress((src / "hellaswag" / "hellaswag_val_full.txt.bz2").read_bytes()).decode("utf-8").splitlines()
    assert len(lines) % 6 == 0, "hellaswag: the export must have 6 lines per item"
    rows = []
    for i in range(0, len(lines), 6):
        head, gold, endings = lines[i], lines[i + 1], lines[i + 2 : i + 6]
        label, _, ctx = head.partition(": ")
        ctx_a, ctx_b = split_ctx(ctx)
        rows.append({"ind": i // 6, "activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": ctx, "endings": endings,
                     "source_id": "", "split": "val", "split_type": "", "label": str(int(gold))})
    return rows


def arc(src: Path, task: str) -> list[dict]:
    rows = []
    for i, r in enumerate(json.loads((src / task / "test.json").read_text())):
        body = r["instruction"].split("question:", 1)[1].split("\n\nAnswer format:", 1)[0]
        question, _, options = body.partition("\n\nAnswer1:")
        texts = [t.strip() for t in re.split(r"\s*Answer\d+:\s*", "Answer1:" + options) if t.strip()]
        gold = int(r["answer"].removeprefix("answer")) - 1
        assert 0 <= gold < len(texts), f"{task} row {i}: gold {r['answer']} but {len(texts)} choices"
        labels = [chr(ord("A") + k) for k in range(len(texts))]
        rows.append({"id": f"{task}-{i}", "question": question.strip(), "choices": {"text": texts, "label": labels},
                     "answerKey": labels[gold]})
    return rows


def wikitext(src: Path) -> list[dict]:
    text = (src / "text" / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8").replace("\r\n", "\n")
    pages, current = [], []
    for line in text.split("\n"):
        if re.match(r"^ = [^=].* = $", line) and current:
            pages.append("\n".join(current) + "\n")
            current = []
        if line:
            current.append(line)
    if current:
        pages.append("\n".join(current) + "\n")
    return [{"page": p} for p in pages]


CONVERTERS = {"boolq": boolq, "piqa": piqa, "winogrande": winogrande, "openbookqa": openbookqa, "hellaswag": hellaswag,
              "arc_easy": lambda s: arc(s, "arc_easy"), "arc_challenge": lambda s: arc(s, "arc_challenge"), "wikitext": wikitext}


def default_out() -> Path:
    import os

    return Path(os.environ.get("QPRUNER_CACHE", "~/.cache/qpruner")).expanduser() / "benchmark_data"


def write_if_changed(path: Path, text: str) -> None:
    """Replace `path` atomically, and only when its text changes: a study running beside may be reading it."""
    if path.is_file() and path.read_text() == text:
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def convert(out: Path, tasks=TASKS) -> dict[str, str]:
    """Write <out>/<task>.jsonl for each task; returns {task: file} (an eval.local_data mapping)."""
    src = shared_data()
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for task in tasks:
        rows = CONVERTERS[task](src)
        path = out / f"{task}.jsonl"
        write_if_changed(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        files[task] = str(path)
        print(f"{task}: {len(rows)} rows -> {path}", file=sys.stderr)
    return files


def check(files: dict[str, str]) -> None:
    """Load every file through qpruner's derived lm-eval tasks and print the first doc as lm-eval sees it."""
    from qpruner.evaluate import load_tasks, resolve_tasks
    from qpruner.plan import resolved_config

    cfg = resolved_config({"eval": {"tasks": list(files), "local_data": files}})
    loaded = load_tasks(*map(tuple, resolve_tasks(cfg.eval)))
    for name, task in loaded["tasks"].items():
        docs = list(task.eval_docs)
        doc = docs[0]
        text = task.doc_to_text(doc)
        if task.OUTPUT_TYPE == "multiple_choice":
            print(f"--- {name} ({len(docs)} docs)\n{text!s}\n  choices={task.doc_to_choice(doc)} target={task.doc_to_target(doc)}")
        else:
            print(f"--- {name} ({len(docs)} docs) target[:200]={str(task.doc_to_target(doc))[:200]!r}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default_out())
    parser.add_argument("--check", action="store_true", help="load the files through lm-eval and print a doc of each")
    args = parser.parse_args()
    files = convert(args.out)
    if args.check:
        check(files)
    print(json.dumps(files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
