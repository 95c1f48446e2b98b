#!/usr/bin/env bash
# Creates .venv (if missing) and installs fastscnn_jax with its test tools and torch. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch (the optional extra) too: the PyTorch-import tests need it.
.venv/bin/python -m pip install --quiet -e '.[test,torch]'
