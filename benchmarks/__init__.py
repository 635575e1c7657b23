"""qpruner's benchmark studies: `python -m benchmarks.<name>`; each prints JSON and writes results/<name>.json."""
