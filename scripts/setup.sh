#!/usr/bin/env bash
# Creates .venv (if missing) and installs fastscnn_jax with its test tools and the optional extras the tests
# use (torch; tflite and onnx for the export tests). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch: the PyTorch-import tests need it; tflite and onnx: the export tests (tests/export_test.py).
.venv/bin/python -m pip install --quiet -e '.[test,torch,tflite,onnx]'
