"""`python -m qpruner.report RUN_DIR` (also called at the end of every run): report.md and its plots.

Reads RUN_DIR/results.parquet (and config.yaml if present); writes report.md, pareto.png,
hypervolume.png and bits_heatmap.png next to it. Works on any results file, finished or not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import pyarrow as pa

from qpruner.baselines import load as load_baselines
from qpruner.config import QUALITY, Objective
from qpruner.pareto import (
    compact_bits,
    completed,
    front_table,
    hypervolume_curve,
    normalized,
    plot_front,
    reference_point,
    uniform_baselines,
)
from qpruner.predict import quality_lines, write_predictions
from qpruner.results import GB, accuracy_text, column_label, metric_columns, noise_text, objective_of
from qpruner.runfolder import check_run_dir

BIT_COLOURS = {4: "#c6dbef", 8: "#4292c6", 16: "#08306b"}  # fixed, so heatmaps of different runs read alike
BIT_NAMES = {4: "4-bit NF4/FP4", 8: "8-bit LLM.int8", 16: "16-bit (not quantized)"}


def write_report(run_dir: str | Path) -> Path:
    """report.md + pareto.png, hypervolume.png and bits_heatmap.png from RUN_DIR/results.parquet."""
    from qpruner.runfolder import read_json, read_results

    run = check_run_dir(run_dir)
    results = read_results(run)
    front = front_table(results)
    ref = reference_point(results)
    curve = hypervolume_curve(results, ref)
    baselines = list(load_baselines(run).values())
    objective = objective_of(results)
    stars = {**uniform_baselines(results), **{b["label"]: (b["memory_bytes"], b.get(objective.name)) for b in baselines
                                              if b["memory_bytes"] is not None}}
    source = model_source(run)  # every input is read before anything is written
    config = (run / "config.yaml").read_text() if (run / "config.yaml").is_file() else None
    record = run / "searcher.json"  # written by qpruner.search.RecordedOptunaSearch
    repeats = read_json(record).get("answered_from_record", 0) if record.is_file() else 0
    plan = run / "validation.json"  # written by qpruner.tune at the start of the run
    validation = read_json(plan) if plan.is_file() else None
    if validation is not None and "validation" not in validation:  # a run of an earlier version: the plan alone
        validation = {"validation": validation, "warnings": []}
    predictions = write_predictions(run)  # the performance model's front, when the run kept a sensitivity table
    plot_front(results, front, run / "pareto.png", stars, predicted=predictions["front"] if predictions else None)
    plot_hypervolume(curve, ref, run / "hypervolume.png", objective)
    plot_bits(front.to_pylist(), run / "bits_heatmap.png", objective)
    (run / "report.md").write_text(markdown(run.name, results, front, curve, config, baselines, repeats, source,
                                            validation, predictions["quality"] if predictions else None))
    return run / "report.md"


# ---------------------------------------------------------------------------------------------
# Markdown.


def model_source(run: Path) -> Optional[dict]:
    """Where the run's source model came from when it was converted (a GGUF file), from the pruned model's metadata."""
    from qpruner.runfolder import read_json

    marker = run / "run.json"
    pruned = read_json(marker).get("pruned_path") if marker.is_file() else None
    meta = Path(pruned) / "qpruner_prune.json" if pruned else None
    return json.loads(meta.read_text()).get("model_source") if meta and meta.is_file() else None


def source_lines(source: Optional[dict]) -> list[str]:
    """One line saying the weights came from a quantized GGUF file and carry its rounding."""
    if not source or source.get("format") != "gguf":
        return []
    return [f"- Source model: GGUF file `{Path(source['file']).name}` ({source['quant_type']}, sha256 "
            f"{source['sha256'][:12]}), dequantized to float: every figure here includes its {source['quant_type']} rounding."]


def markdown(name: str, results: pa.Table, front: pa.Table, curve: list, config: Optional[str],
             baselines: Sequence[dict] = (), repeats: int = 0, source: Optional[dict] = None,
             validation: Optional[dict] = None, model_quality: Optional[dict] = None) -> str:
    """The whole report as Markdown text; `baselines` are the rows of baselines.json, `repeats` the
    searcher's proposals of already-recorded configurations (answered from the record, not trained),
    `source` the model's provenance, `validation` where each task's quick validation read,
    `model_quality` the performance model's (qpruner.predict.write_predictions)."""
    rows = results.to_pylist()
    tasks = metric_columns(results.column_names)
    done = completed(results).to_pylist()
    early = [r for r in rows if r["status"] == "stopped_early"]
    failed = [r for r in rows if r["status"] == "failed"]
    oom = [r for r in rows if r["status"] == "oom"]
    ref = reference_point(results)
    objective = objective_of(results)
    hv = curve[-1][2] if curve else 0.0
    lines = [f"# qpruner run: {name}", ""]
    finished = [r for r in rows if r["status"] == "completed"]  # `done` less those without a value of the objective
    ended = len(finished) + len(early) + len(failed) + len(oom)
    lines += [f"- Trials: {len(rows)}: {len(finished)} completed, {len(early)} stopped early by ASHA, {len(failed)} failed"
              + (f", {len(oom)} out of memory" if oom else "")
              + (f", {len(rows) - ended} other (pending/running)" if len(rows) > ended else "") + "."]
    lines += source_lines(source)
    lines += [f"- Repeat proposals answered from the record (not trained again): {repeats}."]
    lines += time_lines(rows)
    lines += validation_lines((validation or {}).get("validation"))
    lines += early_stop_lines(rows, early)
    lines += [f"- Objectives: {objective.label} ({objective.mode}; search.objective), memory (min)."]
    lines += [f"- Pareto front: {front.num_rows} configurations; hypervolume {hv / GB:.4g} {objective.name} x GB "
              f"({normalized(hv, ref, objective):.3f} of the reference box), reference point: {objective.name} {ref[0]:g}, "
              f"memory {ref[1] / GB:.4f} GB (1.1 x the largest trial memory; the box only grows).",
              f"- Memory objective: {memory_sources(rows)}; weights stored {storage_of(rows)}.", "", "![quality objective vs memory](pareto.png)", ""]
    if model_quality is not None:
        seconds = [r["wall_seconds"] for r in done if r.get("wall_seconds")]
        lines += ["## Performance model", ""] + quality_lines(model_quality, sum(seconds) / len(seconds) if seconds else None) + [""]
    if (validation or {}).get("warnings"):
        lines += ["## Documents", ""] + [f"- {w}" for w in validation["warnings"]] + [""]
    lines += ["## Pareto front", "", "Sorted by memory; bits are per decoder layer, first layer first. Accuracy ± its "
              "standard error over the scored documents (lm-eval's); two accuracies closer than about twice their "
              "combined standard error are within noise.", ""]
    lines += md_table(front.to_pylist(), tasks, objective=objective) if front.num_rows else ["No completed trial yet."]
    lines += ["", "## Comparison with uniform precision", ""] + comparison_lines(done, front.to_pylist(), tasks, baselines,
                                                                                         objective.name)
    lines += ["", "## Search progress", "", "![hypervolume vs completed trials](hypervolume.png)", "",
              "## Bits per layer on the front", "", "![bits per layer on the Pareto front](bits_heatmap.png)", ""]
    if early:
        lines += ["## Stopped early", "", "| trial | bits per layer | steps done | last validation log-prob | last validation acc | memory GB |",
                  "| --- | --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['trial_id']} | {compact_bits(r['bits'])} | {r['steps']} / {run_max_steps(rows, r) or '?'} | "
                  f"{fmt(r.get('val_logprob'))} | {fmt(r['val_acc'])} | {fmt(gb(r), 4)} |" for r in early]
        lines += [""]
    if oom:
        lines += oom_lines(oom)
    if failed:
        lines += ["## Failed trials", ""]
        lines += [f"- `{r['trial_id']}` (bits {compact_bits(r['bits'])}): {one_line(r['error'])}" for r in failed]
        lines += [""]
    if config is not None:
        lines += ["## Config", "", "```yaml", config.rstrip(), "```", ""]
    return "\n".join(lines)


def validation_lines(validation: Optional[dict]) -> list[str]:
    """Where ASHA's quick validation read, per task: a disjoint split, or documents held out of the final score."""
    if not validation:
        return []
    return ["- Quick validation (ASHA's signal: mean log-probability of the gold answer): "
            + "; ".join(f"{task}: {where}" for task, where in validation.items()) + "."]


def time_lines(rows: list[dict]) -> list[str]:
    """Run wall time (first start to last finish) and trial-hours, split by stage."""
    trial_s = sum(r["wall_seconds"] or 0.0 for r in rows)
    starts = [r["started_at"] for r in rows if r["started_at"]]
    ends = [r["started_at"] + (r["wall_seconds"] or 0.0) for r in rows if r["started_at"]]
    wall = f"{duration(max(ends) - min(starts))} wall time (first trial start to last finish); " if starts else ""
    stages = {k: sum(r[k] or 0.0 for r in rows) for k in ("quantize_s", "loftq_s", "finetune_s", "eval_s")}
    split = ("stages (trials that finished them): " + ", ".join(f"{k[:-2]} {duration(v)}" for k, v in stages.items())
             + "; the rest is loading, setup and unfinished training") if any(stages.values()) else "no stage timings"
    return [f"- Time: {wall}{trial_s / 3600:.3g} trial-hours ({duration(trial_s)}) summed over trials; {split}."]


def duration(seconds: float) -> str:
    """'1 h 05 min', '4 min 31 s' or '12.3 s'."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    if seconds >= 60:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{seconds:.1f} s"


def run_max_steps(rows: list[dict], row: dict) -> int:
    """A trial's planned fine-tuning steps; a stopped trial may not have reported it, and every trial
    of a run shares finetune.steps, so fall back to the largest max_steps in the run."""
    return row["max_steps"] or max((r["max_steps"] or 0 for r in rows), default=0)


def early_stop_lines(rows: list[dict], early: list[dict]) -> list[str]:
    """How many fine-tuning steps ASHA saved: sum of max_steps - steps over stopped trials."""
    if not early:
        return ["- Early stopping: no trial was stopped early."]
    saved = sum(max(run_max_steps(rows, r) - (r["steps"] or 0), 0) for r in early)
    planned = sum(run_max_steps(rows, r) for r in early)
    share = f" ({saved / planned:.0%} of their planned steps)" if planned else ""
    return [f"- Early stopping: {len(early)} trials stopped; {saved} fine-tuning steps saved{share}."]


def storage_of(rows: list[dict]) -> str:
    """How the trials' weights were stored. results.parquet's fixed schema has no weight_storage column yet,
    so rows read back say nothing and count as dense, which every qpruner pruner produces today."""
    kinds = sorted({r.get("weight_storage") or "dense" for r in rows})
    return " / ".join(kinds) if kinds else "dense"


def memory_sources(rows: list[dict]) -> str:
    """Whether the memory objective was measured on a GPU, estimated, or a mix."""
    sources = [r["memory_source"] for r in rows if r["memory_source"]]
    measured = sources.count("measured")
    if not sources:
        return "unknown"
    if measured == len(sources):
        return "measured peak GPU memory during fine-tuning"
    if measured == 0:
        return "analytic estimate of the fine-tuning peak (no GPU measurement)"
    return f"measured peak for {measured} trials, analytic estimate for {len(sources) - measured}"


def comparison_lines(done: list[dict], front: list[dict], tasks: list[str], baselines: Sequence[dict] = (),
                     objective_name: str = "accuracy") -> list[str]:
    """The paper's rows when present: the unpruned model and uniform-16 LoRA (baselines.json, measured
    after the search), uniform-4/-8 LoftQ, then the best mixed configuration overall and the best mixed
    one within each uniform configuration's memory, "best" by search.objective (`objective_name`)."""
    uniform: dict[int, dict] = {b["bits"][0]: b for b in baselines if b["trial_id"] == "baseline:uniform-16"}
    for r in done:
        if r["bits"] and len(set(r["bits"])) == 1:
            uniform.setdefault(r["bits"][0], r)
    mixed = [r for r in done if len(set(r["bits"])) > 1]
    unpruned = next((b for b in baselines if b["trial_id"] == "baseline:unpruned"), None)
    apt = next((b for b in baselines if b["trial_id"] == "baseline:apt"), None)
    labelled = [(unpruned["label"], unpruned)] if unpruned else []
    labelled += [(apt["label"], apt)] if apt else []
    labelled += [(f"uniform-{b} {'LoRA' if b == 16 else 'LoftQ'}", r) for b, r in sorted(uniform.items(), reverse=True)]
    objective = QUALITY[objective_name]
    best = objective.best(mixed)
    if best:
        labelled.append(("best mixed", best))
    deltas = []
    for b, base in sorted(uniform.items(), reverse=True):
        within = [r for r in mixed if r["memory_bytes"] <= base["memory_bytes"]]
        if not within:
            continue
        pick = objective.best(within)
        if pick is None:
            continue
        if pick is not best:
            labelled.append((f"best mixed within uniform-{b} memory", pick))
        deltas.append(f"- Best mixed within uniform-{b} memory (`{pick['trial_id']}`) vs uniform-{b}: "
                      f"{quality_delta(pick, base, objective)}, "
                      f"{100 * (pick['memory_bytes'] / base['memory_bytes'] - 1):+.1f}% memory.")
    if not labelled:
        return ["No completed trial to compare yet."]
    note = [] if uniform else ["No uniform-precision trial completed (search.anchors: true adds them).", ""]
    if unpruned:
        note += ["The unpruned model is evaluated zero-shot as loaded; its memory column is empty because it was "
                 f"not fine-tuned (its weights alone take {unpruned['weight_bytes'] / GB:.4f} GB).", ""]
    if apt:
        note += ["APT, no retraining: the source model pruned by APT at matching sparsity (qpruner/baselines.py), "
                 f"zero-shot, unquantized; its memory column is empty (dense weights with zeros: {apt['weight_bytes'] / GB:.4f} GB).", ""]
    table = md_table([r for _, r in labelled], tasks, [label for label, _ in labelled], objective)
    return note + table + ([""] + deltas if deltas else [])


def quality_delta(pick: dict, base: dict, objective: Objective) -> str:
    """How `pick` differs from `base` on the objective: accuracy points with the noise verdict, else the
    objective's own difference (and the accuracy's beside it)."""
    noise = noise_text(pick, base)
    acc = f"{100 * (pick['accuracy'] - base['accuracy']):+.1f} pt accuracy{f', {noise}' if noise else ''}" \
        if pick.get("accuracy") is not None and base.get("accuracy") is not None else ""
    if objective.name == "accuracy" or pick.get(objective.name) is None or base.get(objective.name) is None:
        return acc or "-"
    diff = pick[objective.name] - base[objective.name]
    own = (f"{100 * diff / base[objective.name]:+.1f}% perplexity" if objective.name == "perplexity"
           else f"{diff:+.4f} validation log-prob")
    return f"{own}" + (f" ({acc})" if acc else "")


def md_table(rows: Sequence[dict], tasks: list[str], labels: Optional[list[str]] = None,
             objective: Objective = QUALITY["accuracy"]) -> list[str]:
    """A Markdown table: [label], trial, bits per layer, [validation log-prob, when it is the objective],
    accuracy ± standard error, per-task accuracy (and perplexity), memory GB."""
    logprob = objective.name == "val_logprob"
    head = (["row"] if labels else []) + ["trial", "bits per layer", *(["validation log-prob"] if logprob else []),
                                          "accuracy ± se", *[column_label(t) for t in tasks], "memory GB"]
    out = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for i, r in enumerate(rows):
        cells = ([labels[i]] if labels else []) + [r["trial_id"], compact_bits(r["bits"]),
                                                   *([fmt(r.get("val_logprob"), 4)] if logprob else []), accuracy_text(r),
                                                   *[fmt(r.get(t)) for t in tasks], fmt(gb(r), 4)]
        out.append("| " + " | ".join(cells) + " |")
    return out


def fmt(x: Optional[float], digits: int = 3) -> str:
    """A number for a table cell; '-' when missing."""
    return "-" if x is None else f"{x:.{digits}f}"


def gb(r: dict) -> Optional[float]:
    """A row's memory objective in GB (None when unknown)."""
    return None if r["memory_bytes"] is None else r["memory_bytes"] / GB


def oom_lines(oom: Sequence[dict]) -> list[str]:
    """The trials that ran out of memory, with the GPU share each held: not on the front, and not failures of
    the configuration itself (see docs/how-it-works.md, Failure behaviour)."""
    lines = ["## Out of memory", "", "These trials ran out of memory (GPU or host) at the GPU share they held, so "
             "they are not on the front. One that ran out itself (\"out of GPU memory during ...\") was told to the "
             "searcher as a memory-constraint violation and is not retried: train it on a whole GPU "
             "(`resources.gpu: 1`, or a lower `search.concurrency`) to measure it. One whose worker Ray's memory "
             "monitor killed (the node ran low on memory) is trained again by `--resume`.", "",
             "| trial | bits per layer | GPU fraction | error |", "| --- | --- | ---: | --- |"]
    for r in oom:
        fraction = r.get("gpu_fraction")
        shown = "?" if fraction is None else ("CPU" if fraction == 0 else f"{fraction:g}")
        lines.append(f"| {r['trial_id']} | {compact_bits(r['bits'])} | {shown} | {one_line(r['error'])} |")
    return lines + [""]


def one_line(text: Optional[str]) -> str:
    """The last non-empty line of an error (the exception message), safe inside Markdown."""
    lines = [ln.strip() for ln in (text or "unknown error").splitlines() if ln.strip()]
    return (lines[-1] if lines else "unknown error").replace("|", "/")[:300]


# ---------------------------------------------------------------------------------------------
# Plots.


def _pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_hypervolume(curve: list[tuple[int, float, float]], ref: tuple[float, float], path: Path,
                     objective: Objective = QUALITY["accuracy"]) -> None:
    """Hypervolume (fraction of the reference box) after each completed trial, with trial-hours on top."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=130)
    if curve:
        n = [c[0] for c in curve]
        ax.step(n, [normalized(c[2], ref, objective) for c in curve], where="post", c="tab:red", lw=1.6)
        ax.plot(n, [normalized(c[2], ref, objective) for c in curve], "o", c="tab:red", ms=4)
        for c in curve[:: max(len(curve) // 6, 1)]:
            ax.annotate(duration(c[1]), (c[0], normalized(c[2], ref, objective)), textcoords="offset points",
                        xytext=(0, 7), ha="center", va="bottom", fontsize=8, color="0.35")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("completed trials (labels: trial time spent so far, all trials)")
    ax.set_ylabel("hypervolume (fraction of reference box)")
    ax.set_title(f"search progress (reference: {objective.name} {ref[0]:.4g}, memory {ref[1] / GB:.4g} GB)")
    ax.margins(x=0.06, y=0.2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_bits(front: list[dict], path: Path, objective: Objective = QUALITY["accuracy"]) -> None:
    """Front configurations (rows, by memory) x decoder layers, coloured by bit-width."""
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    plt = _pyplot()
    n_layers = max((len(r["bits"]) for r in front), default=0)
    fig, ax = plt.subplots(figsize=(min(max(8.0, 4.5 + 0.3 * n_layers), 16), 1.6 + 0.38 * max(len(front), 1)), dpi=130)
    if front:
        levels = sorted({b for r in front for b in r["bits"]} | set(BIT_COLOURS))
        grid = np.array([[levels.index(b) for b in r["bits"]] for r in front])
        cmap = ListedColormap([BIT_COLOURS.get(b, "0.5") for b in levels])
        ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=len(levels) - 0.5, aspect="auto")
        if n_layers <= 40:
            for (i, j), k in np.ndenumerate(grid):
                ax.text(j, i, str(levels[k]), ha="center", va="center", fontsize=7,
                        color="white" if levels[k] >= 8 else "black")
        ax.set_yticks(range(len(front)), [f"{r['trial_id']}  {objective.name} {r[objective.name]:.4g}, {gb(r):.4g} GB" for r in front],
                      fontsize=8)
        step = max(n_layers // 16, 1)
        ax.set_xticks(range(0, n_layers, step))
        used = sorted({b for r in front for b in r["bits"]})
        handles = [Patch(facecolor=BIT_COLOURS.get(b, "0.5"), edgecolor="0.3", label=BIT_NAMES.get(b, f"{b}-bit"))
                   for b in used]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False,
                  title="bits", title_fontsize=8)
    else:
        ax.text(0.5, 0.5, "no completed trial yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
    ax.set_xlabel("decoder layer")
    ax.set_title("bits per layer on the Pareto front (rows by memory, smallest first)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# CLI.


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m qpruner.report RUN_DIR`: rebuild report.md and the plots; prints the report's path."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m qpruner.report", description="Write report.md and plots for a run.")
    parser.add_argument("run_dir", help="output folder of a qpruner.tune run (holds results.parquet)")
    parser.add_argument("--repair", action="store_true",
                        help="first repair a damaged run folder: results.parquet rebuilt from Tune's experiment state, "
                             "run.json from config.yaml, a damaged baselines.json set aside (originals kept as *.damaged)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    args = parser.parse_args(argv)
    if args.repair:
        from qpruner.runfolder import RunLock, damage, repair

        run = check_run_dir(args.run_dir)
        with RunLock(run, "run folder") as lock:  # not while a driver writes it
            lock.commit()
            lines = repair(run) if damage(run) or not (run / "results.parquet").is_file() else []
        for line in lines or ["nothing to repair"]:
            print(f"[qpruner] {line}")
    print(write_report(args.run_dir))
    return 0


if __name__ == "__main__":
    from qpruner.cli import run_cli

    run_cli(main)
