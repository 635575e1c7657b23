"""lm-eval evaluation of the in-memory tiny model: real lm-eval, real peft, the built-in tasks."""

import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from qpruner.errors import QPrunerError
from qpruner.evaluate import evaluate_model, load_tasks, make_validator, resolve_tasks
from qpruner.model import load_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tiny_assets):
    return load_model("builtin:tiny")


def chance_level(task_name: str, include_path: str) -> float:
    """Expected accuracy of uniform guessing: mean of 1/len(choices) over the task's evaluation docs."""
    task = load_tasks((task_name,), (include_path,))["tasks"][task_name]
    docs = list(task.eval_docs)
    return sum(1 / len(task.doc_to_choice(d)) for d in docs) / len(docs)


def test_resolve_builtin_expands_to_test_tasks(tiny_assets, tiny_config):
    names, paths = resolve_tasks(tiny_config.eval)
    assert names == list(tiny_assets.test_tasks)
    assert paths == [str(tiny_assets.tasks_dir)]


def test_unpruned_tiny_model_is_above_chance_on_every_builtin_task(tiny, tiny_assets, tiny_config):
    model, tokenizer = tiny
    result = evaluate_model(model, tokenizer, tiny_config.eval)
    assert set(result["tasks"]) == set(tiny_assets.test_tasks)
    for name, scores in result["tasks"].items():
        chance = chance_level(name, str(tiny_assets.tasks_dir))
        assert 0.0 <= scores["acc"] <= 1.0 and scores["acc_norm"] is not None
        assert scores["acc"] > chance + 0.15, f"{name}: acc {scores['acc']:.3f} vs chance {chance:.3f}"
    accs = [s["acc"] for s in result["tasks"].values()]
    assert result["mean_acc"] == pytest.approx(sum(accs) / len(accs))
    print(f"\nbuiltin test tasks: { {k: round(v['acc'], 3) for k, v in result['tasks'].items()} } in {result['seconds']:.2f}s")


def test_peft_model_in_memory_scores_like_its_base(tiny_assets, tiny_config):
    """HFLM takes the PeftModel object itself; LoRA starts at B = 0, so scores equal the base model's."""
    model, tokenizer = load_model("builtin:tiny")
    base = evaluate_model(model, tokenizer, tiny_config.eval, limit=40)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    wrapped = evaluate_model(peft_model, tokenizer, tiny_config.eval, limit=40)
    assert wrapped["tasks"] == base["tasks"]


def test_validator_reuses_tasks_restores_train_mode_and_is_fast(tiny_assets, tiny_config):
    model, tokenizer = load_model("builtin:tiny")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.5))
    tiny_config.finetune.val_limit = 16
    validate = make_validator(peft_model, tokenizer, tiny_config)
    peft_model.train()
    first = validate()
    assert peft_model.training, "validation must hand the model back in training mode"
    t = time.perf_counter()
    second = validate()
    seconds = time.perf_counter() - t
    assert set(first) == {"val_logprob", "val_acc"}
    assert first["val_logprob"] < 0 and 0.0 <= first["val_acc"] <= 1.0
    assert second == first  # eval mode: dropout off, same docs, deterministic
    # the validation tasks are the held-out *_val tasks, and they were loaded once
    val = load_tasks(tuple(tiny_assets.val_tasks), (str(tiny_assets.tasks_dir),))
    assert set(val["tasks"]) == set(tiny_assets.val_tasks)
    assert seconds < 10, f"one validation call took {seconds:.1f}s"
    print(f"\nvalidator: {first}, {seconds:.2f}s per call ({len(tiny_assets.val_tasks)} tasks x 16 docs)")


def test_unknown_task_is_a_one_line_error_with_suggestion(tiny_config):
    tiny_config.eval.tasks = ["boolqq"]
    with pytest.raises(QPrunerError) as err:
        resolve_tasks(tiny_config.eval)
    message = str(err.value)
    assert message.startswith("eval.tasks:") and "'boolqq'" in message and "boolq" in message.split(";")[1]
    assert "\n" not in message


def test_standard_task_names_pass_through(tiny_config):
    tiny_config.eval.tasks = ["boolq", "arc_easy"]
    names, paths = resolve_tasks(tiny_config.eval)
    assert names == ["boolq", "arc_easy"] and paths[0] == tiny_config.eval.include_path  # the tiny tasks' folder stays
    # and their validation twins on the splits the final score does not read
    assert sorted(p.name for p in Path(paths[1]).glob("*.yaml")) == ["arc_easy_val.yaml", "boolq_val.yaml"]


def test_task_data_that_cannot_be_loaded_offline_is_a_one_line_error(tiny_assets, tmp_path):
    """Offline with an EMPTY Hugging Face cache (a child process, so what this machine happens to have cached
    cannot decide the outcome), boolq cannot load: evaluate_model raises one line naming eval.local_data.boolq."""
    import os
    import subprocess
    import sys

    script = (
        "from qpruner.errors import QPrunerError\n"
        "from qpruner.evaluate import evaluate_model\n"
        "from qpruner.model import load_model\n"
        "from qpruner.plan import resolved_config\n"
        f"model, tokenizer = load_model({str(tiny_assets.model_dir)!r})\n"
        "try:\n"
        "    evaluate_model(model, tokenizer, resolved_config({'eval': {'tasks': ['boolq']}}).eval, limit=2)\n"
        "except QPrunerError as err:\n"
        "    print('REFUSED', err)\n"
    )
    empty = tmp_path / "hf"
    env = {**os.environ, "HF_HOME": str(empty), "HF_DATASETS_CACHE": str(empty / "datasets"),
           "HF_HUB_CACHE": str(empty / "hub"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("QPRUNER_ONLINE", None)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    refused = [line for line in done.stdout.splitlines() if line.startswith("REFUSED ")]
    assert done.returncode == 0 and len(refused) == 1, done.stderr[-2000:]
    assert refused[0].startswith("REFUSED eval.local_data.boolq: task 'boolq' cannot load"), refused[0]
    assert "--set eval.local_data.boolq=FILE" in refused[0]


def test_paper_metric_is_acc_norm_where_llm_pruner_reports_it():
    from qpruner.evaluate import mean_acc

    scores = {"hellaswag": {"acc": 0.40, "acc_norm": 0.50}, "arc_challenge": {"acc": 0.30, "acc_norm": 0.36},
              "boolq": {"acc": 0.70, "acc_norm": None}, "winogrande": {"acc": 0.60, "acc_norm": 0.90}}
    assert mean_acc(scores, "paper") == pytest.approx((0.50 + 0.36 + 0.70 + 0.60) / 4)
    assert mean_acc(scores, "acc") == pytest.approx((0.40 + 0.30 + 0.70 + 0.60) / 4)
    assert mean_acc(scores, "acc_norm") == pytest.approx((0.50 + 0.36 + 0.70 + 0.90) / 4)  # boolq has none: acc


def test_eval_metric_is_validated():
    from qpruner.errors import ConfigError
    from qpruner.plan import resolved_config

    assert resolved_config({}).eval.metric == "paper"
    with pytest.raises(ConfigError, match="eval.metric"):
        resolved_config({"eval": {"metric": "f1"}})


def test_mean_acc_stderr_is_lm_evals_per_task_stderr_combined():
    """Each task's standard error equals lm-eval's mean_stderr of its 0/1 document scores; the mean over
    tasks combines them as independent: sqrt(sum se^2) / T. The metric choice follows eval.metric."""
    from lm_eval.api.metrics import mean_stderr

    from qpruner.evaluate import mean_acc_stderr

    boolq, piqa = [1, 0, 1, 1, 0, 0, 1, 1], [1] * 9 + [0] * 11
    norm = [1] * 12 + [0] * 8
    scores = {"boolq": {"acc": 5 / 8, "acc_norm": None, "n_docs": 8},
              "piqa": {"acc": 9 / 20, "acc_norm": 12 / 20, "n_docs": 20},
              "wikitext": {"acc": None, "word_perplexity": 30.0, "n_docs": 5}}
    expected = (mean_stderr(boolq) ** 2 + mean_stderr(piqa) ** 2) ** 0.5 / 2
    assert mean_acc_stderr(scores, "acc") == pytest.approx(expected, rel=1e-12)
    expected_norm = (mean_stderr(boolq) ** 2 + mean_stderr(norm) ** 2) ** 0.5 / 2
    assert mean_acc_stderr(scores, "acc_norm") == pytest.approx(expected_norm, rel=1e-12)
    assert mean_acc_stderr({"boolq": {"acc": 1.0, "n_docs": 1}}) is None  # one document: no spread to measure
