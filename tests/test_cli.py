"""The `qpruner` console script: one verb per module, the modules' own parsers and one-line errors."""

import pytest

from qpruner.__main__ import VERBS, main


def run(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def test_verbs_dispatch_to_the_modules(capsys, tmp_path):
    code, out, _ = run([], capsys)
    assert code == 2 and all(verb in out for verb in VERBS)
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and "qpruner VERB" in out
    assert all(f"  {verb} " in out for verb in VERBS)  # a space between each verb and its description
    code, _, err = run(["frob"], capsys)
    assert code == 2 and err.strip() == f"error: unknown verb 'frob'; use one of {', '.join(VERBS)}"
    code, _, err = run(["report", str(tmp_path / "missing")], capsys)  # the report module's own one-line error
    assert code == 2 and len(err.strip().splitlines()) == 1 and "missing" in err
    code, out, _ = run(["export", "--help"], capsys)
    assert code == 0 and "--format" in out


def test_every_verb_module_has_a_main():
    import importlib

    for module, _ in VERBS.values():
        assert callable(importlib.import_module(module).main)


def test_importing_qpruner_makes_openmp_waiters_sleep():
    """Spinning OpenMP waiters made the tiny model's first build ~10x slower on a busy 2-core machine."""
    import os
    import subprocess
    import sys

    code = "import os, qpruner; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == "PASSIVE", out.stderr[-2000:]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**env, "OMP_WAIT_POLICY": "ACTIVE"})
    assert out.stdout.strip() == "ACTIVE", out.stderr[-2000:]  # the user's choice is kept
