"""`python -m qpruner.export --run DIR (--trial ID | --pick best-acc | --pick best | --pick max-mem=GB) --out OUT [--merge]`
(`--format gguf --out FILE.gguf`: one GGUF file for llama.cpp instead, see qpruner.gguf_export)

Writes a folder that loads with stock libraries (no qpruner import):
  base/               the pruned model (safetensors + config.json with per-layer shapes + tokenizer); the
                      weights are LoftQ residuals, so quantizing them as quantization.json says gives
                      exactly the base the trial trained on
  quantization.json   bits per decoder layer (+ LoRA ranks) and the bitsandbytes settings
  adapter/            the trial's trained LoRA adapter (peft format)
  load_qpruner.py     `from load_qpruner import load; model, tok = load(OUT)` (and OUT/merged)
  merged/             with --merge: dequantized base + LoRA folded in, one full-precision model
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Optional, Sequence

import pyarrow.parquet as pq
import torch

from qpruner.errors import QPrunerError


def pick_trial(run: Path, trial: Optional[str] = None, pick: Optional[str] = None) -> dict:
    """The results row of `trial`; or the completed trial best on accuracy (`best-acc`), on the run's own
    search.objective (`best`), or on the run's objective under a memory cap (`max-mem=GB`)."""
    from qpruner.config import QUALITY
    from qpruner.results import objective_of
    from qpruner.runfolder import read_results

    if trial and pick:
        raise QPrunerError(f"--trial {trial} and --pick {pick}: give one of them, not both")
    table = read_results(run)
    objective = objective_of(table)
    every = table.to_pylist()
    rows = [r for r in every if r["status"] == "completed"]
    if trial:
        match = [r for r in rows if r["trial_id"] == trial]
        if not match:
            other = [r for r in every if r["trial_id"] == trial]
            if other:
                why = {"stopped_early": "was stopped early by ASHA, so it has no final evaluation",
                       "failed": f"failed ({(other[0].get('error') or 'unknown error').splitlines()[-1][:120]})",
                       "oom": f"ran out of memory ({(other[0].get('error') or 'unknown error').splitlines()[-1][:120]})"}
                raise QPrunerError(f"--trial {trial}: that trial {why.get(other[0]['status'], 'is ' + other[0]['status'])}; "
                                   "export a completed trial (report.md lists them), or --pick best-acc")
            raise QPrunerError(f"--trial {trial}: no trial with that id in {run / 'results.parquet'}; report.md lists "
                               "the completed trials")
        return match[0]
    if pick in ("best-acc", "best"):
        candidates = rows
        objective = QUALITY["accuracy"] if pick == "best-acc" else objective
    elif pick and pick.startswith("max-mem="):
        try:
            cap = float(pick.split("=", 1)[1])
        except ValueError:
            raise QPrunerError(f"--pick {pick}: give the memory cap in GB, e.g. max-mem=20") from None
        candidates = [r for r in rows if r["memory_gb"] <= cap]
    else:
        raise QPrunerError("give --trial ID, --pick best-acc, --pick best (the run's search.objective) or --pick max-mem=GB")
    candidates = [r for r in candidates if r.get(objective.name) is not None and math.isfinite(r[objective.name])]
    if not candidates:
        raise QPrunerError(f"--pick {pick}: no completed trial qualifies in {run}")
    return max(candidates, key=lambda r: (float(objective.oriented(r[objective.name])), -r["memory_bytes"]))


def find_adapter(run: Path, trial_id: str) -> Path:
    """The trial's adapter in the run folder (`adapters/<trial id>`, where every node writes it)."""
    from qpruner.results import adapter_path

    adapter = adapter_path(run, trial_id)
    if (adapter / "adapter_config.json").is_file():
        return adapter
    keep = _keep_adapters(run)
    if keep == "all" or (keep == "pareto" and trial_id in _front_ids(run)):
        raise QPrunerError(
            f"trial {trial_id}: its adapter is missing from {adapter} although output.keep_adapters ({keep}) keeps it; "
            "the trial's node wrote it there when the trial finished, so that node did not share the run folder (or it "
            "was removed): put --out on storage every node mounts at the same path (docs/cluster.md) and "
            "run that configuration again"
        )
    raise QPrunerError(
        f"trial {trial_id} has no adapter in {adapter.parent}: output.keep_adapters keeps only the Pareto front by "
        "default (export a front trial, or rerun with output.keep_adapters: all), and 'none' keeps no adapter"
    )


def _keep_adapters(run: Path) -> Optional[str]:
    try:
        import yaml

        return (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("output", {}).get("keep_adapters", "pareto")
    except Exception:  # an unreadable config.yaml: export refuses on it in one line later
        return None


def _front_ids(run: Path) -> set:
    try:
        return set(pq.read_table(run / "pareto.parquet", columns=["trial_id"]).column("trial_id").to_pylist())
    except Exception:  # no or a damaged front file: only the message's wording depends on it
        return set()


def pruned_path(run: Path) -> Path:
    """The pruned model the run trained on (run.json), or one line saying why it cannot be used."""
    from qpruner.runfolder import read_json

    pruned = read_json(run / "run.json").get("pruned_path") if (run / "run.json").is_file() else None
    if not pruned:
        raise QPrunerError(f"--run {run}: run.json records no pruned model (the run stopped before pruning finished); "
                           "rerun the tune command to finish the run")
    if not (Path(pruned) / "config.json").is_file():
        raise QPrunerError(f"--run {run}: the pruned model {pruned} is gone from the cache; rerun `python -m "
                           f"qpruner.prune --config {run / 'config.yaml'}` to rebuild it (same settings, same folder)")
    return Path(pruned)


def run_inputs(run: Path):
    """The run's Config and its pruned model's folder, as recorded in the run folder."""
    from qpruner.config import load_config

    return load_config(run / "config.yaml"), pruned_path(run)


def export(run: Path, row: dict, out: Path, merge: bool = False) -> Path:
    """Write the export folder for one trial of a run (see the module docstring)."""
    cfg, pruned = run_inputs(run)
    return export_trial(cfg, pruned, find_adapter(run, row["trial_id"]), row, out, merge)


def export_gguf(run: Path, row: dict, out: Path, **options):
    """The GGUF file of one trial of a run (`--format gguf`), refused before any work when llama.cpp's deci
    architecture cannot express the pruned model."""
    from qpruner.gguf_export import check_expressible

    cfg, pruned = run_inputs(run)
    check_expressible(json.loads((pruned / "config.json").read_text()))
    return gguf_from_trial(cfg, pruned, find_adapter(run, row["trial_id"]), row, out, **options)


def gguf_from_trial(cfg, pruned: Path, adapter: Path, row: dict, out: Path, **options):
    """Merge a trial's adapter into the pruned model (what `--merge` writes: dequantized LoftQ base + LoRA)
    and write the GGUF file (`qpruner.gguf_export.write_gguf`); the merged folder is temporary."""
    import tempfile

    from qpruner.gguf_export import source_gguf, write_gguf

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        export_trial(cfg, Path(pruned), Path(adapter), row, work / "export", merge=True)
        name = options.pop("name", None) or f"{Path(cfg.model.name).name.removesuffix('.gguf')} qpruner {row.get('trial_id', '')}"
        return write_gguf(work / "export" / "merged", row["bits"], out, tokenizer_gguf=source_gguf(Path(pruned)),
                          name=name.strip(), metadata={"trial_id": row.get("trial_id", ""), "source": cfg.model.name},
                          **options)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def export_trial(cfg, pruned: Path, adapter: Path, row: dict, out: Path, merge: bool = False) -> Path:
    """The export folder from a pruned model, a trained adapter and the trial's row (bits, ranks, scores).

    The base is loaded in quant.compute_dtype, as run_trial loads it, so LoftQ's residual W - B A is rounded
    where the trial rounded it and base/ quantizes to the trial's very weights (with loftq_iters > 1 a float32
    residual cast later rounds differently). merged/ is still written in float32 (an exact upcast first)."""
    from qpruner.loftq import loftq_for_model
    from qpruner.prune import load_pruned, save_pruned
    from qpruner.quantize import settings

    bits, ranks = list(row["bits"]), row.get("ranks")
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_pruned(pruned, dtype=cfg.quant.compute_dtype)
    inits, _ = loftq_for_model(model, bits, cfg, cfg.output.cache, pruned.name, ranks=ranks)
    with torch.no_grad():
        for name, init in inits.items():
            linear = model.get_submodule(name)
            linear.weight.data = init.residual(linear.weight.data)
    save_pruned(model, tokenizer, out / "base", {"trial_id": row["trial_id"], "source": str(pruned)})
    shutil.copytree(adapter, out / "adapter", dirs_exist_ok=True)
    (out / "quantization.json").write_text(json.dumps(
        {"bits": bits, "ranks": ranks, "settings": settings(cfg.quant), "trial_id": row["trial_id"],
         "accuracy": row["accuracy"], "perplexity": row.get("perplexity"), "val_logprob": row.get("val_logprob"),
         "memory_gb": row["memory_gb"]}, indent=1))
    shutil.copy(Path(__file__).with_name("standalone.py"), out / "load_qpruner.py")
    if merge:
        merge_adapter(model.float(), tokenizer, bits, cfg, out)
    return out


def merge_adapter(model, tokenizer, bits: Sequence[int], cfg, out: Path) -> None:
    """merged/: each adapted Linear becomes dequant(Q) + scaling * B A, in full precision."""
    from safetensors.torch import load_file

    from qpruner.loftq import quant_dequant
    from qpruner.prune import save_pruned

    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    state = load_file(out / "adapter" / "adapter_model.safetensors")
    with torch.no_grad():
        for key, a in state.items():
            if not key.endswith("lora_A.weight"):
                continue
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = state[key.replace("lora_A", "lora_B")]
            layer = int(name.split(".layers.")[1].split(".")[0])
            linear = model.get_submodule(name)
            scaling = adapter_cfg["lora_alpha"] / a.shape[0]
            base = quant_dequant(linear.weight.data, bits[layer], cfg.quant)
            linear.weight.data = (base + scaling * b.float() @ a.float()).to(linear.weight.dtype)
    save_pruned(model, tokenizer, out / "merged", {"merged_from": str(out / "adapter"), "bits": list(bits)})


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m qpruner.export", description="Export one trial of a run as a loadable model.")
    parser.add_argument("--run", required=True, help="the --out folder of a qpruner.tune run")
    parser.add_argument("--trial", default=None, help="trial id (see results.parquet / report.md)")
    parser.add_argument("--pick", default=None, help="best-acc; best (on the run's search.objective); or max-mem=GB for the "
                        "best on the run's objective under a memory cap")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--merge", action="store_true", help="also write merged/: one full-precision model")
    parser.add_argument("--format", choices=("folder", "gguf"), default="folder",
                        help="folder (default, above) or gguf: --out FILE.gguf, one file llama.cpp runs (qpruner/gguf_export.py)")
    parser.add_argument("--embeddings", default=None, help="gguf: type of token embeddings and output (f16, q8_0 (default), f32, bf16, q4_0)")
    parser.add_argument("--q4", default="q4_0", help="gguf: type of 4-bit layers, q4_0 (default), q4_1, or iq4_nl / q4_k (need llama-cpp-python)")
    parser.add_argument("--tokenizer-pre", default=None, help="gguf: llama.cpp pre-tokenizer name, when it cannot be recognised")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    from qpruner.errors import check_out_path
    from qpruner.runfolder import check_run_dir

    if args.trial and args.pick:
        raise QPrunerError(f"--trial {args.trial} and --pick {args.pick}: give one of them, not both")
    run = check_run_dir(args.run, "--run")
    check_out_path(args.out, "--out", "file" if args.format == "gguf" else "folder")
    row = pick_trial(run, args.trial, args.pick)
    pruned_path(run)  # run.json readable and its pruned model present, before anything is written
    if args.format == "gguf":
        from qpruner.gguf_export import DEFAULT_EMBEDDINGS, describe

        summary = export_gguf(run, row, Path(args.out), embeddings=args.embeddings or DEFAULT_EMBEDDINGS, q4=args.q4,
                              tokenizer_pre=args.tokenizer_pre)
        print(f"exported trial {row['trial_id']} ({scores_text(row)}) as GGUF: {describe(summary)}")
        return 0
    out = export(run, row, Path(args.out), merge=args.merge)
    print(f"exported trial {row['trial_id']} ({scores_text(row)}, {row['memory_gb']:.4f} GB) to {out}")
    return 0


def scores_text(row: dict) -> str:
    """'accuracy 0.4231, perplexity 196.7': the quality figures a results row has."""
    shown = [(k, row.get(k)) for k in ("accuracy", "perplexity", "val_logprob")]
    return ", ".join(f"{k} {v:.4f}" if k != "perplexity" else f"{k} {v:.4g}" for k, v in shown if v is not None) or "no score"


if __name__ == "__main__":
    from qpruner.cli import run_cli

    run_cli(main)
