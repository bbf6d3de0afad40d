#!/usr/bin/env python3
"""Estimates, from reports of `tessera-sim validate`, the errors that the
round-to-round noise of this machine alone produces: what a model without
any bias would score on the same measurements.

    scripts/sim_validation_noise.py [--draws N] [--seed S] REPORT.json ...

For each case of a report, every round gives a measured and a predicted
step (rows[].round_measured_s, round_predicted_s). In log space each is
taken relative to the case's mean over the rounds, which removes any bias
of the model and keeps only how the rounds scatter; the scatter (standard
deviation of measured and of predicted, and their correlation through the
host's speed) is pooled over the cases of the report. A draw gives every
case as many fresh rounds from a normal distribution with that scatter and
scores median(predicted) / median(measured) - 1 per case as `validate`
does; the median and max |error| over the cases are recorded. The table
gives their quantiles over the draws and how often the targets (median
<= 5 %, max <= 12 %) hold: what an unbiased model would score on this
machine with this many rounds. Pooling gives the quieter cases the
noisier ones' scatter and the reverse; rounds are drawn independently per
case (a round's speed shared by all cases is not modelled).

A report named validation_report_X.json is labelled run X, one given as
X=PATH too; others by their file name.
"""
import argparse
import json
import math
import os
import random
import re


def label(arg):
    m = re.match(r"^([a-z_]+)=(.*)$", arg)
    if m:
        return m.group(1), m.group(2)
    m = re.search(r"^validation_report_(.+)\.json$", os.path.basename(arg))
    return (m.group(1) if m else os.path.basename(arg)), arg


def median(values):
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def quantile(sorted_values, q):
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def noise_of(rows, draws, rng):
    # Per case, each round's log step minus the case's mean over rounds; the
    # rounds' scatter pooled over the cases (n - 1 degrees of freedom each).
    smm = spp = smp = 0.0
    dof = 0
    n_rounds = len(rows[0]["round_measured_s"])
    for r in rows:
        m = [math.log(x) for x in r["round_measured_s"]]
        p = [math.log(x) for x in r["round_predicted_s"]]
        if len(m) != n_rounds or len(p) != n_rounds or n_rounds < 2:
            raise SystemExit(f"sim_validation_noise.py: case {r['name']}: needs the same "
                             "number (two or more) of measured and predicted rounds as the others")
        cm, cp = sum(m) / len(m), sum(p) / len(p)
        smm += sum((a - cm) ** 2 for a in m)
        spp += sum((b - cp) ** 2 for b in p)
        smp += sum((a - cm) * (b - cp) for a, b in zip(m, p))
        dof += len(m) - 1
    sd_m, sd_p = math.sqrt(smm / dof), math.sqrt(spp / dof)
    rho = smp / dof / (sd_m * sd_p)
    medians, maxima = [], []
    for _ in range(draws):
        errors = []
        for _case in rows:
            ms, ps = [], []
            for _round in range(n_rounds):
                z1, z2 = rng.gauss(0, 1), rng.gauss(0, 1)
                ms.append(sd_m * z1)
                ps.append(sd_p * (rho * z1 + math.sqrt(1 - rho * rho) * z2))
            errors.append(abs(math.exp(median(ps) - median(ms)) - 1))
        medians.append(median(errors))
        maxima.append(max(errors))
    medians.sort()
    maxima.sort()
    return {
        "cases": len(rows),
        "rounds": n_rounds,
        "sd_m": sd_m,
        "sd_p": sd_p,
        "rho": rho,
        "median": [quantile(medians, q) for q in (0.1, 0.5, 0.9)],
        "max": [quantile(maxima, q) for q in (0.1, 0.5, 0.9)],
        "p_median": sum(x <= 0.05 for x in medians) / draws,
        "p_max": sum(x <= 0.12 for x in maxima) / draws,
        "p_both": sum(a <= 0.05 and b <= 0.12 for a, b in zip(medians, maxima)) / draws,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+")
    parser.add_argument("--draws", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    print("| run | cases x rounds | round-to-round scatter, measured / predicted (corr.) | "
          "median |error| from noise (10 / 50 / 90 %) | "
          "max |error| from noise (10 / 50 / 90 %) | P(median <= 5 %) | P(max <= 12 %) | "
          "P(both) | model's median / max |")
    print("|---" * 9 + "|")
    for arg in args.reports:
        name, path = label(arg)
        report = json.load(open(path))
        n = noise_of(report["rows"], args.draws, rng)
        pct = lambda v: " / ".join(f"{100 * x:.1f}" for x in v)
        print(f"| {name} | {n['cases']} x {n['rounds']} | {100 * n['sd_m']:.1f} / "
              f"{100 * n['sd_p']:.1f} % ({n['rho']:.2f}) | {pct(n['median'])} % | "
              f"{pct(n['max'])} % | {100 * n['p_median']:.0f} % | {100 * n['p_max']:.0f} % | "
              f"{100 * n['p_both']:.0f} % | {100 * report['median_abs_error']:.1f} / "
              f"{100 * report['max_abs_error']:.1f} % |")
    print(f"\n{args.draws} draws per run (seed {args.seed}) of every case's rounds from the "
          "run's pooled round-to-round scatter (log step, normal, measured and predicted "
          "correlated as measured); written by scripts/sim_validation_noise.py.")


if __name__ == "__main__":
    main()
