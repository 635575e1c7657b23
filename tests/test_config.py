"""Config loading: every shipped recipe validates; every kind of mistake is one line naming the field."""

from pathlib import Path

import pytest

from qpruner.config import ConfigError, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("recipe", sorted((ROOT / "tune_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(recipe):
    cfg = load_config(recipe)
    assert cfg.quant.bits and 0 <= cfg.prune.ratio < 1


def test_paper_recipes_match_the_paper():
    for ratio in (20, 50):
        cfg = load_config(ROOT / "tune_configs" / f"llama7b_prune{ratio}.yaml")
        assert cfg.prune.ratio == ratio / 100
        assert set(cfg.eval.tasks) == {"boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"}
        assert (cfg.finetune.lr, cfg.finetune.batch_size, cfg.finetune.micro_batch_size, cfg.finetune.max_length) == (3e-4, 8, 4, 256)
        assert cfg.lora.dropout == 0.05 and len(cfg.lora.target_modules) == 7
        assert cfg.search.sampler == "gp"


@pytest.mark.parametrize(
    "raw, field, words",
    [
        ({"prune": {"ratoi": 0.3}}, "prune.ratoi", "did you mean 'prune.ratio'"),
        ({"prune": {"ratio": 1.0}}, "prune.ratio", "[0, 1)"),
        ({"prune": {"ratio": "high"}}, "prune.ratio", "number"),
        ({"quant": {"bits": [4, 5]}}, "quant.bits", "not allowed"),
        ({"search": {"concurrency": 0}}, "search.concurrency", "> 0"),
        ({"search": {"sampler": "bayes"}}, "search.sampler", "one of"),
        ({"resources": {"gpu": 1.5}}, "resources.gpu", "fraction"),
        ({"resources": {"gpu": -0.5}}, "resources.gpu", "fraction"),
        ({"finetune": {"batch_size": 6, "micro_batch_size": 4}}, "finetune.batch_size", "multiple"),
        ({"finetune": {"data": "./missing.json"}}, "finetune.data", "does not exist"),
        ({"model": {"name": "./no/such/model"}}, "model.name", "does not exist"),
        ({"lora": {"rank": 0}}, "lora.rank", "> 0"),
        ({"modle": {}}, "modle", "did you mean 'model'"),
    ],
)
def test_bad_values_name_the_field(raw, field, words):
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert err.value.field == field
    assert words in str(err.value) and "\n" not in str(err.value)


def test_yaml_syntax_error_gives_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("prune:\n  ratio: 0.2\n  method: [taylor\n")
    with pytest.raises(ConfigError, match="line 3|line 4"):
        load_config(bad)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_model_folder_without_config_json(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        config_from_dict({"model": {"name": str(tmp_path)}})
