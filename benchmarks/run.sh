#!/usr/bin/env bash
# Runs every benchmark, each with its peers in the same run, and writes one
# results file per benchmark (schema tessera-bench/1, see
# benchmarks/README.md); then renders docs/benchmarks.md from them.
#
#   benchmarks/run.sh [--quick] [--only NAME...] [--out DIR] [--build DIR] [--no-render]
#
#   --quick       tiny sizes and 1-2 repetitions: checks that each benchmark
#                 runs and writes valid JSON (CI smoke); the numbers are not
#                 measurements
#   --only NAME   run only these (collectives, model, lora, ckpt, qspec, rlhf,
#                 moe, serve, serve_workloads); repeatable
#   --out DIR     where the results go (default benchmarks/results)
#   --build DIR   the build to run (default build/release; nothing is built)
#   --no-render   leave docs/benchmarks.md alone (default: re-render it when
#                 --out is benchmarks/results)
#
# Peers it uses when present (the full run expects them; without them the
# results say what is missing):
#   fio                         disk anchor of ckpt (scripts/install-deps.sh)
#   build/bench-venv            PyTorch 2.x for DCP (scripts/setup-bench-venv.sh)
#   $TESSERA_LLAMA_CPP          llama.cpp's bin directory (default: what
#                               scripts/build-llama-cpp.sh builds)
#   /usr/bin/python3 + torch    PyTorch eager (Debian's python3-torch)
#
# Per-benchmark logs go to $TESSERA_BENCH_LOGS (default build/bench-logs).
# Exit status: 0 when every benchmark ran and wrote valid JSON, 1 otherwise
# (the others still run).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
quick=0
only=()
out="$root/benchmarks/results"
build="$root/build/release"
render=1
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --only) shift; only+=("${1:?--only needs a name}") ;;
    --out) shift; out=$(realpath -m "${1:?--out needs a directory}") ;;
    --build) shift; build=$(realpath -m "${1:?--build needs a directory}") ;;
    --no-render) render=0 ;;
    -h|--help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
all=(collectives model lora ckpt qspec rlhf moe serve serve_workloads)
[ ${#only[@]} -eq 0 ] && only=("${all[@]}")
for name in "${only[@]}"; do
  [[ " ${all[*]} " == *" $name "* ]] || { echo "run.sh: unknown benchmark '$name' (${all[*]})" >&2; exit 2; }
done
bin="$build/bin"
for program in tessera-launch collectives_bench model_bench lora_bench ckpt_bench qspec_bench; do
  [ -x "$bin/$program" ] || { echo "run.sh: $bin/$program is missing: build $build first" >&2; exit 2; }
done
logs=${TESSERA_BENCH_LOGS:-$root/build/bench-logs}
mkdir -p "$out" "$logs"

# One commit and state for every results file of this run.
export TESSERA_BENCH_COMMIT
TESSERA_BENCH_COMMIT=$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)
export TESSERA_BENCH_DIRTY=0
if [ -n "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  TESSERA_BENCH_DIRTY=1
fi

smollm2=$("$root/scripts/smollm2-path.sh" 2>/dev/null || true)
dcp_python="$root/build/bench-venv/bin/python"
[ -x "$dcp_python" ] || dcp_python=""
llama_cpp=${TESSERA_LLAMA_CPP:-${XDG_CACHE_HOME:-$HOME/.cache}/tessera-llama.cpp/build/bin}
[ -x "$llama_cpp/llama-bench" ] && [ -x "$llama_cpp/llama-batched-bench" ] || llama_cpp=""

# rep N: the repetition options of a benchmark that repeats N times in a
# full run (at least 5; the quick run: 2, or 1 where one repetition is long).
rep() {
  if [ $quick -eq 1 ]; then echo "--quick --reps ${2:-2} --warmup 0"; else echo "--reps $1 --warmup 1"; fi
}
if [ $quick -eq 1 ]; then
  ranks=(2)
else
  ranks=(2 4)
  [ -n "$smollm2" ] || echo "run.sh: warning: no SmolLM2 GGUF (scripts/install-deps.sh); its rows are skipped" >&2
  [ -n "$dcp_python" ] || echo "run.sh: warning: no build/bench-venv (scripts/setup-bench-venv.sh); no DCP rows" >&2
  [ -n "$llama_cpp" ] || echo "run.sh: warning: no llama.cpp (scripts/build-llama-cpp.sh); no llama.cpp rows" >&2
fi

# The generator's Python: Debian's, which has python3-matplotlib for the plots.
py=${TESSERA_BENCH_PYTHON:-/usr/bin/python3}
[ -x "$py" ] || py=python3

failed=()
timings=()
expected=()
# run NAME RESULT_FILE COMMAND...: runs it with its log, checks its JSON.
run() {
  local name=$1 file=$2
  shift 2
  local log="$logs/$(basename "$file" .json).log" start end
  echo "run.sh: $name -> $file (log $log)"
  expected+=("$(basename "$file" .json)")
  rm -f "$file"
  start=$(date +%s.%N)
  if "$@" >"$log" 2>&1 && [ -s "$file" ]; then
    end=$(date +%s.%N)
    timings+=("$(basename "$file" .json)=$(awk -v a="$start" -v b="$end" 'BEGIN { print b - a }')")
  else
    echo "run.sh: $name FAILED (last lines of $log):" >&2
    tail -n 20 "$log" >&2
    failed+=("$(basename "$file" .json)")
  fi
}

for name in "${only[@]}"; do
  case "$name" in
    collectives)
      for n in "${ranks[@]}"; do
        run collectives "$out/collectives_np$n.json" \
          "$bin/tessera-launch" --nproc "$n" -- "$bin/collectives_bench" $(rep 5) \
          --json "$out/collectives_np$n.json"
      done ;;
    model)
      args=()
      [ -n "$smollm2" ] && [ $quick -eq 0 ] && args+=(--smollm2 "$smollm2")
      if [ $quick -eq 1 ]; then args+=(--train-steps 2); else args+=(--train-steps 20); fi
      run model "$out/model.json" "$bin/model_bench" $(rep 5) "${args[@]}" --json "$out/model.json" ;;
    lora)
      args=()
      [ -n "$smollm2" ] && [ $quick -eq 0 ] && args+=(--smollm2 "$smollm2")
      corpus="$root/../shared/testdata/text/moby-dick.txt"
      if [ ! -f "$corpus" ]; then
        if [ $quick -eq 0 ]; then
          echo "run.sh: lora needs $corpus (the shared test data); skipped" >&2
          continue
        fi
        # The smoke run only checks that the benchmark runs: any English text will do.
        corpus="$logs/lora_corpus.txt"
        cat "$root"/docs/*.md > "$corpus"
        args+=(--corpus "$corpus")
      fi
      run lora "$out/lora.json" "$bin/lora_bench" $(rep 5 1) "${args[@]}" --json "$out/lora.json" ;;
    ckpt)
      args=()
      [ -n "$dcp_python" ] && args+=(--dcp-python "$dcp_python")
      for n in "${ranks[@]}"; do
        run ckpt "$out/ckpt_np$n.json" \
          "$bin/tessera-launch" --nproc "$n" -- "$bin/ckpt_bench" $(rep 5 1) "${args[@]}" \
          --dir "${TMPDIR:-/tmp}/tessera_ckpt_bench_$$" --json "$out/ckpt_np$n.json"
      done ;;
    qspec)
      args=()
      if [ $quick -eq 0 ]; then
        [ -n "$smollm2" ] && args+=(--smollm2 "$smollm2")
        [ -n "$llama_cpp" ] && args+=(--llama-cpp "$llama_cpp")
        args+=(--random)
      fi
      run qspec "$out/qspec.json" "$bin/qspec_bench" $(rep 5 1) "${args[@]}" --json "$out/qspec.json" ;;
    rlhf)
      if [ -x "$bin/rlhf_bench" ]; then
        run rlhf "$out/rlhf.json" "$bin/rlhf_bench" $(rep 15) --json "$out/rlhf.json"
      else
        echo "run.sh: rlhf_bench not built (TESSERA_WITH_GRPC off); skipped" >&2
      fi ;;
    moe)
      if [ -x "$bin/moe_bench" ]; then
        args=()
        [ -n "$smollm2" ] && [ $quick -eq 0 ] && args+=(--smollm2 --gguf "$smollm2")
        run moe "$out/moe.json" "$bin/moe_bench" $(rep 5 1) "${args[@]}" --json "$out/moe.json"
      else
        echo "run.sh: moe_bench not built (TESSERA_WITH_GRPC off); skipped" >&2
      fi ;;
    serve|serve_workloads)
      if [ -z "$smollm2" ]; then
        echo "run.sh: no SmolLM2 GGUF (scripts/install-deps.sh); $name skipped" >&2
      else
        script=serve_bench.py
        [ "$name" = serve_workloads ] && script=serve_workloads_bench.py
        args=(--tessera-serve "$bin/tessera-serve" --model "$smollm2" --logs "$logs")
        if [ $quick -eq 1 ]; then
          args+=(--quick)
        else
          args+=(--reps 5)
          [ -n "$llama_cpp" ] && [ -x "$llama_cpp/llama-server" ] && args+=(--llama-server "$llama_cpp/llama-server")
        fi
        run "$name" "$out/$name.json" "$py" "$root/benchmarks/$script" "${args[@]}" --json "$out/$name.json"
      fi ;;
  esac
done

# What ran, how long each took, and with which peers.
"$py" - "$out/run.json" "$quick" "${timings[@]}" <<'EOF'
import json, os, sys, time
path, quick, pairs = sys.argv[1], sys.argv[2] == "1", sys.argv[3:]
old = {}
if os.path.exists(path):
    with open(path) as f:
        old = json.load(f).get("seconds", {})
seconds = dict(old)
for p in pairs:
    k, v = p.split("=", 1)
    seconds[k] = round(float(v), 1)
doc = {"schema": "tessera-bench-run/1", "quick": quick,
       "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
       "seconds": dict(sorted(seconds.items()))}
with open(path + ".tmp", "w") as f:
    json.dump(doc, f, indent=1)
    f.write("\n")
os.replace(path + ".tmp", path)
EOF

expect=$(IFS=,; echo "${expected[*]}")
"$py" "$root/benchmarks/render_docs.py" --validate "$out" --expect "$expect" || failed+=(validation)
if [ $render -eq 1 ] && [ "$out" = "$root/benchmarks/results" ]; then
  "$py" "$root/benchmarks/render_docs.py" --results "$out" || failed+=(render)
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "run.sh: failed: ${failed[*]}" >&2
  exit 1
fi
echo "run.sh: all benchmarks wrote their results to $out"
