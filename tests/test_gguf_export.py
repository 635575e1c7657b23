"""GGUF export (`python -m qpruner.export --format gguf`): llama.cpp's deci architecture with per-layer head
counts, widths and tensor types.

Default suite: the file reads back through the `gguf` package with the right architecture, per-layer
arrays and per-tensor types, and its dequantized weights match the merged model within each format's
rounding; the RoPE row order is checked against transformers' rotary embedding. Slow: llama-cpp-python
(built from PyPI) runs the file and its logits match the merged model's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from qpruner.errors import QPrunerError

ROOT = Path(__file__).resolve().parents[1]
BITS = [4, 8, 16, 4, 8, 16]


def _pruned_folder(model_dir: Path, out: Path, widths: dict, groups: dict) -> Path:
    """The tiny model with some heads and MLP channels removed (widths that are and are not multiples of 32)."""
    from qpruner.model import load_model
    from qpruner.prune.store import save_pruned
    from qpruner.prune.structure import head_dim_of, keep_channels, keep_groups

    model, tok = load_model(str(model_dir))
    head_dim = head_dim_of(model)
    gen = torch.Generator().manual_seed(0)
    for i, width in widths.items():
        layer = model.model.layers[i]
        keep_channels(layer, torch.randperm(layer.mlp.gate_proj.out_features, generator=gen)[:width])
    for i, kept in groups.items():
        keep_groups(model.model.layers[i], kept, head_dim)
    save_pruned(model, tok, out, {"test": True})
    return out


@pytest.fixture(scope="module")
def pruned(tiny_assets, tmp_path_factory):
    return _pruned_folder(Path(tiny_assets.model_dir), tmp_path_factory.mktemp("gguf") / "pruned",
                          widths={1: 161, 2: 160, 3: 200, 4: 96}, groups={1: [1], 2: [0], 4: [1]})


def _fake_run(tmp: Path, cache: Path, pruned: Path) -> tuple[Path, dict]:
    """A run folder as qpruner.tune leaves it, with one completed trial and a (random, non-zero) trained adapter."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from peft import get_peft_model

    from qpruner.model import load_model
    from qpruner.plan import resolved_config
    from qpruner.quantize import lora_config_for
    from qpruner.results import adapter_path

    run = tmp / "run"
    run.mkdir()
    cfg = resolved_config({"output": {"cache_dir": str(cache), "dir": str(run)}})
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (run / "run.json").write_text(json.dumps({"pruned_path": str(pruned)}))
    row = {"trial_id": "t_gguf", "status": "completed", "accuracy": 0.5, "memory_gb": 0.001, "memory_bytes": 10**6,
           "bits": BITS, "ranks": None}
    pq.write_table(pa.Table.from_pylist([row]), run / "results.parquet")
    model, _ = load_model(str(pruned))
    torch.manual_seed(1)  # peft draws lora_A from the global generator
    peft_model = get_peft_model(model, lora_config_for(cfg.lora, model))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    peft_model.save_pretrained(adapter_path(run, row["trial_id"]), safe_serialization=True)
    return run, {**row, "cfg": cfg}


@pytest.fixture(scope="module")
def exported(pruned, cache, tmp_path_factory):
    """The CLI's GGUF of the fake run's trial, and the merged model `qpruner.export --merge` writes for it."""
    from qpruner.export import export_trial, find_adapter, main

    tmp = tmp_path_factory.mktemp("exported")
    run, row = _fake_run(tmp, cache, pruned)
    cfg = row.pop("cfg")
    out = tmp / "model.gguf"
    assert main(["--run", str(run), "--trial", row["trial_id"], "--format", "gguf", "--out", str(out)]) == 0
    export_trial(cfg, pruned, find_adapter(run, row["trial_id"]), row, tmp / "folder", merge=True)
    return out, tmp / "folder" / "merged"


def _merged_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v.float().numpy() for k, v in load_file(folder / "model.safetensors").items()}


def _bound(expected: np.ndarray, qtype) -> np.ndarray:
    """Largest rounding error per element for a GGUF type, from each block's absolute maximum."""
    import gguf

    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return np.zeros_like(expected)
    if qtype == T.F16:
        return np.abs(expected) * 2.0 ** -11 + 6e-8
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    blocks = np.abs(expected).reshape(expected.shape[0], -1, block).max(-1, keepdims=True)
    # Q4_0: d = max/8 and the opposite extreme is clipped to 7d, so |error| <= d; Q8_0 rounds: d/2 (d = max/127);
    # the fp16 scale adds its own rounding times up to 8 (or 127) steps: relative 2^-11, or absolute 2^-25 where
    # d is an fp16 subnormal (a block of tiny values)
    steps = {T.Q4_0: 8, T.Q8_0: 127}[qtype]
    step = {T.Q4_0: blocks / 8, T.Q8_0: blocks / 127 / 2}[qtype] + steps * (blocks / steps * 2.0 ** -10 + 2.0 ** -25)
    return np.broadcast_to(step, blocks.shape[:2] + (block,)).reshape(expected.shape) + 1e-7


def test_gguf_reads_back_with_per_layer_shapes_types_and_weights(exported):
    import gguf

    from qpruner.gguf_export import dequantize, rope_unpermute

    out, merged = exported
    config = json.loads((merged / "config.json").read_text())
    shapes = config["qpruner_layers"]
    reader = gguf.GGUFReader(str(out))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "deci"
    assert field("deci.block_count") == len(shapes) == len(BITS)
    assert field("deci.attention.head_count") == [s["num_attention_heads"] for s in shapes]
    assert field("deci.attention.head_count_kv") == [s["num_key_value_heads"] for s in shapes]
    widths = [s["intermediate_size"] for s in shapes]
    written = field("deci.feed_forward_length")
    assert written == [w if b == 16 or w % 32 == 0 else -(-w // 32) * 32 for w, b in zip(widths, BITS)]
    assert field("deci.attention.key_length") == field("deci.rope.dimension_count") == config["head_dim"]
    assert field("qpruner.bits") == BITS

    T = gguf.GGMLQuantizationType
    expected_type = {4: T.Q4_0, 8: T.Q8_0, 16: T.F16}
    weights = _merged_weights(merged)
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["token_embd.weight"].tensor_type == T.Q8_0 and tensors["output.weight"].tensor_type == T.Q8_0
    assert tensors["output_norm.weight"].tensor_type == T.F32
    pairs = [("token_embd.weight", "model.embed_tokens.weight", T.Q8_0), ("output.weight", "lm_head.weight", T.Q8_0)]
    head_dim = config["head_dim"]
    for i, b in enumerate(BITS):
        for ours, theirs in (("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
                             ("attn_output", "self_attn.o_proj"), ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
                             ("ffn_down", "mlp.down_proj")):
            pairs.append((f"blk.{i}.{ours}.weight", f"model.layers.{i}.{theirs}.weight", expected_type[b]))
        pairs += [(f"blk.{i}.attn_norm.weight", f"model.layers.{i}.input_layernorm.weight", T.F32),
                  (f"blk.{i}.ffn_norm.weight", f"model.layers.{i}.post_attention_layernorm.weight", T.F32)]
    for ours, theirs, qtype in pairs:
        tensor = tensors[ours]
        assert tensor.tensor_type == qtype, (ours, tensor.tensor_type.name)
        got = dequantize(tensor.data, qtype).reshape(tuple(int(n) for n in reversed(tensor.shape)))
        expected = weights[theirs]
        if ".attn_q." in ours or ".attn_k." in ours:
            got = rope_unpermute(got, head_dim)
        if ".ffn_down." in ours:  # zero padding columns, then the model's own
            assert not got[:, expected.shape[1]:].any()
            got = got[:, : expected.shape[1]]
        elif ".ffn_gate." in ours or ".ffn_up." in ours:
            assert not got[expected.shape[0]:].any()
            got = got[: expected.shape[0]]
        assert got.shape == expected.shape, ours
        padded = expected
        if qtype in (T.Q4_0, T.Q8_0) and expected.shape[1] % 32:
            padded = np.pad(expected, ((0, 0), (0, -expected.shape[1] % 32)))
        bound = _bound(padded, qtype)  # blocks run along rows: the q/k row order does not change them
        bound = bound[:, : expected.shape[1]] if bound.ndim == 2 else bound
        assert np.all(np.abs(got - expected) <= bound), (ours, float(np.abs(got - expected).max()))
        if qtype != T.F32:
            assert np.abs(got - expected).max() > 0  # really quantized, not stored as float


def test_rope_row_order_matches_transformers_rotary():
    """llama.cpp's RoPE for llama/deci rotates adjacent pairs (2j, 2j+1), transformers' pairs (j, j + d/2): the
    permuted query/key rows rotated the llama.cpp way and put back in order equal transformers' rotation."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from qpruner.gguf_export import rope_permute, rope_unpermute

    d, heads, n_pos = 8, 3, 5
    w = torch.randn(heads * d, 7, dtype=torch.float64)
    assert torch.equal(torch.from_numpy(rope_unpermute(rope_permute(w.numpy(), d), d)), w)
    x = torch.randn(7, dtype=torch.float64)
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(n_pos, dtype=torch.float64)[:, None] * inv[None, :]  # (pos, d/2)
    emb = torch.cat([angles, angles], -1)[None]  # (1, pos, d)
    q = (w @ x).reshape(1, heads, 1, d).expand(1, heads, n_pos, d)
    hf, _ = apply_rotary_pos_emb(q, q, emb.cos(), emb.sin())  # (1, heads, pos, d)
    pairs = torch.from_numpy(rope_permute(w.numpy(), d)) @ x  # llama.cpp's row order
    a, b = pairs.reshape(heads, 1, d // 2, 2).unbind(-1)  # (heads, 1, d/2) each
    rotated = torch.stack([a * angles.cos() - b * angles.sin(), a * angles.sin() + b * angles.cos()], -1)  # (heads, pos, d/2, 2)
    for p in range(n_pos):
        back = torch.from_numpy(rope_unpermute(rotated[:, p].reshape(-1).numpy(), d)).reshape(heads, d)
        assert torch.allclose(back, hf[0, :, p], atol=1e-12)


def test_tokenizer_and_special_tokens_come_from_the_model(exported):
    import gguf
    from transformers import AutoTokenizer

    out, merged = exported
    tok = AutoTokenizer.from_pretrained(merged)
    reader = gguf.GGUFReader(str(out))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    tokens = field("tokenizer.ggml.tokens")
    assert tokens == [tok.convert_ids_to_tokens(i) for i in range(len(tokens))]
    assert field("tokenizer.ggml.bos_token_id") == tok.bos_token_id and field("tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert field("tokenizer.ggml.add_bos_token") is False  # the tiny tokenizer adds no BOS to text
    assert len(field("tokenizer.ggml.merges")) > 100


def test_unexpressible_models_are_refused_in_one_line(tmp_path, pruned):
    from qpruner.gguf_export import write_gguf

    config = json.loads((pruned / "config.json").read_text())
    for change, words in (({"model_type": "qwen3"}, "q_norm/k_norm"),
                          ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope type 'yarn'")):
        folder = tmp_path / change.get("model_type", "rope")
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(QPrunerError, match=words) as info:
            write_gguf(folder, BITS, tmp_path / "x.gguf")
        assert "\n" not in str(info.value) and not (tmp_path / "x.gguf").exists()
    with pytest.raises(QPrunerError, match="--embeddings"):
        write_gguf(pruned, BITS, tmp_path / "x.gguf", embeddings="q2")


def test_cli_refusal_is_one_line_and_exit_2(tmp_path, cache, pruned):
    """A Qwen3 run's trial exported as GGUF: one line on stderr, exit code 2, no file."""
    qwen3 = tmp_path / "qwen3"
    qwen3.mkdir()
    (qwen3 / "config.json").write_text(json.dumps({**json.loads((pruned / "config.json").read_text()), "model_type": "qwen3"}))
    import pyarrow as pa
    import pyarrow.parquet as pq

    from qpruner.plan import resolved_config

    run = tmp_path / "run"
    run.mkdir()
    cfg = resolved_config({"output": {"cache_dir": str(cache), "dir": str(run)}})
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (run / "run.json").write_text(json.dumps({"pruned_path": str(qwen3)}))
    pq.write_table(pa.Table.from_pylist([{"trial_id": "t", "status": "completed", "accuracy": 0.5, "memory_gb": 0.1,
                                          "memory_bytes": 1, "bits": BITS}]), run / "results.parquet")
    proc = subprocess.run([sys.executable, "-m", "qpruner.export", "--run", str(run), "--pick", "best-acc", "--format",
                           "gguf", "--out", str(tmp_path / "q.gguf")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().count("\n") == 0 and "qwen3" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "q.gguf").exists()


# ---------------------------------------------------------------------------------------------
# slow: llama.cpp runs the file

# llama.cpp against the same weights in transformers, max |logit difference| over 24 tokens x 768 vocabulary
# entries: F16 files differ by fp16 arithmetic only; in quantized files llama.cpp also rounds activations to
# 8 bits for its Q4_0/Q8_0 dot products (measured 0.09-0.12 on this model)
LOGIT_TOLERANCE = {"f16": 0.02, "quantized": 0.25}


def _llama():
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python is not installed: pip install llama-cpp-python (builds llama.cpp, ~15 min on 2 cores)")
    return llama_cpp


def llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits for every position of one sequence of token ids."""
    llama_cpp = _llama()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(64, len(ids)), logits_all=True, verbose=False, n_threads=2,
                          n_batch=max(64, len(ids)))
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


@pytest.mark.slow
def test_llama_cpp_runs_the_file_with_the_merged_models_logits(exported, tmp_path):
    """llama.cpp runs the exported file (deci, per-layer heads and widths, zero-padded widths, mixed types) and
    computes what transformers computes with the file's weights; against the merged model it differs by the
    file's rounding, which is printed."""
    from qpruner.gguf_export import load_gguf_weights, write_gguf
    from qpruner.model import load_model

    _llama()
    out, merged = exported
    model, tok = load_model(str(merged))
    ids = tok("Pim the grey cat lives in a small house and eats fish every day.").input_ids[:24]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    f16 = write_gguf(merged, [16] * len(BITS), tmp_path / "f16.gguf", embeddings="f32").path
    for path, tolerance in ((f16, LOGIT_TOLERANCE["f16"]), (out, LOGIT_TOLERANCE["quantized"])):
        held, _ = load_model(str(merged))
        load_gguf_weights(held, path)
        with torch.no_grad():
            same_weights = held(torch.tensor([ids])).logits[0].numpy()
        ours = llama_logits(path, ids)
        runtime, rounding = np.abs(ours - same_weights).max(), np.abs(ours - ref).max()
        print(f"{path.name}: max |logit diff| llama.cpp vs transformers on the file's weights {runtime:.4f}, "
              f"vs the merged model {rounding:.4f}, file's own rounding {np.abs(same_weights - ref).max():.4f}; "
              f"top-1 agreement with merged {np.mean(ours.argmax(-1) == ref.argmax(-1)):.3f}")
        assert runtime <= tolerance
        assert rounding <= np.abs(same_weights - ref).max() + tolerance


@pytest.fixture(scope="module")
def wide_model(tiny_assets, tmp_path_factory):
    """A random LLaMA with hidden size 256 (rows long enough for Q4_K's 256-blocks), the tiny tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=768, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    out = tmp_path_factory.mktemp("wide") / "model"
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_assets.model_dir).save_pretrained(out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("q4", ["q4_k", "iq4_nl"])
def test_ggml_quantized_layers_run_in_llama_cpp(wide_model, tmp_path, q4):
    """--q4 q4_k / iq4_nl: ggml's own quantizers (llama-cpp-python's library); Q4_K where rows are multiples of 256."""
    from transformers import LlamaForCausalLM

    from qpruner.gguf_export import load_gguf_weights, write_gguf

    _llama()
    summary = write_gguf(wide_model, [4, 8, 4], tmp_path / "k.gguf", q4=q4)
    four = q4.upper()
    assert summary.layer_types == [four, "Q8_0", four] and summary.tensor_types[four] == 14 and not summary.fallbacks
    held = LlamaForCausalLM.from_pretrained(wide_model).eval()
    load_gguf_weights(held, summary.path)
    ids = list(range(3, 40))
    with torch.no_grad():
        same = held(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(llama_logits(summary.path, ids) - same).max() <= LOGIT_TOLERANCE["quantized"]


@pytest.mark.slow
@pytest.mark.parametrize("zero", [[1], [0], [0, 2]])
def test_layers_without_attention_heads_run_in_llama_cpp(wide_model, tmp_path, zero):
    """deci's attention-free layers; layer 0 without heads is written with one zero group (which adds 0)."""
    import shutil

    from transformers import LlamaForCausalLM

    from qpruner.gguf_export import write_gguf

    _llama()
    folder = tmp_path / "model"
    shutil.copytree(wide_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config["qpruner_layers"] = [{"num_attention_heads": 0 if i in zero else 4, "num_key_value_heads": 0 if i in zero else 2,
                                 "intermediate_size": 512} for i in range(3)]
    (folder / "config.json").write_text(json.dumps(config))
    summary = write_gguf(folder, [16, 16, 16], tmp_path / "z.gguf", embeddings="f32")
    reference = LlamaForCausalLM.from_pretrained(wide_model).eval()
    with torch.no_grad():
        for i in zero:  # no heads = attention adds nothing
            reference.model.layers[i].self_attn.o_proj.weight.zero_()
        ids = list(range(3, 40))
        ref = reference(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(llama_logits(summary.path, ids) - ref).max() <= LOGIT_TOLERANCE["f16"]


def test_f16_overflow_falls_back_to_bf16(pruned, tmp_path):
    """A 16-bit layer's tensor with values beyond F16's range is written as BF16, and the summary says so."""
    import shutil

    import gguf
    from safetensors.torch import load_file, save_file

    from qpruner.gguf_export import dequantize, write_gguf

    folder = tmp_path / "big"
    shutil.copytree(pruned, folder)
    state = load_file(folder / "model.safetensors")
    state["model.layers.2.mlp.up_proj.weight"][0, 0] = 1e6
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    summary = write_gguf(folder, BITS, tmp_path / "big.gguf")
    assert summary.fallbacks == {"blk.2.ffn_up.weight": "BF16 (values beyond F16's range)"}
    tensor = next(t for t in gguf.GGUFReader(str(summary.path)).tensors if t.name == "blk.2.ffn_up.weight")
    assert tensor.tensor_type == gguf.GGMLQuantizationType.BF16
    values = dequantize(tensor.data, tensor.tensor_type).reshape(tuple(int(n) for n in reversed(tensor.shape)))
    assert values[0, 0] == pytest.approx(1e6, rel=2 ** -8)
