"""Offline benchmarks: lm-eval's stock tasks read local files (eval.local_data / eval.val_data),
preflight fails fast and writes nothing, `--set` overrides, and Ray errors arrive as one line.

Every fixture is a few rows invented here, in the HF schema of the split lm-eval's stock task reads.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qpruner.config import config_from_dict
from qpruner.errors import ConfigError
from qpruner.plan import resolved_config

REPO = Path(__file__).resolve().parents[1]

# Two invented rows per task, in the schema of the split lm-eval evaluates.
ROWS = {
    "boolq": [
        {"question": "is the sky blue on a clear day", "passage": "On a clear day the sky looks blue.", "idx": 0, "label": 1},
        {"question": "do fish live on the moon", "passage": "Fish live in water on Earth.", "idx": 1, "label": 0},
    ],
    "piqa": [
        {"goal": "Dry wet hands.", "sol1": "Rub them with a towel.", "sol2": "Dip them in a pond.", "label": 0},
        {"goal": "Keep soup warm.", "sol1": "Put it in the freezer.", "sol2": "Put a lid on the pot.", "label": 1},
    ],
    "hellaswag": [
        {"ind": 0, "activity_label": "Cooking", "ctx_a": "A man cracks an egg into a bowl.", "ctx_b": "he",
         "ctx": "A man cracks an egg into a bowl. he", "endings": ["whisks it with a fork.", "sings to the moon.",
         "paints the bowl red.", "throws the bowl away."], "source_id": "x", "split": "val", "split_type": "indomain",
         "label": "0"},
        {"ind": 1, "activity_label": "Running", "ctx_a": "A woman ties her shoes.", "ctx_b": "she",
         "ctx": "A woman ties her shoes. she", "endings": ["eats the laces.", "starts to jog down the road.",
         "falls asleep at once.", "buys a boat."], "source_id": "y", "split": "val", "split_type": "indomain",
         "label": "1"},
    ],
    "winogrande": [
        {"sentence": "The cup fell off the table because _ was shaky.", "option1": "the cup", "option2": "the table", "answer": "2"},
        {"sentence": "Anna lent Maria a pen because _ had two.", "option1": "Anna", "option2": "Maria", "answer": "1"},
    ],
    "arc_easy": [
        {"id": "e1", "question": "What do plants need to grow?",
         "choices": {"text": ["light", "darkness", "plastic", "noise"], "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
        {"id": "e2", "question": "Which is a liquid?",
         "choices": {"text": ["ice", "water", "stone"], "label": ["A", "B", "C"]}, "answerKey": "B"},
    ],
    "arc_challenge": [
        {"id": "c1", "question": "Which gas do animals breathe out?",
         "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"], "label": ["1", "2", "3", "4"]}, "answerKey": "2"},
        {"id": "c2", "question": "What makes a shadow?",
         "choices": {"text": ["blocked light", "loud sound", "warm air", "cold water"], "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
    ],
    "openbookqa": [
        {"id": "o1", "question_stem": "A magnet will stick to",
         "choices": {"text": ["a nail", "a leaf", "a glass", "a cork"], "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
        {"id": "o2", "question_stem": "Rain comes from",
         "choices": {"text": ["rocks", "clouds", "roots", "sand"], "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
    ],
    "wikitext": [
        {"page": " = Small River = \n The Small River runs through a quiet valley . It is 12 @.@ 5 km long . \n"},
        {"page": " = Old Mill = \n The Old Mill was built in 1820 and ground wheat for the town . \n"},
    ],
}


def write_rows(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("local_data")
    suffix = {"piqa": ".parquet"}  # one parquet file: both formats are read
    return {t: str(write_rows(root / f"{t}{suffix.get(t, '.jsonl')}", rows)) for t, rows in ROWS.items()}


@pytest.fixture(scope="module")
def tiny_lm(tiny_assets):
    from qpruner.evaluate import wrap_model
    from qpruner.model import load_model

    model, tok = load_model(str(tiny_assets.model_dir))
    return wrap_model(model, tok, batch_size=8)


def test_every_derived_task_loads_through_lm_eval_and_scores_the_tiny_model(fixtures, tiny_lm, tmp_path):
    """The derived task keeps lm-eval's name, prompts and metrics; only the rows come from the file."""
    from qpruner.evaluate import load_tasks, resolve_tasks, run_tasks

    cfg = resolved_config({"eval": {"tasks": list(ROWS), "local_data": fixtures}})
    started = time.perf_counter()
    names, paths = resolve_tasks(cfg.eval, cfg.output.cache)
    loaded = load_tasks(tuple(names), tuple(paths))
    assert time.perf_counter() - started < 20  # no 20 s lm-eval index, no hub
    assert sorted(loaded["tasks"]) == sorted(ROWS)
    hella = loaded["tasks"]["hellaswag"]
    doc = list(hella.eval_docs)[0]
    assert hella.doc_to_text(doc) == "Cooking: A man cracks an egg into a bowl. He"  # lm-eval's process_docs ran
    wino = loaded["tasks"]["winogrande"]
    assert wino.doc_to_choice(list(wino.eval_docs)[0])[1] == "The cup fell off the table because the table"
    scores = run_tasks(tiny_lm, loaded, stderr=True)
    for task in ROWS:
        if task == "wikitext":
            assert scores[task]["acc"] is None
            assert math.isfinite(scores[task]["word_perplexity"]) and scores[task]["word_perplexity"] > 1
        else:
            assert scores[task]["acc"] in (0.0, 0.5, 1.0), task  # two docs scored
            assert scores[task]["acc_stderr"] is not None or scores[task]["acc"] in (0.0, 1.0)
        assert scores[task]["n_docs"] == 2


def test_val_data_becomes_a_val_twin_and_builtin_twins_are_found(fixtures, tmp_path, tiny_config):
    from qpruner.evaluate import load_tasks, tasks_without_validation_split, validation_tasks

    cfg = resolved_config({"eval": {"tasks": ["boolq", "arc_easy"], "local_data": {"boolq": fixtures["boolq"], "arc_easy": fixtures["arc_easy"]},
                                     "val_data": {"boolq": fixtures["boolq"]}}})
    names, paths = validation_tasks(cfg)
    assert names == ("boolq_val", "arc_easy")
    assert tasks_without_validation_split(cfg) == ["arc_easy"]
    assert len(list(load_tasks(names, paths)["tasks"]["boolq_val"].eval_docs)) == 2
    builtin_names, _ = validation_tasks(tiny_config)
    assert all(n.endswith("_val") for n in builtin_names) and tasks_without_validation_split(tiny_config) == []


def test_local_data_errors_name_the_field(fixtures, tmp_path):
    with pytest.raises(ConfigError, match=r"eval\.local_data\.boolq: file .* does not exist"):
        resolved_config({"eval": {"tasks": ["boolq"], "local_data": {"boolq": str(tmp_path / "nope.jsonl")}}})
    with pytest.raises(ConfigError, match=r"eval\.local_data\.boolq: .* must end in"):
        resolved_config({"eval": {"tasks": ["boolq"], "local_data": {"boolq": fixtures["boolq"] + ".csv"}}})
    with pytest.raises(ConfigError, match=r"eval\.local_data: must be a mapping"):
        resolved_config({"eval": {"local_data": ["boolq"]}})
    with pytest.raises(ConfigError, match=r"eval\.local_data\.boolq: must be a string"):
        resolved_config({"eval": {"local_data": {"boolq": 3}}})


def test_builtin_resolves_to_plain_paths_at_load(tiny_assets, tiny_config):
    assert tiny_config.model.name == str(tiny_assets.model_dir)
    assert tiny_config.finetune.data == str(tiny_assets.alpaca_path)
    assert tiny_config.prune.calibration.source == str(tiny_assets.corpus_path)
    assert tiny_config.eval.tasks == list(tiny_assets.test_tasks)
    assert tiny_config.eval.include_path == str(tiny_assets.tasks_dir)
    again = config_from_dict(tiny_config.to_dict())  # what Ray workers and recorded runs rebuild: no resolution
    assert again.to_dict() == tiny_config.to_dict()


def _cli(args: list[str], tmp_path: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "QPRUNER_ONLINE"))}
    env.update(PYTHONPATH=str(REPO), **(env_extra or {}))
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_unreachable_task_fails_preflight_fast_with_one_line_and_no_out(tmp_path):
    """boolq without local data, offline by default: one line naming the fix, exit 2, no --out, < 5 s."""
    (tmp_path / "r.yaml").write_text("eval:\n  tasks: [boolq]\n")
    out = tmp_path / "out"
    started = time.perf_counter()
    proc = _cli(["-m", "qpruner.tune", "--config", "r.yaml", "--out", str(out), "--set", "search.num_samples=1"], tmp_path,
                {"HF_HOME": str(tmp_path / "hf")})  # an empty HF cache: boolq is surely not there
    wall = time.perf_counter() - started
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: eval.local_data.boolq:") and "--set eval.local_data.boolq=FILE" in lines[0], proc.stderr
    assert not out.exists()
    print(f"\nunreachable boolq: exit 2 after {wall:.2f}s (whole CLI process)")
    # The check itself is ~1 s (test below); the process start (torch, lm-eval, Ray imports) is most of the rest.
    assert wall < 30


def test_preflight_unreachable_task_itself_under_5s(tmp_path, monkeypatch):
    """The preflight check alone (imports done) takes well under 5 s for an unreachable hub task."""
    from qpruner.plan import preflight

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    cfg = resolved_config({"eval": {"tasks": ["arc_easy"]}})
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="eval.local_data.arc_easy"):
        preflight(cfg)
    assert time.perf_counter() - started < 5


def test_set_misspelt_key_exits_2_with_suggestion(tmp_path):
    (tmp_path / "r.yaml").write_text("search:\n  num_samples: 1\n")
    proc = _cli(["-m", "qpruner.prune", "--config", "r.yaml", "--set", "finetune.stpes=100"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: finetune.stpes: unknown key; did you mean 'finetune.steps'?"


def test_set_values_get_their_yaml_type(tmp_path):
    from qpruner.cli import base_parser, load_cli_config, parse_overrides

    (tmp_path / "r.yaml").write_text("finetune:\n  steps: 5\n")
    rows = write_rows(tmp_path / "b.jsonl", ROWS["boolq"])
    args = base_parser("x", "y").parse_args(["--config", str(tmp_path / "r.yaml"), "--set", "finetune.steps=100",
                                             "--set", "quant.bits=[4, 16]", "--set", "eval.limit=null",
                                             "--set", f"eval.local_data.boolq={rows}", "--set", "lora.dropout=0.1"])
    cfg = load_cli_config(args)
    assert cfg.finetune.steps == 100 and cfg.quant.bits == [4, 16] and cfg.eval.limit is None
    assert cfg.eval.local_data == {"boolq": str(rows)} and cfg.lora.dropout == 0.1
    with pytest.raises(ConfigError, match=r"finetune\.steps: must be an integer, got 'ten'"):
        load_cli_config(base_parser("x", "y").parse_args(["--config", str(tmp_path / "r.yaml"), "--set", "finetune.steps=ten"]))
    with pytest.raises(ConfigError, match=r"--set: 'steps' must look like KEY=VALUE"):
        parse_overrides(["steps"])


def test_config_error_inside_a_ray_task_arrives_as_itself():
    import ray

    from qpruner.errors import ray_get

    def fails():
        raise ConfigError("eval.tasks", "cannot load boolq")

    ray.init(num_cpus=1, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        with pytest.raises(ConfigError) as info:
            ray_get(ray.remote(fails).remote())
        assert str(info.value) == "eval.tasks: cannot load boolq" and type(info.value) is ConfigError
    finally:
        ray.shutdown()


# ---------------------------------------------------------------------------------------------
# Quick validation: disjoint data, gold log-probability.


def test_quick_validation_scores_the_gold_answer_as_lm_eval_does_on_every_task_type(fixtures, tiny_lm):
    """The validator's accuracy equals lm-eval's own acc on the same documents for every multiple-choice
    task type (WinoGrande's multiple_input too), and its log-probability is a finite log-probability
    that separates the choices (not the uniform log 1/k). Fails before: the validator
    returned lm-eval's accuracy alone, and there was no gold-answer scoring to compare."""
    import numpy as np

    from qpruner.evaluate import gold_requests, gold_scores, load_tasks, resolve_tasks, run_tasks

    tasks = [t for t in ROWS if t != "wikitext"]
    cfg = resolved_config({"eval": {"tasks": tasks, "local_data": {t: fixtures[t] for t in tasks}}})
    loaded = load_tasks(*map(tuple, resolve_tasks(cfg.eval, cfg.output.cache)))
    lm_eval_acc = run_tasks(tiny_lm, loaded)
    for name in tasks:
        instances, golds = gold_requests(loaded["tasks"][name], limit=2)
        logp, acc = gold_scores(tiny_lm, instances, golds)
        assert acc == lm_eval_acc[name]["acc"], name
        n_choices = len(instances) / 2
        assert math.isfinite(logp) and logp < 0 and np.exp(logp) != pytest.approx(1 / n_choices, abs=1e-9), name


def test_a_task_without_another_split_holds_its_validation_docs_out_of_the_final_score(fixtures, tiny_assets, tmp_path):
    """arc_easy from local data has no other split: validation reads its first val_limit documents and
    every final evaluation skips them; boolq with eval.val_data keeps all its documents. Fails before:
    validation read the first documents of the test split and the final score counted them again."""
    from qpruner.evaluate import evaluate_model, gold_requests, held_out_docs, validated_tasks, validation_plan
    from qpruner.model import load_model

    rows = [dict(ROWS["arc_easy"][i % 2], id=f"e{i}") for i in range(5)]
    arc = write_rows(tmp_path / "arc_easy.jsonl", rows)
    cfg = resolved_config({"eval": {"tasks": ["boolq", "arc_easy", "wikitext"], "local_data": {"boolq": fixtures["boolq"], "arc_easy": str(arc),
                                     "wikitext": fixtures["wikitext"]}, "val_data": {"boolq": fixtures["boolq"]}}, "finetune": {"val_limit": 2}})
    assert held_out_docs(cfg) == {"arc_easy": 2}  # wikitext has no gold answer: never validated, nothing held out
    plan = validation_plan(cfg)
    assert "held out of the final score" in plan["arc_easy"] and "val_data" in plan["boolq"]
    assert plan["wikitext"].startswith("not validated")
    instances, _ = gold_requests(validated_tasks(cfg)["arc_easy"], cfg.finetune.val_limit)
    assert {i.doc_id for i in instances} == {0, 1}
    model, tok = load_model(str(tiny_assets.model_dir))
    scores = evaluate_model(model, tok, cfg.eval, skip=held_out_docs(cfg))["tasks"]
    assert scores["arc_easy"]["n_docs"] == 3 and scores["boolq"]["n_docs"] == 2
    assert scores["wikitext"]["n_docs"] == len(ROWS["wikitext"])
    assert evaluate_model(model, tok, cfg.eval, limit=1, skip=held_out_docs(cfg))["tasks"]["arc_easy"]["n_docs"] == 1
    cfg.finetune.val_limit = 5
    with pytest.raises(ConfigError, match=r"finetune\.val_limit: .*arc_easy.* leaving none"):
        evaluate_model(model, tok, cfg.eval, skip=held_out_docs(cfg))


def test_stock_hub_tasks_validate_on_their_other_split(cache):
    """Hub tasks get a `<task>_val` twin of lm-eval's own YAML that evaluates the split the final score
    does not read (boolq scores validation -> twin reads train; arc_easy scores test -> twin reads
    validation); wikitext has no gold answer, so nothing is derived for it. Fails before: no twin, so
    validation read the scored split."""
    import yaml as pyyaml

    from qpruner.evaluate import derived_tasks_dir, tasks_without_validation_split, validation_plan, validation_tasks

    cfg = resolved_config({"eval": {"tasks": ["boolq", "arc_easy", "wikitext"]}, "output": {"cache_dir": str(cache)}})
    names, _ = validation_tasks(cfg)
    assert names == ("boolq_val", "arc_easy_val", "wikitext")
    derived = derived_tasks_dir(cfg.eval, cache)
    assert pyyaml.safe_load((derived / "boolq_val.yaml").read_text())["test_split"] == "train"
    assert pyyaml.safe_load((derived / "arc_easy_val.yaml").read_text())["test_split"] == "validation"
    assert tasks_without_validation_split(cfg) == ["wikitext"]
    assert "'train' split" in validation_plan(cfg)["boolq"]
