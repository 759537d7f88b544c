#!/usr/bin/env bash
# One command from a fresh machine to a test result: installs what the tests need, lints and
# checks the formatting (ruff), type-checks the code (the TensorRT calls against tensorrt-stubs),
# then runs pytest. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
# The CPU build of torch: a plain `torch` requirement can pull a multi-GB CUDA build.
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e '.[dev]'
# The stubs declare tensorrt as a dependency, which no reachable index serves.
python3 -m pip install -q --no-deps 'tensorrt-stubs>=10'
python3 -m ruff check .
python3 -m ruff format --check .
python3 -m mypy fa3trt build_jobs deploy
set +e
python3 -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
