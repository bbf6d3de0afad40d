#!/usr/bin/env bash
# Measures what collectives cost inside real training steps of the
# validation's dense-s job (tp=2 on 2 ranks, tp=4 and dp=2,tp=2 on 4) and,
# right after, what the collective calibration times for the same groups
# (`calibrate collectives`, 10 ms of compute before each call, and 5 ms
# for pairs), then writes the comparison table
# (scripts/sim_measured_waits.py).
#
#   scripts/sim_measure_waits.sh [--bin DIR] [--out DIR]
#
#   --bin DIR   where tessera-launch, tessera-train and tessera-sim are
#               (default build/release/bin)
#   --out DIR   where the files go (default data/sim/results/waits)
#
# About 5 minutes on 2 cores; run it on a quiet machine.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/build/release/bin"
out="$root/data/sim/results/waits"
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "sim_measure_waits.sh: unknown option '$1' (--help lists them)" >&2; exit 2 ;;
  esac
done
for tool in tessera-launch tessera-train tessera-sim; do
  [ -x "$bin/$tool" ] || { echo "sim_measure_waits.sh: $bin/$tool not found (build first, or --bin)" >&2; exit 2; }
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$root/data/sim"

train() {  # train NPROC LAYOUT NAME
  "$bin/tessera-launch" --nproc "$1" -- "$bin/tessera-train" jobs/dense-s.json --layout "$2" \
    --timings "$out/$3.timings.json" --chrome "$out/$3.measured.json" --warmup 2 --measure 10 \
    --log-every 0
}
calibrate() {  # calibrate NPROC NAME ARGS...
  "$bin/tessera-launch" --nproc "$1" -- "$bin/tessera-sim" calibrate collectives --max-bytes 8M \
    -o "$out/$2.json" "${@:3}"
}
train 2 tp=2 dense-s_tp2
train 4 tp=4 dense-s_tp4
train 4 dp=2,tp=2 dense-s_dp2_tp2
calibrate 2 np2_compute10 --compute-ms 10
calibrate 4 np4_compute10 --compute-ms 10
calibrate 4 np4_pairs_compute10 --compute-ms 10 --group-size 2
calibrate 4 np4_pairs_compute5 --compute-ms 5 --group-size 2

/usr/bin/python3 "$root/scripts/sim_measured_waits.py" \
  "tp=2, 2 ranks=$out/dense-s_tp2.measured.json:$out/np2_compute10.json" \
  "tp=4, 4 ranks=$out/dense-s_tp4.measured.json:$out/np4_compute10.json" \
  "dp=2 tp=2, 4 ranks=$out/dense-s_dp2_tp2.measured.json:$out/np4_pairs_compute10.json" \
  "dp=2 tp=2 (calibration with 5 ms)=$out/dense-s_dp2_tp2.measured.json:$out/np4_pairs_compute5.json" \
  > "$out/waits.md"
echo "-> $out/waits.md"
