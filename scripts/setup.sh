#!/usr/bin/env bash
# Creates .venv (if missing) and installs fastscnn_jax with its test tools and the optional extras the tests
# use (torch; tflite and onnx for the export tests). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch: the PyTorch-import tests need it; tflite and onnx: the export tests (tests/export_test.py).
# ml_dtypes below 0.7 (JAX, TensorFlow and onnx accept 0.5.4-0.6): 0.7.0 takes about 1 s to import, in every
# process that imports JAX (numpy compares each ufunc loop it registers with all registered before it, and
# 0.7 registers many), against 0.15 s for 0.6.0 (benchmarks/README.md). Not a package requirement:
# environments whose JAX needs a newer one (Colab's) must not be held back.
.venv/bin/python -m pip install --quiet -e '.[test,torch,tflite,onnx]' 'ml_dtypes>=0.5.4,<0.7'
