#!/usr/bin/env python3
"""Per compute segment: how far apart a job's ranks finish it, measured and predicted.

A segment is the compute between two consecutive communication calls of a
rank (the same calls on every rank of the job). For each segment the table
gives, over the ranks and the measured steps, the mean wall time and the mean
of (slowest rank - mean of the ranks): measured from `tessera-train --chrome`
files (`<case>.rN.measured.json` in a validation work directory) and
predicted from the simulator's timelines (`<case>.rN.timeline.json`, compute
between two calls without the sync waits). The trace column gives how much
the traced ranks' compute for the segment differs (slowest / fastest entry,
per-node medians; 1.00 for identical work), from `<case>.rN.trace.json`.

    scripts/sim_segment_spread.py WORK_DIR CASE_STEM [--out FILE]

e.g. `scripts/sim_segment_spread.py sim-validation moe-s_ep4`. Only jobs whose
ranks all issue every call (one group of the whole world, as expert
parallelism on one axis) are supported; other layouts are refused.
"""
import argparse
import collections
import glob
import json
import statistics
import sys


def comm_events(path):
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    ranks = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") not in ("step", "compute", "sync_wait"):
            ranks[e["pid"]].append(e)
    for r in ranks.values():
        r.sort(key=lambda e: e["ts"])
    return ranks


def measured_segments(path):
    """segment index -> list over steps of per-rank wall times (us)."""
    ranks = comm_events(path)
    world = len(ranks)
    for r in range(world):
        group = {e["args"].get("group_size") for e in ranks[r]}
        if group != {world}:
            sys.exit(f"{path}: rank {r} issues calls on groups smaller than the world")
    out = collections.defaultdict(list)
    by_step = collections.defaultdict(list)
    for k, e in enumerate(ranks[0]):
        by_step[e["args"]["step"]].append(k)
    for ks in by_step.values():
        for i in range(len(ks) - 1):
            a, b = ks[i], ks[i + 1]
            out[i].append([ranks[r][b]["ts"] - (ranks[r][a]["ts"] + ranks[r][a]["dur"])
                           for r in range(world)])
    return out, world


def predicted_segments(path, world):
    with open(path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    out = {}
    calls = {r: sorted((e for e in events if e["pid"] == r and e.get("cat") == "collective"),
                       key=lambda e: e["ts"]) for r in range(world)}
    waits = {r: [e for e in events if e["pid"] == r and e.get("cat") == "sync_wait"]
             for r in range(world)}
    for i in range(len(calls[0]) - 1):
        row = []
        for r in range(world):
            start = calls[r][i]["ts"] + calls[r][i]["dur"]
            end = calls[r][i + 1]["ts"]
            waited = sum(w["dur"] for w in waits[r]
                         if w["ts"] >= start - 1 and w["ts"] + w["dur"] <= end + 1)
            row.append(end - start - waited)
        out[i] = row
    return out


def traced_ratio(path):
    """segment index -> slowest / fastest entry's median compute."""
    with open(path) as f:
        entries = json.load(f)["ranks"]
    per_entry = []
    for e in entries:
        seg, current = [], 0.0
        for n in e["nodes"]:
            if n["kind"] == "compute":
                current += n["duration_us"]
            else:
                seg.append(current)
                current = 0.0
        per_entry.append(seg[1:])  # segments between two calls
    out = {}
    for i in range(min(len(s) for s in per_entry)):
        values = [s[i] for s in per_entry]
        out[i] = max(values) / min(values) if min(values) > 0 else float("nan")
    return out


def spread(rows):
    return statistics.mean(max(r) - statistics.mean(r) for r in rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work_dir")
    ap.add_argument("case")
    ap.add_argument("--out")
    args = ap.parse_args()
    measured_files = sorted(glob.glob(f"{args.work_dir}/{args.case}*.measured.json"))
    if not measured_files:
        sys.exit(f"no {args.case}*.measured.json in {args.work_dir}")
    measured = collections.defaultdict(list)
    predicted = collections.defaultdict(list)
    ratios = collections.defaultdict(list)
    world = 0
    for m in measured_files:
        stem = m[: -len(".measured.json")]
        segs, world = measured_segments(m)
        for i, rows in segs.items():
            measured[i] += rows
        for i, row in predicted_segments(stem + ".timeline.json", world).items():
            predicted[i].append(row)
        for i, v in traced_ratio(stem + ".trace.json").items():
            ratios[i].append(v)
    lines = [
        "| segment | traced slowest / fastest | measured mean ms | measured slowest - mean ms "
        "| predicted mean ms | predicted slowest - mean ms |",
        "|---|---|---|---|---|---|",
    ]
    sums = collections.defaultdict(float)
    for i in sorted(predicted):
        if i not in measured:
            continue
        mm = statistics.mean(statistics.mean(r) for r in measured[i]) / 1e3
        pm = statistics.mean(statistics.mean(r) for r in predicted[i]) / 1e3
        if mm < 0.5 and pm < 0.5:
            continue  # no compute between the two calls
        ms, ps = spread(measured[i]) / 1e3, spread(predicted[i]) / 1e3
        ratio = statistics.median(ratios[i]) if ratios[i] else float("nan")
        kind = "differs" if ratio > 1.15 else "same"
        sums[kind, "m"] += ms
        sums[kind, "p"] += ps
        lines.append(f"| {i + 1} | {ratio:.2f} | {mm:.2f} | {ms:.2f} | {pm:.2f} | {ps:.2f} |")
    lines.append("")
    lines.append(f"{len(measured_files)} rounds of {args.case} ({world} ranks), means over the "
                 "ranks and measured steps. Sum of (slowest - mean) over the segments whose traced "
                 f"work is the same on every rank: measured {sums['same', 'm']:.1f} ms, predicted "
                 f"{sums['same', 'p']:.1f} ms; over those whose traced work differs (slowest / "
                 f"fastest > 1.15): measured {sums['differs', 'm']:.1f} ms, predicted "
                 f"{sums['differs', 'p']:.1f} ms. Written by scripts/sim_segment_spread.py.")
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
