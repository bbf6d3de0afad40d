#!/usr/bin/env python3
"""Prints, as a Markdown table, how much the measured step time of each
validation case moved between runs of `tessera-sim validate` on the same
machine: the median step of each run, the spread (largest / smallest - 1)
and each run's prediction error.

    scripts/sim_validation_spread.py data/sim/results/runs/validation_report_{a,b,c,d,e,f,g}.json

A report named validation_report_X.json is labelled run X, one given as
X=PATH too; others take the letters a, b, ... in the order given.
"""
import json
import os
import re
import sys


def split(arg, index):
    """(label, path) of one argument: X=PATH, or PATH with its letter."""
    m = re.match(r"^([a-z])=(.*)$", arg)
    if m:
        return m.group(1), m.group(2)
    m = re.search(r"_([a-z])\.json$", os.path.basename(arg))
    return (m.group(1) if m else chr(ord("a") + index)), arg


def main(args):
    letters, paths = zip(*(split(a, i) for i, a in enumerate(args)))
    runs = [json.load(open(p))["rows"] for p in paths]
    names = [r["name"] for r in runs[0]]
    for rows in runs[1:]:
        if [r["name"] for r in rows] != names:
            sys.exit("sim_validation_spread.py: the reports hold different cases")
    print("| case | " + " | ".join(f"measured ms, run {x}" for x in letters) +
          " | spread | " + " | ".join(f"error, run {x}" for x in letters) + " |")
    print("|---" * (2 + 2 * len(runs)) + "|")
    spreads = []
    for i, name in enumerate(names):
        measured = [rows[i]["measured_s"] * 1e3 for rows in runs]
        spread = max(measured) / min(measured) - 1
        spreads.append(spread)
        errors = [rows[i]["error"] * 100 for rows in runs]
        print(f"| {name} | " + " | ".join(f"{m:.1f}" for m in measured) +
              f" | {100 * spread:.1f} % | " + " | ".join(f"{e:+.1f} %" for e in errors) + " |")
    spreads.sort()
    n = len(spreads)
    median = spreads[n // 2] if n % 2 else 0.5 * (spreads[n // 2 - 1] + spreads[n // 2])
    print(f"\nSpread of the measured median step between runs: median {100 * median:.1f} %, "
          f"max {100 * spreads[-1]:.1f} %")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1:])
