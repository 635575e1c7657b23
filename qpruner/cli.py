"""Shared CLI plumbing: offline defaults, `--config`/`--set`/`--debug` flags, and one-line errors with exit 2."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Optional, Sequence

import yaml

from qpruner.errors import ConfigError, QPrunerError

ONLINE_ENV = "QPRUNER_ONLINE"  # =1: let Hugging Face libraries reach the hub (default: offline)


def base_parser(prog: str, description: str, config_required: bool = True) -> argparse.ArgumentParser:
    """An argparse parser with the flags every qpruner command shares."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=config_required, help="YAML recipe, e.g. tune_configs/tiny.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a config field, YAML-typed, repeatable: --set finetune.steps=100 "
                             "--set eval.local_data.boolq=/data/boolq.jsonl")
    parser.add_argument("--online", action="store_true", help=f"allow the Hugging Face hub (same as {ONLINE_ENV}=1)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    return parser


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`--set a.b=VALUE` items -> {"a.b": VALUE}, each value parsed as YAML (100 -> int, [4, 8] -> list)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError("--set", f"{item!r} must look like KEY=VALUE, e.g. --set finetune.steps=100")
        try:
            out[key.strip()] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"--set {key.strip()}", f"value {text!r} is not valid YAML; quote it") from None
    return out


def load_cli_config(args: argparse.Namespace, overrides: Optional[dict[str, Any]] = None):
    """The Config of `--config` with `--set` overrides (and any command-specific `overrides`) applied."""
    from qpruner.config import load_config

    return load_config(args.config, {**parse_overrides(args.overrides), **(overrides or {})})


def run_cli(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> None:
    """Run `main(argv)`; a QPrunerError becomes `error: <one line>` and exit code 2 unless --debug."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        from qpruner import noise

        noise.show_all()
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


def set_offline_defaults(argv: Optional[Sequence[str]] = None) -> None:
    """Hubs are often unreachable: Hugging Face libraries run offline (fail in a second, not after minutes
    of retries) unless $QPRUNER_ONLINE=1 or `--online` is given. Explicit HF_*_OFFLINE settings win."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    args = sys.argv[1:] if argv is None else argv
    if os.environ.get(ONLINE_ENV, "") in ("", "0") and "--online" not in args:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
