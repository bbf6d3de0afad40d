#!/usr/bin/env bash
# Calibrates the simulator's cluster files for this machine: Gloo collective
# times on 2 and 4 local ranks, measured as a training step meets them
# (`tessera-sim calibrate collectives --compute-ms`), and compute slowed by
# other ranks sharing the host's cores, the straggler among them, the
# same compute in lock step after each collective, and the cores that
# communicating ranks take (4 ranks; `calibrate host`); then fits
# gloo_local_np2.json and gloo_local_np4.json from them with the recipes in
# data/sim (`tessera-sim fit-cluster`, which also writes the host figures
# into the cluster files).
#
#   scripts/sim_calibrate_local.sh [--bin DIR] [--out DIR] [--compute-ms MS]
#
#   --bin DIR         where tessera-launch and tessera-sim are (default build/release/bin)
#   --out DIR         where the measurements and fitted files go (default data/sim:
#                     replaces the shipped gloo_local files)
#   --compute-ms MS   compute before each timed collective (default 10: the
#                     compute between two tensor-parallel collectives of the
#                     validation jobs is 1-12 ms)
#
# Run it on a quiet machine (nothing else running): the measurements are the
# timings of this host as it is now. A cloud VM's collective times drift
# from day to day, so calibrate right before `tessera-sim validate`.
# Takes about 4 minutes on 2 cores.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/build/release/bin"
out="$root/data/sim"
compute_ms=10
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --compute-ms) compute_ms=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "sim_calibrate_local.sh: unknown option '$1' (--help lists them)" >&2; exit 2 ;;
  esac
done
for tool in tessera-launch tessera-sim; do
  [ -x "$bin/$tool" ] || { echo "sim_calibrate_local.sh: $bin/$tool not found (build first, or --bin)" >&2; exit 2; }
done
mkdir -p "$out/gloo_local"
out=$(cd "$out" && pwd)
# From data/sim, so the files name the job as the recipes do (jobs/...).
cd "$root/data/sim"
launch() { "$bin/tessera-launch" --nproc "$1" -- "$bin/tessera-sim" "${@:2}"; }

launch 2 calibrate collectives --compute-ms "$compute_ms" -o "$out/gloo_local/np2_groups2.json"
launch 4 calibrate collectives --compute-ms "$compute_ms" -o "$out/gloo_local/np4_groups4.json"
launch 4 calibrate collectives --compute-ms "$compute_ms" --group-size 2 \
  -o "$out/gloo_local/np4_groups2.json"
launch 2 calibrate host --job jobs/dense-s.json -o "$out/gloo_local/np2_host.json"
launch 4 calibrate host --job jobs/dense-s.json -o "$out/gloo_local/np4_host.json"

# The recipes name the measurements (the host's through "host_sharing");
# the fitted files say which machine and settings they describe.
cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
cores=$(nproc)
for n in 2 4; do
  [ "$out" = "$root/data/sim" ] || cp "$root/data/sim/gloo_local_np$n.fit.json" "$out/"
  if [ "$n" = 4 ]; then
    groups=" and pairs running concurrently (--group-size 2, gloo_local/np4_groups2.json)"
    host_fields="host_sync_skew, host_lockstep_slowdown, host_sync_us and host_comm_load"
  else
    groups=""
    host_fields="host_sync_skew, host_lockstep_slowdown and host_sync_us"
  fi
  (cd "$out" && "$bin/tessera-sim" fit-cluster "gloo_local_np$n.fit.json" -o "gloo_local_np$n.json" \
    --description "This machine running $n ranks: $n processes on a $cores-core host (${cpu:-unknown CPU}), Gloo over loopback" \
    --provenance "collective times from \`tessera-sim calibrate collectives --compute-ms $compute_ms\` under tessera-launch --nproc $n (gloo_local/np${n}_groups$n.json)$groups; host_compute_slowdown, $host_fields from \`tessera-sim calibrate host --job jobs/dense-s.json\` (gloo_local/np${n}_host.json); written by scripts/sim_calibrate_local.sh")
done
echo "cluster files: $out/gloo_local_np2.json $out/gloo_local_np4.json"
