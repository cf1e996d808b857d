#!/usr/bin/env bash
# Check fastverify's Triton kernels against another Triton release (default 3.6.0, what the
# GPU machines run) on a CPU machine, without touching .venv:
#
#   scripts/check_triton.sh [VERSION]
#
# 1. every kernel variant compiles for sm_90 with that Triton (tests/triton_sm90_compile.py --all);
# 2. the triton-backend tests of every family pass under that Triton's interpreter.
# The release's wheel (and numpy<2.3: Triton <= 3.6's interpreter calls int() on 1-element
# arrays, which numpy 2.3+ refuses) goes to a temporary folder placed first on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:-3.6.0}
PY=${PYTHON:-.venv/bin/python}
SITE=${TMPDIR:-/tmp}/fastverify-triton-$VERSION
if [ ! -d "$SITE/triton" ]; then
    "$PY" -m pip install -q --no-deps --target "$SITE" "triton==$VERSION" "numpy<2.3"
fi
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c "import triton, numpy; print('Triton', triton.__version__, '| numpy', numpy.__version__)"
echo "== sm_90 compile of every kernel variant"
env -u TRITON_INTERPRET "$PY" tests/triton_sm90_compile.py --all | tail -1
echo "== triton-backend tests under the interpreter"
"$PY" -m pytest -q -p no:cacheprovider -k triton tests/test_rejection*.py tests/test_tree_attention*.py \
    tests/test_lm_head*.py tests/test_sparse_kv.py tests/test_ops.py tests/test_lossless.py
