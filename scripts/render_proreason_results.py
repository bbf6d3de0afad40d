#!/usr/bin/env python3
"""Renders the ProReason experiment's results files as the tables of docs/proreason.md.

    scripts/render_proreason_results.py [--data data/proreason] [--update docs/proreason.md]

Reads, for every seed folder DATA/seed*/:
  stage1_training_report.json  `proreason train-vlm` from random weights
  training_report.json         `proreason train-vlm --init-from` (the final model)
  report.json                  `proreason run --report` on DATA/benchmark.json
  trace.jsonl.gz               `proreason run --trace` of that run (every model call)
and prints (or, with --update, writes between the "<!-- results:begin -->"
and "<!-- results:end -->" lines of the doc):
  1. the scene VLM's held-out perception accuracy per seed and kind, with
     the majority-answer baseline;
  2. each method's accuracy (mean and sample standard deviation over the
     seeds), unparsed answers, model calls, tokens and seconds per question;
  3. accuracy per question kind, pooled over the seeds;
  4. ProReason against each other method item by item: where it wins,
     where it loses;
  5. what ProReason's roles did, from the traces: calls per role, the
     Dispatcher answers in the asked format, the Vision Expert's questions,
     the Referee's verdicts.
Every number comes from the input files; nothing is typed here.
"""
import argparse
import glob
import gzip
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_block import replace_results_block  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["blind", "direct", "cot", "describe", "proreason"]
LABELS = {
    "blind": "blind (control: image replaced by its mean colour)",
    "direct": "direct VLM answer",
    "cot": "VLM chain of thought",
    "describe": "describe-then-reason (caption + LLM)",
    "proreason": "ProReason",
}


def pct(x):
    return f"{100 * x:.1f} %"


def mean_sd(values):
    if len(values) < 2:
        return pct(values[0]) if values else "-"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f} %"


def load(path):
    with open(path) as f:
        return json.load(f)


def render(data):
    seeds = sorted(glob.glob(os.path.join(data, "seed*")))
    if not seeds:
        sys.exit(f"render_proreason_results: no seed folders in {data}")
    out = []
    bench = load(os.path.join(data, "benchmark.json"))
    items = bench["items"] if isinstance(bench, dict) else bench
    kinds = sorted({it.get("kind", "") for it in items})

    # 1. Perception.
    out.append("**Held-out perception** (`proreason eval-vlm`: 200 scenes never used in "
               "training, 4 questions each, exact match; the baseline always gives the most "
               "frequent answer of each question kind in the same set):\n")
    pkinds = ["count", "exists", "color", "shape"]
    out.append("| seed | after stage 1 | final | majority baseline | " +
               " | ".join(pkinds) + " |")
    out.append("|---|---|---|---|" + "---|" * len(pkinds))
    finals = []
    for s in seeds:
        name = os.path.basename(s)
        first = load(os.path.join(s, "stage1_training_report.json"))["perception"]
        final = load(os.path.join(s, "training_report.json"))["perception"]
        finals.append(final["accuracy"])
        cells = []
        for k in pkinds:
            c, n = final["by_kind"].get(k, [0, 0])
            cells.append(f"{c}/{n}")
        out.append(f"| {name} | {pct(first['accuracy'])} | {pct(final['accuracy'])} | "
                   f"{pct(final['majority_baseline'])} | " + " | ".join(cells) + " |")
    out.append(f"\nFinal models: {mean_sd(finals)} over {len(seeds)} seeds.\n")

    # 2. Methods.
    reports = [load(os.path.join(s, "report.json")) for s in seeds]
    out.append(f"**The four methods** on the held-out reasoning set ({len(items)} questions, "
               f"4 options each: chance 25 %), vision expert = the seed's scene VLM, text LLM = "
               f"{reports[0]['llm']}; mean ± standard deviation over {len(seeds)} seeds; cost per "
               "question summed over every model call:\n")
    out.append("| method | accuracy | unparsed | model calls | tokens | seconds |")
    out.append("|---|---|---|---|---|---|")
    for m in METHODS:
        rows = [r["methods"][m] for r in reports if m in r.get("methods", {})]
        if not rows:
            continue
        acc = [x["accuracy"] for x in rows]
        unparsed = statistics.mean(x["unparsed"] / x["questions"] for x in rows)
        calls = statistics.mean(x["calls_per_question"] for x in rows)
        tokens = statistics.mean(x["tokens_per_question"] for x in rows)
        secs = statistics.mean(x["seconds_per_question"] for x in rows)
        out.append(f"| {LABELS[m]} | {mean_sd(acc)} | {pct(unparsed)} | {calls:.2f} | "
                   f"{tokens:.0f} | {secs:.2f} |")
    out.append("")

    # 3. Per kind, pooled.
    kind_of = {it["id"]: it.get("kind", "") for it in items}
    out.append("**Accuracy per question kind** (pooled over the seeds; correct / asked):\n")
    out.append("| method | " + " | ".join(kinds) + " |")
    out.append("|---|" + "---|" * len(kinds))
    for m in METHODS:
        counts = {k: [0, 0] for k in kinds}
        for r in reports:
            for o in r.get("outcomes", []):
                if o["method"] == m:
                    k = kind_of.get(o["id"], "")
                    counts[k][0] += int(o["correct"])
                    counts[k][1] += 1
        if not any(n for _, n in counts.values()):
            continue
        out.append(f"| {m} | " + " | ".join(f"{c}/{n}" for c, n in counts.values()) + " |")
    out.append("")

    # 4. Item by item.
    out.append("**ProReason item by item** against each method (pooled over the seeds: "
               "ProReason right and the other wrong = win, the reverse = loss):\n")
    out.append("| against | wins | losses | both right | both wrong |")
    out.append("|---|---|---|---|---|")
    for m in METHODS:
        if m == "proreason":
            continue
        w = l = br = bw = 0
        for r in reports:
            pr = {o["id"]: o["correct"] for o in r.get("outcomes", []) if o["method"] == "proreason"}
            ot = {o["id"]: o["correct"] for o in r.get("outcomes", []) if o["method"] == m}
            for i in pr.keys() & ot.keys():
                a, b = pr[i], ot[i]
                w += a and not b
                l += b and not a
                br += a and b
                bw += not a and not b
        if w + l + br + bw:
            out.append(f"| {m} | {w} | {l} | {br} | {bw} |")
    out.append("")

    # 5. Roles, from the traces.
    calls = {}
    dispatch_ok = dispatch_n = describe = vision_n = yes = referee_n = 0
    questions = 0
    for s in seeds:
        with gzip.open(os.path.join(s, "trace.jsonl.gz"), "rt") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        rows = [r for r in rows if r["method"] == "proreason"]
        questions += len({r["question_id"] for r in rows})
        for r in rows:
            calls[r["role"]] = calls.get(r["role"], 0) + 1
            answer = r["answer"].strip().lower()
            if r["role"] == "dispatcher":
                dispatch_n += 1
                dispatch_ok += answer.startswith(("vision:", "vision expert:", "insight"))
            elif r["role"] == "vision":
                vision_n += 1
                describe += r["prompt"].strip() == "Describe the image."
            elif r["role"] == "referee":
                referee_n += 1
                yes += answer.startswith("yes")
    if questions:
        per = ", ".join(f"{role} {n / questions:.2f}" for role, n in sorted(calls.items()))
        out.append(f"**What ProReason's roles did** (from the traces, {questions} question runs): "
                   f"calls per question: {per}. Dispatcher answers in the asked format "
                   f"(starting with `VISION:` or `INSIGHT`): {dispatch_ok} of {dispatch_n}. "
                   f"Vision Expert calls that were the fallback \"Describe the image.\": "
                   f"{describe} of {vision_n}. Referee verdicts \"yes\": {yes} of {referee_n}.\n")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.path.join(ROOT, "data", "proreason"))
    ap.add_argument("--update", help="write the tables into this Markdown file")
    args = ap.parse_args()
    text = render(args.data)
    if not args.update:
        print(text)
        return
    replace_results_block(args.update, text)


if __name__ == "__main__":
    main()
