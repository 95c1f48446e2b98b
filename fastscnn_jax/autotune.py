"""XLA:CPU's matrix-product library for a jitted function: YNNPACK (jaxlib's default) or Eigen, or the faster.

This jaxlib's XLA:CPU hands dot products (and reductions, and plain convolutions) to YNNPACK. Which library
multiplies faster depends on the CPU and the program (`scripts/dot_library.py` times the two; results in
benchmarks/README.md). XLA's flag for it applies to a whole process; the same option passed to
`jax.jit(..., compiler_options=...)` applies to one function.

`TunedJit(fn, library)` is `jax.jit(fn)` with that choice: 'ynnpack' and 'eigen' pin it; 'auto' compiles
the program both ways at the first call, times the two in alternation (`rounds` calls each, after one
untimed call), and keeps the faster, as `torch.backends.cudnn.benchmark` does for convolutions. That costs
a second compile and the timed calls once, so it pays where one program runs many times (a benchmark, a
stream of same-size frames), not for a few images. Both give the same values to float rounding (tests). On
other backends the option does not exist and `TunedJit` is `jax.jit`.
"""

import statistics
import time
from collections.abc import Callable

import jax

DOT_LIBRARIES = ("auto", "ynnpack", "eigen")

# `xla_cpu_experimental_ynn_fusion_type` lists what XLA:CPU gives YNNPACK; this jaxlib's default is these
# two and LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT. Without the latter, dots are XLA's own (Eigen) dots.
COMPILER_OPTIONS = {
    "ynnpack": {},
    "eigen": {
        "xla_cpu_experimental_ynn_fusion_type": (
            "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,LIBRARY_FUSION_TYPE_REDUCE"
        )
    },
}


def check_library(library: str, what: str = "dot_library") -> str:
    """Returns `library` if it is one of DOT_LIBRARIES, else raises ValueError naming `what`."""
    if library not in DOT_LIBRARIES:
        raise ValueError(f"{what} must be one of {', '.join(DOT_LIBRARIES)}, got {library!r}")
    return library


class TunedJit:
    """`jax.jit(fn)` whose XLA:CPU executables use the matrix-product library `library` (see module doc).

    With 'auto' the library is chosen once, at the first call, on its arguments, and then holds for every
    later call (other shapes compile with it too): make one `TunedJit` per input size where sizes vary.
    Calls go straight to a `jax.jit` function, for its fast C++ dispatch (a per-call signature lookup in
    Python would add to every call). `library` is the choice once made (None off CPU, or
    before the first call with 'auto'); `timings_ms` the tuning's median ms per library.
    """

    def __init__(self, fn: Callable, library: str = "auto", rounds: int = 5):
        """`fn` as for `jax.jit`; `library` one of DOT_LIBRARIES; `rounds` timed calls per library."""
        self.requested = check_library(library)
        self.rounds = rounds
        self._jitted = {
            name: jax.jit(fn, compiler_options=options or None) for name, options in COMPILER_OPTIONS.items()
        }
        self._call = None
        self.library: str | None = None
        self.timings_ms: dict[str, float] = {}

    def __call__(self, *args):
        """Runs `fn` compiled with the chosen library; the first call compiles (and with 'auto', tunes)."""
        if self._call is None:
            self._choose(args)
        return self._call(*args)

    def lower(self, *args):
        """`jax.jit(fn).lower(*args)`: the program before compilation (either library's)."""
        return self._jitted["ynnpack"].lower(*args)

    def _choose(self, args: tuple) -> None:
        """Picks the library: none off CPU, the pinned one, or the faster on `args` ('auto')."""
        if jax.default_backend() != "cpu":
            self._call = self._jitted["ynnpack"]
            return
        names = list(COMPILER_OPTIONS) if self.requested == "auto" else [self.requested]
        if len(names) > 1:
            for name in names:  # first calls: compilation, allocation, caches
                jax.block_until_ready(self._jitted[name](*args))
            times = {name: [] for name in names}
            for _ in range(self.rounds):  # alternating, so that a slow spell of the machine hits both
                for name in names:
                    start = time.perf_counter()
                    jax.block_until_ready(self._jitted[name](*args))
                    times[name].append(time.perf_counter() - start)
            self.timings_ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            names = [min(names, key=lambda name: self.timings_ms[name])]  # ties: the default, listed first
        self.library = names[0]
        self._call = self._jitted[self.library]
