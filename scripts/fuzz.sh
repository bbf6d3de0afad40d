#!/usr/bin/env bash
# Builds the fuzz targets (fuzz/, clang + libFuzzer + ASan/UBSan, in their own
# build directory) and runs each for a time budget, one after another, then
# prints executions and crashes per target.
#
#   scripts/fuzz.sh                     # build, then 60 s per target
#   scripts/fuzz.sh --quick             # build, then 10 s per target (CI)
#   scripts/fuzz.sh --seconds 600 --targets gguf,safetensors
#   scripts/fuzz.sh --quick --no-build  # run what is built; exit 77 (skip) if nothing is
#
# Options:
#   --seconds N        fuzzing time per target (default 60; --quick: 10)
#   --quick            the CI budget: 10 s per target
#   --targets a,b      only these targets (names as in fuzz/CMakeLists.txt)
#   --jobs N           run N targets at a time (default 1; one core each)
#   --no-build         do not configure or build; exit 77 when the build is absent
#   --build-only       configure, build and write the seed corpus, run nothing
#   --build-dir DIR    default: build/fuzz
#   --rss-limit-mb N   per-process memory limit libFuzzer enforces (default 2048)
#   --timeout N        an input running longer than N s is a hang (default 30)
#
# Environment: CC / CXX (default clang / clang++); TESSERA_BUILD_LOCK, a
# lock file every build step runs under (flock), for machines where several
# people build at once.
#
# Each target runs as one process (libFuzzer's in-process mode: one job, one
# core) on build/fuzz/corpus/<target> (kept between runs, so coverage
# accumulates) seeded from build/fuzz/seeds/<target> (make_seed_corpus).
# Findings go to build/fuzz/artifacts/<target>/ (crash-*, leak-*, timeout-*,
# oom-*, slow-unit-*); reproduce one with build/fuzz/bin/fuzz_<target> FILE.
# Every run also appends its rows, dated, to build/fuzz/history.tsv (the
# totals per target over all runs are what docs/build-and-test.md reports).
# The exit status is 1 when any target found something, 0 otherwise.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
seconds=60
quick=0
targets=""
build=1
build_only=0
build_dir="$root/build/fuzz"
rss_limit=2048
timeout=30
jobs=1

while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    --quick) quick=1; shift ;;
    --targets) targets=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    --build-only) build_only=1; shift ;;
    --build-dir) build_dir=$2; shift 2 ;;
    --rss-limit-mb) rss_limit=$2; shift 2 ;;
    --timeout) timeout=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "fuzz.sh: unknown option '$1' (--help lists them)" >&2; exit 2 ;;
  esac
done
[ "$quick" = 1 ] && seconds=10

locked() {
  if [ -n "${TESSERA_BUILD_LOCK:-}" ]; then flock "$TESSERA_BUILD_LOCK" "$@"; else "$@"; fi
}

if [ "$build" = 1 ]; then
  for tool in "${CXX:-clang++}" cmake ninja; do
    command -v "$tool" >/dev/null || { echo "fuzz.sh: $tool not found (install clang, libfuzzer-14-dev, cmake, ninja-build)" >&2; exit 2; }
  done
  if [ ! -f "$build_dir/build.ninja" ]; then
    locked env CC="${CC:-clang}" CXX="${CXX:-clang++}" cmake -S "$root/fuzz" -B "$build_dir" -G Ninja
  fi
  # Only the fuzz targets and the corpus builder (and the modules they use).
  locked cmake --build "$build_dir" --target fuzz_all
fi

bin="$build_dir/bin"
if [ ! -f "$build_dir/targets.txt" ] || [ ! -x "$bin/make_seed_corpus" ]; then
  echo "fuzz.sh: no fuzz build in $build_dir (run scripts/fuzz.sh without --no-build, which needs clang and libFuzzer)"
  exit 77
fi
if [ -z "$targets" ]; then
  targets=$(tr '\n' ' ' < "$build_dir/targets.txt")
else
  targets=${targets//,/ }
fi
for t in $targets; do
  if [ ! -x "$bin/fuzz_$t" ]; then
    if [ "$build" = 0 ]; then
      echo "fuzz.sh: fuzz target $t is not built in $build_dir"
      exit 77
    fi
    echo "fuzz.sh: no fuzz target '$t' (see $build_dir/targets.txt)" >&2
    exit 2
  fi
done

# The seed corpus, written once per build directory (delete it to refresh).
if [ ! -f "$build_dir/seeds/.done" ]; then
  rm -rf "$build_dir/seeds"
  ASAN_OPTIONS=detect_leaks=0 "$bin/make_seed_corpus" "$build_dir/seeds" >/dev/null
  touch "$build_dir/seeds/.done"
fi
[ "$build_only" = 1 ] && exit 0

# detect_leaks=0: LibTorch, gRPC and protobuf keep process-lifetime
# allocations that LeakSanitizer would report at exit; ODR checking is off
# for the same reason as in the asan preset (LibTorch's own globals).
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0:detect_odr_violation=0:allocator_may_return_null=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
logs="$build_dir/logs"
mkdir -p "$logs"
summary="$build_dir/summary.tsv"
printf 'target\tseconds\texecutions\texec/s\tcorpus\tfindings\n' > "$summary"
rows="$build_dir/rows"
rm -rf "$rows"
mkdir -p "$rows"

# Runs one target; its summary row goes to $rows/<target>.tsv, and a
# finding leaves $rows/<target>.found.
run_target() {
  local t=$1
  local corpus="$build_dir/corpus/$t"
  local artifacts="$build_dir/artifacts/$t"
  local before log start rc elapsed execs new corpus_size line
  mkdir -p "$corpus" "$artifacts"
  before=$(ls "$artifacts" | wc -l)
  log="$logs/$t.log"
  start=$(date +%s)
  set +e
  "$bin/fuzz_$t" -max_total_time="$seconds" -rss_limit_mb="$rss_limit" -timeout="$timeout" \
    -print_final_stats=1 -artifact_prefix="$artifacts/" "$corpus" "$build_dir/seeds/$t" \
    </dev/null >"$log" 2>&1
  rc=$?
  set -e
  elapsed=$(( $(date +%s) - start ))
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  if [ -z "$execs" ]; then  # a finding stops the run before the final stats
    execs=$(grep -o '^#[0-9]*' "$log" | tail -1 | tr -d '#')
  fi
  execs=${execs:-0}
  new=$(( $(ls "$artifacts" | wc -l) - before ))
  corpus_size=$(ls "$corpus" | wc -l)
  line=$(printf '%s\t%s\t%s\t%s\t%s\t%s' "$t" "$elapsed" "$execs" $(( execs / (elapsed > 0 ? elapsed : 1) )) \
    "$corpus_size" "$new")
  echo "$line" > "$rows/$t.tsv"
  echo "$(date -u +%Y-%m-%dT%H:%M:%SZ)	$line" >> "$build_dir/history.tsv"
  if [ "$rc" != 0 ] || [ "$new" -gt 0 ]; then
    touch "$rows/$t.found"
    echo "fuzz.sh: $t found something (exit $rc); log: $log" >&2
    grep -E 'ERROR|SUMMARY|fuzz property|escaped|answered INTERNAL|Test unit written' "$log" | head -8 >&2 || true
  fi
}

# --jobs targets at a time, each one libFuzzer process on one core.
running=0
for t in $targets; do
  if [ "$running" -ge "$jobs" ]; then
    wait -n || true
    running=$((running - 1))
  fi
  run_target "$t" &
  running=$((running + 1))
done
wait || true
# Leftover scratch directories of runs that crashed (only now: with --jobs a
# running target's directory may look old).
find /dev/shm /tmp -maxdepth 1 -name 'tessera-fuzz.*' -user "$(id -u)" -mmin +1 -exec rm -rf {} + 2>/dev/null || true
found=0
for t in $targets; do
  cat "$rows/$t.tsv" >> "$summary"
  [ -e "$rows/$t.found" ] && found=1
done
column -t -s $'\t' "$summary"
exit "$found"
