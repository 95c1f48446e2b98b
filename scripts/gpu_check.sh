#!/usr/bin/env bash
# Runs `python -m fastscnn_jax.gpu_check` (the environment, correctness checks and the JAX/PyTorch benchmark
# on a GPU; see its docstring) from the repository root, writing to $OUT, else runs/gpu_check (ignored by
# git). Arguments go to the module: --torch_modes=channels_last leaves torch.compile out, --quick
# --allow_cpu is a CPU dry run. $IMAGES, if set, is the --images glob; $PYTHON the interpreter (default
# .venv/bin/python where there is one, else python3).
#
# It installs nothing. A GPU machine whose Python lacks ml_collections and clu (pure-Python wheels; their own
# needs come with JAX and Flax, except clu's wrapt) can take them as wheels fetched where pip works, into an
# ignored folder (wrapt's for the GPU machine's Python, here 3.12):
#   python3 -m pip download --no-deps --only-binary=:all: -d build/gpu_check/wheels \
#     ml_collections==1.1.0 clu==0.0.12
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_28_x86_64 -d build/gpu_check/wheels wrapt
# and, on the GPU machine, before this script:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site build/gpu_check/wheels/*.whl
#   export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
args=(--output="${OUT:-runs/gpu_check}")
if [ -n "${IMAGES:-}" ]; then args+=(--images="$IMAGES"); fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
exec "$PYTHON" -m fastscnn_jax.gpu_check "${args[@]}" "$@"
