#!/usr/bin/env bash
# The project's checks, as CI runs them: set up, lint, then the whole pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# Transparent huge pages for XLA:CPU's large buffers, in the tests and the programs they start: the same
# results, less time faulting in fresh pages (benchmarks/README.md); glibc ignores it where unsupported.
export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1"
# Two workers (pytest-xdist), each test file on one of them (so its module-scoped fixtures are built once):
# most tests wait on one single-threaded XLA compile at a time, so two take about 80% of the time one does
# on 2 cores. Files go to the workers in collection order, which tests/conftest.py sets (longest first).
# PYTEST_WORKERS=0 runs everything in this process.
.venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
