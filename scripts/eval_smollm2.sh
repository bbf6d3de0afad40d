#!/usr/bin/env bash
# Runs SmolLM2-135M-Instruct over the five Yue-Benchmark sets, 0- and 5-shot,
# with the limits docs/eval.md states, one tessera-eval run at a time, and
# leaves one results JSON per run in OUT_DIR (sample logs beside them).
# Interrupted runs resume from their sample logs when started again; raising
# a limit evaluates only the new documents.
#
#   scripts/eval_smollm2.sh OUT_DIR [TESSERA_EVAL]
#   scripts/render_eval_results.py OUT_DIR/*.json   # the tables of docs/eval.md
#
# Environment: MC_LIMIT_0 / MC_LIMIT_5 (multiple-choice tasks, default 200 /
# 100 documents), GEN_LIMIT_0 / GEN_LIMIT_5 (generation tasks, default 40 /
# 30), MAX_GEN_TOKS (cap on generated tokens, default 128), TESSERA_NUM_THREADS
# (default 1: on a shared two-core machine two OpenMP threads that must wait
# for each other's core run many times slower than one).
set -euo pipefail
out="${1:?usage: eval_smollm2.sh OUT_DIR [TESSERA_EVAL]}"
root=$(cd "$(dirname "$0")/.." && pwd)
eval_bin="${2:-$root/build/release/bin/tessera-eval}"
model=$("$root/scripts/smollm2-path.sh")
export TESSERA_NUM_THREADS="${TESSERA_NUM_THREADS:-1}"
mc0="${MC_LIMIT_0:-200}" mc5="${MC_LIMIT_5:-100}"
gen0="${GEN_LIMIT_0:-40}" gen5="${GEN_LIMIT_5:-30}"
cap="${MAX_GEN_TOKS:-128}"
mkdir -p "$out"

run() {  # name, then tessera-eval arguments
  local name=$1
  shift
  echo "== $name: $*" >&2
  nice -n 10 "$eval_bin" --model "$model" --output "$out/$name.json" "$@"
}

mc=yue_arc_c_mc,yue_mmlu_mc
gen=yue_truthfulqa,yue_gsm8k,yue_arc_c_gen,yue_mmlu_gen,yue_trans
run smollm2_mc_0shot --tasks "$mc" --num-fewshot 0 --limit "$mc0"
run smollm2_mc_5shot --tasks "$mc" --num-fewshot 5 --limit "$mc5"
run smollm2_gen_0shot --tasks "$gen" --num-fewshot 0 --limit "$gen0" --max-gen-toks "$cap" \
  --chunk-tokens "$cap"
run smollm2_gen_5shot --tasks "$gen" --num-fewshot 5 --limit "$gen5" --max-gen-toks "$cap" \
  --chunk-tokens "$cap"
