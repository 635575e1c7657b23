"""Load the model to compress: a hub id, a local Hugging Face folder, a GGUF file, `builtin:tiny`, or a
qpruner-pruned folder. Only the families in qpruner.families are accepted, checked before any work.

A `.gguf` file is dequantized by transformers (with the `gguf` package) and converted once into the
cache as an HF folder (safetensors + tokenizer), keyed by the file's content hash. The folder's
`qpruner_source.json` records that the weights came from GGUF and its quantization type: they carry
that rounding, and the pruning metadata and the report say so.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Optional

from qpruner.errors import ConfigError

SOURCE = "qpruner_source.json"  # provenance of a converted folder
GGUF_VERSION = 1  # bump when the conversion changes


def resolve_model(name: str, cache_dir: Optional[Path] = None) -> str:
    """`builtin:tiny` -> its folder (built on first use), a `.gguf` file -> its converted folder; else unchanged."""
    if name == "builtin:tiny":
        from qpruner.builtin import ensure_tiny

        return str(ensure_tiny(cache_dir).model_dir)
    if name.endswith(".gguf"):
        return str(gguf_folder(Path(name).expanduser(), cache_dir))
    return name


def source_info(path: str | Path) -> Optional[dict]:
    """What a converted folder came from ({"format": "gguf", "quant_type": ..., ...}), or None."""
    file = Path(path) / SOURCE
    return json.loads(file.read_text()) if file.is_file() else None


def check_model(name: str, cache_dir: Optional[Path] = None, trust_remote_code: bool = False,
                allow_pickle: bool = False):
    """Resolve `name` and read its config offline-first: (path, transformers config, family adapter).

    Refuses, in one line naming model.name: a model that cannot be found, a model type outside the
    supported families, and a folder whose weights exist only as pickles (unless allow_pickle).
    """
    from transformers import AutoConfig

    from qpruner.families import family_of

    path = resolve_model(name, cache_dir)
    local = Path(path).expanduser()
    if local.is_dir() and not (local / "config.json").is_file():
        raise ConfigError("model.name", f"folder {name!r} has no config.json; point at a Hugging Face model folder")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        if not local.exists():  # a relative folder that is not there reads as a hub id: say both
            raise ConfigError(
                "model.name",
                f"{name!r} is no folder here (relative to {os.getcwd()}), and as a hub id it cannot be loaded "
                f"({first_line(exc, 120)}); give an existing model folder, a .gguf file, 'builtin:tiny', or a hub id "
                "reachable from this machine (offline: download it first)",
            ) from None
        raise ConfigError(
            "model.name",
            f"cannot load {name!r} ({first_line(exc, 160)}); give a local folder, a .gguf file, 'builtin:tiny', "
            "or a hub id reachable from this machine (offline: download it first)",
        ) from None
    family = family_of(config, "model.name", name)
    if local.is_dir() and not allow_pickle and not list(local.glob("*.safetensors")) and list(local.glob("*.bin")):
        raise ConfigError("model.name", f"folder {name!r} holds its weights only as pickles (*.bin), and loading a pickle "
                          "runs code; convert it to safetensors, or set model.allow_pickle: true if you trust it")
    return path, config, family


def load_model(name: str, dtype: str = "float32", cache_dir: Optional[Path] = None,
               trust_remote_code: bool = False, device: Optional[str] = None, allow_pickle: bool = False):
    """Return (model in eval mode, tokenizer with a pad token); a model that cannot be used is one line."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qpruner.standalone import build_pruned_model

    path, config, _ = check_model(name, cache_dir, trust_remote_code, allow_pickle)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if getattr(config, "qpruner_layers", None):  # a qpruner-pruned folder: per-layer shapes
            model = build_pruned_model(path, getattr(torch, dtype))
        else:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code,
                use_safetensors=None if allow_pickle else True,
            )
    except OSError as exc:
        raise ConfigError(
            "model.name",
            f"cannot load {name!r} ({first_line(exc, 160)}); give a local folder, a .gguf file, 'builtin:tiny', "
            "or a hub id reachable from this machine (offline: download it first)",
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device:
        model.to(device)
    return model.eval(), tokenizer


def parameter_bytes(name: str, cache_dir: Optional[Path] = None, dtype: str = "float32") -> int:
    """Bytes of the model's weights in `dtype`, counted on the meta device from its config (no weights read)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    _, config, _ = check_model(name, cache_dir)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    count = sum(p.numel() for p in model.parameters())
    return count * torch.finfo(getattr(torch, dtype)).bits // 8


def first_line(exc: BaseException, width: int = 200) -> str:
    """The first line of an exception's message (or its type), cut to `width` characters."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:width]


# ---------------------------------------------------------------------------------------------
# GGUF input


@lru_cache(maxsize=None)
def _sha256(path: str, size: int, mtime: float) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """Content hash of a file, computed once per (path, size, mtime) in this process."""
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime)


def gguf_quant_type(path: Path) -> dict:
    """The GGUF file's declared file type (e.g. Q4_1) and how many tensors each storage type holds."""
    from collections import Counter

    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get("general.file_type")
    declared = None
    if field is not None:
        code = int(field.parts[field.data[0]][0])
        try:
            declared = gguf.LlamaFileType(code).name.removeprefix("MOSTLY_")
        except ValueError:
            declared = str(code)
    tensors = Counter(t.tensor_type.name for t in reader.tensors)
    return {"quant_type": declared or tensors.most_common(1)[0][0], "tensor_types": dict(tensors)}


def gguf_folder(file: Path, cache_dir: Optional[Path] = None) -> Path:
    """Convert a GGUF file once into <cache>/gguf/<content hash>/ (safetensors + tokenizer); return the folder."""
    from filelock import FileLock

    from qpruner.config import default_cache_dir

    if not file.is_file():
        raise ConfigError("model.name", f"GGUF file {str(file)!r} does not exist; give the path of a .gguf file")
    digest = file_sha256(file)
    root = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "gguf"
    home = root / f"{digest[:16]}-v{GGUF_VERSION}"
    if (home / "COMPLETE").is_file():
        return home
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(home) + ".lock"):
        if not (home / "COMPLETE").is_file():
            _convert_gguf(file, digest, home)
    return home


def _convert_gguf(file: Path, digest: str, home: Path) -> None:
    """Dequantize with transformers, check the family first, save safetensors in a temp folder, rename."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from qpruner.families import family_of

    try:
        config = AutoConfig.from_pretrained(file.parent, gguf_file=file.name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ConfigError("model.name", f"cannot read GGUF file {str(file)!r} ({first_line(exc, 160)}); "
                          "transformers reads GGUF files of LLaMA, Mistral and Qwen2/3 models") from None
    family_of(config, "model.name", str(file))
    model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    for attr in ("quantization_config", "_name_or_path"):  # the saved folder is plain float weights
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.hf_quantizer = None
    tmp = Path(tempfile.mkdtemp(prefix=f".{home.name}-", dir=home.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info = {"format": "gguf", "file": str(file), "sha256": digest, **gguf_quant_type(file),
                "note": "weights dequantized from GGUF: they carry its quantization rounding"}
        (tmp / SOURCE).write_text(json.dumps(info, indent=1))
        (tmp / "COMPLETE").write_text("{}")
        if home.exists():
            shutil.rmtree(home)
        os.replace(tmp, home)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
