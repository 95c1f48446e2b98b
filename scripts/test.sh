#!/usr/bin/env bash
# The project's checks, as CI runs them: set up, lint, then the whole pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# Huge pages for the tests' own XLA:CPU buffers too (fastscnn_jax/cli.py: the entry points restart with it).
export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1"
.venv/bin/python -m pytest -q "$@"
