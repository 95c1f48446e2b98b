"""The CPU layer: forms of the core's convolutions and training loss that XLA:CPU runs faster, with the same
outputs and gradients (tests/cpu_test.py), and the compiler options the CPU train step is built with.

Opt-in through `config.cpu_layer` ('auto', the default, turns it on when JAX's backend is the CPU), chosen
once by `steps.select_layer`; nothing in the core imports this package. Why each form exists is said where
it is defined (`conv.py`, `loss.py`, `resize.py`); what each one gains is measured in benchmarks/README.md.

Process-wide settings are left to the user (glibc reads its tunables only when a process starts):
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` lets malloc back XLA:CPU's large per-step buffers with transparent
huge pages, which saves most of the page faults of touching them afresh every step. Adding
`:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776`, with the entry point's flag
`--jax_cpu_enable_async_dispatch=false` (computations on the calling thread, whose arena those settings
govern; JAX reads this option from no environment variable), removes the rest, at the price of keeping the
process at its peak memory. The code before this layer set all of them on itself by restarting the process;
benchmarks/README.md measures them.
"""

import functools

from flax import linen as nn

from fastscnn_jax import steps
from fastscnn_jax.cpu import conv, loss, resize

# Train step: LLVM may reassociate float arithmetic (and ignore the sign of zero), nothing else; NaNs,
# infinities, division and library functions stay exact (the four `honor` options), so a NaN loss still
# shows (tests/train_test.py). Reassociation lets XLA split long chains of additions into independent ones.
# Only rounding changes. Not used for inference, where it does not pay.
TRAIN_COMPILER_OPTIONS = {
    "xla_cpu_enable_fast_math": True,
    "xla_cpu_fast_math_honor_nans": True,
    "xla_cpu_fast_math_honor_infs": True,
    "xla_cpu_fast_math_honor_division": True,
    "xla_cpu_fast_math_honor_functions": True,
}

# `model.init`: LLVM at optimisation level 1 instead of 2. The init program is a random draw per kernel
# (the forward pass it traces is dead code), on which LLVM spends most of the compile; it runs once, in
# milliseconds either way, and every variable comes out bit for bit the same (tests/cpu_test.py).
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}

LAYER = steps.Layer(
    name="cpu",
    conv=functools.partial(nn.Conv, conv_general_dilated=conv.conv_general_dilated),
    train_loss=loss.train_loss,
    train_compiler_options=TRAIN_COMPILER_OPTIONS,
    init_compiler_options=INIT_COMPILER_OPTIONS,
    resize_logits=resize.resize_logits,
)
