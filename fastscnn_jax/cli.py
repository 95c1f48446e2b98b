"""Command-line plumbing shared by the entry points: flag parsing that reports bad config keys plainly, and
the process restart that gives XLA:CPU huge pages (`restart_with_huge_pages`)."""

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


# glibc's malloc serves large blocks (XLA:CPU's per-step buffers among them) with fresh mmap'ed memory, which
# the kernel then fills page by page on first touch: at 384x480 batch 8 the train step took ~290,000 page
# faults (1.2 GB of 4 KiB pages) every step. With this tunable (glibc 2.35+) malloc asks for transparent huge
# pages for those blocks (madvise), where the kernel allows them ('madvise' or 'always' in
# /sys/kernel/mm/transparent_hugepage/enabled): ~1,500 faults a step, the step 989 -> 780 ms on a 2-core VM.
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
HUGE_PAGES_ENV = "FASTSCNN_HUGE_PAGES"  # '0' leaves the process as it was started


def huge_pages_supported() -> bool:
    """Linux with glibc 2.35+ and transparent huge pages not switched off."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = (int(v) for v in version.split(".")[:2])
    except (ValueError, OSError, AttributeError):
        return False
    if name != "glibc" or (major, minor) < (2, 35):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def restart_with_huge_pages() -> None:
    """Re-runs this command (same interpreter, arguments and environment) with `HUGE_PAGES_TUNABLE` set.

    Called by the entry points before they parse flags or import JAX. glibc reads its tunables only when a
    process starts, so the setting needs a fresh process image: `os.execv` keeps the PID, environment and
    open terminal. Nothing happens when the tunable is already set, when `FASTSCNN_HUGE_PAGES=0`, or where
    the system cannot use it (`huge_pages_supported`).
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables or os.environ.get(HUGE_PAGES_ENV) == "0":
        return
    if not huge_pages_supported():
        return
    os.environ["GLIBC_TUNABLES"] = f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, list(sys.orig_argv))
