"""Config loading: every shipped recipe validates; every kind of mistake is one line naming the field."""

from pathlib import Path

import pytest

from qpruner.config import ConfigError, config_from_dict, load_config
from qpruner.plan import resolved_config

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
        resolved_config(raw)  # parsing catches values; the driver's resolution catches missing files
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
        resolved_config({"model": {"name": str(tmp_path)}})


def test_parsing_reads_no_disk_and_builds_nothing(tmp_path, monkeypatch):
    """What every Ray task and trial does with the plan's config: no file checks, no tiny model build."""
    monkeypatch.setenv("QPRUNER_CACHE", str(tmp_path / "cache"))
    raw = {"model": {"name": "./no/such/model"}, "finetune": {"data": "./missing.json"},
           "eval": {"tasks": ["boolq"], "local_data": {"boolq": str(tmp_path / "absent.jsonl")}}}
    cfg = config_from_dict(raw)
    assert cfg.model.name == "./no/such/model" and not (tmp_path / "cache").exists()
    assert config_from_dict({}).model.name == "builtin:tiny"  # resolved only on the driver
    assert not (tmp_path / "cache").exists()
    import qpruner.config as config_module

    assert "qpruner.builtin" not in config_module.__dict__ and "resolve_builtin" not in Path(config_module.__file__).read_text()
