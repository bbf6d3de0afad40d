#!/usr/bin/env python3
"""What the proposer's valid questions look like, round by round.

    scripts/reversegen_question_stats.py WORK_DIR [ROUNDS]

Reads WORK_DIR/round_r/labels.jsonl (written by examples/reversegen) for
r = 0..ROUNDS (default 3) and prints a Markdown table: valid questions,
mean operand count, and the shares with a number above 50, a negative
answer, and a multiplication or division.
"""
import json
import re
import sys


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    work_dir = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    print("| proposer | valid | mean operands | number > 50 | negative answer | * or / |")
    print("|---|---|---|---|---|---|")
    for r in range(rounds + 1):
        with open(f"{work_dir}/round_{r}/labels.jsonl") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        valid = [x for x in rows if x["valid"]]
        n = len(valid)
        if n == 0:
            print(f"| {r} | 0 | - | - | - | - |")
            continue
        # "reason" is "expression: <the expression the verifier read>".
        numbers = [re.findall(r"\d+(?:\.\d+)?", x["reason"]) for x in valid]
        operands = sum(len(ns) for ns in numbers) / n
        big = sum(any(float(v) > 50 for v in ns) for ns in numbers) / n
        negative = sum(x["reference"].startswith("-") for x in valid) / n
        muldiv = sum(("*" in x["reason"] or "/" in x["reason"]) for x in valid) / n
        print(f"| {r} | {n} | {operands:.2f} | {big:.2f} | {negative:.2f} | {muldiv:.2f} |")


if __name__ == "__main__":
    main()
