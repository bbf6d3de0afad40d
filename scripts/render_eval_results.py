#!/usr/bin/env python3
"""Renders tessera-eval results JSON files as the Markdown tables of docs/eval.md.

    scripts/render_eval_results.py RESULTS.json... [--reported FILE] [--update DOC]

Prints (or, with --update, writes between the "<!-- results:begin -->" and
"<!-- results:end -->" lines of DOC):
  1. every task's scores from the results files, with the number of documents,
     the limits and the time per item the runs recorded;
  2. the headline scores in the units of the Yue-Benchmark paper next to the
     scores its authors report for other models (--reported, default
     data/eval/yue_benchmark_reported.json), in a separate table labelled as
     theirs;
  3. the Cantonese / English comparison: translation into Cantonese against
     translation into English of the same paragraphs, and the authors' own
     GSM8K English / Cantonese pairs.
Every number comes from the input files; nothing is typed here.
"""
import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_block import replace_results_block  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Benchmark set of a task name, in the order the paper lists them.
SETS = [
    ("yue_truthfulqa", "Yue-TruthfulQA"),
    ("yue_gsm8k", "Yue-GSM8K"),
    ("yue_arc_c", "Yue-ARC-C"),
    ("yue_mmlu", "Yue-MMLU"),
    ("yue_trans", "Yue-TRANS"),
]


def set_of(task):
    for prefix, name in SETS:
        if task.startswith(prefix):
            return name
    return "other"


def shots_of(task):
    m = re.search(r"_(\d+)shot$", task)
    return int(m.group(1)) if m else 0


def base_of(task):
    return re.sub(r"_\d+shot$", "", task)


def load_runs(paths):
    """Per task: its scores, run facts and timing, from every results file."""
    tasks = {}
    for path in paths:
        with open(path) as f:
            r = json.load(f)
        config = r.get("config", {})
        for task, scores in r["results"].items():
            tasks[task] = {
                "scores": scores,
                "n": r["n-samples"][task]["effective"],
                "total": r["n-samples"][task]["original"],
                "shots": r["n-shot"][task],
                "timing": r.get("timing", {}).get(task, {}),
                "max_gen_toks": config.get("max_gen_toks", 0),
                "backend": config.get("backend", ""),
                "file": os.path.basename(path),
            }
    return tasks


def metric_rows(scores):
    """(metric, filter, value, stderr) in name order."""
    rows = []
    for key, value in scores.items():
        if key == "alias" or "_stderr," in key:
            continue
        metric, _, flt = key.partition(",")
        stderr = scores.get(f"{metric}_stderr,{flt}", "N/A")
        rows.append((metric, flt, value, stderr))
    return sorted(rows)


def fmt(v, digits=4):
    return "N/A" if not isinstance(v, (int, float)) else f"{v:.{digits}f}"


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def all_scores(tasks):
    rows = []
    order = {name: i for i, (_, name) in enumerate(SETS)}
    for task in sorted(tasks, key=lambda t: (order.get(set_of(t), 99), base_of(t), shots_of(t))):
        t = tasks[task]
        timing = t["timing"]
        per_item = timing.get("seconds_per_item")
        rate = timing.get("items_per_second")
        cap = t["max_gen_toks"]
        generated = any(m in ("exact_match", "bleu", "rouge_l") for m, *_ in metric_rows(t["scores"]))
        for i, (metric, flt, value, stderr) in enumerate(metric_rows(t["scores"])):
            first = i == 0
            rows.append([
                task if first else "",
                t["shots"] if first else "",
                f"{t['n']} / {t['total']}" if first else "",
                flt, metric, fmt(value), fmt(stderr),
                (f"{per_item:.2f}" if per_item else "resumed") if first else "",
                (f"{rate:.3f}" if rate else "") if first else "",
                (cap if cap else "task's") if first and generated else "",
            ])
    return table(["task", "n-shot", "documents", "filter", "metric", "value", "stderr",
                  "s/item", "items/s", "max new tokens"], rows)


def score(tasks, task, metric_filter, scale=100.0):
    t = tasks.get(task)
    if not t or metric_filter not in t["scores"]:
        return None
    return t["scores"][metric_filter] * scale


def cell(v):
    return "—" if v is None else f"{v:.2f}"


def headline(tasks):
    """Ours in the paper's units: (label, 0-shot, 5-shot)."""
    def pair(base, key, scale=100.0):
        return [score(tasks, f"{base}_{k}shot", key, scale) for k in (0, 5)]

    return [
        ("Yue-TruthfulQA ROUGE-L", pair("yue_truthfulqa", "rouge_l,none", 1.0)),
        ("Yue-TruthfulQA BLEU-4", pair("yue_truthfulqa", "bleu,none", 1.0)),
        ("Yue-GSM8K accuracy", pair("yue_gsm8k", "exact_match,yue-extract")),
        ("Yue-ARC-C accuracy (letter)", pair("yue_arc_c_gen", "exact_match,choice-letter")),
        ("Yue-ARC-C accuracy (log-likelihood)", pair("yue_arc_c_mc", "acc,none")),
        ("Yue-MMLU accuracy (letter)", pair("yue_mmlu_gen", "exact_match,choice-letter")),
        ("Yue-MMLU accuracy (log-likelihood)", pair("yue_mmlu_mc", "acc,none")),
    ]


def ours_table(tasks):
    rows = []
    for label, (zero, five) in headline(tasks):
        rows.append([label, cell(zero), cell(five)])
    return table(["SmolLM2-135M-Instruct, Tessera (this page's runs)", "0-shot", "5-shot"], rows)


def reported_table(reported):
    rows = []
    for model, r in reported["models"].items():
        cm = [sum(c) / len(c) for c in r["cmmlu"]]
        rows.append([
            model,
            f"{r['truthfulqa']['rouge_l'][0]:.2f} / {r['truthfulqa']['rouge_l'][1]:.2f}",
            f"{r['truthfulqa']['bleu'][0]:.2f} / {r['truthfulqa']['bleu'][1]:.2f}",
            f"{r['gsm8k'][0]:.2f} / {r['gsm8k'][1]:.2f}",
            f"{r['arc_c'][0]:.2f} / {r['arc_c'][1]:.2f}",
            f"{cm[0]:.2f} / {cm[1]:.2f}",
        ])
    return table(["model (reported by the Yue-Benchmark authors)", "TruthfulQA ROUGE-L",
                  "TruthfulQA BLEU-4", "GSM8K acc.", "ARC-C acc.", "CMMLU acc. (mean of 5 categories)"],
                 rows)


def gap_table(tasks):
    rows = []
    for k in (0, 5):
        yue = [score(tasks, f"yue_trans_en_yue_{k}shot", m, 1.0) for m in ("bleu,none", "rouge_l,none")]
        zh = [score(tasks, f"yue_trans_zh_yue_{k}shot", m, 1.0) for m in ("bleu,none", "rouge_l,none")]
        en = [score(tasks, f"yue_trans_yue_en_{k}shot", m, 1.0) for m in ("bleu,none", "rouge_l,none")]
        rows.append([k, cell(yue[0]), cell(yue[1]), cell(zh[0]), cell(zh[1]), cell(en[0]), cell(en[1])])
    return table(["n-shot", "en→yue BLEU", "en→yue ROUGE-L", "zh→yue BLEU", "zh→yue ROUGE-L",
                  "yue→en BLEU", "yue→en ROUGE-L"], rows)


def reported_gap_table(reported):
    rows = []
    for model, r in reported["models"].items():
        rows.append([model, f"{r['gsm8k_english'][0]:.2f}", f"{r['gsm8k'][0]:.2f}",
                     f"{r['gsm8k_english'][1]:.2f}", f"{r['gsm8k'][1]:.2f}"])
    return table(["model (reported by the Yue-Benchmark authors)", "GSM8K English 0-shot",
                  "Yue-GSM8K 0-shot", "GSM8K English 5-shot", "Yue-GSM8K 5-shot"], rows)


def run_facts(tasks):
    backends = sorted({t["backend"] for t in tasks.values() if t["backend"]})
    files = sorted({t["file"] for t in tasks.values()})
    seconds = sum(t["timing"].get("seconds", 0) for t in tasks.values())
    lines = [f"Runs: {', '.join(files)}; backend: {'; '.join(backends)}.",
             f"Compute for the documents evaluated in these runs: {seconds / 60:.1f} minutes."]
    return "\n".join(lines)


def render(tasks, reported):
    return "\n\n".join([
        "### Every task (SmolLM2-135M-Instruct, measured here)",
        run_facts(tasks),
        all_scores(tasks),
        "### In the paper's units",
        "Percentages (accuracy x 100); BLEU and ROUGE-L as the harness reports them "
        "(0–100). Our runs are limited samples (see the documents column above).",
        ours_table(tasks),
        "### Reported by the Yue-Benchmark authors for other models (their numbers)",
        f"Source: {reported['sources']['leaderboard']}. {reported['about']} "
        "Each cell is 0-shot / 5-shot.",
        reported_table(reported),
        "### Cantonese against English",
        "Translation of the same Yue-TRANS paragraphs into Cantonese and into "
        "English by SmolLM2-135M-Instruct (measured here; as many paragraphs as the "
        "documents column above says):",
        gap_table(tasks),
        f"The authors' English and Cantonese GSM8K for other models (their numbers; "
        f"source: {reported['sources']['gsm8k_english']}):",
        reported_gap_table(reported),
    ])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="tessera-eval results JSON files")
    p.add_argument("--reported", default=os.path.join(ROOT, "data/eval/yue_benchmark_reported.json"))
    p.add_argument("--update", help="Markdown file whose results block is replaced")
    a = p.parse_args()
    with open(a.reported) as f:
        reported = json.load(f)
    text = render(load_runs(a.results), reported)
    if not a.update:
        print(text)
        return 0
    replace_results_block(a.update, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
