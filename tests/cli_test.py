"""Tests of the entry points' process set-up: the restart with glibc's malloc tunables, inline dispatch."""

import os
import subprocess
import sys
import textwrap

from fastscnn_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Prints the tunables and PID, restarts, then twice mallocs, touches and frees 64 MiB (numpy would ask for
# huge pages itself) and prints the page faults each round took.
CHILD = textwrap.dedent(
    """
    import ctypes, os, resource
    from fastscnn_jax import cli
    print("start", os.getpid(), os.environ.get("GLIBC_TUNABLES"), flush=True)
    cli.restart_with_malloc_tunables()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 * 1024 * 1024  # glibc mmaps a block this large by default, as it does XLA's buffers
    faults = []
    for _ in range(2):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(ctypes.c_size_t(size))
        ctypes.memset(block, 1, size)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print("faults", *faults, flush=True)
    """
)

# After the restart, optionally `inline_cpu_dispatch`, then runs a jitted function with 64 MiB buffers four
# times and prints the page faults of the last three calls.
JAX_CHILD = textwrap.dedent(
    """
    import resource, sys
    from fastscnn_jax import cli
    cli.restart_with_malloc_tunables()
    inline = cli.inline_cpu_dispatch() if sys.argv[1] == "inline" else False
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: jnp.sin(x * 2.0) + jnp.cos(x)[::-1])
    x = jnp.ones((16 * 1024 * 1024,), jnp.float32)
    jax.block_until_ready(f(x))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        y = jax.block_until_ready(f(x))
        del y
    print(inline, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, flush=True)
    """
)


def _run(env_update: dict, child: str = CHILD, *args: str) -> list[list[str]]:
    """Runs `child` with `env_update` and returns its output lines, split."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("GLIBC_TUNABLES", cli.HUGE_PAGES_ENV, cli.MALLOC_TUNABLES_ENV)
    }
    env.update(env_update, PYTHONPATH=REPO)
    out = subprocess.run(
        [sys.executable, "-c", child, *args], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    return [line.split() for line in out.stdout.splitlines()]


def _wanted() -> str:
    """GLIBC_TUNABLES as the restart sets it in an environment without any: ours, in order."""
    return ":".join(f"{k}={v}" for k, v in cli.wanted_tunables().items())


def test_restart_sets_the_tunables_in_the_same_process_and_cuts_page_faults():
    """Where supported, the command restarts once (same PID) with the tunables; fresh memory comes in huge
    pages and freed memory is reused: far fewer page faults than with FASTSCNN_MALLOC_TUNABLES=0 (or the
    older FASTSCNN_HUGE_PAGES=0), which leave the process alone."""
    for switch in (cli.MALLOC_TUNABLES_ENV, cli.HUGE_PAGES_ENV):
        off = _run({switch: "0"})
        assert [line[0] for line in off] == ["start", "faults"]  # no restart
        assert off[0][2] == "None"
    off_first, off_second = (int(n) for n in off[1][1:])
    assert off_first > 10_000 and off_second > 10_000  # 64 MiB in 4 KiB pages, mmapped afresh each time
    on = _run({})
    if not cli.malloc_tunables_supported():
        assert [line[0] for line in on] == ["start", "faults"]
        return
    assert [line[0] for line in on] == ["start", "start", "faults"]
    assert on[0][1] == on[1][1]  # execv: the same process
    assert on[0][2] == "None" and on[1][2] == _wanted()
    first, second = (int(n) for n in on[2][1:])
    if cli.huge_pages_supported():
        assert first < off_first / 20, (on, off)
    assert second < 50, (on, off)  # the freed block was kept and reused


def test_restart_keeps_other_tunables_and_their_values_and_does_not_loop():
    """Tunables already set are kept (ours appended); a value the user gave one of ours is left as it is;
    the restart happens once."""
    if not cli.malloc_tunables_supported():
        return
    on = _run({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    starts = [line for line in on if line[0] == "start"]
    assert len(starts) == 2
    assert starts[-1][2] == "glibc.malloc.arena_max=2:" + _wanted()
    user = _run({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    starts = [line for line in user if line[0] == "start"]
    assert len(starts) == 2
    tunables = dict(item.split("=") for item in starts[-1][2].split(":"))
    assert tunables["glibc.malloc.hugetlb"] == "0"
    assert tunables["glibc.malloc.mmap_max"] == "0"
    assert len(_run({"GLIBC_TUNABLES": _wanted()})) == 2  # start, faults: all set already, no restart


def test_inline_dispatch_reuses_the_memory_of_large_buffers():
    """With the tunables and `inline_cpu_dispatch`, repeated calls of a jitted function with 64 MiB buffers
    take (almost) no page faults; asynchronous dispatch, or no tunables, fault them in every call."""
    if not cli.malloc_tunables_supported():
        return
    inline = _run({}, JAX_CHILD, "inline")
    assert inline[-1][0] == "True"
    assert int(inline[-1][1]) < 100, inline
    not_inline = _run({}, JAX_CHILD, "async")
    assert not_inline[-1][0] == "False"
    off = _run({cli.MALLOC_TUNABLES_ENV: "0"}, JAX_CHILD, "inline")
    assert off[-1][0] == "False"  # no mmap_max=0 in this process: dispatch left asynchronous
    assert int(off[-1][1]) > 3 * 16_000, off  # 3 calls, at least one 64 MiB buffer each in 4 KiB pages
    assert int(not_inline[-1][1]) > int(inline[-1][1]), (not_inline, inline)
