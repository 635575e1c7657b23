"""The built-in tiny model: GQA LLaMA, local tokenizer, cached, and clearly above chance on its tasks."""

import json
import time

import pytest

from qpruner.builtin import ensure_tiny
from qpruner.errors import QPrunerError
from qpruner.model import load_model


def test_gqa_llama_with_local_tokenizer(tiny_assets):
    model, tok = load_model("builtin:tiny")
    cfg = model.config
    assert cfg.model_type == "llama"
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert not cfg.tie_word_embeddings
    text = "Question: what colour is the bakof?\nAnswer: red"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.pad_token is not None and tok.eos_token is not None


def test_second_call_uses_the_cache(tiny_assets):
    started = time.time()
    again = ensure_tiny(progress=False)
    assert again == tiny_assets
    assert time.time() - started < 1.0
    assert json.loads((tiny_assets.model_dir.parent / "COMPLETE").read_text())["version"] == "tiny-v1"


def test_test_and_validation_docs_are_disjoint(tiny_assets):
    for task in tiny_assets.test_tasks:
        test = {json.loads(line)["name"] for line in (tiny_assets.tasks_dir / f"{task}_test.jsonl").read_text().splitlines()}
        val = {json.loads(line)["name"] for line in (tiny_assets.tasks_dir / f"{task}_validation.jsonl").read_text().splitlines()}
        assert len(test) >= 100 and len(val) >= 40 and not test & val


def test_trained_model_is_clearly_above_chance(tiny_assets, tiny_config):
    from qpruner.evaluate import evaluate_model

    model, tok = load_model("builtin:tiny")
    scores = evaluate_model(model, tok, tiny_config.eval)
    print(scores)
    for task in tiny_assets.test_tasks:
        assert scores["tasks"][task]["acc"] >= 0.25 + 0.15, (task, scores)  # 4 choices: chance 0.25
    assert scores["mean_acc"] >= 0.65


@pytest.mark.parametrize("name, words", [("./no/such/folder", "model.name"), ("nobody/no-such-model-xyz", "model.name")])
def test_unloadable_model_is_one_clear_error(name, words, tmp_path):
    with pytest.raises(QPrunerError) as err:
        load_model(name)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_folder_without_config_json(tmp_path):
    with pytest.raises(QPrunerError, match="config.json"):
        load_model(str(tmp_path))
