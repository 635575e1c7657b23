"""Exactness per model family (llama, mistral, qwen2, qwen3), tied and untied embeddings, on small
random-initialised models built from each family's own transformers config.

- pruning nothing (prune.ratio 0) reproduces the original logits exactly;
- a pruned model saved and reloaded (qpruner's loader and the standalone loader in a process without
  qpruner) reproduces the in-memory pruned model's logits exactly, for Taylor, SlimGPT and random;
- removing heads and channels whose weights were zeroed beforehand leaves the logits unchanged;
- an exported adapter reloads to the trial's accuracy;
- what is not supported (GPT-2, a llama with biases, pickle-only folders) is one line and exit 2.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qpruner.errors import ConfigError
from qpruner.plan import resolved_config

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
TEXTS = ["the bakof lives in the forest and eats berries .", "a red creature sleeps near the river at night .",
         "Question: what colour is the mipo?\nAnswer: blue", "the home of the zarn is the mountain ."]


def family_config(family: str, vocab: int, tied: bool, **ids):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    return cls(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=tied,
               initializer_range=0.1, **ids)


@pytest.fixture(scope="module")
def make_folder(tmp_path_factory, tiny_assets):
    """(family, tied) -> an HF folder holding a random-initialised model of that family (biases random too)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets.model_dir)
    made = {}

    def make(family: str, tied: bool) -> Path:
        if (family, tied) not in made:
            torch.manual_seed(0)
            config = family_config(family, len(tokenizer), tied, bos_token_id=tokenizer.bos_token_id,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            model = AutoModelForCausalLM.from_config(config)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name.endswith("bias"):
                        p.normal_(0, 0.5)
            folder = tmp_path_factory.mktemp(f"{family}-{'tied' if tied else 'untied'}")
            model.save_pretrained(folder, safe_serialization=True)
            tokenizer.save_pretrained(folder)
            made[family, tied] = folder
        return made[family, tied]

    return make


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def calibration(tokenizer) -> list[torch.Tensor]:
    return [tokenizer(t, return_tensors="pt").input_ids for t in TEXTS]


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_nothing_reproduces_the_original_logits(family, tied, make_folder, cache):
    from qpruner.model import load_model
    from qpruner.prune import load_pruned, prune_cached

    folder = make_folder(family, tied)
    original, tokenizer = load_model(str(folder))
    assert original.config.model_type == family
    cfg = resolved_config({"model": {"name": str(folder)}, "prune": {"ratio": 0.0}, "output": {"cache_dir": str(cache)}})
    result = prune_cached(cfg, progress=False)
    assert result.params_after == result.params_before
    pruned, _ = load_pruned(result.path)
    assert type(pruned) is type(original)
    assert torch.equal(logits(pruned, tokenizer), logits(original, tokenizer))


@pytest.mark.parametrize("method", ["taylor", "slimgpt", "random"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_model_reloads_to_the_same_logits(family, tied, method, make_folder, tmp_path):
    from qpruner.model import load_model
    from qpruner.prune import load_pruned, save_pruned
    from qpruner.prune.slimgpt import prune_slimgpt
    from qpruner.prune.taylor import prune_model

    model, tokenizer = load_model(str(make_folder(family, tied)))
    before = sum(p.numel() for p in model.parameters())
    pcfg = resolved_config({"prune": {"ratio": 0.1, "method": method}}).prune
    (prune_slimgpt if method == "slimgpt" else prune_model)(model, calibration(tokenizer), pcfg, progress=False)
    assert sum(p.numel() for p in model.parameters()) < before
    expected = logits(model, tokenizer)
    save_pruned(model, tokenizer, tmp_path, {"test": True})
    reloaded, _ = load_pruned(tmp_path)
    assert torch.equal(logits(reloaded, tokenizer), expected)
    if family == "qwen2":  # the q/k/v biases were pruned with their rows
        attn = reloaded.model.layers[1].self_attn
        assert attn.q_proj.bias.shape[0] == attn.q_proj.out_features and attn.o_proj.bias is None


STANDALONE = """
import sys
sys.modules["qpruner"] = None  # the standalone loader must not need qpruner
sys.path.insert(0, sys.argv[1])
import torch
from safetensors.torch import load_file
from load_qpruner import load
for folder in sys.argv[2:]:
    model, tok = load(folder, device="cpu")
    want = load_file(folder + "/expected.safetensors")
    with torch.no_grad():
        got = model(input_ids=want["ids"], attention_mask=want["mask"]).logits
    assert torch.equal(got, want["logits"]), folder
print("ok", len(sys.argv) - 2)
"""


def test_standalone_loader_reproduces_pruned_logits_without_qpruner(make_folder, tmp_path):
    from safetensors.torch import save_file

    from qpruner.model import load_model
    from qpruner.prune import save_pruned
    from qpruner.prune.taylor import prune_model

    folders = []
    for family in FAMILIES:
        for tied in (True, False):
            model, tokenizer = load_model(str(make_folder(family, tied)))
            prune_model(model, [], resolved_config({"prune": {"ratio": 0.1, "method": "random"}}).prune, progress=False)
            folder = tmp_path / f"{family}-{tied}"
            save_pruned(model, tokenizer, folder, {})
            batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
            save_file({"ids": batch.input_ids, "mask": batch.attention_mask, "logits": logits(model, tokenizer)},
                      folder / "expected.safetensors")
            folders.append(str(folder))
    shutil.copy(ROOT / "qpruner" / "standalone.py", tmp_path / "load_qpruner.py")
    script = tmp_path / "check.py"
    script.write_text(STANDALONE)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), *folders], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == f"ok {len(folders)}"


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("family", FAMILIES)
def test_removing_zeroed_heads_and_channels_leaves_logits_unchanged(family, tied, make_folder):
    from qpruner.model import load_model
    from qpruner.prune.structure import group_rows, head_dim_of, keep_channels, keep_groups

    model, tokenizer = load_model(str(make_folder(family, tied)))
    head_dim = head_dim_of(model)
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[2].mlp
    q_rows, kv_rows = group_rows(1, 2, head_dim)  # group 1: query heads 2, 3 and key/value head 1
    channels = torch.tensor([3, 17, 50, 95])
    with torch.no_grad():
        for proj, rows in ((attn.q_proj, q_rows), (attn.k_proj, kv_rows), (attn.v_proj, kv_rows)):
            proj.weight[rows] = 0
            if proj.bias is not None:
                proj.bias[rows] = 0
        attn.o_proj.weight[:, q_rows] = 0
        mlp.gate_proj.weight[channels] = 0
        mlp.up_proj.weight[channels] = 0
        mlp.down_proj.weight[:, channels] = 0
    before = logits(model, tokenizer)
    keep_groups(model.model.layers[1], [0], head_dim)
    keep = torch.tensor([c for c in range(96) if c not in channels.tolist()])
    keep_channels(model.model.layers[2], keep)
    assert model.model.layers[1].self_attn.q_proj.out_features == 2 * head_dim
    assert model.model.layers[2].mlp.down_proj.in_features == 92
    torch.testing.assert_close(logits(model, tokenizer), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,tied", [("llama", False), ("mistral", True), ("qwen2", True), ("qwen3", False)])
def test_exported_adapter_reloads_to_the_trials_accuracy(family, tied, make_folder, cache, tmp_path):
    import importlib.util

    from qpruner.evaluate import evaluate_model
    from qpruner.export import export_trial
    from qpruner.prune import prune_cached
    from qpruner.trial import run_trial

    cfg = resolved_config({
        "model": {"name": str(make_folder(family, tied))}, "prune": {"ratio": 0.1, "method": "random"},
        "quant": {"bits": [4, 8, 16]}, "lora": {"rank": 4},
        "finetune": {"steps": 2, "report_every": 2, "val_limit": 8, "max_length": 64},
        "eval": {"limit": 24}, "output": {"cache_dir": str(cache)},
    })
    pruned = prune_cached(cfg, progress=False).path
    def text_loss(model, tokenizer):  # run_trial's `measure` hook: a figure of the trained model
        ids = tokenizer("the cat sat on the mat and looked at the dog", return_tensors="pt").input_ids
        return {"loss": float(model(input_ids=ids, labels=ids).loss), "training": model.training}

    result = run_trial(cfg, pruned, [4, 8, 16, 4], adapter_dir=tmp_path / "adapter", measure=text_loss)
    assert result["measured"]["training"] is False
    out = export_trial(cfg, pruned, tmp_path / "adapter", {**result, "trial_id": "t0"}, tmp_path / "export")
    spec = importlib.util.spec_from_file_location(f"load_qpruner_{family}", out / "load_qpruner.py")
    standalone = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(standalone)
    model, tokenizer = standalone.load(out, device="cpu")
    assert model.base_model.model.config.model_type == family
    reloaded = evaluate_model(model, tokenizer, cfg.eval, cache_dir=cache)
    assert reloaded["mean_acc"] == pytest.approx(result["accuracy"], abs=1e-9)
    model.eval()
    with torch.no_grad():  # what `measure` saw is the trained, quantized model the export reloads
        assert text_loss(model, tokenizer)["loss"] == pytest.approx(result["measured"]["loss"], rel=1e-5)


def save_pickled(model, folder: Path) -> None:
    """An old-style checkpoint: config.json and the weights only as a pickle (pytorch_model.bin)."""
    folder.mkdir(parents=True)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")


def test_unsupported_models_are_refused_in_one_line(tmp_path, cache, tiny_assets):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

    from qpruner.model import check_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets.model_dir)
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tokenizer))).save_pretrained(gpt2)
    with pytest.raises(ConfigError, match=r"model.name: .*model_type 'gpt2'.*supported families: llama"):
        check_model(str(gpt2))
    biased = tmp_path / "biased"
    LlamaForCausalLM(family_config("llama", len(tokenizer), False, attention_bias=True)).save_pretrained(biased)
    with pytest.raises(ConfigError, match=r"attention_bias"):
        check_model(str(biased))
    pickled = tmp_path / "pickled"
    save_pickled(LlamaForCausalLM(family_config("llama", len(tokenizer), False)), pickled)
    with pytest.raises(ConfigError, match=r"only as pickles.*model.allow_pickle: true"):
        check_model(str(pickled))
    check_model(str(pickled), allow_pickle=True)  # opted in


@pytest.mark.parametrize("kind", ["gpt2", "pickle", "biased-llama"])
def test_prune_cli_refuses_unsupported_models_with_exit_2(kind, tmp_path, tiny_assets):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

    folder = tmp_path / kind
    if kind == "gpt2":
        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)).save_pretrained(folder)
    else:
        model = LlamaForCausalLM(family_config("llama", 768, False, attention_bias=kind == "biased-llama"))
        save_pickled(model, folder) if kind == "pickle" else model.save_pretrained(folder)
    cache = tmp_path / "cache"  # the recipe's builtin data resolve into it: share the built tiny model
    cache.mkdir()
    (cache / "builtin").symlink_to(tiny_assets.model_dir.parent.parent)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"model": {"name": str(folder)}, "output": {"cache_dir": str(cache)}}))
    proc = subprocess.run([sys.executable, "-m", "qpruner.prune", "--config", str(recipe)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.name:"), proc.stderr[-2000:]
    assert not (tmp_path / "cache" / "pruned").exists()
