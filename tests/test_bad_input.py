"""Issue 28's bad-input matrix: one row per case (verb, argv, config, the field or file the error must name).

Every row must end the command with exit code 2 and exactly one line on stderr (`error: ...`), no traceback,
naming the expected field, with the workspace (config, --out, run folder) unchanged. The CLI runs in-process
(the verb's `main` under qpruner.cli.run_cli), so the matrix takes seconds; only the rows that need the pruned
model (LoRA ranks and target modules against its shapes, bit vectors) load the built-in tiny model.
A hypothesis test then puts random wrong types and values into every config field.
"""

from __future__ import annotations

import copy
import gzip
import importlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qpruner.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
VERBS = {"tune": "qpruner.tune", "trial": "qpruner.trial", "prune": "qpruner.prune.__main__",
         "report": "qpruner.report", "export": "qpruner.export"}
LONG_NAME = "n" * 300  # one path component beyond NAME_MAX (255)
LONG_PATH = "/".join(["d" * 200] * 25)  # beyond PATH_MAX (4096)


def base_raw(cache: Path) -> dict:
    raw = yaml.safe_load((ROOT / "tune_configs" / "tiny.yaml").read_text())
    raw["search"]["baselines"] = []
    raw["output"]["cache_dir"] = str(cache)
    return raw


def merged(raw: dict, override: dict) -> dict:
    out = copy.deepcopy(raw)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# The workspace: a config, a folder for --out, and a synthetic finished run folder.


@pytest.fixture(scope="module")
def template(tmp_path_factory, cache):
    """A run folder as qpruner.tune leaves it (results, front, config.yaml, run.json with the recipe, baselines,
    an adapter of the front), written without running a search."""
    from qpruner.config import config_from_dict
    from qpruner.pareto import write_results
    from qpruner.tune import run_key

    root = tmp_path_factory.mktemp("template")
    raw = base_raw(cache)
    cfg = config_from_dict(raw)
    run = root / "run"
    run.mkdir()

    def row(trial_id, status, accuracy, started, error=None):
        return {"trial_id": trial_id, "status": status, "bits": [4] * 6, "ranks": None, "accuracy": accuracy,
                "task_acc": {"tiny": accuracy} if accuracy else {}, "val_logprob": -0.8, "val_acc": 0.5,
                "memory_bytes": 1000 + started, "memory_source": "estimated", "weight_bytes": 400, "lora_bytes": 10,
                "peak_estimate_bytes": 1000, "train_loss": 1.2, "iterations": 2, "steps": 40, "max_steps": 40,
                "wall_seconds": 1.0, "timings": {}, "error": error, "started_at": float(started),
                "config": {f"b{i}": 4 for i in range(6)}}

    write_results([row("done0001", "completed", 0.6, 1), row("early001", "stopped_early", None, 2),
                   row("broke001", "failed", None, 3, "RuntimeError: loss is NaN")], run, plot=False)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (run / "run.json").write_text(json.dumps({"run_key": run_key(cfg), "created": 0.0, "config": cfg.to_dict(),
                                              "pruned_path": str(root / "pruned")}))
    (run / "baselines.json").write_text(json.dumps({}))
    (root / "pruned").mkdir()
    (root / "pruned" / "config.json").write_text("{}")
    return root, raw


@pytest.fixture()
def ws(tmp_path, template):
    """Per case: a copy of the template (run folder, pruned stand-in), the base config, an empty place for --out."""
    root, raw = template
    shutil.copytree(root / "run", tmp_path / "run")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "file.txt").write_text("a file, not a folder\n")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "keep.txt").write_text("someone's file\n")
    run_json = json.loads((tmp_path / "run" / "run.json").read_text())
    run_json["pruned_path"] = str(root / "pruned")
    (tmp_path / "run" / "run.json").write_text(json.dumps(run_json))
    return tmp_path, raw


def snapshot(root: Path) -> dict:
    """Every file under root with its size and bytes: what a refusal must leave as it found it."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} | \
        {str(p.relative_to(root)) + "/": b"" for p in sorted(root.rglob("*")) if p.is_dir()}


def refuse(verb: str, argv: list[str], capsys) -> str:
    """Run the verb in-process; assert exit 2 and one line without a traceback; return the line."""
    module = importlib.import_module(VERBS[verb])
    with pytest.raises(SystemExit) as exc:
        run_cli(module.main, argv)
    captured = capsys.readouterr()
    err = captured.err
    assert exc.value.code == 2, (exc.value.code, err[-2000:], captured.out[-2000:])
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    return lines[0]


# ---------------------------------------------------------------------------------------------
# The matrix. argv placeholders: {cfg} the config, {out} a fresh --out, {run} the run folder, {file} an existing
# file, {folder} a folder of someone else's files, {tmp} the workspace.

TUNE = ["--config", "{cfg}", "--out", "{out}", "--no-dashboard"]
TRIAL = ["--config", "{cfg}", "--bits", "uniform:4"]
PRUNE = ["--config", "{cfg}"]
EXPORT = ["--run", "{run}", "--out", "{tmp}/export"]

# (field override as YAML data, the field the line must name); each runs under tune; every third also under
# trial and prune, which parse the same config.
FIELDS = [
    ({"model": {"name": 5}}, "model.name"),
    ({"model": {"name": "builtin:huge"}}, "model.name"),
    ({"model": {"name": "./no/such/model"}}, "model.name"),
    ({"model": {"name": "a/b/c/missing"}}, "model.name"),
    ({"model": {"name": "missing.gguf"}}, "model.name"),
    ({"model": {"dtype": "fp8"}}, "model.dtype"),
    ({"model": {"trust_remote_code": "yes"}}, "model.trust_remote_code"),
    ({"model": {"allow_pickle": 1}}, "model.allow_pickle"),
    ({"modle": {}}, "did you mean 'model'"),
    ({"prune": 5}, "prune"),
    ({"prune": {"method": "magic"}}, "prune.method"),
    ({"prune": {"ratio": 1.0}}, "prune.ratio"),
    ({"prune": {"ratio": -0.1}}, "prune.ratio"),
    ({"prune": {"ratio": "high"}}, "prune.ratio"),
    ({"prune": {"ratio": [0.2]}}, "prune.ratio"),
    ({"prune": {"ratoi": 0.3}}, "did you mean 'prune.ratio'"),
    ({"prune": {"sparsity": 0.5}}, "prune.sparsity"),
    ({"prune": {"method": "apt", "ratio": 0, "sparsity": "3:2"}}, "prune.sparsity"),
    ({"prune": {"method": "apt", "ratio": 0, "sparsity": 1.5}}, "prune.sparsity"),
    ({"prune": {"method": "apt", "ratio": 0.2}}, "prune.ratio"),
    ({"prune": {"first_layer": -1}}, "prune.first_layer"),
    ({"prune": {"first_layer": 5, "last_layer": 3}}, "prune.first_layer"),
    ({"prune": {"last_layer": "end"}}, "prune.last_layer"),
    ({"prune": {"round_to": 0}}, "prune.round_to"),
    ({"prune": {"round_to": 1.5}}, "prune.round_to"),
    ({"prune": {"prune_attention": False, "prune_mlp": False}}, "prune.prune_mlp"),
    ({"prune": {"taylor_order": "third"}}, "prune.taylor_order"),
    ({"prune": {"aggregation": "median"}}, "prune.aggregation"),
    ({"prune": {"calibration": {"n_samples": 0}}}, "prune.calibration.n_samples"),
    ({"prune": {"calibration": {"seq_len": -1}}}, "prune.calibration.seq_len"),
    ({"prune": {"calibration": {"source": "./nope.txt"}}}, "prune.calibration.source"),
    ({"prune": {"calibration": 3}}, "prune.calibration"),
    ({"quant": {"bits": []}}, "quant.bits"),
    ({"quant": {"bits": [4, 5]}}, "quant.bits"),
    ({"quant": {"bits": [4, 4]}}, "quant.bits"),
    ({"quant": {"bits": "4"}}, "quant.bits"),
    ({"quant": {"double_quant": "yes"}}, "quant.double_quant"),
    ({"quant": {"blocksize": 100}}, "quant.blocksize"),
    ({"quant": {"quant_type": "int4"}}, "quant.quant_type"),
    ({"quant": {"compute_dtype": "fp64"}}, "quant.compute_dtype"),
    ({"quant": {"int8_threshold": -1}}, "quant.int8_threshold"),
    ({"quant": {"quantize_embeddings": True}}, "quant.quantize_embeddings"),  # no such key (was a stub)
    ({"lora": {"rank": 0}}, "lora.rank"),
    ({"lora": {"rank": -1}}, "lora.rank"),
    ({"lora": {"rank": "eight"}}, "lora.rank"),
    ({"lora": {"rank": 8.5}}, "lora.rank"),
    ({"lora": {"alpha": 0}}, "lora.alpha"),
    ({"lora": {"dropout": 1.0}}, "lora.dropout"),
    ({"lora": {"dropout": -0.1}}, "lora.dropout"),
    ({"lora": {"target_modules": []}}, "lora.target_modules"),
    ({"lora": {"target_modules": "q_proj"}}, "lora.target_modules"),
    ({"lora": {"loftq_iters": -1}}, "lora.loftq_iters"),
    ({"finetune": {"lr": 0}}, "finetune.lr"),
    ({"finetune": {"lr": "fast"}}, "finetune.lr"),
    ({"finetune": {"lr": "-3e-4"}}, "finetune.lr"),
    ({"finetune": {"batch_size": 6, "micro_batch_size": 4}}, "finetune.batch_size"),
    ({"finetune": {"micro_batch_size": 0}}, "finetune.micro_batch_size"),
    ({"finetune": {"max_length": 0}}, "finetune.max_length"),
    ({"finetune": {"steps": 0}}, "finetune.steps"),
    ({"finetune": {"steps": "many"}}, "finetune.steps"),
    ({"finetune": {"report_every": 0}}, "finetune.report_every"),
    ({"finetune": {"val_limit": 0}}, "finetune.val_limit"),
    ({"finetune": {"data": "./missing.json"}}, "finetune.data"),
    ({"finetune": {"optimizer": "sgd"}}, "finetune.optimizer"),
    ({"finetune": {"max_examples": 0}}, "finetune.max_examples"),
    ({"finetune": {"warmup_steps": "x"}}, "finetune.warmup_steps"),
    ({"eval": {"tasks": []}}, "eval.tasks"),
    ({"eval": {"tasks": "boolq"}}, "eval.tasks"),
    ({"eval": {"limit": 0}}, "eval.limit"),
    ({"eval": {"batch_size": 0}}, "eval.batch_size"),
    ({"eval": {"local_data": {"boolq": "x.csv"}}}, "eval.local_data.boolq"),
    ({"eval": {"local_data": {"boolq": "./missing.jsonl"}}}, "eval.local_data.boolq"),
    ({"eval": {"local_data": "boolq.jsonl"}}, "eval.local_data"),
    ({"eval": {"metric": "f1"}}, "eval.metric"),
    ({"eval": {"include_path": "./nope"}}, "eval.include_path"),
    ({"search": {"num_samples": 0}}, "search.num_samples"),
    ({"search": {"concurrency": 0}}, "search.concurrency"),
    ({"search": {"sampler": "bayes"}}, "search.sampler"),
    ({"search": {"init": "grid"}}, "search.init"),
    ({"search": {"n_init": -1}}, "search.n_init"),
    ({"search": {"importance": "gradient"}}, "search.importance"),
    ({"search": {"temperature": 0}}, "search.temperature"),
    ({"search": {"ranks": [0]}}, "search.ranks"),
    ({"search": {"ranks": []}}, "search.ranks"),
    ({"search": {"layer_groups": 0}}, "search.layer_groups"),
    ({"search": {"max_failures": -1}}, "search.max_failures"),
    ({"search": {"baselines": ["dense"]}}, "search.baselines"),
    ({"search": {"asha": {"grace_period": 0}}}, "search.asha.grace_period"),
    ({"search": {"asha": {"reduction_factor": 1}}}, "search.asha.reduction_factor"),
    ({"search": {"asha": {"max_t": 0}}}, "search.asha.max_t"),
    ({"search": {"asha": {"enabeld": True}}}, "did you mean 'search.asha.enabled'"),
    ({"search": {"memory_objective": "peak"}}, "search.memory_objective"),
    ({"search": {"objective": "loss"}}, "search.objective"),
    ({"search": {"max_memory_gb": 0}}, "search.max_memory_gb"),
    ({"search": {"max_memory_gb": "lots"}}, "search.max_memory_gb"),
    ({"prune": {"ratio": 0}, "search": {"importance": "taylor"}}, "search.importance"),
    ({"resources": {"cpu": 0}}, "resources.cpu"),
    ({"resources": {"gpu": 1.5}}, "resources.gpu"),
    ({"resources": {"gpu": -0.5}}, "resources.gpu"),
    ({"resources": {"gpu": "all"}}, "resources.gpu"),
    ({"resources": {"gpu_wait_s": -1}}, "resources.gpu_wait_s"),
    ({"resources": {"threads": "x"}}, "resources.threads"),
    ({"output": {"keep_adapters": "some"}}, "output.keep_adapters"),
    ({"output": {"dir": 5}}, "output.dir"),
]

# config files that are no YAML text: (file bytes, or None for "no file", the words the line must hold)
FILES = [
    ("missing", None, "--config"),
    ("binary", bytes(range(256)) * 4, "binary"),
    ("gzip", gzip.compress(b"model: {name: builtin:tiny}\n"), "gzip"),
    ("latin1", "model:\n  name: caf\u00e9\n".encode("latin-1"), "UTF-8"),
    ("yaml-syntax", b"prune:\n  ratio: 0.2\n search: [\n", "line"),
    ("not-a-mapping", b"- a\n- b\n", "mapping"),
    ("scalar", b"42\n", "mapping"),
]

ROWS: list[tuple] = []  # (id, verb, argv, config override dict | None, prep, expected words)
for i, (override, words) in enumerate(FIELDS):
    name = words.split("'")[1] if "'" in words else words
    ROWS.append((f"tune-{name}-{i}", "tune", TUNE, override, None, words))
    if i % 3 == 0:
        ROWS.append((f"trial-{name}-{i}", "trial", TRIAL, override, None, words))
        ROWS.append((f"prune-{name}-{i}", "prune", PRUNE, override, None, words))
for kind, _data, words in FILES:
    for verb, argv in (("tune", TUNE), ("trial", TRIAL), ("prune", PRUNE)):
        ROWS.append((f"{verb}-config-{kind}", verb, argv, None, f"config:{kind}", words))
for verb, argv in (("tune", TUNE), ("trial", TRIAL), ("prune", PRUNE)):
    ROWS += [
        (f"{verb}-config-folder", verb, [a.replace("{cfg}", "{folder}") for a in argv], None, None, "is a folder"),
        (f"{verb}-config-long-name", verb, [a.replace("{cfg}", "{tmp}/" + LONG_NAME) for a in argv], None, None, "--config"),
        (f"{verb}-config-long-path", verb, [a.replace("{cfg}", "/" + LONG_PATH) for a in argv], None, None, "--config"),
        (f"{verb}-config-below-a-file", verb, [a.replace("{cfg}", "{file}/cfg.yaml") for a in argv], None, None, "--config"),
        (f"{verb}-set-no-equals", verb, argv + ["--set", "prune.ratio"], None, None, "--set"),
        (f"{verb}-set-bad-yaml", verb, argv + ["--set", "prune.ratio=["], None, None, "--set prune.ratio"),
        (f"{verb}-set-inside-a-value", verb, argv + ["--set", "prune.ratio.x=1"], None, None, "prune.ratio"),
        (f"{verb}-set-misspelt", verb, argv + ["--set", "lora.rnak=4"], None, None, "did you mean 'lora.rank'"),
    ]
ROWS += [
    ("tune-num-samples-0", "tune", TUNE + ["--num-samples", "0"], None, None, "search.num_samples"),
    ("tune-perplexity-without-a-perplexity-task", "tune", TUNE, {"search": {"objective": "perplexity"}}, None,
     "search.objective: perplexity needs a perplexity task"),
    ("tune-out-is-a-file", "tune", ["--config", "{cfg}", "--out", "{file}"], None, None, "--out"),
    ("tune-out-long-name", "tune", ["--config", "{cfg}", "--out", "{tmp}/" + LONG_NAME], None, None, "--out"),
    ("tune-out-long-path", "tune", ["--config", "{cfg}", "--out", "/" + LONG_PATH], None, None, "--out"),
    ("tune-out-below-a-file", "tune", ["--config", "{cfg}", "--out", "{file}/run"], None, None, "--out"),
    ("tune-out-not-a-run", "tune", ["--config", "{cfg}", "--out", "{folder}"], None, None, "holds no qpruner run"),
    ("tune-out-locked", "tune", ["--config", "{cfg}", "--out", "{run}"], None, "lock", "in use by another"),
    ("tune-out-locked-resume", "tune", ["--config", "{cfg}", "--out", "{run}", "--resume"], None, "lock", "in use"),
    ("tune-resume-damaged-results", "tune", ["--config", "{cfg}", "--out", "{run}"], None, "truncate:results.parquet",
     "results.parquet is damaged"),
    ("tune-damaged-run-json", "tune", ["--config", "{cfg}", "--out", "{run}"], None, "truncate:run.json", "run.json"),
    ("tune-damaged-baselines", "tune", ["--config", "{cfg}", "--out", "{run}"], None, "truncate:baselines.json",
     "baselines.json"),
    ("tune-resume-changed-steps", "tune", ["--config", "{cfg}", "--out", "{run}", "--resume", "--set",
                                           "finetune.steps=20", "--set", "lora.rank=4"], None, None, "finetune.steps, lora.rank"),
    ("tune-resume-changed-bits", "tune", ["--config", "{cfg}", "--out", "{run}", "--resume", "--set", "quant.bits=[4,8,16]"],
     None, None, "quant.bits"),
    ("tune-rerun-changed-prune", "tune", ["--config", "{cfg}", "--out", "{run}", "--set", "prune.ratio=0.2"], None, None,
     "prune.ratio"),
    ("tune-rerun-other-concurrency", "tune", ["--config", "{cfg}", "--out", "{run}", "--set", "search.concurrency=1"],
     None, None, "--resume"),
    ("tune-other-run", "tune", ["--config", "{cfg}", "--out", "{run}"], None, "run_key:someone-else", "--overwrite"),
    ("trial-adapter-out-file", "trial", TRIAL + ["--adapter-out", "{file}"], None, None, "--adapter-out"),
    ("trial-adapter-out-long", "trial", TRIAL + ["--adapter-out", "{tmp}/" + LONG_NAME], None, None, "--adapter-out"),
    ("report-missing", "report", ["{tmp}/nothing"], None, None, "does not exist"),
    ("report-a-file", "report", ["{file}"], None, None, "is a file"),
    ("report-no-results", "report", ["{folder}"], None, None, "no results.parquet"),
    ("report-long-name", "report", ["{tmp}/" + LONG_NAME], None, None, "run folder"),
    ("report-truncated-results", "report", ["{run}"], None, "truncate:results.parquet", "results.parquet is damaged"),
    ("report-garbage-results", "report", ["{run}"], None, "garbage:results.parquet", "results.parquet is damaged"),
    ("report-foreign-parquet", "report", ["{run}"], None, "foreign:results.parquet", "not a qpruner results file"),
    ("report-truncated-baselines", "report", ["{run}"], None, "truncate:baselines.json", "baselines.json is damaged"),
    ("report-truncated-run-json", "report", ["{run}"], None, "truncate:run.json", "run.json is damaged"),
    ("report-run-json-a-list", "report", ["{run}"], None, "list:run.json", "run.json is damaged"),
    ("report-binary-baselines", "report", ["{run}"], None, "binary:baselines.json", "baselines.json is damaged"),
    ("export-trial-and-pick", "export", EXPORT + ["--trial", "done0001", "--pick", "best-acc"], None, None, "not both"),
    ("export-neither", "export", EXPORT, None, None, "--pick best-acc"),
    ("export-unknown-trial", "export", EXPORT + ["--trial", "nope"], None, None, "--trial nope"),
    ("export-stopped-early", "export", EXPORT + ["--trial", "early001"], None, None, "stopped early"),
    ("export-failed-trial", "export", EXPORT + ["--trial", "broke001"], None, None, "loss is NaN"),
    ("export-bad-pick", "export", EXPORT + ["--pick", "worst"], None, None, "--pick"),
    ("export-bad-max-mem", "export", EXPORT + ["--pick", "max-mem=abc"], None, None, "max-mem"),
    ("export-nothing-under-cap", "export", EXPORT + ["--pick", "max-mem=0"], None, None, "no completed trial"),
    ("export-out-is-a-file", "export", ["--run", "{run}", "--pick", "best-acc", "--out", "{file}"], None, None, "--out"),
    ("export-gguf-out-is-a-folder", "export", ["--run", "{run}", "--pick", "best-acc", "--format", "gguf", "--out", "{folder}"],
     None, None, "--out"),
    ("export-out-long", "export", ["--run", "{run}", "--pick", "best-acc", "--out", "{tmp}/" + LONG_NAME], None, None, "--out"),
    ("export-run-missing", "export", ["--run", "{tmp}/nothing", "--pick", "best-acc", "--out", "{tmp}/e"], None, None, "--run"),
    ("export-run-a-file", "export", ["--run", "{file}", "--pick", "best-acc", "--out", "{tmp}/e"], None, None, "--run"),
    ("export-truncated-results", "export", EXPORT + ["--pick", "best-acc"], None, "truncate:results.parquet",
     "results.parquet is damaged"),
    ("export-truncated-run-json", "export", EXPORT + ["--pick", "best-acc"], None, "truncate:run.json", "run.json is damaged"),
    ("export-no-pruned-path", "export", EXPORT + ["--pick", "best-acc"], None, "run_json:{}", "records no pruned model"),
    ("export-pruned-gone", "export", EXPORT + ["--pick", "best-acc"], None, "run_json:gone", "gone from the cache"),
    ("export-adapter-lost", "export", EXPORT + ["--trial", "done0001"], None, None, "adapter is missing"),
    ("export-adapter-off-front", "export", EXPORT + ["--trial", "done0001"], None, "keep:none", "keep_adapters"),
]


def prepare(ws: Path, raw: dict, override, prep) -> None:
    if override is not None:
        (ws / "cfg.yaml").write_text(yaml.safe_dump(merged(raw, override)))
    if not prep:
        return
    kind, _, arg = prep.partition(":")
    run = ws / "run"
    if kind == "config":
        data = dict((k, d) for k, d, _ in FILES)[arg]
        if data is None:
            (ws / "cfg.yaml").unlink()
        else:
            (ws / "cfg.yaml").write_bytes(data)
    elif kind == "truncate":
        data = (run / arg).read_bytes()
        (run / arg).write_bytes(data[: max(len(data) // 2, 1)] if arg.endswith(".json") else data[:300])
    elif kind == "garbage":
        (run / arg).write_bytes(b"PAR1 not really parquet PAR1")
    elif kind == "foreign":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"x": [1, 2]}), run / arg)
    elif kind == "list":
        (run / arg).write_text("[1, 2]")
    elif kind == "binary":
        (run / arg).write_bytes(b"\xff\xfe\x00\x01" * 8)
    elif kind == "run_json":
        data = json.loads((run / "run.json").read_text())
        if arg == "{}":
            data.pop("pruned_path")
        else:
            data["pruned_path"] = str(ws / "gone")
        (run / "run.json").write_text(json.dumps(data))
    elif kind == "run_key":
        data = json.loads((run / "run.json").read_text())
        data.update(run_key=arg, config=None)
        (run / "run.json").write_text(json.dumps(data))
    elif kind == "keep":
        text = (run / "config.yaml").read_text().replace("keep_adapters: pareto", f"keep_adapters: {arg}")
        (run / "config.yaml").write_text(text)


def fill(argv, ws: Path) -> list[str]:
    names = {"{cfg}": ws / "cfg.yaml", "{out}": ws / "out", "{run}": ws / "run", "{file}": ws / "file.txt",
             "{folder}": ws / "folder", "{tmp}": ws}
    out = []
    for arg in argv:
        for key, value in names.items():
            arg = arg.replace(key, str(value))
        out.append(arg)
    return out


@pytest.mark.parametrize("case", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, ws, capsys):
    case_id, verb, argv, override, prep, words = case
    root, raw = ws
    prepare(root, raw, override, prep)
    lock = None
    if prep == "lock":
        from qpruner.runfolder import RunLock

        lock = RunLock(root / "run").__enter__()
    before = snapshot(root)
    try:
        line = refuse(verb, fill(argv, root), capsys)
    finally:
        after = snapshot(root)
        if lock is not None:
            lock.commit()
            lock.__exit__(None, None, None)
    assert words in line, line
    assert after == before, sorted(set(after) ^ set(before)) or "a file's content changed"


def test_the_matrix_covers_issue_28():
    assert len(ROWS) >= 120
    assert len({r[0] for r in ROWS}) == len(ROWS)


# ---------------------------------------------------------------------------------------------
# Checks against the pruned model's shapes (the built-in tiny model: 6 decoder layers, k/v 64 wide).

SHAPED = [
    ("rank-beyond-width", ["--set", "lora.rank=4000"], "lora.rank"),
    ("search-rank-beyond-width", ["--set", "search.ranks=[4,5000]"], "search.ranks"),
    ("target-no-module", ["--set", "lora.target_modules=[qproj]"], "did you mean 'q_proj'"),
    ("target-not-a-linear", ["--set", "lora.target_modules=[mlp]"], "LlamaMLP"),
    ("ranks-not-integers", ["--ranks", "a,b"], "--ranks"),
    ("ranks-zero", ["--ranks", "8,0,8,8,8,8"], "--ranks"),
    ("ranks-count", ["--ranks", "8,8"], "--ranks"),
    ("ranks-beyond-width", ["--ranks", "8,8,8,8,8,9999"], "--ranks (layer 5)"),
    ("bits-count", ["--bits", "4,8"], "bits: got 2 entries"),
    ("bits-value", ["--bits", "uniform:5"], "bits[0]=5"),
    ("bits-not-in-quant-bits", ["--bits", "uniform:16"], "quant.bits"),
    ("bits-not-numbers", ["--bits", "4,x"], "--bits"),
    ("relative-model-folder-missing", ["--set", "model.name=models/my-llama"], "is no folder here"),
    ("local-data-wrong-columns", ["--set", "eval.tasks=[boolq]", "--set", "eval.local_data.boolq={tmp}/boolq.jsonl"],
     "eval.local_data.boolq: task 'boolq' cannot read"),
]


@pytest.fixture(scope="module")
def pruned(template):
    """The base config's pruned tiny model, built once here so that no case prints pruning progress."""
    from qpruner.config import config_from_dict
    from qpruner.plan import resolve_config
    from qpruner.prune import prune_cached

    return prune_cached(resolve_config(config_from_dict(template[1])), progress=False).path


@pytest.mark.parametrize("case", SHAPED, ids=[c[0] for c in SHAPED])
def test_shapes_of_the_pruned_model_bound_lora(case, ws, pruned, capsys):
    _, extra, words = case
    root, _ = ws
    (root / "boolq.jsonl").write_text('{"q": "is it", "p": "x", "y": 1}\n')  # not boolq's columns
    extra = [a.replace("{tmp}", str(root)) for a in extra]
    argv = ["--config", str(root / "cfg.yaml")] + (["--bits", "uniform:4"] if "--bits" not in extra else []) + extra
    before = snapshot(root)
    line = refuse("trial", argv, capsys)
    assert words in line, line
    assert snapshot(root) == before


def test_learning_rate_written_3e_4_is_a_number(tmp_path):
    from qpruner.config import load_config

    path = tmp_path / "lr.yaml"
    path.write_text("finetune:\n  lr: 3e-4\n  data: builtin\nsearch:\n  temperature: 5e-1\n")
    cfg = load_config(path)
    assert cfg.finetune.lr == 3e-4 and cfg.search.temperature == 0.5


# ---------------------------------------------------------------------------------------------
# Property: random wrong types and values in any field.


def _fields():
    """(dotted field, type hint) of every leaf field of the Config."""
    import dataclasses
    import typing

    from qpruner.config import Config

    out = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{f.name}.")
            else:
                out.append((f"{prefix}{f.name}", hint))

    walk(Config, "")
    return out


def _wrong_values(hint):
    """A strategy of values the field's type refuses."""
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    words = st.text(alphabet="abcxyz_", min_size=1, max_size=8)
    mapping = st.dictionaries(words, st.integers(), min_size=1, max_size=2)
    if origin is typing.Union and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return _wrong_values(inner[0]) if len(inner) == 1 else st.one_of(mapping, st.lists(st.integers(), min_size=1))
    if origin is typing.Union:  # float | str (sparsity), float | 'auto' (gpu)
        return st.one_of(mapping, st.lists(st.integers(), min_size=1, max_size=2), st.booleans())
    if origin is typing.Literal:
        return st.one_of(words.filter(lambda w: w not in args), st.integers(), mapping)
    if origin is list:
        return st.one_of(st.integers(), mapping, st.lists(mapping, min_size=1, max_size=2))
    if origin is dict:
        return st.one_of(st.integers(), words, st.lists(st.integers(), min_size=1, max_size=2))
    if hint is bool:
        return st.one_of(st.integers(), words, mapping)
    if hint is int:
        return st.one_of(words, st.floats(allow_nan=False).filter(lambda x: x != int(x) if x == x and abs(x) < 1e300 else True),
                         st.booleans(), mapping, st.lists(st.integers(), min_size=1, max_size=2))
    if hint is float:
        return st.one_of(words, st.booleans(), mapping, st.lists(st.integers(), min_size=1, max_size=2))
    if hint is str:
        return st.one_of(st.integers(), st.booleans(), mapping, st.lists(st.integers(), min_size=1, max_size=2))
    raise AssertionError(hint)


FIELD_HINTS = _fields()


@st.composite
def wrong_configs(draw):
    field, hint = draw(st.sampled_from(FIELD_HINTS))
    return field, draw(_wrong_values(hint))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(wrong=wrong_configs())
def test_any_field_with_a_wrong_type_is_refused_in_one_line(wrong, tmp_path, capsys):
    field, value = wrong
    assert_tune_refuses(field, value, tmp_path, capsys)


def assert_tune_refuses(field: str, value, tmp_path: Path, capsys) -> None:
    """tiny.yaml with `field` set to `value`: tune refuses in one line naming the field and writes nothing."""
    import tempfile

    raw = yaml.safe_load((ROOT / "tune_configs" / "tiny.yaml").read_text())
    node = raw
    parts = field.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    (work / "cfg.yaml").write_text(yaml.safe_dump(raw))
    before = snapshot(work)
    line = refuse("tune", ["--config", str(work / "cfg.yaml"), "--out", str(work / "out"), "--no-dashboard"], capsys)
    assert field in line, (field, value, line)
    assert snapshot(work) == before


def test_a_search_whose_every_trial_failed_alike_fails_in_one_line(tmp_path):
    """tune exits 2 naming the error when every trial failed with it, not 0 with an empty front."""
    from qpruner.errors import QPrunerError
    from qpruner.pareto import write_results
    from qpruner.tune import check_not_all_failed

    def row(trial_id, status, error):
        return {"trial_id": trial_id, "status": status, "bits": [4, 8], "error": error, "started_at": 1.0,
                "config": {"b0": 4, "b1": 8}}

    error = "Traceback ...\nValueError: Target modules {'qproj'} not found in the base model."
    write_results([row("a", "failed", error), row("b", "failed", error)], tmp_path, plot=False)
    with pytest.raises(QPrunerError, match=r"every trial failed \(2 of 2\) .*Target modules") as info:
        check_not_all_failed(tmp_path)
    assert "\n" not in str(info.value)
    write_results([row("c", "failed", "RuntimeError: loss is NaN")], tmp_path, plot=False)
    check_not_all_failed(tmp_path)  # different reasons: the trials failed, the configuration did not


# Values of the right type outside what the field allows (the validate() checks), per field.
OUT_OF_RANGE = {
    "prune.ratio": st.one_of(st.floats(min_value=1.0, max_value=1e6), st.floats(max_value=-1e-9, min_value=-1e6)),
    "prune.round_to": st.integers(max_value=0),
    "prune.calibration.n_samples": st.integers(max_value=0),
    "prune.calibration.seq_len": st.integers(max_value=0),
    "quant.blocksize": st.integers(min_value=-10**6, max_value=10**6).filter(
        lambda b: b not in (32, 64, 128, 256, 512, 1024, 2048, 4096)),
    "quant.int8_threshold": st.floats(max_value=-1e-9, min_value=-1e6),
    "lora.rank": st.integers(max_value=0),
    "lora.alpha": st.integers(max_value=0),
    "lora.dropout": st.one_of(st.floats(min_value=1.0, max_value=1e6), st.floats(max_value=-1e-9, min_value=-1e6)),
    "lora.loftq_iters": st.integers(max_value=-1),
    "finetune.lr": st.floats(max_value=0.0, min_value=-1e6),
    "finetune.steps": st.integers(max_value=0),
    "finetune.max_length": st.integers(max_value=0),
    "finetune.report_every": st.integers(max_value=0),
    "eval.batch_size": st.integers(max_value=0),
    "eval.limit": st.integers(max_value=0),
    "search.num_samples": st.integers(max_value=0),
    "search.concurrency": st.integers(max_value=0),
    "search.n_init": st.integers(max_value=-1),
    "search.temperature": st.floats(max_value=0.0, min_value=-1e6),
    "search.max_failures": st.integers(max_value=-1),
    "search.layer_groups": st.integers(max_value=0),
    "search.max_memory_gb": st.floats(max_value=0.0, min_value=-1e6),
    "search.asha.grace_period": st.integers(max_value=0),
    "search.asha.reduction_factor": st.integers(max_value=1),
    "resources.cpu": st.floats(max_value=0.0, min_value=-1e6),
    "resources.gpu": st.one_of(st.floats(min_value=1.0001, max_value=1e6), st.floats(max_value=-1e-9, min_value=-1e6)),
    "resources.gpu_wait_s": st.floats(max_value=-1e-9, min_value=-1e6),
}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_field_out_of_its_range_is_refused_in_one_line(data, tmp_path, capsys):
    field = data.draw(st.sampled_from(sorted(OUT_OF_RANGE)))
    assert_tune_refuses(field, data.draw(OUT_OF_RANGE[field]), tmp_path, capsys)


def test_the_perplexity_objective_is_not_measured_on_the_calibration_text(tmp_path, tiny_config):
    """search.objective: perplexity reads the first perplexity task of eval.tasks; its text may not be the text
    the pruning calibrated on. Checked on the driver before any work (qpruner.plan.preflight calls it with the
    loaded tasks' output types)."""
    from qpruner.errors import ConfigError
    from qpruner.plan import check_objective

    cfg = tiny_config
    cfg.search.objective = "perplexity"
    with pytest.raises(ConfigError) as exc:
        check_objective(cfg, {"arc_easy": "multiple_choice"})
    assert exc.value.field == "search.objective"
    pages = tmp_path / "pages.jsonl"
    pages.write_text(json.dumps({"page": "one two three"}) + "\n")
    cfg.eval.tasks = ["arc_easy", "wikitext"]
    cfg.eval.local_data = {"wikitext": str(pages)}
    cfg.prune.calibration.source = str(pages)
    with pytest.raises(ConfigError) as exc:
        check_objective(cfg, {"arc_easy": "multiple_choice", "wikitext": "loglikelihood_rolling"})
    assert exc.value.field == "eval.local_data.wikitext" and "calibration" in str(exc.value)
    cfg.prune.calibration.source = str(tmp_path / "other.txt")
    (tmp_path / "other.txt").write_text("another text")
    check_objective(cfg, {"arc_easy": "multiple_choice", "wikitext": "loglikelihood_rolling"})
