"""Write a pruned (and merged) qpruner model as one GGUF file that llama.cpp runs.

llama.cpp's `deci` architecture (made for NVIDIA's Nemotron-NAS models) reads the head count, the
key/value head count and the feed-forward width of every decoder layer from arrays
(`deci.attention.head_count`, `deci.attention.head_count_kv`, `deci.feed_forward_length`), which is what
a pruned model needs; GGUF stores each tensor in its own type, so each decoder layer keeps the precision
the search chose:

    bits 4  -> Q4_0 (block 32; `q4="iq4_nl"` uses IQ4_NL, block 32 on a non-linear grid like NF4's, and
               `q4="q4_k"` Q4_K, block 256, where a row length allows; both need llama-cpp-python's ggml
               library, which quantizes them)
    bits 8  -> Q8_0 (block 32)
    bits 16 -> F16 (BF16 for a tensor whose values leave F16's range)
    norms F32; token embeddings and the output matrix per `embeddings` (default Q8_0, see docs/serving.md)

How the model's shapes become what deci can express, with no change to what it computes:
- query/key rows are permuted per head from transformers' rotate-half order to the interleaved pairs
  llama.cpp's (non-NeoX) RoPE rotates, as llama.cpp's own converter does;
- a feed-forward width that is not a multiple of the quantization block is padded with zero channels
  (zero gate/up rows and zero down columns add silu(0) * 0 = 0); a width of 0 becomes one zero block,
  because deci skips a layer's attention output when its width is 0;
- layer 0 without attention heads gets one zero key/value group (llama.cpp takes the head size from
  layer 0's head count), which adds 0; other head-less layers use deci's attention-free layers;
- a tensor whose row length is not a multiple of its type's block (a hidden size that is not a
  multiple of 32) falls back to F16, and the summary says which.

Refused, in one line (QPrunerError, exit 2 at the CLI): Qwen3 (per-head q/k norms, which deci does not
have), rope scalings that change attention magnitude or depend on the sequence (YaRN, LongRoPE,
dynamic), tokenizers other than byte-level BPE or LLaMA's byte-fallback BPE, a byte-level pre-tokenizer
it cannot name (pass `tokenizer_pre`), and a vocabulary larger than the embedding matrix.

The tokenizer and chat template come from the source model: when the model was converted from a GGUF
file, its `tokenizer.*` keys are copied as they are; otherwise they are built from the Hugging Face
folder's tokenizer.json / tokenizer_config.json.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from qpruner.errors import QPrunerError

ARCH = "deci"
EMBEDDING_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
Q4_TYPES = ("q4_0", "q4_1", "iq4_nl", "q4_k")
DEFAULT_EMBEDDINGS = "q8_0"
SUPPORTED_TYPES = ("llama", "mistral", "qwen2")  # qpruner families deci can express
F16_MAX = 65504.0

# byte-level BPE pre-tokenizers llama.cpp knows, by the regex of the tokenizer.json Split that precedes a
# ByteLevel(use_regex=False) step
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_PRE = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}


@dataclass
class GGUFSummary:
    """What write_gguf wrote."""

    path: Path
    file_bytes: int
    layer_types: list[str]  # the GGUF type of each decoder layer's projections (the searched bits)
    tensor_types: dict[str, int]  # how many tensors of each type
    n_head: list[int]
    n_head_kv: list[int]
    n_ff: list[int]  # as written (padded)
    padded_ff: dict[int, tuple[int, int]] = field(default_factory=dict)  # layer -> (model width, written width)
    fallbacks: dict[str, str] = field(default_factory=dict)  # tensor -> why it is not in its layer's type
    tokenizer: str = ""  # where the tokenizer came from

    def to_dict(self) -> dict:
        return {"path": str(self.path), "file_bytes": self.file_bytes, "layer_types": self.layer_types,
                "tensor_types": self.tensor_types, "n_head": self.n_head, "n_head_kv": self.n_head_kv,
                "n_ff": self.n_ff, "padded_ff": {str(k): list(v) for k, v in self.padded_ff.items()},
                "fallbacks": self.fallbacks, "tokenizer": self.tokenizer}


# ---------------------------------------------------------------------------------------------
# what deci can express


def _rope(config: dict) -> tuple[float, Optional[np.ndarray]]:
    """(rope theta, per-frequency divisors for llama.cpp's rope_freqs tensor or None)."""
    params = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or {}
    if scaling and not params.get("rope_type"):
        params.update(scaling)
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind == "default":
        return theta, None
    if kind not in ("linear", "llama3"):
        raise QPrunerError(f"rope type {kind!r}: llama.cpp's deci architecture takes only plain, linear and llama3 "
                           "RoPE (it has no attention-magnitude or sequence-dependent scaling); export with --format hf")
    head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factor = float(params.get("factor", 1.0))
    if kind == "linear":
        return theta, np.full(inv.shape, factor, dtype=np.float32)
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth blend between (transformers'
    # formula); llama.cpp divides each frequency by its factor
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    original = float(params.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv
    smooth = np.clip((original / wavelen - low) / (high - low), 0.0, 1.0)
    scaled = (1 - smooth) * inv / factor + smooth * inv
    scaled = np.where(wavelen > original / low, inv / factor, np.where(wavelen < original / high, inv, scaled))
    return theta, (inv / scaled).astype(np.float32)


def check_expressible(config: dict) -> None:
    """A one-line QPrunerError for a model deci cannot express (module docstring)."""
    kind = config.get("model_type")
    if kind == "qwen3":
        raise QPrunerError("model_type 'qwen3': its per-head q_norm/k_norm have no place in llama.cpp's deci "
                           "architecture, so a pruned Qwen3 cannot be written as GGUF; export with --format hf")
    if kind not in SUPPORTED_TYPES:
        raise QPrunerError(f"model_type {kind!r}: GGUF export writes llama, mistral and qwen2 models "
                           "(llama.cpp's deci architecture); export with --format hf")
    head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    if head_dim % 2:
        raise QPrunerError(f"head_dim {head_dim} is odd: RoPE rotates pairs; export with --format hf")
    if config.get("mlp_bias") or (kind != "qwen2" and config.get("attention_bias")):
        raise QPrunerError("projection biases other than Qwen2's q/k/v: not written by GGUF export; export with --format hf")
    if config.get("hidden_act", "silu") != "silu":
        raise QPrunerError(f"hidden_act {config.get('hidden_act')!r}: deci's feed-forward is SwiGLU (silu); "
                           "export with --format hf")
    _rope(config)


def layer_shapes(config: dict) -> list[dict]:
    """Each decoder layer's head counts and MLP width: qpruner_layers, or the config's uniform shape."""
    if config.get("qpruner_layers"):
        return [dict(s) for s in config["qpruner_layers"]]
    return [{"num_attention_heads": config["num_attention_heads"],
             "num_key_value_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
             "intermediate_size": config["intermediate_size"]}] * config["num_hidden_layers"]


# ---------------------------------------------------------------------------------------------
# tensor types


# 4-bit types that only ggml itself quantizes (through llama-cpp-python's library): Q4_K (blocks of 256) and
# IQ4_NL (blocks of 32 on a fixed non-linear grid, like NF4's, so closer to a bitsandbytes NF4 trial than Q4_0)
GGML_QUANTIZED = ("Q4_K", "IQ4_NL")


def _gguf():
    import gguf

    return gguf


def layer_type(bits: int, q4: str = "q4_0"):
    """The GGUF type of a decoder layer's projections at a searched bit-width."""
    T = _gguf().GGMLQuantizationType
    if bits == 4:
        return {"q4_0": T.Q4_0, "q4_1": T.Q4_1, "q4_k": T.Q4_K, "iq4_nl": T.IQ4_NL}[q4]
    if bits == 8:
        return T.Q8_0
    if bits == 16:
        return T.F16
    raise QPrunerError(f"bits {bits}: GGUF export maps 4, 8 and 16 bits")


def block_size(qtype) -> int:
    return _gguf().GGML_QUANT_SIZES[qtype][0]


def _ggml_library():
    """llama-cpp-python's ggml base library (for GGML_QUANTIZED, which the gguf package does not quantize), or None."""
    import ctypes
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
            path = Path(folder) / "lib" / name
            if path.is_file():
                lib = ctypes.CDLL(str(path))
                lib.ggml_quantize_chunk.restype = ctypes.c_size_t
                lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                    ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
                return lib
    return None


def quantize(data: np.ndarray, qtype) -> np.ndarray:
    """A 2-D float32 array in a GGUF type, as the bytes (uint8 rows) or float array the writer takes."""
    gguf = _gguf()
    T = gguf.GGMLQuantizationType
    data = np.ascontiguousarray(data, dtype=np.float32)
    if qtype == T.F32:
        return data
    if qtype == T.F16:
        return data.astype(np.float16)
    if qtype.name in GGML_QUANTIZED:
        lib = _ggml_library()
        rows, cols = data.shape
        block, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
        out = np.empty((rows, cols // block * type_bytes), dtype=np.uint8)
        lib.ggml_quantize_chunk(int(qtype), data.ctypes.data, out.ctypes.data, 0, rows, cols, None)
        return out
    return gguf.quants.quantize(data, qtype)


def dequantize(raw: np.ndarray, qtype) -> np.ndarray:
    """The float32 values of a tensor as GGUFReader returns it (rows x columns)."""
    gguf = _gguf()
    T = gguf.GGMLQuantizationType
    if qtype in (T.F32, T.F16):
        return np.asarray(raw, dtype=np.float32)
    return gguf.quants.dequantize(np.asarray(raw), qtype)


def _fit_type(name: str, data: np.ndarray, qtype, fallbacks: dict):
    """qtype, or F16/BF16 where the row length or the values do not fit it."""
    T = _gguf().GGMLQuantizationType
    if qtype.name in GGML_QUANTIZED and (_ggml_library() is None or data.shape[1] % block_size(qtype)):
        why = (f"row length not a multiple of {block_size(qtype)}" if data.shape[1] % block_size(qtype)
               else "llama-cpp-python not installed")
        fallbacks[name] = f"Q4_0 ({why})"
        qtype = T.Q4_0
    if data.shape[1] % block_size(qtype):
        fallbacks[name] = f"F16 (row length {data.shape[1]} not a multiple of {qtype.name}'s block {block_size(qtype)})"
        qtype = T.F16
    if qtype == T.F16 and float(np.abs(data).max(initial=0.0)) > F16_MAX:
        fallbacks[name] = "BF16 (values beyond F16's range)"
        qtype = T.BF16
    return qtype


# ---------------------------------------------------------------------------------------------
# tokenizer


def _copy_gguf_tokenizer(writer, source: Path, n_vocab: int) -> bool:
    """Copy every tokenizer.* key of the source GGUF file; False when its vocabulary does not fit the model."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(source))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) > n_vocab:
        return False
    for key, fld in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        main = fld.types[0]
        value = fld.contents()
        if main == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, value, main, sub_type=fld.types[-1])
        else:
            writer.add_key_value(key, value, main)
    return True


def _pre_tokenizer(tokenizer_json: dict) -> Optional[str]:
    """llama.cpp's name for a byte-level BPE pre-tokenizer, from tokenizer.json's structure, or None."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        return SPLIT_PRE.get((steps[0].get("pattern") or {}).get("Regex"))
    return None


def _hf_tokenizer(writer, folder: Path, n_vocab: int, tokenizer_pre: Optional[str]) -> str:
    """tokenizer.ggml.* keys from a Hugging Face folder (byte-level BPE, or LLaMA's byte-fallback BPE)."""
    gguf = _gguf()
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise QPrunerError(f"{folder}: no tokenizer.json; GGUF export reads the fast (tokenizers) tokenizer")
    data = json.loads(file.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise QPrunerError(f"tokenizer model {model.get('type')!r}: GGUF export writes BPE tokenizers (byte-level or "
                           "LLaMA's byte-fallback)")
    if model.get("byte_fallback"):  # LLaMA 1/2, Mistral, TinyLlama: sentencepiece-style, llama.cpp's 'llama' model
        vocab = gguf.LlamaHfVocab(folder)
        tokens, scores, types = zip(*vocab.all_tokens())
        if len(tokens) > n_vocab:
            raise QPrunerError(f"tokenizer has {len(tokens)} tokens, the embedding matrix {n_vocab} rows")
        pad = n_vocab - len(tokens)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(list(tokens) + [f"[PAD{i}]".encode() for i in range(len(tokens), n_vocab)])
        writer.add_token_scores(list(scores) + [-1000.0] * pad)
        writer.add_token_types([int(t) for t in types] + [int(gguf.TokenType.UNUSED)] * pad)
        special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=n_vocab)
        special.add_to_gguf(writer, quiet=True)
        return "tokenizer.json (byte-fallback BPE, llama)"
    if (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise QPrunerError("tokenizer.json: a BPE tokenizer without a ByteLevel decoder; GGUF export writes "
                           "byte-level BPE (GPT-2 style) and LLaMA's byte-fallback BPE")
    pre = tokenizer_pre or _pre_tokenizer(data)
    if pre is None:
        raise QPrunerError("tokenizer.json: its pre-tokenizer is none that GGUF export recognises (gpt-2, smollm, "
                           "llama-bpe, qwen2); name llama.cpp's pre-tokenizer with --tokenizer-pre")
    by_id: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    kinds: dict[int, int] = {}
    for added in data.get("added_tokens") or []:
        by_id[int(added["id"])] = added["content"]
        kinds[int(added["id"])] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    if max(by_id) >= n_vocab:
        raise QPrunerError(f"tokenizer has token id {max(by_id)}, the embedding matrix {n_vocab} rows")
    tokens, types = [], []
    for i in range(n_vocab):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(kinds.get(i, int(gguf.TokenType.NORMAL)))
        else:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
    special.add_special_token.update(_adds_special(folder))
    special.add_to_gguf(writer, quiet=True)
    return f"tokenizer.json (byte-level BPE, pre-tokenizer {pre})"


def _adds_special(folder: Path) -> dict:
    """Whether the Hugging Face tokenizer adds BOS / EOS to plain text, as llama.cpp's add_*_token flags."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("a").input_ids
    return {"bos": bool(ids) and tok.bos_token_id is not None and ids[0] == tok.bos_token_id,
            "eos": bool(ids) and tok.eos_token_id is not None and ids[-1] == tok.eos_token_id}


def source_gguf(pruned: Path) -> Optional[Path]:
    """The GGUF file a pruned folder's source model was converted from (qpruner_prune.json), if it is still there."""
    meta = Path(pruned) / "qpruner_prune.json"
    if not meta.is_file():
        return None
    info = json.loads(meta.read_text()).get("model_source") or {}
    file = Path(info["file"]) if info.get("format") == "gguf" and info.get("file") else None
    return file if file is not None and file.is_file() else None


# ---------------------------------------------------------------------------------------------
# the file


def _rope_order(head_dim: int) -> np.ndarray:
    """Row order within one head: rotate-half pairs (j, j + head_dim/2) become adjacent rows."""
    half = head_dim // 2
    return np.stack([np.arange(half), np.arange(half) + half], axis=1).reshape(-1)


def rope_permute(rows: np.ndarray, head_dim: int) -> np.ndarray:
    """Query/key rows (or biases) of whole heads from transformers' rotate-half order to llama.cpp's."""
    n_heads = rows.shape[0] // head_dim
    order = (np.arange(n_heads)[:, None] * head_dim + _rope_order(head_dim)[None, :]).reshape(-1)
    return rows[order]


def rope_unpermute(rows: np.ndarray, head_dim: int) -> np.ndarray:
    """The inverse of rope_permute."""
    n_heads = rows.shape[0] // head_dim
    order = (np.arange(n_heads)[:, None] * head_dim + _rope_order(head_dim)[None, :]).reshape(-1)
    out = np.empty_like(rows)
    out[order] = rows
    return out


def _padded_width(width: int, qtype) -> int:
    """The feed-forward width written: a multiple of 32 for quantized layers (Q4_K falls back to Q4_0 where a
    width is no multiple of 256 rather than padding to 256), at least one block."""
    block = 1 if block_size(qtype) == 1 else 32
    return max(block, -(-width // block) * block)


def write_gguf(model_dir: str | Path, bits: Sequence[int], out: str | Path, embeddings: str = DEFAULT_EMBEDDINGS,
               q4: str = "q4_0", tokenizer_gguf: Optional[Path] = None, tokenizer_pre: Optional[str] = None,
               name: Optional[str] = None, metadata: Optional[dict] = None) -> GGUFSummary:
    """Write the model in `model_dir` (a qpruner pruned or merged folder, or a plain Hugging Face folder of a
    supported family, float weights in model.safetensors) as a deci GGUF file, decoder layer i in the type of
    bits[i]. The file is written to a temporary name beside `out` and renamed when complete."""
    import torch
    from safetensors import safe_open

    gguf = _gguf()
    T = gguf.GGMLQuantizationType
    model_dir, out = Path(model_dir), Path(out)
    if embeddings not in EMBEDDING_TYPES:
        raise QPrunerError(f"--embeddings {embeddings!r}: choose one of {', '.join(EMBEDDING_TYPES)}")
    if q4 not in Q4_TYPES:
        raise QPrunerError(f"--q4 {q4!r}: choose one of {', '.join(Q4_TYPES)}")
    config = json.loads((model_dir / "config.json").read_text())
    check_expressible(config)
    shapes = layer_shapes(config)
    bits = [int(b) for b in bits]
    if len(bits) != len(shapes):
        raise QPrunerError(f"bits: got {len(bits)} entries, the model has {len(shapes)} decoder layers")
    types = [layer_type(b, q4) for b in bits]
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // config["num_attention_heads"])
    theta, rope_factors = _rope(config)
    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        raise QPrunerError(f"{model_dir}: no model.safetensors (one file of float weights); give a merged or pruned folder")
    embed_type = getattr(T, embeddings.upper())

    summary = GGUFSummary(path=out, file_bytes=0, layer_types=[t.name for t in types], tensor_types={},
                          n_head=[], n_head_kv=[], n_ff=[])
    tensors: list[tuple[str, np.ndarray, object]] = []  # (name, data ready for the writer, type)

    def add(name: str, data: np.ndarray, qtype) -> None:
        qtype = _fit_type(name, data, qtype, summary.fallbacks) if data.ndim == 2 else T.F32
        tensors.append((name, quantize(data, qtype) if data.ndim == 2 else data.astype(np.float32), qtype))

    with safe_open(str(weights), framework="pt") as f:
        keys = set(f.keys())

        def get(key: str) -> np.ndarray:
            return f.get_tensor(key).to(torch.float32).numpy()

        embed = get("model.embed_tokens.weight")
        n_vocab = embed.shape[0]
        add("token_embd.weight", embed, embed_type)
        if "lm_head.weight" in keys and not config.get("tie_word_embeddings", False):
            add("output.weight", get("lm_head.weight"), embed_type)
        add("output_norm.weight", get("model.norm.weight"), T.F32)
        if rope_factors is not None:
            tensors.append(("rope_freqs.weight", rope_factors, T.F32))
        for i, (shape, qtype) in enumerate(zip(shapes, types)):
            p = f"model.layers.{i}."
            n_head, n_kv, n_ff = shape["num_attention_heads"], shape["num_key_value_heads"], shape["intermediate_size"]
            if n_head:
                q, k, v, o = (get(p + f"self_attn.{x}_proj.weight") for x in "qkvo")
                q, k = rope_permute(q, head_dim), rope_permute(k, head_dim)
                biases = {x: get(p + f"self_attn.{x}_proj.bias") for x in "qkv" if p + f"self_attn.{x}_proj.bias" in keys}
            elif i == 0:  # llama.cpp sizes heads from layer 0's head count: one zero group, which adds 0
                heads = int(config["num_attention_heads"])
                n_kv, n_head = 1, max(1, heads // int(config.get("num_key_value_heads") or heads))
                q, o = np.zeros((n_head * head_dim, hidden), np.float32), np.zeros((hidden, n_head * head_dim), np.float32)
                k = v = np.zeros((head_dim, hidden), np.float32)
                biases = {}
            if n_head:
                add(f"blk.{i}.attn_norm.weight", get(p + "input_layernorm.weight"), T.F32)
                add(f"blk.{i}.attn_q.weight", q, qtype)
                add(f"blk.{i}.attn_k.weight", k, qtype)
                add(f"blk.{i}.attn_v.weight", v, qtype)
                add(f"blk.{i}.attn_output.weight", o, qtype)
                for x, b in biases.items():
                    add(f"blk.{i}.attn_{x}.bias", rope_permute(b, head_dim) if x in "qk" else b, T.F32)
            width = _padded_width(n_ff, qtype)
            if width != n_ff:
                summary.padded_ff[i] = (n_ff, width)
            gate, up = np.zeros((width, hidden), np.float32), np.zeros((width, hidden), np.float32)
            down = np.zeros((hidden, width), np.float32)
            if n_ff:
                gate[:n_ff], up[:n_ff] = get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")
                down[:, :n_ff] = get(p + "mlp.down_proj.weight")
            add(f"blk.{i}.ffn_norm.weight", get(p + "post_attention_layernorm.weight"), T.F32)
            add(f"blk.{i}.ffn_gate.weight", gate, qtype)
            add(f"blk.{i}.ffn_up.weight", up, qtype)
            add(f"blk.{i}.ffn_down.weight", down, qtype)
            summary.n_head.append(n_head)
            summary.n_head_kv.append(n_kv)
            summary.n_ff.append(width)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)[1])
    try:
        writer = gguf.GGUFWriter(str(tmp), ARCH, use_temp_file=False)
        writer.add_type("model")
        writer.add_name(name or config.get("_name_or_path") or "qpruner model")
        writer.add_block_count(len(shapes))
        context = int(config.get("max_position_embeddings") or 2048)
        window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
        if window:  # deci has no sliding window: advertise only the context where none applies
            context = min(context, int(window))
        writer.add_context_length(context)
        writer.add_embedding_length(hidden)
        writer.add_feed_forward_length(summary.n_ff)
        writer.add_head_count(summary.n_head)
        writer.add_head_count_kv(summary.n_head_kv)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(theta)
        writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
        writer.add_vocab_size(n_vocab)
        counts = Counter(t.name for t in types)
        main = counts.most_common(1)[0][0]
        file_type = {"Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q4_K": "MOSTLY_Q4_K_M", "IQ4_NL": "MOSTLY_IQ4_NL", "Q8_0": "MOSTLY_Q8_0",
                     "F16": "MOSTLY_F16"}[main]
        writer.add_file_type(int(getattr(gguf.LlamaFileType, file_type)))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_array("qpruner.bits", bits)
        for key, value in (metadata or {}).items():
            writer.add_string(f"qpruner.{key}", str(value))
        if tokenizer_gguf is not None and _copy_gguf_tokenizer(writer, Path(tokenizer_gguf), n_vocab):
            summary.tokenizer = f"copied from {Path(tokenizer_gguf).name}"
        else:
            summary.tokenizer = _hf_tokenizer(writer, model_dir, n_vocab, tokenizer_pre)
        for tname, data, qtype in tensors:
            if data.dtype == np.uint8:  # quantized (and BF16) tensors come as bytes
                writer.add_tensor(tname, data, raw_dtype=qtype)
            else:
                writer.add_tensor(tname, data)
            summary.tensor_types[qtype.name] = summary.tensor_types.get(qtype.name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    summary.file_bytes = out.stat().st_size
    return summary


_HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def dequantized_state(path: str | Path, head_dim: int) -> dict[str, np.ndarray]:
    """What a GGUF file written here holds, as float32 arrays under the Hugging Face names, in transformers'
    row order and still padded (slice to the model's shapes): for measuring the file's own rounding."""
    gguf = _gguf()
    state = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        values = dequantize(tensor.data, tensor.tensor_type).reshape(tuple(int(n) for n in reversed(tensor.shape)))
        if tensor.name in ("token_embd.weight", "output.weight", "output_norm.weight"):
            key = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
                   "output_norm.weight": "model.norm.weight"}[tensor.name]
        elif tensor.name.startswith("blk."):
            _, layer, kind, suffix = tensor.name.split(".")
            key = f"model.layers.{layer}.{_HF_NAMES[kind]}.{suffix}"
            if kind in ("attn_q", "attn_k"):
                values = rope_unpermute(values, head_dim)
        else:
            continue
        state[key] = values
    return state


def load_gguf_weights(model, path: str | Path) -> None:
    """Replace a transformers model's weights (the model the file was written from) with the file's, in place."""
    import torch

    state = dequantized_state(path, int(getattr(model.config, "head_dim", None)
                                        or model.config.hidden_size // model.config.num_attention_heads))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, values in state.items():
            if key in params:
                param = params[key]
                param.copy_(torch.from_numpy(np.ascontiguousarray(values[tuple(slice(0, n) for n in param.shape)])))
    if "lm_head.weight" not in state and "lm_head.weight" in params and getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


def describe(summary: GGUFSummary) -> str:
    """A short human summary of a written file."""
    short = {"Q4_0": "q4", "Q8_0": "q8", "F16": "f16", "Q4_K": "q4k", "Q4_1": "q4_1", "IQ4_NL": "iq4nl"}

    def brief(types: str) -> str:
        for name, abbrev in short.items():
            types = types.replace(name, abbrev)
        return types

    lines = [f"{summary.path} ({summary.file_bytes / 1e6:.1f} MB, architecture deci): layer types "
             f"{','.join(brief(t) for t in summary.layer_types)}; "
             f"tensors {dict(sorted(summary.tensor_types.items()))}; tokenizer {summary.tokenizer}"]
    if summary.padded_ff:
        lines.append("feed-forward widths padded with zero channels to the block size: "
                     + ", ".join(f"layer {i} {a}->{b}" for i, (a, b) in summary.padded_ff.items())
                     + " (prune.round_to avoids this)")
    for tname, why in summary.fallbacks.items():
        lines.append(f"{tname}: {why}")
    return "\n".join(lines)
