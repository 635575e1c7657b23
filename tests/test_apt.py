"""APT and the sparse baselines: the set update is the least-squares optimum, targets are exact, N:M is
N:M, sparsity 0 changes nothing, and on builtin:tiny APT beats magnitude in held-out perplexity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qpruner.errors import ConfigError
from qpruner.evaluate import perplexity
from qpruner.model import load_model
from qpruner.plan import resolved_config
from qpruner.prune import load_pruned, prune_cached
from qpruner.prune.apt import apt_prune, set_update
from qpruner.prune.masks import Sparsity
from qpruner.prune.slimgpt import DAMP
from qpruner.prune.sparse import magnitude_prune, sparsegpt_prune, wanda_prune

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"apt": apt_prune, "sparsegpt": sparsegpt_prune, "wanda": wanda_prune, "magnitude": magnitude_prune}


def layer(rows=12, cols=64, tokens=300, seed=0):
    """A random Linear weight and correlated calibration inputs; X is returned with the damping rows
    sqrt(lambda) I appended, so ||X_aug d^T||^2 is exactly the damped error the pruners minimise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.3 + torch.randn(tokens, cols, generator=g)
    w = torch.randn(rows, cols, generator=g)
    gram = x.T @ x
    damp = DAMP * gram.diagonal().mean()
    return w, gram, torch.cat([x, damp.sqrt() * torch.eye(cols)])


def output_error(x_aug, w, w_new) -> float:
    return float(((x_aug @ (w_new - w).T) ** 2).sum())


@pytest.mark.parametrize("spec", [Sparsity(0.5), Sparsity(0.5, 2, 4), Sparsity(0.3)])
def test_set_update_is_the_least_squares_optimum(spec):
    """One block spanning the row: for APT's mask, the kept weights equal a brute-force least-squares
    fit of the dense outputs on the kept inputs, and so does the output error."""
    w, gram, x_aug = layer()
    pruned = apt_prune(w, gram, spec, block=w.shape[1])
    mask = pruned == 0
    brute = torch.zeros_like(w)
    for r in range(w.shape[0]):
        keep = ~mask[r]
        brute[r, keep] = torch.linalg.lstsq(x_aug[:, keep], x_aug @ w[r]).solution
    assert output_error(x_aug, w, pruned) == pytest.approx(output_error(x_aug, w, brute), rel=1e-4)
    assert torch.allclose(pruned, brute, atol=1e-4)


def test_set_update_error_matches_closed_form():
    """error = w_S (Hinv_SS)^-1 w_S^T for a fixed mask of uneven per-row set sizes (padding is inert)."""
    w, gram, x_aug = layer(rows=5, cols=16)
    hinv = torch.linalg.inv(x_aug.T @ x_aug)
    mask = torch.rand(5, 16, generator=torch.Generator().manual_seed(1)) < torch.linspace(0.1, 0.7, 5)[:, None]
    new = w + set_update(w, hinv, mask)
    assert new[mask].abs().max() < 1e-5
    for r in range(5):
        s = mask[r]
        closed = w[r, s] @ torch.linalg.inv(hinv[s][:, s]) @ w[r, s]
        assert output_error(x_aug, w[r:r + 1], new[r:r + 1]) == pytest.approx(float(closed), rel=1e-4)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_masks_are_exact(method, n, m):
    w, gram, _ = layer(rows=9, cols=256)  # two blocks of 128
    pruned = METHODS[method](w, gram, Sparsity(1 - n / m, n, m))
    nonzero = (pruned != 0).reshape(9, -1, m).sum(-1)
    assert (nonzero == n).all()


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("fraction", [0.5, 0.3, 0.77])
def test_unstructured_targets_are_exact(method, fraction):
    w, gram, _ = layer(rows=7, cols=200)  # 200 = 128 + 72: an uneven last block
    pruned = METHODS[method](w, gram, Sparsity(fraction))
    assert int((pruned == 0).sum()) == round(fraction * w.numel())


@pytest.mark.parametrize("method", list(METHODS))
def test_sparsity_zero_is_identity(method):
    w, gram, _ = layer()
    assert torch.equal(METHODS[method](w, gram, Sparsity(0.0)), w)


def test_apt_error_below_baselines():
    """Same sparsity, same inputs: APT's damped output error is the lowest (SparseGPT next, then Wanda/magnitude)."""
    w, gram, x_aug = layer(rows=16, cols=256)
    for spec in (Sparsity(0.5), Sparsity(0.5, 2, 4)):
        errors = {name: output_error(x_aug, w, fn(w, gram, spec)) for name, fn in METHODS.items()}
        assert errors["apt"] < errors["sparsegpt"] < min(errors["wanda"], errors["magnitude"]), errors


def sparse_cfg(cache: Path, **prune):
    return resolved_config({"prune": {"ratio": 0, **prune}, "output": {"cache_dir": str(cache)}})


@pytest.mark.parametrize("raw,field", [
    ({"method": "apt", "sparsity": 0.5}, "prune.ratio"),  # ratio 0.2 by default: structured amount given
    ({"method": "apt", "ratio": 0, "sparsity": "3:2"}, "prune.sparsity"),
    ({"method": "apt", "ratio": 0, "sparsity": "2-4"}, "prune.sparsity"),
    ({"method": "wanda", "ratio": 0, "sparsity": 1.0}, "prune.sparsity"),
    ({"method": "taylor", "sparsity": 0.5}, "prune.sparsity"),
])
def test_bad_sparsity_config_names_the_field(raw, field):
    with pytest.raises(ConfigError) as info:
        resolved_config({"prune": raw})
    assert info.value.field == field


@pytest.fixture(scope="module")
def heldout(cache, tiny_assets):
    """(calibration file, held-out docs): the last 128 corpus documents, which the calibration file excludes."""
    lines = tiny_assets.corpus_path.read_text().splitlines()
    calib = cache / "calibration.txt"
    calib.write_text("\n".join(lines[:-128]) + "\n")
    return calib, lines[-128:]


@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_tiny_apt_models_are_exact(cache, heldout, sparsity):
    """builtin:tiny at 50% and 2:4: exactly half of every decoder Linear is zero, stored dense, and
    qpruner_prune.json records it."""
    result = prune_cached(sparse_cfg(cache, method="apt", sparsity=sparsity, calibration={"source": str(heldout[0])}), progress=False)
    model, _ = load_pruned(result.path)
    meta = json.loads((result.path / "qpruner_prune.json").read_text())
    assert meta["sparsity"]["storage"] == "dense" and meta["sparsity"]["zeros"] == meta["sparsity"]["weights"] // 2
    assert result.params_after == result.params_before - meta["sparsity"]["zeros"]
    for block in model.model.layers:
        for lin in (m for m in block.modules() if isinstance(m, torch.nn.Linear)):
            assert int((lin.weight == 0).sum()) == lin.weight.numel() // 2
            if sparsity == "2:4":
                assert ((lin.weight != 0).reshape(lin.out_features, -1, 4).sum(-1) == 2).all()


def test_tiny_apt_perplexity_beats_magnitude(cache, heldout):
    """Held-out perplexity, no retraining, at 70% unstructured (where pruning costs something).

    Measured on builtin:tiny (dense 1.654; 16 calibration rows of 64 tokens): at 70% apt 1.692,
    sparsegpt 1.781, wanda 1.853, magnitude 1.784. At 50% and 2:4 the tiny model barely notices any
    method (50%: apt 1.660, sparsegpt 1.664, wanda 1.670, magnitude 1.657; 2:4: 1.675, 1.680, 1.680,
    1.671), so those are ties and are not asserted.

    The tiny model is trained on first use and floating-point order differs between CPUs, so the margin
    moves (on another 2-core machine: dense 1.654, apt 1.698, magnitude 1.725): the test asks that APT
    loses at most 80% of what magnitude pruning loses, relative to the dense model of this machine."""
    calib, docs = heldout
    ppl = {m: perplexity(*load_pruned(prune_cached(sparse_cfg(cache, method=m, sparsity=0.7, calibration={"source": str(calib)}),
                                                   progress=False).path), docs) for m in ("apt", "magnitude")}
    dense = perplexity(*load_model(str(cache / "builtin" / "tiny-v1" / "model")), docs)
    print("held-out ppl at 70%:", ppl, "dense", dense)
    assert ppl["apt"] - dense < 0.8 * (ppl["magnitude"] - dense)


def test_prune_cli_writes_exact_2_4(tmp_path, tiny_assets):
    """`python -m qpruner.prune` with method apt (through the Ray task) reports exact 2:4, stored dense."""
    recipe = tmp_path / "apt.yaml"
    recipe.write_text(f"prune:\n  method: apt\n  ratio: 0\n  sparsity: '2:4'\noutput:\n  cache_dir: {tmp_path}\n")
    (tmp_path / "builtin").symlink_to(tiny_assets.model_dir.parent.parent)
    proc = subprocess.run([sys.executable, "-m", "qpruner.prune", "--config", str(recipe)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(50.0000%), stored dense" in proc.stdout


@pytest.mark.slow  # ~40 s on 2 free cores: a whole (short) trial plus a zero-shot evaluation
def test_trial_and_no_retraining_baseline_on_an_apt_model(cache):
    """An APT 2:4 tiny model goes through 4/8-bit quantization, LoftQ, LoRA fine-tuning and evaluation; the
    trial records dense storage; the "apt" baseline row (zero-shot, no retraining) is measured beside it."""
    import yaml

    from qpruner.baselines import apt_no_retraining
    from qpruner.plan import plan_tasks
    from qpruner.trial import run_trial

    raw = yaml.safe_load((ROOT / "tune_configs" / "tiny.yaml").read_text())
    raw["prune"] = {"method": "apt", "ratio": 0, "sparsity": "2:4"}
    raw["finetune"].update(steps=4, report_every=2, val_limit=8)
    raw["output"] = {"cache_dir": str(cache)}
    cfg = resolved_config(raw)
    path = prune_cached(cfg, progress=False).path
    result = run_trial(cfg, path, [4, 8, 4, 8, 4, 8])
    assert result["steps"] == 4 and 0 < result["accuracy"] <= 1
    assert result["weight_storage"] == "dense (sparsity 2:4: zeros stored)"
    assert result["weight_bytes"] > 0 and result["memory_bytes"] > result["weight_bytes"]
    baseline = apt_no_retraining(cfg, plan_tasks(cfg))
    assert baseline["label"] == "APT, no retraining" and baseline["memory_bytes"] is None and 0 < baseline["accuracy"] <= 1
