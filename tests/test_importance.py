"""Layer importance (qpruner.importance) on the built-in tiny model and small local lm-eval tasks."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from qpruner.importance import importance_task
from qpruner.plan import resolved_config


@pytest.mark.parametrize("method", ["mi", "quant_loss", "taylor"])
def test_layer_importance_methods_on_the_pruned_tiny_model(tiny_assets, method):
    from qpruner.plan import make_plan
    from qpruner.prune import prune_cached

    cfg = resolved_config({"prune": {"ratio": 0.3}, "search": {"importance": method}})
    plan = make_plan(cfg, Path("unused")).with_pruned(prune_cached(cfg, progress=False).path)  # what the driver hands on
    scores = importance_task(plan)
    assert len(scores) == 6 and all(np.isfinite(scores)) and min(scores) > 0 and len(set(scores)) > 1
    assert scores == importance_task(plan)  # deterministic


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model's matrices are too small for two threads to pay off on a shared 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pruned(tiny_assets):
    """(model, tokenizer, cfg) of the builtin tiny model pruned by 30%: what `importance_task` scores."""
    from qpruner.prune import load_pruned, prune_cached

    cfg = resolved_config({"prune": {"ratio": 0.3}})
    model, tok = load_pruned(str(prune_cached(cfg, progress=False).path), dtype=cfg.quant.compute_dtype, device="cpu")
    return model, tok, cfg


def test_disjoint_halves_of_the_docs_rank_the_layers_alike(pruned):
    """The first and second 25 validation docs of each tiny task give the same layer ranking.

    Before this change the code scored the hidden state at the last prompt token against the gold
    label with the per-layer gain, which ranks the layers differently on disjoint docs."""
    from scipy.stats import spearmanr

    from qpruner.importance import mi_importance

    model, tok, cfg = pruned
    started = time.perf_counter()
    first = mi_importance(model, tok, cfg, docs=slice(0, 25))
    seconds = time.perf_counter() - started
    second = mi_importance(model, tok, cfg, docs=slice(25, 50))
    rho = spearmanr(first, second)[0]
    print(f"\nhalves {np.round(first, 3)} {np.round(second, 3)}: Spearman {rho:.2f}; one half {seconds:.1f}s")
    assert len(first) == 6 and min(first) > 0 and min(second) > 0
    assert rho >= 0.7


def test_shuffling_the_prediction_across_docs_drives_the_estimate_to_zero(pruned):
    """I(last layer; Y) is clearly positive; with Y permuted across docs it is about 0.

    Before this change there was no `task_samples`/`mutual_information` (and Y was the gold label)."""
    from qpruner.evaluate import load_tasks, validation_tasks
    from qpruner.importance import mutual_information, task_samples

    model, tok, cfg = pruned
    task = load_tasks(*validation_tasks(cfg))["tasks"]["tiny_colour_val"]
    x, y = task_samples(model, tok, task, docs=slice(0, 50))
    assert y.reshape(50, 4).sum(axis=1).tolist() == [1] * 50  # one predicted choice per doc
    doc_of = np.repeat(np.arange(50), 4)
    rng = np.random.default_rng(0)
    true = mutual_information(x[:, -1], y)
    shuffled = [mutual_information(x[:, -1], y.reshape(50, 4)[rng.permutation(50)].ravel()) for _ in range(5)]
    print(f"\nI(last layer; Y) = {true:.3f} nats; Y shuffled across docs: {np.round(shuffled, 3)}")
    assert len(doc_of) == len(y) and true > 0.2 and np.mean(shuffled) < 0.05 and max(shuffled) < 0.1


def _colour_task(folder: Path, name: str, rows: list[dict]) -> str:
    """A builtin-style multiple_choice YAML task `name` in `folder` over `rows`; returns the folder."""
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    validation: {data}\n"
        "output_type: multiple_choice\ntest_split: validation\n"
        'doc_to_text: "Question: what colour is the {{name}}?\\nAnswer:"\ndoc_to_choice: choices\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n")
    return str(folder)


def test_y_is_the_models_prediction_not_the_gold_label(pruned, tiny_assets, tmp_path):
    """The same docs with their gold labels permuted give the same samples and the same estimate.

    Before this change `labelled_prompts` took Y from doc_to_target (the gold label), so the estimate moves."""
    from qpruner.evaluate import load_tasks
    from qpruner.importance import layer_information, task_samples

    model, tok, _ = pruned
    rows = [json.loads(line) for line in (tiny_assets.tasks_dir / "tiny_colour_validation.jsonl").read_text().splitlines()]
    permuted = [{**r, "label": (r["label"] + 1 + i % 3) % len(r["choices"])} for i, r in enumerate(rows)]
    _colour_task(tmp_path, "gold_colour", rows)
    folder = _colour_task(tmp_path, "permuted_colour", permuted)
    tasks = load_tasks(("gold_colour", "permuted_colour"), (folder,))["tasks"]
    (x_gold, y_gold), (x_perm, y_perm) = (task_samples(model, tok, tasks[n], docs=slice(0, 50)) for n in ("gold_colour", "permuted_colour"))
    assert np.array_equal(y_gold, y_perm) and np.allclose(x_gold, x_perm)
    assert np.allclose(layer_information(x_gold, y_gold), layer_information(x_perm, y_perm))


WINOGRANDE = [  # invented rows in winogrande's schema: _ marks the blank the option fills
    {"sentence": f"The {a} could not fit into the {b} because _ was too {adj}.", "option1": f"the {a}",
     "option2": f"the {b}", "answer": ans}
    for a, b, adj, ans in [("trophy", "case", "big", "1"), ("trophy", "case", "small", "2"), ("ball", "box", "large", "1"),
                           ("ball", "box", "tiny", "2"), ("car", "garage", "wide", "1"), ("car", "garage", "narrow", "2"),
                           ("sofa", "door", "bulky", "1"), ("sofa", "door", "slim", "2"), ("cake", "tin", "tall", "1"),
                           ("cake", "tin", "shallow", "2"), ("book", "bag", "thick", "1"), ("book", "bag", "full", "2")]
]
BOOLQ = [{"question": f"is the {thing} {colour}", "passage": f"The {thing} is {truth}.", "idx": i, "label": int(colour == truth)}
         for i, (thing, colour, truth) in enumerate([("sky", "blue", "blue"), ("grass", "red", "green"), ("snow", "white", "white"),
                                                     ("coal", "white", "black"), ("sun", "yellow", "yellow"), ("sea", "green", "blue"),
                                                     ("milk", "white", "white"), ("night", "bright", "dark"), ("lemon", "yellow", "yellow"),
                                                     ("blood", "blue", "red")])]
WIKITEXT = [{"page": f" = {t} = \n The {t} is a {d} in the north . It was built in {y} and is {n} km long . \n"}
            for t, d, y, n in [("Small River", "river", 1820, 12), ("Old Mill", "mill", 1790, 3),
                               ("Long Road", "road", 1901, 40), ("High Bridge", "bridge", 1877, 2)]]


def test_multiple_input_yes_no_and_rolling_tasks_work(tiny_assets, tmp_path):
    """lm-eval's own winogrande (multiple_input), boolq (yes/no) and wikitext (loglikelihood_rolling),
    reading invented rows through eval.local_data, give one positive score per layer.

    Before this change `labelled_prompts` raised ValueError on winogrande (doc_to_target is the shared
    continuation, not in doc_to_choice) and had no case for wikitext's docs without choices."""
    from qpruner.evaluate import load_tasks, validation_tasks
    from qpruner.importance import mi_importance, task_samples
    from qpruner.model import load_model

    files = {}
    for task, rows in {"winogrande": WINOGRANDE, "boolq": BOOLQ, "wikitext": WIKITEXT}.items():
        files[task] = str(tmp_path / f"{task}.jsonl")
        Path(files[task]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = resolved_config({"eval": {"tasks": list(files), "local_data": files}})
    model, tok = load_model(str(tiny_assets.model_dir))
    tasks = load_tasks(*validation_tasks(cfg, tmp_path))["tasks"]
    x, y = task_samples(model, tok, tasks["winogrande"], docs=slice(0, 12))
    assert x.shape == (24, 7, 1) and y.reshape(12, 2).sum(axis=1).tolist() == [1] * 12
    x, y = task_samples(model, tok, tasks["wikitext"], docs=slice(0, 4))
    assert x.shape[1:] == (7, 8) and len(y) == 32 and y.max() <= 8
    scores = mi_importance(model, tok, cfg, tmp_path)
    assert len(scores) == 6 and all(np.isfinite(scores)) and min(scores) > 0


def test_generating_tasks_are_refused_with_the_fix(tiny_assets, tmp_path):
    """A generate_until task has no choices or scored tokens: one ConfigError line naming the fix."""
    from qpruner.errors import ConfigError
    from qpruner.evaluate import load_tasks
    from qpruner.importance import task_samples
    from qpruner.model import load_model

    (tmp_path / "gen.jsonl").write_text(json.dumps({"q": "Say hi", "a": "hi"}) + "\n")
    (tmp_path / "gen_task.yaml").write_text(
        f"task: gen_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    validation: {tmp_path / 'gen.jsonl'}\n"
        "output_type: generate_until\ntest_split: validation\ndoc_to_text: q\ndoc_to_target: a\n"
        "metric_list:\n  - metric: exact_match\n")
    model, tok = load_model(str(tiny_assets.model_dir))
    task = load_tasks(("gen_task",), (str(tmp_path),))["tasks"]["gen_task"]
    with pytest.raises(ConfigError, match=r"search.importance: 'mi' needs .* use search.importance: quant_loss"):
        task_samples(model, tok, task)
