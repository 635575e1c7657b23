"""Known-harmless library messages are dropped by their text; everything else, and everything under --debug, shows."""

import logging
import subprocess
import sys
import warnings

import pytest

from qpruner import noise

BNB = "Failed to load CPU gemm_4bit_forward from kernels-community: offline. Please make sure you already `pip install kernels`"
LM_EVAL = "[Task: boolq] metric acc is defined, but aggregation is not. using default aggregation=mean"


@pytest.fixture
def no_debug(monkeypatch):
    monkeypatch.delenv(noise.DEBUG_ENV, raising=False)
    noise.install()


def test_known_messages_are_dropped_and_others_kept(no_debug, caplog):
    caplog.set_level(logging.WARNING)
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning(BNB)
    logging.getLogger("lm_eval.api.task").warning(LM_EVAL)
    logging.getLogger("lm_eval.api.task").warning("[Task: boolq] has no documents")  # a real warning
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning("something else went wrong")
    assert [r.getMessage() for r in caplog.records] == ["[Task: boolq] has no documents", "something else went wrong"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        noise.install()  # catch_warnings restores the filters afterwards; install again inside
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning, stacklevel=1)
        warnings.warn("another deprecation", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["another deprecation"]


def test_debug_shows_everything(no_debug, caplog, monkeypatch):
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        noise.install()
        monkeypatch.setenv(noise.DEBUG_ENV, "1")  # what show_all sets; monkeypatch takes it away afterwards
        noise.show_all()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning, stacklevel=1)
    logging.getLogger("lm_eval.api.task").warning(LM_EVAL)
    assert [str(w.message) for w in seen] and [r.getMessage() for r in caplog.records] == [LM_EVAL]


CATCH_REAL_LINES = """
import logging, os
seen = []
class Keep(logging.Handler):
    def emit(self, record): seen.append(record)
logging.getLogger().addHandler(Keep())
os.environ["QPRUNER_DEBUG"] = "1"  # let everything through while bitsandbytes is imported
import qpruner, bitsandbytes
from bitsandbytes.functional import has_avx512bf16
del os.environ["QPRUNER_DEBUG"]
from qpruner.noise import KNOWN_LOGS, _KnownNoise
hub = [r for r in seen if "kernels-community" in r.getMessage()]
assert hub or not has_avx512bf16(), "bitsandbytes made no kernel-hub lookup on an AVX512-BF16 CPU"
kept = [r.getMessage() for r in hub if _KnownNoise(KNOWN_LOGS.get(r.name, ["$^"])).filter(r)]
assert not kept, kept
print(len(hub))
"""


def test_bitsandbytes_kernel_hub_lines_on_import_are_the_known_ones():
    """The real lines bitsandbytes' import logs offline on AVX512-BF16 CPUs (this machine) are all caught."""
    out = subprocess.run([sys.executable, "-c", CATCH_REAL_LINES], capture_output=True, text=True,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
