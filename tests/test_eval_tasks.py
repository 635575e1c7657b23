"""Any lm-eval task offline (issue 29): template-built tasks and groups from local files, perplexity in
bounded memory and in the trial's JSON, checks on task names, and the few-documents warning.

Every fixture is invented here in the HF schema of the split lm-eval's task reads (MMLU: question,
subject, choices, answer); nothing is read from the hub or from ../shared.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qpruner.config import Config, config_from_dict
from qpruner.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def mmlu_rows(subject: str, n: int) -> list[dict]:
    return [{"question": f"Which statement about {subject.replace('_', ' ')} number {i} holds?", "subject": subject,
             "choices": [f"the first {i}", f"the second {i}", f"the third {i}", f"the fourth {i}"], "answer": i % 4}
            for i in range(n)]


def mmmlu_rows(subject: str, n: int) -> list[dict]:
    """openai/MMMLU's schema; lm-eval's process_docs keeps the rows whose Subject is the task's subject."""
    rows = [{"Question": f"Quelle affirmation sur le sujet {i} est vraie ?", "A": f"un {i}", "B": f"deux {i}", "C": f"trois {i}",
             "D": f"quatre {i}", "Answer": "ABCD"[i % 4], "Subject": subject} for i in range(n)]
    return rows + [dict(rows[0], Subject="virology")]  # another subject's row: filtered out by lm-eval


def write_rows(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def eval_config(tmp_path: Path, tasks: list[str], local_data: dict, val_data: dict | None = None, **sections) -> Config:
    """A Config whose eval section names `tasks` with local data. Folders (groups) are set after parsing, so the
    test does not depend on whether config parsing accepts them yet."""
    files = {t: f for t, f in local_data.items() if not Path(f).is_dir()}
    cfg = config_from_dict({"eval": {"tasks": tasks, "local_data": files}, "output": {"cache_dir": str(tmp_path / "cache")}, **sections})
    cfg.eval.local_data = dict(local_data)
    cfg.eval.val_data = dict(val_data or {})
    return cfg


@pytest.fixture(scope="module")
def tiny_model(tiny_assets):
    from qpruner.model import load_model

    return load_model(str(tiny_assets.model_dir))


# ---------------------------------------------------------------------------------------------
# 1. Local data for template-built tasks


def test_every_mmlu_subject_is_found_whatever_its_yaml_quoting():
    """All 57 MMLU subject files write `"task": "mmlu_..."` (quoted key) and include a shared template.
    Fails before: the scan needed a plain `task:` line and found none of them."""
    from qpruner.evaluate import stock_group_tree, stock_task_yamls, tree_leaves

    leaves = tree_leaves(stock_group_tree("mmlu"))
    assert len(leaves) == 57 and "mmlu_clinical_knowledge" in leaves
    assert all(leaf in stock_task_yamls() for leaf in leaves)
    assert stock_task_yamls()["mmlu_clinical_knowledge"].name == "mmlu_clinical_knowledge.yaml"


def test_mmlu_and_mmmlu_subtasks_read_local_files_through_their_include_chain(tmp_path, tiny_model):
    """mmlu_clinical_knowledge (template include) and mmmlu_fr_fr_astronomy (template include plus a
    !function process_docs that filters by subject) load from invented files with lm-eval's prompts."""
    from qpruner.evaluate import evaluate_model, load_tasks, resolve_tasks

    cfg = eval_config(tmp_path, ["mmlu_clinical_knowledge", "mmmlu_fr_fr_astronomy"], {
        "mmlu_clinical_knowledge": write_rows(tmp_path / "ck.jsonl", mmlu_rows("clinical_knowledge", 5)),
        "mmmlu_fr_fr_astronomy": write_rows(tmp_path / "fr.jsonl", mmmlu_rows("astronomy", 3))})
    names, paths = resolve_tasks(cfg.eval, cfg.output.cache)
    tasks = load_tasks(tuple(names), tuple(paths))["tasks"]
    ck, fr = tasks["mmlu_clinical_knowledge"], tasks["mmmlu_fr_fr_astronomy"]
    doc = list(ck.eval_docs)[0]
    assert ck.doc_to_text(doc) == ("Which statement about clinical knowledge number 0 holds?\nA. the first 0\nB. the second 0\n"
                                   "C. the third 0\nD. the fourth 0\nAnswer:")
    assert ck.doc_to_choice(doc) == ["A", "B", "C", "D"] and ck.doc_to_target(doc) == 0
    assert len(list(fr.eval_docs)) == 3  # lm-eval's process_docs dropped the virology row
    scores = evaluate_model(*tiny_model, cfg.eval, cache_dir=cfg.output.cache)["tasks"]
    assert scores["mmlu_clinical_knowledge"]["n_docs"] == 5 and scores["mmmlu_fr_fr_astronomy"]["n_docs"] == 3
    assert 0 <= scores["mmlu_clinical_knowledge"]["acc"] <= 1 and 0 <= scores["mmmlu_fr_fr_astronomy"]["acc_norm"] <= 1


# ---------------------------------------------------------------------------------------------
# 2. Groups


def test_a_group_folder_is_scored_by_lm_eval_aggregate_and_counts_once_in_the_objective(tmp_path, tiny_model):
    """eval.tasks [mmlu, mmlu_clinical_knowledge] with a folder of two MMLU subjects: mmlu is lm-eval's
    size-weighted aggregate of its two subtasks (through lm-eval's mmlu_stem subgroup), the subtasks are
    reported, and the objective averages mmlu (one task) with clinical knowledge."""
    from qpruner.evaluate import eval_record, evaluate_model, held_out_docs, validation_limits, validation_plan

    folder = tmp_path / "mmlu"
    write_rows(folder / "mmlu_anatomy.jsonl", mmlu_rows("anatomy", 6))
    write_rows(folder / "mmlu_astronomy.jsonl", mmlu_rows("astronomy", 9))
    ck = write_rows(tmp_path / "ck.jsonl", mmlu_rows("clinical_knowledge", 5))
    cfg = eval_config(tmp_path, ["mmlu", "mmlu_clinical_knowledge"], {"mmlu": str(folder), "mmlu_clinical_knowledge": ck},
                      finetune={"val_limit": 4})
    ev = evaluate_model(*tiny_model, cfg.eval, cache_dir=cfg.output.cache)
    assert list(ev["tasks"]) == ["mmlu", "mmlu_clinical_knowledge"]
    assert set(ev["subtasks"]) == {"mmlu_stem", "mmlu_anatomy", "mmlu_astronomy"} and ev["groups"] == {"mmlu": ["mmlu_anatomy", "mmlu_astronomy"]}
    anatomy, astronomy = ev["subtasks"]["mmlu_anatomy"], ev["subtasks"]["mmlu_astronomy"]
    assert ev["tasks"]["mmlu"]["acc"] == pytest.approx((anatomy["acc"] * 6 + astronomy["acc"] * 9) / 15)
    assert ev["tasks"]["mmlu"]["n_docs"] == 15 and ev["subtasks"]["mmlu_stem"]["acc"] == pytest.approx(ev["tasks"]["mmlu"]["acc"])
    assert ev["mean_acc"] == pytest.approx((ev["tasks"]["mmlu"]["acc"] + ev["tasks"]["mmlu_clinical_knowledge"]["acc"]) / 2)
    record = eval_record(ev)
    assert set(record["task_acc"]) == {"mmlu", "mmlu_clinical_knowledge"}
    assert set(record["subtask_acc"]) == {"mmlu_stem", "mmlu_anatomy", "mmlu_astronomy"}
    assert record["task_docs"] == {"mmlu": 15, "mmlu_clinical_knowledge": 5}
    # quick validation: val_limit documents per eval task, a group's spread over its subtasks and held out there
    assert validation_limits(cfg) == {"mmlu": {"mmlu_anatomy": 2, "mmlu_astronomy": 2}, "mmlu_clinical_knowledge": {"mmlu_clinical_knowledge": 4}}
    assert held_out_docs(cfg) == {"mmlu_anatomy": 2, "mmlu_astronomy": 2, "mmlu_clinical_knowledge": 4}
    assert validation_plan(cfg)["mmlu"].startswith("the first 2 documents of each of its 2 subtasks")
    held = evaluate_model(*tiny_model, cfg.eval, cache_dir=cfg.output.cache, skip=held_out_docs(cfg))
    assert held["tasks"]["mmlu"]["n_docs"] == 11 and held["tasks"]["mmlu_clinical_knowledge"]["n_docs"] == 1


def test_a_subgroup_and_a_validation_folder_derive_groups_too(tmp_path):
    """mmlu_stem is a group of its own; eval.val_data.mmlu_stem (a folder) becomes the twin group
    mmlu_stem_val over `<subtask>_val` tasks, so nothing is held out of the final score."""
    from qpruner.evaluate import held_out_docs, load_tasks, validation_tasks

    folder, val = tmp_path / "stem", tmp_path / "stem_val"
    write_rows(folder / "mmlu_anatomy.jsonl", mmlu_rows("anatomy", 3))
    write_rows(val / "mmlu_anatomy.jsonl", mmlu_rows("anatomy", 2))
    cfg = eval_config(tmp_path, ["mmlu_stem"], {"mmlu_stem": str(folder)}, {"mmlu_stem": str(val)})
    names, paths = validation_tasks(cfg)
    assert names == ("mmlu_stem_val",)
    loaded = load_tasks(names, paths)
    assert list(loaded["tasks"]) == ["mmlu_anatomy_val"] and len(list(loaded["tasks"]["mmlu_anatomy_val"].eval_docs)) == 2
    assert held_out_docs(cfg) == {}


# ---------------------------------------------------------------------------------------------
# 5. Names: one line, "did you mean", in every path


@pytest.mark.parametrize("tasks, kind, key, expected", [
    (["social_iqa"], "local_data", "siqa", r"^eval\.local_data\.siqa: 'siqa' is not in eval\.tasks \(social_iqa\).*did you mean social_iqa\?"),
    (["mmlu_anatomy"], "val_data", "mmlu_anatomyy", r"^eval\.val_data\.mmlu_anatomyy: .*not in eval\.tasks.*did you mean mmlu_anatomy\?"),
    (["boolq"], "local_data", "piqa", r"^eval\.local_data\.piqa: 'piqa' is not in eval\.tasks \(boolq\), so this data would never be read"),
    (["siqa"], "local_data", "siqa", r"^eval\.tasks: unknown lm-eval task 'siqa'; did you mean social_iqa\b"),
])
def test_local_data_names_are_checked_with_suggestions(tmp_path, tasks, kind, key, expected):
    from qpruner.evaluate import check_eval_inputs, resolve_tasks

    cfg = eval_config(tmp_path, tasks, {})
    getattr(cfg.eval, kind)[key] = write_rows(tmp_path / "rows.jsonl", mmlu_rows("anatomy", 1))
    for check in (lambda: check_eval_inputs(cfg), lambda: resolve_tasks(cfg.eval, cfg.output.cache)):
        with pytest.raises(ConfigError, match=expected) as err:
            check()
        assert "\n" not in str(err.value)


def test_groups_need_folders_and_folders_need_subtask_names(tmp_path):
    from qpruner.evaluate import check_eval_inputs, resolve_tasks

    rows = write_rows(tmp_path / "anatomy.jsonl", mmlu_rows("anatomy", 1))
    with pytest.raises(ConfigError, match=r"^eval\.local_data\.mmlu: 'mmlu' is a group .* folder holding one file per subtask"):
        check_eval_inputs(eval_config(tmp_path, ["mmlu"], {"mmlu": rows}))
    with pytest.raises(ConfigError, match=r"^eval\.local_data\.mmlu_anatomy: 'mmlu_anatomy' is one task"):
        check_eval_inputs(eval_config(tmp_path, ["mmlu_anatomy"], {"mmlu_anatomy": str(tmp_path)}))
    # a file in the group's folder named after the subject, not the subtask
    with pytest.raises(ConfigError, match=r"^eval\.local_data\.mmlu: anatomy\.jsonl in .* names no subtask of lm-eval's 'mmlu'; "
                                          r"did you mean mmlu_anatomy\.jsonl\?"):
        resolve_tasks(eval_config(tmp_path, ["mmlu"], {"mmlu": str(tmp_path)}).eval)
    # a subtask scored on its own and inside the group: lm-eval scores a task once
    (tmp_path / "anatomy.jsonl").rename(tmp_path / "mmlu_anatomy.jsonl")
    cfg = eval_config(tmp_path, ["mmlu", "mmlu_anatomy"], {"mmlu": str(tmp_path), "mmlu_anatomy": str(tmp_path / "mmlu_anatomy.jsonl")})
    with pytest.raises(ConfigError, match=r"^eval\.local_data\.mmlu: mmlu_anatomy is in eval\.tasks and also a subtask of mmlu"):
        resolve_tasks(cfg.eval, cfg.output.cache)


def test_cli_refuses_local_data_for_a_task_it_does_not_evaluate_in_one_line(tmp_path, tiny_assets):
    rows = write_rows(tmp_path / "boolq.jsonl", [{"question": "q", "passage": "p", "idx": 0, "label": 1}])
    (tmp_path / "r.yaml").write_text(f"eval:\n  tasks: [{', '.join(tiny_assets.test_tasks)}]\n  include_path: {tiny_assets.tasks_dir}\n"
                                     f"  local_data: {{boolq: {rows}}}\n")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("QPRUNER_ONLINE")}, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "qpruner.trial", "--config", "r.yaml", "--bits", "uniform:4"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: eval.local_data.boolq: 'boolq' is not in eval.tasks"), proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# 6. Few documents left after held-out validation


def test_a_task_left_with_few_documents_is_reported_in_one_line_with_the_fix(tmp_path):
    from qpruner.evaluate import held_out_warnings

    ck = write_rows(tmp_path / "ck.jsonl", mmlu_rows("clinical_knowledge", 100))
    big = write_rows(tmp_path / "anatomy.jsonl", mmlu_rows("anatomy", 300))
    cfg = eval_config(tmp_path, ["mmlu_clinical_knowledge", "mmlu_anatomy"], {"mmlu_clinical_knowledge": ck, "mmlu_anatomy": big},
                      finetune={"val_limit": 64})
    lines = held_out_warnings(cfg)
    assert lines == ["mmlu_clinical_knowledge: the final score counts 36 of 100 documents (fewer than half and fewer than 100): "
                     "quick validation reads its first 64 documents and holds them out; give "
                     "eval.val_data.mmlu_clinical_knowledge=FILE (validation rows in the same schema) to score all 100"]
    cfg.eval.val_data = {"mmlu_clinical_knowledge": ck}  # validation elsewhere: every document is scored, no warning
    assert held_out_warnings(cfg) == []
    cfg.eval.val_data, cfg.eval.limit = {}, 20  # the limit, not the held-out documents, sets the count: no warning
    assert held_out_warnings(cfg) == []


# ---------------------------------------------------------------------------------------------
# 3. Perplexity in bounded memory

MEMORY_SCRIPT = r'''
import json, sys, time
import torch
torch.set_num_threads(1)
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from qpruner.builtin import ensure_tiny
from qpruner.evaluate import wrap_model
from qpruner.model import load_model


def status_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])


def peak_growth(fn):
    """(result, MiB the resident set peaked above its size before the call): VmHWM reset through clear_refs."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_kb("VmRSS:")
    out = fn()
    return out, (status_kb("VmHWM:") - before) / 1024


assets = ensure_tiny(progress=False)
model, tok = load_model(str(assets.model_dir))
model.eval()
lines = assets.corpus_path.read_text().splitlines(keepends=True)


def page(tokens):
    out, count = [], 0
    for line in lines * 4:
        out.append(line)
        count += len(tok(line, add_special_tokens=False).input_ids)
        if count >= tokens:
            return "".join(out)


def score(lm, text):
    return lm.loglikelihood_rolling([Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)], disable_tqdm=True)[0]


long, short = page(50_000), page(4_096)
result = {"tokens": len(tok(long, add_special_tokens=False).input_ids)}
with torch.no_grad():
    for kind, lm in (("bounded", wrap_model(model, tok, 16)), ("stock", HFLM(pretrained=model, tokenizer=tok, batch_size=16))):
        score(lm, "warm up")
        lm.tok_encode(long)  # the tokenizer's first pass over a long page fills its caches (~13 MiB here): not scoring
        result[kind] = {}
        for name, text in (("short", short), ("long", long)):
            t = time.perf_counter()
            # the lower of two runs: a one-off allocation elsewhere in the process (seen under load) is not the input's
            ll, mib = min((peak_growth(lambda: score(lm, text)) for _ in range(2)), key=lambda r: r[1])
            result[kind][name] = {"loglikelihood": ll, "peak_mib": round(mib, 2), "seconds": round(time.perf_counter() - t, 2)}
    result["window"], result["batch"], result["vocab"] = lm.max_length, 16, model.config.vocab_size
    # a model whose vocabulary dwarfs its width, as real ones do (SmolLM2: 49152 vs 576): logits dominate
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)).eval()
    text = page(2_048)  # one batch of 8 windows
    for kind, lm in (("bounded", wrap_model(wide, tok, 8)), ("stock", HFLM(pretrained=wide, tokenizer=tok, batch_size=8))):
        score(lm, "warm up")
        ll, mib = peak_growth(lambda: score(lm, text))
        result[f"wide_{kind}"] = {"loglikelihood": ll, "peak_mib": round(mib, 2)}
print(json.dumps(result))
'''


def test_perplexity_of_a_50000_token_page_runs_in_memory_set_by_window_and_batch(tiny_assets):
    """The tiny model (context 256, batch 16) scores a 50,000-token page with lm-eval's own rolling windows.
    Peak memory is the resident set's high-water mark above its size before the call (Linux VmHWM, reset
    through /proc/self/clear_refs; glibc told to return large blocks at once), in a fresh process, after
    the tokenizer has seen the page once (its first pass fills caches): the 50,000-token page peaks at
    most a few MiB (its token lists, the tokenizer's ~250 bytes a token) above a 4,096-token one (one
    batch of windows), the log-likelihood
    equals stock lm-eval's, and on a model with a 32,000-word vocabulary the peak is a fraction of stock
    lm-eval's, which holds the batch's full log-softmax."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": "131072", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\nperplexity peak memory: {json.dumps(result)}")
    ours, stock = result["bounded"], result["stock"]
    assert result["tokens"] >= 50_000
    assert ours["long"]["loglikelihood"] == pytest.approx(stock["long"]["loglikelihood"], rel=1e-5)
    assert ours["short"]["loglikelihood"] == pytest.approx(stock["short"]["loglikelihood"], rel=1e-5)
    # set by window x batch: the long page costs at most a few MiB more than one batch (its token list)
    assert ours["long"]["peak_mib"] <= ours["short"]["peak_mib"] + 8
    assert ours["long"]["peak_mib"] < 48  # 16 windows x 256 tokens through a 128-wide model, logits in chunks
    assert result["wide_bounded"]["loglikelihood"] == pytest.approx(result["wide_stock"]["loglikelihood"], rel=1e-5)
    assert result["wide_bounded"]["peak_mib"] < result["wide_stock"]["peak_mib"] / 4


# ---------------------------------------------------------------------------------------------
# Done when: one trial, MMLU subtask + two-subtask mmlu group + wikitext, all in its JSON


def test_a_trial_prints_an_mmlu_subtask_a_group_and_wikitext_perplexity(tmp_path, tiny_assets, cache):
    from qpruner.evaluate import held_out_warnings
    from qpruner.prune import prune_cached
    from qpruner.trial import run_trial

    folder = tmp_path / "mmlu"
    write_rows(folder / "mmlu_anatomy.jsonl", mmlu_rows("anatomy", 12))
    write_rows(folder / "mmlu_astronomy.jsonl", mmlu_rows("astronomy", 12))
    ck = write_rows(tmp_path / "ck.jsonl", mmlu_rows("clinical_knowledge", 12))
    wiki = write_rows(tmp_path / "wiki.jsonl", [{"page": tiny_assets.corpus_path.read_text()[i * 4000:(i + 1) * 4000]} for i in range(2)])
    cfg = config_from_dict({
        "model": {"name": str(tiny_assets.model_dir)},
        "prune": {"ratio": 0.3, "calibration": {"source": str(tiny_assets.corpus_path), "n_samples": 8, "seq_len": 32}},
        "finetune": {"data": str(tiny_assets.alpaca_path), "steps": 4, "report_every": 2, "batch_size": 4, "micro_batch_size": 4,
                     "max_length": 64, "val_limit": 4},
        "eval": {"tasks": ["mmlu_clinical_knowledge", "mmlu", "wikitext"], "local_data": {"mmlu_clinical_knowledge": ck, "wikitext": wiki}},
        "output": {"cache_dir": str(cache)}})
    cfg.eval.local_data["mmlu"] = str(folder)
    pruned = prune_cached(cfg, progress=False)
    reports = []
    result = json.loads(json.dumps(run_trial(cfg, pruned.path, [4] * 6, report=reports.append)))
    assert set(result["task_acc"]) == {"mmlu_clinical_knowledge", "mmlu"}
    assert set(result["subtask_acc"]) == {"mmlu_stem", "mmlu_anatomy", "mmlu_astronomy"}
    assert set(result["task_ppl"]) == {"wikitext"} and result["task_ppl"]["wikitext"] > 1
    assert result["accuracy"] == pytest.approx((result["task_acc"]["mmlu_clinical_knowledge"] + result["task_acc"]["mmlu"]) / 2)
    assert result["task_docs"] == {"mmlu_clinical_knowledge": 8, "mmlu": 20, "wikitext": 2}  # 4 and 2 + 2 held out for validation
    assert reports and all(r["val_logprob"] < 0 for r in reports)
    assert [line.split(":")[0] for line in held_out_warnings(cfg)] == ["mmlu_clinical_knowledge", "mmlu"]
