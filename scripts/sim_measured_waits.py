#!/usr/bin/env python3
"""Compares what a collective costs inside a real training step with what
the collective calibration measured, as a Markdown table.

    scripts/sim_measured_waits.py LABEL=MEASURED.json[:BENCH.json[,BENCH.json]] ...

(the last "=" ends the label)

MEASURED.json is the Chrome trace `tessera-train --timings t.json --chrome
MEASURED.json` writes. The operations of one group (args.group, group_size)
are matched by their order on that group within a step: the k-th operation
of every member is one collective. Per operation kind (group size, bytes),
medians over the steps and groups of:

  mean wait   each member's time from issue to completion, averaged over
              the members (what `calibrate collectives --compute-ms`
              times per call);
  skew        last member's issue minus the first's;
  after last  the last-arriving member's time from issue to completion
              (the transfer once everybody is there).

Each BENCH.json (`tessera-sim calibrate collectives` output) adds the
calibration's time for the same op, group size and bytes where it measured
one. Operations with group size 1 are left out.
"""
import json
import statistics
import sys
from collections import defaultdict


def kinds(path):
    events = json.load(open(path))["traceEvents"]
    ops = [e for e in events if e.get("ph") == "X" and e.get("cat") == "communication"]
    by_member = defaultdict(list)  # (step, group, size, rank) -> events in issue order
    for e in ops:
        a = e["args"]
        if a["group_size"] < 2:
            continue
        by_member[(a["step"], a["group"], a["group_size"], e["pid"])].append(e)
    by_group = defaultdict(dict)
    for (step, group, size, rank), evs in by_member.items():
        by_group[(step, group, size)][rank] = sorted(evs, key=lambda e: e["ts"])
    out = defaultdict(list)  # (op, size, bytes) -> [(mean wait, skew, after last)] in ms
    for (step, group, size), members in by_group.items():
        if len(members) != size:
            continue
        count = min(len(v) for v in members.values())
        for k in range(count):
            call = [v[k] for v in members.values()]
            if len({(e["name"], e["args"]["bytes"]) for e in call}) != 1:
                continue  # not one collective: the order differs between members
            first = min(e["ts"] for e in call)
            last = max(call, key=lambda e: e["ts"])
            out[(call[0]["name"], size, call[0]["args"]["bytes"])].append(
                (statistics.mean(e["dur"] for e in call) / 1e3, (last["ts"] - first) / 1e3,
                 last["dur"] / 1e3))
    return out


def bench(paths):
    table = {}
    for path in paths:
        for r in json.load(open(path))["results"]:
            table[(r["op"], r["ranks"], r["bytes"])] = r["seconds"] * 1e3
    return table


def main(args):
    if not args:
        sys.exit(__doc__)
    print("| job | op | group size | bytes | calls | mean wait ms | skew ms | after last ms | "
          "calibration ms |")
    print("|---" * 9 + "|")
    for arg in args:
        label, _, rest = arg.rpartition("=")  # labels may hold "=", paths not
        measured, _, benches = rest.partition(":")
        calibration = bench(benches.split(",")) if benches else {}
        for (op, size, nbytes), rows in sorted(kinds(measured).items()):
            med = [statistics.median(col) for col in zip(*rows)]
            cal = calibration.get((op, size, nbytes))
            cal_text = f"{cal:.2f}" if cal is not None else "-"
            print(f"| {label} | {op} | {size} | {nbytes} | {len(rows)} | {med[0]:.2f} | "
                  f"{med[1]:.2f} | {med[2]:.2f} | {cal_text} |")
    print("\nMedians over the measured steps and groups; written by "
          "scripts/sim_measured_waits.py.")


if __name__ == "__main__":
    main(sys.argv[1:])
