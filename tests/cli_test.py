"""Tests of the entry points' process set-up: the restart with glibc's huge-page tunable."""

import os
import subprocess
import sys
import textwrap

from fastscnn_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Prints the tunables and PID, restarts, then touches 64 MiB of fresh malloc'ed memory (numpy would ask for
# huge pages itself) and prints the page faults that took.
CHILD = textwrap.dedent(
    """
    import ctypes, os, resource
    from fastscnn_jax import cli
    print("start", os.getpid(), os.environ.get("GLIBC_TUNABLES"), flush=True)
    cli.restart_with_huge_pages()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    size = 64 * 1024 * 1024  # glibc mmaps a block this large, as it does XLA's buffers
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(ctypes.c_size_t(size))
    ctypes.memset(block, 1, size)
    print("faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, flush=True)
    """
)


def _run(env_update: dict) -> list[list[str]]:
    """Runs CHILD with `env_update` and returns its output lines, split."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", cli.HUGE_PAGES_ENV)}
    env.update(env_update, PYTHONPATH=REPO)
    out = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    return [line.split() for line in out.stdout.splitlines()]


def test_restart_sets_the_tunable_in_the_same_process_and_cuts_page_faults():
    """Where supported, the command restarts once (same PID) with the tunable, and fresh memory comes in
    huge pages: far fewer page faults than with FASTSCNN_HUGE_PAGES=0, which leaves the process alone."""
    off = _run({cli.HUGE_PAGES_ENV: "0"})
    assert [line[0] for line in off] == ["start", "faults"]  # no restart
    assert off[0][2] == "None"
    off_faults = int(off[1][1])
    assert off_faults > 10_000  # 64 MiB in 4 KiB pages
    on = _run({})
    if not cli.huge_pages_supported():
        assert [line[0] for line in on] == ["start", "faults"]
        return
    assert [line[0] for line in on] == ["start", "start", "faults"]
    assert on[0][1] == on[1][1]  # execv: the same process
    assert on[0][2] == "None" and on[1][2] == cli.HUGE_PAGES_TUNABLE
    assert int(on[2][1]) < off_faults / 20, (on, off)


def test_restart_keeps_other_tunables_and_does_not_loop():
    """Tunables already set are kept (the huge-page one appended); a hugetlb setting is left as it is."""
    on = _run({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    starts = [line for line in on if line[0] == "start"]
    if cli.huge_pages_supported():
        assert starts[-1][2] == "glibc.malloc.arena_max=2:" + cli.HUGE_PAGES_TUNABLE
    assert len(_run({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})) == 2  # start, faults: no restart
