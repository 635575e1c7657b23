"""LoRA fine-tuning on the built-in tiny model: loss goes down, reports fire, seeds repeat, bad data fails clearly."""

import json
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from qpruner.errors import ConfigError, QPrunerError
from qpruner.evaluate import make_validator
from qpruner.finetune import TrainingDiverged, alpaca_prompt, finetune, load_alpaca, lr_at, tokenize_dataset
from qpruner.model import load_model

torch.set_num_threads(1)


def lora_model(seed: int = 0):
    """The full-precision tiny model with fresh LoRA adapters (seeded init)."""
    model, tokenizer = load_model("builtin:tiny")
    torch.manual_seed(seed)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    return get_peft_model(model, lora), tokenizer


@pytest.fixture
def cfg(tiny_config):
    tiny_config.finetune.max_length = 128
    tiny_config.finetune.max_examples = 256
    tiny_config.finetune.lr = 1e-3
    tiny_config.finetune.val_limit = 16
    return tiny_config


def test_finetune_lowers_loss_and_reports_every_n_steps(tiny_assets, cfg):
    cfg.finetune.steps, cfg.finetune.report_every = 24, 8
    model, tokenizer = lora_model()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    reports = []
    result = finetune(model, tokenizer, cfg, report=reports.append, validate=make_validator(model, tokenizer, cfg))

    assert result.steps == 24 and len(result.losses) == 24
    first, last = sum(result.losses[:4]) / 4, sum(result.losses[-4:]) / 4
    assert last < 0.9 * first, f"loss {first:.3f} -> {last:.3f}"
    assert [r["step"] for r in reports] == [8, 16, 24]
    for r in reports:
        assert set(r) == {"step", "train_loss", "val_logprob", "val_acc"}
        assert math.isfinite(r["train_loss"]) and r["val_logprob"] < 0 and 0.0 <= r["val_acc"] <= 1.0
    assert reports[-1]["train_loss"] == pytest.approx(sum(result.losses[16:]) / 8)
    assert result.last_validation == {k: reports[-1][k] for k in ("val_logprob", "val_acc")}
    assert reports[-1]["val_logprob"] > reports[0]["val_logprob"], "training on the world raises the gold answer's probability"
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad), "only LoRA trains"
    print(f"\nloss {first:.3f} -> {last:.3f} in {result.seconds:.1f}s ({result.seconds / 24:.3f}s/step); val_acc {[r['val_acc'] for r in reports]}")


def test_seeded_runs_are_bit_identical(tiny_assets, cfg):
    cfg.finetune.steps, cfg.finetune.report_every = 4, 4
    runs = []
    for _ in range(2):
        model, tokenizer = lora_model(seed=1)
        result = finetune(model, tokenizer, cfg)
        runs.append((result.losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}))
    (losses_a, weights_a), (losses_b, weights_b) = runs
    assert losses_a == losses_b
    assert all(torch.equal(weights_a[n], weights_b[n]) for n in weights_a)
    cfg.finetune.seed = 1
    model, tokenizer = lora_model(seed=1)
    assert finetune(model, tokenizer, cfg).losses != losses_a, "another data seed gives another run"


def test_nan_loss_raises_training_diverged(tiny_assets, cfg):
    cfg.finetune.steps = 3
    model, tokenizer = lora_model()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="diverged at step 1") as err:
        finetune(model, tokenizer, cfg)
    assert isinstance(err.value, QPrunerError) and "finetune.lr" in str(err.value)


def test_prompt_tokens_are_masked_and_response_ends_with_eos(tiny_assets):
    _, tokenizer = load_model("builtin:tiny")
    record = load_alpaca(str(tiny_assets.alpaca_path), max_examples=1)[0]
    example = tokenize_dataset([record], tokenizer, max_length=512)[0]
    n_prompt = example["labels"].count(-100)
    assert n_prompt == len(tokenizer(alpaca_prompt(record))["input_ids"])
    assert example["labels"][:n_prompt] == [-100] * n_prompt
    assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:]
    assert example["input_ids"][-1] == tokenizer.eos_token_id
    short = tokenize_dataset([record], tokenizer, max_length=n_prompt + 1)[0]
    assert len(short["input_ids"]) == n_prompt + 1 and short["labels"][-1] != -100
    with pytest.raises(ConfigError, match="finetune.max_length"):
        tokenize_dataset([record], tokenizer, max_length=n_prompt)  # no response token left


def test_lr_schedule_warms_up_then_decays_to_zero():
    lrs = [lr_at(s, 1.0, warmup_steps=4, total_steps=20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and 0 < lrs[-1] < 0.05


def test_builtin_alpaca_records(tiny_assets, tiny_config):
    assert tiny_config.finetune.data == str(tiny_assets.alpaca_path)  # `builtin` is resolved at config load
    records = load_alpaca(tiny_config.finetune.data, max_examples=10)
    assert len(records) == 10
    assert all(isinstance(r["instruction"], str) and isinstance(r["output"], str) and isinstance(r["input"], str) for r in records)


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', "record 1"),
        ('{"instruction": "a", "output": 3}\n', "record 0"),
        ("not json\n", "not valid JSON"),
    ],
)
def test_bad_alpaca_file_is_a_one_line_error(tmp_path, content, expected):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(ConfigError) as err:
        load_alpaca(str(path))
    message = str(err.value)
    assert message.startswith("finetune.data:") and expected in message and "\n" not in message
    if expected.startswith("record"):
        assert '"instruction": str' in message  # says the expected format


def test_missing_file_and_offline_hub_id_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^finetune\.data: file .* does not exist"):
        load_alpaca(str(tmp_path / "missing.jsonl"))
    (tmp_path / "list.json").write_text(json.dumps({"instruction": "a", "output": "b"}))
    with pytest.raises(ConfigError, match="JSON list"):
        load_alpaca(str(tmp_path / "list.json"))
    with pytest.raises(ConfigError, match=r"^finetune\.data: cannot load hub dataset 'nobody/no-such-alpaca'"):
        load_alpaca("nobody/no-such-alpaca")


def test_paged_optimizer_needs_cuda(tiny_assets, cfg):
    """paged_adamw_32bit on CPU: one line naming finetune.optimizer, before any step; `auto` there is torch's
    AdamW without weight decay (alpaca-lora's setting)."""
    from qpruner.finetune import make_optimizer

    cfg.finetune.optimizer = "paged_adamw_32bit"
    model, tokenizer = lora_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(ConfigError, match=r"^finetune\.optimizer: paged_adamw_32bit needs the model on a CUDA GPU; use 'auto'"):
        finetune(model, tokenizer, cfg)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad), "nothing trained"
    auto = make_optimizer([p for p in model.parameters() if p.requires_grad], "auto", 1e-3)
    assert type(auto) is torch.optim.AdamW and auto.defaults["weight_decay"] == 0.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes' paged optimizers need a CUDA GPU")
def test_paged_adamw_trains_lora_on_cuda(tiny_assets, cfg):
    """On CUDA, `auto` and paged_adamw_32bit are bitsandbytes' PagedAdamW32bit, and it trains the LoRA weights."""
    import bitsandbytes as bnb

    from qpruner.finetune import make_optimizer

    cfg.finetune.optimizer, cfg.finetune.steps, cfg.finetune.report_every = "paged_adamw_32bit", 3, 3
    model, tokenizer = lora_model()
    model.cuda()
    params = [p for p in model.parameters() if p.requires_grad]
    for name in ("auto", "paged_adamw_32bit"):
        optimizer = make_optimizer(params, name, 1e-3)
        assert isinstance(optimizer, bnb.optim.PagedAdamW32bit) and optimizer.is_paged
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    result = finetune(model, tokenizer, cfg)
    assert result.steps == 3 and all(math.isfinite(x) for x in result.losses)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_B" in n)


def test_finetune_and_evaluate_a_bnb_4bit_model(tiny_assets, cfg):
    """The same loop trains LoRA on top of bitsandbytes NF4 weights (CPU kernels) and lm-eval scores it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from qpruner.evaluate import evaluate_model

    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_assets.model_dir, quantization_config=nf4, device_map="cpu")
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets.model_dir)
    assert type(model.get_decoder().layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    for module in model.modules():  # as qpruner.standalone does: bnb's AVX512-BF16 repack fails on 352-wide MLPs
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    cfg.finetune.steps, cfg.finetune.report_every = 6, 3
    reports = []
    result = finetune(model, tokenizer, cfg, report=reports.append, validate=make_validator(model, tokenizer, cfg))
    assert all(math.isfinite(x) for x in result.losses) and [r["step"] for r in reports] == [3, 6]
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_B" in n)
    scores = evaluate_model(model, tokenizer, cfg.eval, limit=20)
    assert set(scores["tasks"]) == set(tiny_assets.test_tasks) and 0.0 <= scores["mean_acc"] <= 1.0


def test_float16_compute_trains_with_loss_scaling(tiny_assets, cfg):
    """quant.compute_dtype float16 (issue 25): autocast(float16) + GradScaler. The float32 LoRA weights learn
    with finite losses, the scale has moved from GradScaler's 2**16 only by halving on overflowed steps, and
    bfloat16 / float32 compute get no scaler at all."""
    from qpruner.finetune import make_scaler

    cfg.quant.compute_dtype = "float16"
    cfg.finetune.steps, cfg.finetune.report_every = 8, 8
    model, tokenizer = load_model("builtin:tiny", "float16")
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {p.dtype for p in trained.values()} == {torch.float32}
    before = {n: p.detach().clone() for n, p in trained.items()}
    result = finetune(model, tokenizer, cfg)
    assert result.loss_scale is not None and result.loss_scale == 2.0**16 / 2**result.skipped_steps
    assert result.skipped_steps < cfg.finetune.steps
    assert all(math.isfinite(x) for x in result.losses)
    assert any(not torch.equal(p, before[n]) for n, p in trained.items() if "lora_B" in n)
    assert all(torch.isfinite(p).all() for p in trained.values())
    cpu = torch.device("cpu")
    assert not make_scaler("bfloat16", cpu, list(trained.values())).is_enabled()
    assert make_scaler("float16", cpu, list(trained.values())).is_enabled()
    with pytest.raises(ConfigError, match=r"^quant\.compute_dtype: float16 training needs float32 LoRA weights"):
        make_scaler("float16", cpu, [torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))])
