"""Known-harmless library messages, filtered once, here, by their text.

Each Ray worker used to repeat a few lines that users read as something broken. They are not:

- bitsandbytes 0.50 looks up a faster CPU 4-bit kernel on the Hugging Face kernel hub when it is imported on
  a CPU with AVX512-BF16 (`backends/cpu/ops.py`, no switch to skip it); offline, `kernels` says it skips the
  publisher check and bitsandbytes that the lookup failed, then uses its own kernel;
- peft reads transformers' deprecated `is_gradient_checkpointing` (a FutureWarning per model);
- lm-eval's own task files (boolq, piqa, ...) list `metric: acc` without aggregation or higher_is_better,
  and lm-eval warns that it uses the defaults (mean, higher is better), which are the right ones.

Only these messages are dropped, matched by text, so any other warning from the same libraries still
shows. `--debug` (which sets QPRUNER_DEBUG=1, passed on to every Ray worker) shows everything.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

DEBUG_ENV = "QPRUNER_DEBUG"

# logger name -> messages (regular expressions, matched at the start) that carry no information
KNOWN_LOGS = {
    "bitsandbytes.backends.cpu.ops": [r"Failed to load CPU gemm_4bit_forward from kernels-community"],
    "kernels._internals.hf_hub": [r"Skipping publisher trust check for 'kernels-community/"],
    "lm_eval.api.task": [r"\[Task: [^\]]+\] metric \w+ is defined, but (aggregation|higher_is_better) is not"],
}
KNOWN_WARNINGS = [(FutureWarning, r"`is_gradient_checkpointing` is deprecated")]


class _KnownNoise(logging.Filter):
    def __init__(self, patterns: list[str]):
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return os.environ.get(DEBUG_ENV) == "1" or not self.pattern.match(record.getMessage())


def install() -> None:
    """Attach the filters (idempotent). Loggers are configured by name, so this works before the libraries
    are imported, which is when bitsandbytes logs."""
    for name, patterns in KNOWN_LOGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _KnownNoise) for f in logger.filters):
            logger.addFilter(_KnownNoise(patterns))
    if os.environ.get(DEBUG_ENV) != "1":
        for category, message in KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)


def show_all() -> None:
    """`--debug`: every message shows, here and (through the environment) in every Ray worker."""
    os.environ[DEBUG_ENV] = "1"
    known = {(category, message) for category, message in KNOWN_WARNINGS}
    warnings.filters[:] = [f for f in warnings.filters
                           if not (f[0] == "ignore" and f[1] is not None and (f[2], f[1].pattern) in known)]
