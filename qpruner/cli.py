"""Shared CLI plumbing: offline defaults, `--config`/`--debug` flags, and one-line errors with exit 2."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, Sequence

from qpruner.errors import QPrunerError


def base_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with the flags every qpruner command shares."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. tune_configs/tiny.yaml")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    return parser


def run_cli(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> None:
    """Run `main(argv)`; a QPrunerError becomes `error: <one line>` and exit code 2 unless --debug."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        code = main(args)
    except QPrunerError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def set_offline_defaults() -> None:
    """Hubs are often unreachable: fail fast instead of retrying for minutes (users can override)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
