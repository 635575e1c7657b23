"""`qpruner VERB ...`: the console script. Each verb is its module's CLI, unchanged: `qpruner tune ...` is
`python -m qpruner.tune ...`, and so on (the modules keep working on their own)."""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

VERBS = {
    "tune": ("qpruner.tune", "prune once, search bit-widths per layer, write the front and report"),
    "trial": ("qpruner.trial", "train and evaluate one configuration"),
    "prune": ("qpruner.prune.__main__", "prune a model and store it in the cache"),
    "report": ("qpruner.report", "write report.md and the plots of a run folder again"),
    "predict": ("qpruner.predict", "the best configuration under a memory budget, predicted without training"),
    "export": ("qpruner.export", "export one trial as a loadable folder or a GGUF file"),
}


def usage() -> str:
    lines = ["usage: qpruner VERB [options]   (qpruner VERB --help for its options)", "", "verbs:"]
    return "\n".join(lines + [f"  {verb:<8} {what}" for verb, (_, what) in VERBS.items()])


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if args else 2)
    verb, rest = args[0], args[1:]
    if verb not in VERBS:
        print(f"error: unknown verb {verb!r}; use one of {', '.join(VERBS)}", file=sys.stderr)
        sys.exit(2)
    from qpruner.cli import run_cli

    module = importlib.import_module(VERBS[verb][0])
    sys.argv = [f"qpruner {verb}", *rest]
    run_cli(module.main, rest)


if __name__ == "__main__":
    main()
