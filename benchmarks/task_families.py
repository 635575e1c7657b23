"""Try lm-eval task families offline through eval.local_data, on invented rows and the built-in tiny model.

    python -m benchmarks.task_families            # prints one JSON line per family, then a markdown table

For each family: write a few rows in the HF schema of the split lm-eval's task evaluates (a folder of
one file per subtask for a group), resolve and load the task through qpruner (lm-eval's own YAML, include
chain and process_docs), score the tiny model with lm-eval, and build the quick validation's gold-answer
requests where the task has a gold answer. docs/tasks.md is written from this output.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def mmlu(subject: str, n: int = 3) -> list[dict]:
    return [{"question": f"Which {subject} statement {i} holds?", "subject": subject,
             "choices": [f"one {i}", f"two {i}", f"three {i}", f"four {i}"], "answer": i % 4} for i in range(n)]


# family -> (eval.tasks name, rows, or {subtask: rows} for a group folder)
FAMILIES: dict[str, tuple[str, object]] = {
    "boolq": ("boolq", [{"question": "is the sky blue", "passage": "The sky looks blue.", "idx": i, "label": i % 2} for i in range(3)]),
    "piqa": ("piqa", [{"goal": "Dry wet hands.", "sol1": "Use a towel.", "sol2": "Use a pond.", "label": i % 2} for i in range(3)]),
    "hellaswag": ("hellaswag", [{"ind": i, "activity_label": "Cooking", "ctx_a": "A man cracks an egg.", "ctx_b": "he",
                                 "ctx": "A man cracks an egg. he", "endings": ["whisks it.", "sings.", "paints.", "leaves."],
                                 "source_id": "x", "split": "val", "split_type": "indomain", "label": "0"} for i in range(3)]),
    "winogrande": ("winogrande", [{"sentence": "The cup fell off the table because _ was shaky.", "option1": "the cup",
                                   "option2": "the table", "answer": "2"} for _ in range(3)]),
    "arc (arc_easy, arc_challenge)": ("arc_challenge", [{"id": f"c{i}", "question": "Which gas do animals breathe out?",
                                      "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"], "label": ["A", "B", "C", "D"]},
                                      "answerKey": "B"} for i in range(3)]),
    "openbookqa": ("openbookqa", [{"id": f"o{i}", "question_stem": "Rain comes from",
                                   "choices": {"text": ["rocks", "clouds", "roots", "sand"], "label": ["A", "B", "C", "D"]},
                                   "answerKey": "B"} for i in range(3)]),
    "wikitext": ("wikitext", [{"page": " = Old Mill = \n The Old Mill was built in 1820 and ground wheat . \n"} for _ in range(2)]),
    "lambada": ("lambada_openai", [{"text": "She opened the door and saw her old friend standing in the rain"} for _ in range(3)]),
    "mmlu (one subject)": ("mmlu_clinical_knowledge", mmlu("clinical_knowledge")),
    "mmlu (group: folder of subjects)": ("mmlu", {"mmlu_anatomy": mmlu("anatomy"), "mmlu_world_religions": mmlu("world_religions")}),
    "mmlu_stem (subgroup)": ("mmlu_stem", {"mmlu_astronomy": mmlu("astronomy")}),
    "openai-mmmlu (one language and subject)": ("mmmlu_fr_fr_astronomy", [
        {"Question": f"Question {i} ?", "A": "un", "B": "deux", "C": "trois", "D": "quatre", "Answer": "ABCD"[i % 4],
         "Subject": "astronomy"} for i in range(3)]),
    "cmmlu (one subject)": ("cmmlu_agronomy", [{"Question": f"问题 {i}", "A": "甲", "B": "乙", "C": "丙", "D": "丁", "Answer": "ABCD"[i % 4]}
                                               for i in range(3)]),
    "super_glue copa": ("copa", [{"premise": "The man broke his toe.", "choice1": "He dropped a hammer on his foot.",
                                  "choice2": "He got a hole in his sock.", "question": "cause", "idx": i, "label": 0} for i in range(3)]),
    "glue sst2": ("sst2", [{"sentence": "a gorgeous film", "label": 1, "idx": i} for i in range(3)]),
    "siqa (social_iqa)": ("social_iqa", [{"context": "Tracy gave Riley a gift.", "question": "How would Riley feel?",
                                         "answerA": "grateful", "answerB": "angry", "answerC": "bored", "label": "1"} for _ in range(3)]),
    "commonsense_qa": ("commonsense_qa", [{"id": f"q{i}", "question": "Where do you keep milk?", "question_concept": "milk",
                                           "choices": {"label": ["A", "B", "C", "D", "E"], "text": ["fridge", "oven", "desk", "car", "shoe"]},
                                           "answerKey": "A"} for i in range(3)]),
    "sciq": ("sciq", [{"question": "What do plants need?", "distractor1": "salt", "distractor2": "sand", "distractor3": "oil",
                       "correct_answer": "light", "support": "Plants use light."} for _ in range(3)]),
}


def write(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


def try_family(family: str, task: str, rows, root: Path, model, tokenizer) -> dict:
    from qpruner.config import config_from_dict
    from qpruner.evaluate import VALIDATED_TYPES, evaluate_model, gold_requests, leaves_of, load_tasks, resolve_tasks, stock_task_config

    if isinstance(rows, dict):
        location = str(root / task)
        for subtask, sub_rows in rows.items():
            write(root / task / f"{subtask}.jsonl", sub_rows)
        schema = sorted(next(iter(rows.values()))[0])
    else:
        location, schema = write(root / f"{task}.jsonl", rows), sorted(rows[0])
    cfg = config_from_dict({"eval": {"tasks": [task]}, "output": {"cache_dir": str(root / "cache")}})
    cfg.eval.local_data = {task: location}
    started = time.perf_counter()
    names, paths = resolve_tasks(cfg.eval, cfg.output.cache)
    loaded = load_tasks(tuple(names), tuple(paths))
    ev = evaluate_model(model, tokenizer, cfg.eval, cache_dir=cfg.output.cache)
    leaves = leaves_of(loaded, task, paths)
    types = sorted({loaded["tasks"][leaf].OUTPUT_TYPE for leaf in leaves})
    gold = sum(len(gold_requests(loaded["tasks"][leaf], 2)[0]) for leaf in leaves if loaded["tasks"][leaf].OUTPUT_TYPE in VALIDATED_TYPES)
    score = ev["tasks"][task]
    _, stock = stock_task_config(leaves[0], "eval.tasks")
    return {"family": family, "task": task, "group": task in loaded.get("groups", {}),
            "subtasks": leaves if len(leaves) > 1 or leaves != [task] else [],
            "dataset": stock["dataset_path"], "split": stock.get("test_split") or stock.get("validation_split"), "schema": schema,
            "output_type": types, "n_docs": score["n_docs"], "acc": score["acc"], "ppl": ev["task_ppl"].get(task),
            "gold_requests": gold, "seconds": round(time.perf_counter() - started, 2)}


def main() -> int:
    import torch

    from qpruner.builtin import ensure_tiny
    from qpruner.model import load_model

    torch.set_num_threads(2)
    model, tokenizer = load_model(str(ensure_tiny(progress=False).model_dir))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for family, (task, rows) in FAMILIES.items():
            try:
                result = try_family(family, task, rows, Path(tmp), model, tokenizer)
            except Exception as exc:  # a family that does not work offline is reported, not fatal
                result = {"family": family, "task": task, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            results.append(result)
            print(json.dumps(result, ensure_ascii=False), flush=True)
    print("\n| family | eval.tasks | hub dataset, split | output type | local file schema | tried |\n| --- | --- | --- | --- | --- | --- |")
    for r in results:
        if "error" in r:
            print(f"| {r['family']} | `{r['task']}` | | | | failed: {r['error']} |")
            continue
        what = f"{r['n_docs']} docs scored" + (f", acc {r['acc']:.2f}" if r["acc"] is not None else "") + (
            f", perplexity {r['ppl']:.3g}" if r["ppl"] is not None else "")
        print(f"| {r['family']} | `{r['task']}` | {r['dataset']}, {r['split']} | {', '.join(r['output_type'])} | {', '.join(r['schema'])} | {what} |")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
