"""Command-line plumbing shared by the entry points: flag parsing that reports bad config keys plainly, and
the process restart with glibc malloc tunables for XLA:CPU's large buffers (`restart_with_malloc_tunables`,
`inline_cpu_dispatch`)."""

import os
import sys

from absl import flags


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing for `app.run(..., flags_parser=parse_flags)`.

    A missing config file, or a misspelt or mistyped `--config.KEY=VALUE` override, makes ml_collections
    raise deep inside flag parsing or later; this reports it in one message naming the flag and exits 1.
    """
    try:
        remaining = flags.FLAGS(argv)
        if "config" in flags.FLAGS:
            flags.FLAGS.config.keys()  # a config file that failed to load only says so when used
        return remaining
    except OSError as e:
        sys.exit(f"error: --config: {e}")
    except flags.Error as e:
        sys.exit(f"error: {e}\nPass --help for the flags.")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        bad = [a for a in argv[1:] if a.startswith("--config.")]
        message = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
        sys.exit(f"error: bad config override {' '.join(bad) or ''}: {message}")


# glibc's malloc serves large blocks (XLA:CPU's per-step buffers among them: 1.2 GB for the 384x480 batch-8
# train step) with fresh mmap'ed memory, which the kernel then fills page by page on first touch, every step
# (~290,000 page faults a step in 4 KiB pages). These tunables (glibc 2.35+ for hugetlb):
# - hugetlb=1: malloc asks for transparent huge pages (madvise) where the kernel allows them ('madvise' or
#   'always' in /sys/kernel/mm/transparent_hugepage/enabled): ~1,000-1,500 faults a step, but each still
#   zeroes a fresh 2 MiB page (~200 ms of kernel time a step on a 2-core VM); the step 989 -> 780 ms.
# - mmap_max=0 and a trim threshold above any buffer: the main heap serves large blocks and keeps them after
#   free, so the next step reuses the pages (no faults, ~1 ms of kernel time a step). This holds only for
#   blocks the main thread allocates (other threads' arenas mmap large blocks whatever mmap_max says), hence
#   `inline_cpu_dispatch`. Together: the train step ~8% faster again (benchmarks/README.md).
MALLOC_TUNABLES = {
    "glibc.malloc.hugetlb": "1",
    "glibc.malloc.mmap_max": "0",
    "glibc.malloc.trim_threshold": str(1 << 40),
}
MALLOC_TUNABLES_ENV = "FASTSCNN_MALLOC_TUNABLES"  # '0' leaves the process as it was started
HUGE_PAGES_ENV = "FASTSCNN_HUGE_PAGES"  # the older name of the same switch, still honoured


def malloc_tunables_supported() -> bool:
    """Linux with glibc 2.35+."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = (int(v) for v in version.split(".")[:2])
    except (ValueError, OSError, AttributeError):
        return False
    return name == "glibc" and (major, minor) >= (2, 35)


def huge_pages_supported() -> bool:
    """`malloc_tunables_supported` and transparent huge pages not switched off."""
    if not malloc_tunables_supported():
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def wanted_tunables() -> dict[str, str]:
    """The `MALLOC_TUNABLES` this system can use (no hugetlb where huge pages are off)."""
    if not malloc_tunables_supported():
        return {}
    wanted = dict(MALLOC_TUNABLES)
    if not huge_pages_supported():
        del wanted["glibc.malloc.hugetlb"]
    return wanted


def _parse_tunables(value: str) -> dict[str, str]:
    """'a=1:b=2' -> {'a': '1', 'b': '2'}."""
    return dict(item.partition("=")[::2] for item in value.split(":") if item)


def malloc_tunables_off() -> bool:
    """True when the user turned the restart off (FASTSCNN_MALLOC_TUNABLES=0 or FASTSCNN_HUGE_PAGES=0)."""
    return "0" in (os.environ.get(MALLOC_TUNABLES_ENV), os.environ.get(HUGE_PAGES_ENV))


def restart_with_malloc_tunables() -> None:
    """Re-runs this command (same interpreter, arguments and environment) with `MALLOC_TUNABLES` set.

    Called by the entry points before they parse flags or import JAX. glibc reads its tunables only when a
    process starts, so the setting needs a fresh process image: `os.execv` keeps the PID, environment and
    open terminal. Tunables already in GLIBC_TUNABLES are kept, with their values (ours are appended), so
    the restart happens at most once. Nothing happens when all are set, when FASTSCNN_MALLOC_TUNABLES=0, or
    where the system cannot use them (`wanted_tunables`).
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if malloc_tunables_off():
        return
    present = _parse_tunables(tunables)
    missing = [f"{k}={v}" for k, v in wanted_tunables().items() if k not in present]
    if not missing:
        return
    os.environ["GLIBC_TUNABLES"] = ":".join(([tunables] if tunables else []) + missing)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, list(sys.orig_argv))


def inline_cpu_dispatch() -> bool:
    """Makes JAX run single-device CPU computations on the calling thread, where malloc keeps large blocks.

    With asynchronous dispatch (JAX's default) a worker thread runs each computation and allocates its
    buffers from its own malloc arena, which mmaps blocks that large afresh each time; run inline, the main
    thread allocates them from the main heap, which the tunables above keep (384x480 batch-8 train step
    603-668 -> 558-569 ms, no page faults). Only done when this process has glibc.malloc.mmap_max=0; call
    before JAX's CPU backend starts (later it has no effect). Dispatch returns when the computation is done,
    so Python's work between steps no longer overlaps it (a few ms a step). Returns whether it was done.
    """
    if _parse_tunables(os.environ.get("GLIBC_TUNABLES", "")).get("glibc.malloc.mmap_max") != "0":
        return False
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True
