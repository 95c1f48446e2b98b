"""camvid.get_builder called by several processes at once on one unprepared TFDS data_dir, as every process
of a multi-process (JAX distributed) job does: one prepares, the others wait and load its result; a bad
dataset fails every one of them promptly with the error naming the bad file; a preparer killed midway
neither blocks nor breaks the next one."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading

from absl import logging as absl_logging

from fastscnn_jax import camvid
from tests.camvid_test import _bad_mask_values
from tests.conftest import checksums_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Seconds a child may take after the start signal; preparing a few tiny images takes about one.
TIMEOUT_S = 120
# Started with argv [dataset_dir, data_dir, checksums JSON]. It imports everything, says "ready" and waits
# for a line on stdin, so that all children call get_builder within milliseconds of each other.
CHILD = """
import json, sys
from absl import logging
logging.set_verbosity(logging.INFO)
logging.use_absl_handler()
from fastscnn_jax import camvid
dataset_dir, data_dir, checksums = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
print("ready", flush=True)
sys.stdin.readline()
builder = camvid.get_builder(dataset_dir=dataset_dir, data_dir=data_dir, checksums=checksums)
print("train examples:", sum(1 for _ in camvid.load_split(builder, "train")), flush=True)
"""
PREPARING = "Downloading and preparing dataset"  # TFDS prints this to stdout when it starts preparing.


def _run_together(n, dataset_dir, data_dir, checksums, tmp_path) -> list[tuple[int, str, str]]:
    """Runs CHILD in `n` processes started together; returns each one's (exit code, stdout, stderr)."""
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu"}
    argv = [sys.executable, "-c", CHILD, str(dataset_dir), str(data_dir), json.dumps(checksums)]
    procs, errs = [], []
    try:
        for i in range(n):
            # stderr to a file: a full pipe would stall a child (maybe one holding the lock) until we read it.
            errs.append(open(tmp_path / f"child{i}.err", "w+"))
            procs.append(
                subprocess.Popen(
                    argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errs[-1], text=True
                )
            )
        for p in procs:
            assert p.stdout.readline() == "ready\n", "child died before it was ready"
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for p, err in zip(procs, errs, strict=True):
            out, _ = p.communicate(timeout=TIMEOUT_S)
            err.seek(0)
            results.append((p.returncode, out, err.read()))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for err in errs:
            err.close()


def test_processes_prepare_once_and_all_load(fake_camvid_factory, tmp_path):
    """Three processes on one empty data_dir: all exit 0 and read all 3 train examples; exactly one of them
    prepared, and the data_dir holds the one prepared version and no leftover."""
    root = fake_camvid_factory(n=3, size=(16, 16))
    data_dir = tmp_path / "tfds"  # Missing: get_builder makes it.
    results = _run_together(3, root, data_dir, checksums_of(root), tmp_path)
    for code, out, err in results:
        assert code == 0, f"child failed:\n{err[-3000:]}"
        assert "train examples: 3\n" in out
    assert sum(PREPARING in out for _, out, _ in results) == 1, [out for _, out, _ in results]
    assert sorted(p.name for p in (data_dir / "camvid_segnet").iterdir()) == ["1.0.0"]


def test_bad_dataset_fails_every_process(fake_camvid_factory, tmp_path):
    """Two processes on a folder with a bad mask: both fail promptly (no hang), each naming the bad file,
    and nothing is prepared."""
    root = fake_camvid_factory(n=3, size=(16, 16))
    bad = _bad_mask_values(root)
    data_dir = tmp_path / "tfds"
    results = _run_together(2, root, data_dir, checksums_of(root), tmp_path)
    for code, _, err in results:
        assert code != 0
        assert "DatasetError" in err and str(bad) in err, err[-3000:]
    assert not (data_dir / "camvid_segnet" / "1.0.0").exists()


def test_killed_preparer_neither_blocks_nor_breaks_the_next(fake_camvid_factory, tmp_path, caplog):
    """A process holding the preparation lock is killed (SIGKILL) while get_builder waits for it, leaving a
    partial TFDS copy: get_builder then gets the lock, prepares and removes the leftover."""
    root = fake_camvid_factory(n=2, size=(16, 16))
    data_dir = tmp_path / "tfds"
    leftover = data_dir / "camvid_segnet" / "incomplete.KILLED_1.0.0"  # Named as TFDS names them.
    leftover.mkdir(parents=True)
    (leftover / "camvid_segnet-train.tfrecord-00000-of-00001").write_bytes(b"partial")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('locked', flush=True); time.sleep(600)",
            str(data_dir / ".camvid_segnet.lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    waited = threading.Event()

    class KillHolderWhenWaiting(logging.Handler):
        """Kills the holder once get_builder logs that it waits for it."""

        def emit(self, record):
            """Kills on the waiting message."""
            if record.getMessage().startswith("Waiting for another process"):
                waited.set()
                holder.kill()

    handler = KillHolderWhenWaiting()
    caplog.set_level(logging.INFO, logger="absl")
    absl_logging.get_absl_logger().addHandler(handler)
    safety = threading.Timer(TIMEOUT_S, holder.kill)  # Never hang, even if get_builder does not wait.
    safety.start()
    try:
        assert holder.stdout.readline() == "locked\n"
        builder = camvid.get_builder(str(root), data_dir=str(data_dir), checksums=checksums_of(root))
    finally:
        safety.cancel()
        absl_logging.get_absl_logger().removeHandler(handler)
        holder.kill()
        holder.communicate()
    assert waited.is_set() and holder.returncode == -signal.SIGKILL
    assert builder.info.splits["train"].num_examples == 2
    assert sorted(p.name for p in (data_dir / "camvid_segnet").iterdir()) == ["1.0.0"]
