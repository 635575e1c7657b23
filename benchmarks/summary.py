"""The latest results as one Markdown table: `python -m benchmarks.summary` rewrites the block between
the results markers in benchmarks/README.md (and prints it), so the table never drifts from the JSON."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.common import RESULTS

README = Path(__file__).resolve().parent / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
SMOL_START, SMOL_END = "<!-- smollm2:start -->", "<!-- smollm2:end -->"


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def pm(stat: dict, digits: int = 3) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def machine(result: dict) -> str:
    m = result["machine"]
    return f"{m.get('gpu') or str(m['cpu_count']) + ' CPU cores'}, {result['date'][:10]}"


def paper_rows(r: dict) -> list[str]:
    rows = []
    for study in r["ratios"]:
        arms = study["arms"]
        base = arms["LoRA uniform-16"]
        cells = ", ".join(f"{name} {pm(a['accuracy'])} ({a['weight_bytes'] / base['weight_bytes']:.2f}x weights)"
                          for name, a in arms.items())
        rows.append(f"| 1. paper comparison, {study['ratio']:.0%} pruned (tiny, {len(r['seeds'])} seeds) | {cells} | {machine(r)} |")
        mem = study["llama7b_memory"]
        rows.append(f"| 1. same patterns priced on LLaMA-7B at {study['ratio']:.0%} (shapes only, est. peak, mb 4 x 256) | "
                    + ", ".join(f"{k}: weights {v['weights_gb']:.2f} GiB, peak {v['peak_estimate_gb']:.2f} GiB" for k, v in mem.items())
                    + f"; paper: LoRA-16 {r['paper']['lora16_gb']} GB, LoftQ-4 {r['paper']['loftq4_gb']} GB | analytic |")
    return rows


def search_rows(r: dict) -> list[str]:
    arms = r["arms"]
    cells = ", ".join(f"{name}: {a['fraction_of_best_hv']['mean']:.3f} of best hv in {a['trial_compute_s']['mean'] / 60:.1f} min"
                      f" (ASHA saved {a['asha_steps_saved']['mean']:.0f} steps)" if "ASHA" in name else
                      f"{name}: {a['fraction_of_best_hv']['mean']:.3f} of best hv in {a['trial_compute_s']['mean'] / 60:.1f} min"
                      for name, a in arms.items())

    def claims(arm: str, bound: str) -> str:
        return "; ".join(f"{k}: {'yes' if v[bound] else 'no'} (fractions {[None if f is None else round(f, 2) for f in v['fraction']]})"
                         for k, v in r["claims"].items() if k.startswith(arm))

    table = r.get("sensitivity_table") or {}
    rows = [f"| 2. search efficiency ({r['trials_per_search']} trials, {r['seeds']} seeds, replay of all 64 tiny configs) | {cells} | {machine(r)} |",
            f"| 2. claim: importance+GP reaches random-init+GP's final hypervolume in <= half the compute | "
            f"{claims('importance+GP', 'at_most_half')} | {machine(r)} |"]
    if any(k.startswith("model sampler") for k in r["claims"]):
        rows.append(f"| 2b. claim: the model sampler (sensitivity table {table.get('table_s', 0):.1f} s beside a "
                    f"{table.get('trial_s', 0):.1f} s trial, charged) reaches random-init+GP's final hypervolume in <= 1/3 of its "
                    f"compute | {claims('model sampler', 'at_most_third')} | {machine(r)} |")
    return rows


def overhead_rows(r: dict) -> list[str]:
    o, p, c, lq = r["orchestration"], r["packing"], r["prune_once"], r["loftq_cache"]
    s = r["suggestion_cost"]
    return [
        f"| 3. orchestration overhead (goal <= 5%) | {o['overhead_fraction_of_span']:.1%} of the trials' span "
        f"({o['per_trial_overhead_s']:.1f} s per trial of {o['median_trial_s']:.0f} s); "
        f"{o['overhead_fraction_of_cli_run']:.1%} of the whole CLI run (Ray start, prune, importance included) | {machine(r)} |",
        "| 3. packing: trials/hour per device | " + ", ".join(f"{k}: {v['trials_per_hour']:.0f}" for k, v in p.items()) + f" | {machine(r)} |",
        f"| 3. prune once | prune task {c['prune_task_s']:.1f} s = {c['fraction_of_search']:.1%} of the search; "
        f"second run {c['second_run_prune_s']:.2f} s (cache hit) | {machine(r)} |",
        f"| 3. LoftQ cache | first trial {lq['first_trial_loftq_s']:.2f} s; later trials "
        f"{', '.join(f'{x:.2f}' for x in lq['later_trials_loftq_s'])} s | {machine(r)} |",
        f"| 3. search cost per suggestion (32 layers, 40 trials) | GP {s['gp']['seconds_median']:.2f} s / {s['gp']['peak_mb_median']:.1f} MB, "
        f"TPE {s['tpe']['seconds_median']:.3f} s / {s['tpe']['peak_mb_median']:.1f} MB (paper's GP: 7 s, 187 MB) | {machine(r)} |",
    ]


def seed_rows(r: dict) -> list[str]:
    p = r["pruning_30pct"]
    cells = "; ".join(f"{m}: ppl {v['heldout_ppl_no_finetune']:.3f}, acc {v['accuracy_no_finetune']:.3f} before / "
                      f"u4 {pm(v['uniform-4 after recovery'])}, u8 {pm(v['uniform-8 after recovery'])} after, prune {v['prune_seconds']:.1f} s"
                      for m, v in p.items())
    ranks = "; ".join(f"{k}: hv {pm(v['hypervolume_acc_x_mib'], 4)}, best acc {pm(v['best_accuracy'])}" for k, v in r["ranks"]["arms"].items())
    return [f"| 5. SlimGPT vs Taylor, 30% (tiny) | {cells} | {machine(r)} |",
            f"| 5. searched ranks [4, 8, 16] vs fixed rank 8 (tiny, 8-trial searches) | {ranks} | {machine(r)} |"]


def gpu_rows(r: dict) -> list[str]:
    if "skipped" in r:
        return [f"| 4. GPU memory, LLaMA-7B shape at 20% | not run: {r['skipped']} | {machine(r)} |"]
    cells = ", ".join(f"{k}: peak {v['peak_gb']:.2f} GB, step {v['step_s']:.2f} s, {v['trials_per_gpu']} per GPU" for k, v in r["results"].items())
    return [f"| 4. GPU memory, LLaMA-7B shape at 20% | {cells}; paper {r['paper_gb']} | {machine(r)} |"]


PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
SHORT = {"boolq": "BoolQ", "piqa": "PIQA", "hellaswag": "HellaS.", "winogrande": "WinoG.", "arc_easy": "ARC-e",
         "arc_challenge": "ARC-c", "openbookqa": "OBQA"}


def paper_metric(task: str, score: dict) -> tuple[float, float | None]:
    """(value, stderr) of the metric the papers report for this task (acc_norm for HellaSwag, ARC, OBQA, PIQA)."""
    from qpruner.evaluate import task_metric

    metric = task_metric(task, "paper", score)
    return score[metric], score.get(f"{metric}_stderr")


def task_cells(zs: dict) -> str:
    cells = [f"{paper_metric(t, zs['tasks'][t])[0]:.3f}" for t in PAPER_TASKS]
    return " | ".join(cells) + f" | **{zs['mean']:.3f}** ± {zs['mean_stderr']:.3f}"


def zero_shot_table(cells: dict) -> list[str]:
    """One row per cell that has zero-shot scores: per-task paper metric, mean ± se, perplexity, memory."""
    head = " | ".join(SHORT[t] for t in PAPER_TASKS)
    out = [f"| row | {head} | mean ± se | WikiText-2 ppl | weights MiB | fine-tune peak GiB (est.) |",
           "| --- |" + " --- |" * (len(PAPER_TASKS) + 4)]
    for name, c in cells.items():
        if "tasks" not in c:
            continue
        peak = c.get("peak_measured_bytes") or c.get("peak_estimate_bytes")
        weights = c.get("weight_bytes")
        source = c.get("copied_from", "").partition(": ")[2]  # "file: cell" of a reused measurement
        same = f" (= {source})" if source and source != name else ""
        out.append(f"| {name}{same} | {task_cells(c)} | {c['wikitext2_ppl']:.1f} | {'-' if weights is None else f'{weights / 2**20:.0f}'} | "
                   f"{'-' if peak is None else f'{peak / 2**30:.2f}'} |")
    return out + [""]


def budget(r: dict) -> str:
    s = r["settings"]
    return (f"first {s['limit']} documents per task, {s['steps']} LoRA steps x 8 Alpaca records, WikiText-2 "
            f"{s['ppl_windows']}; {machine(r)}")


def search_line(search: dict) -> list[str]:
    """What the Table 1 search tried and kept."""
    eights = lambda bits: sum(b == 8 for b in bits)  # noqa: E731
    tried = ", ".join(f"{eights(t['bits'])}x8 {t['status'].lower()}" + (f" {t['accuracy']:.3f}" if t["accuracy"] is not None else "")
                      for t in search["trials"])
    return [f"Search: {len(search['trials'])} trials (TPE after importance init, ASHA; each scored on "
            f"{search['search_docs']}) in {search['seconds'] / 60:.0f} min; trials as "
            f"8-bit layers of 30, status, mean accuracy: {tried}; front: {[eights(b) for b in search['front']]} 8-bit layers.", ""]


def arm_order(key: str) -> tuple:
    """Pruner rows in a fixed order whatever order processes stored them: taylor, slimgpt, random seeds; before, after."""
    arm = key.split(":")[0]
    return (("taylor", "slimgpt").index(arm) if arm in ("taylor", "slimgpt") else 2, arm, "after" in key)


def smollm2_tables() -> str:
    """The SmolLM2-135M tables (Table 1 per ratio, ablations, pruners, APT)."""
    head = " | ".join(SHORT[t] for t in PAPER_TASKS)
    out = []
    for ratio in (20, 50):
        r = load(f"smollm2_table1_{ratio}")
        if not r:
            out += [f"Table 1 at {ratio}%: not run yet.", ""]
            continue
        pruned = r["cells"].get("pruned") or {}
        count = lambda k, pruned=pruned: f"{pruned[k]:,}" if k in pruned else "?"  # noqa: E731
        out += [f"**Table 1, {ratio}% pruned** ({count('params_after')} parameters left of {count('params_before')}; "
                f"{budget(r)})", "", *zero_shot_table(r["cells"])]
        if "search" in r["cells"]:
            out += search_line(r["cells"]["search"])
    for name, title in (("smollm2_ablations", "Ablations at 20% (Taylor), uniform 4 bits unless named"),
                        ("smollm2_pruners", "Pruners at 20%, before and after recovery (uniform 4-bit LoftQ)")):
        r = load(name)
        if r:
            cells = dict(sorted(r["cells"].items(), key=lambda kv: arm_order(kv[0]))) if name == "smollm2_pruners" else r["cells"]
            out += [f"**{title}** ({budget(r)})", "", *zero_shot_table(cells)]
    r = load("apt_sparsity")
    if r:
        out += [f"**Post-training sparsity, no retraining** (first {r['zero_shot']['limit']} documents per task; WikiText-2 "
                f"{r['perplexity']['chunks']} x {r['perplexity']['window']} tokens; calibration {r['calibration']['n_samples']} x "
                f"{r['calibration']['seq_len']} tokens of gutenberg 1342; {machine(r)})", "",
                f"| method | sparsity | {head} | mean ± se | WikiText-2 ppl | prune s/layer |",
                "| --- | --- |" + " --- |" * (len(PAPER_TASKS) + 3)]
        for c in r["cells"].values():
            spl = c.get("seconds_per_layer")
            out.append(f"| {c['method']} | {c['sparsity']} | {task_cells(c['zero_shot'])} | {c['wikitext2_ppl']:.1f} | "
                       f"{'-' if spl is None else f'{spl:.1f}'} |")
        out.append("")
    return "\n".join(out)


def table() -> str:
    lines = ["| study | result | machine, date |", "| --- | --- | --- |"]
    for name, rows in (("paper_comparison", paper_rows), ("search_efficiency", search_rows), ("overheads", overhead_rows),
                       ("gpu_memory", gpu_rows), ("seed_methods", seed_rows)):
        result = load(name)
        lines += rows(result) if result else [f"| {name} | not run yet | |"]
    return "\n".join(lines)


def main() -> None:
    readme = README.read_text()
    for (start, end), text in (((START, END), table()), ((SMOL_START, SMOL_END), smollm2_tables())):
        print(text)
        if start in readme and end in readme:
            head, rest = readme.split(start, 1)
            readme = head + start + "\n" + text + "\n" + end + rest.split(end, 1)[1]
    README.write_text(readme)


if __name__ == "__main__":
    main()
