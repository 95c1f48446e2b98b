"""End-to-end tests of the command-line entry points: train and evaluate (SIGTERM, kill -9 and resume are
tests/faults_test.py's, against the uninterrupted run made here).

The runs train configs/tiny.py on the small synthetic CamVid of tests/conftest.py (`small_camvid`).
"""

import fcntl
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from configs import tiny
from fastscnn_jax import camvid, evaluate
from tests.conftest import non_void_pixels, shared_temp_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")


def _command(module, *args, data_flags):
    """argv for `python -m fastscnn_jax.<module>` with the tiny config and the test's dataset."""
    return [sys.executable, "-m", f"fastscnn_jax.{module}", f"--config={TINY}", *data_flags, *args]


def _env():
    """Environment with the repository importable from any working directory."""
    return {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"}


_SESSION: dict = {}


def _cache_vars() -> dict:
    """tests/conftest.py's session-wide JAX compilation cache, with every program written to it."""
    return {
        "JAX_COMPILATION_CACHE_DIR": os.environ["JAX_COMPILATION_CACHE_DIR"],
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def compile_cache_env() -> dict:
    """`_env()` plus `_cache_vars()`: a run's programs go to (and come from) the session's cache.

    A run that finds its programs there skips about a minute of compiling on 2 CPU cores; the executables are
    the same, so the results are bit-equal (the resume tests below compare against a run that wrote it).
    """
    return {**_env(), **_cache_vars()}


def _run_uninterrupted(cwd: pathlib.Path, data_flags) -> subprocess.CompletedProcess:
    """The tiny training command, started with no --workdir from the empty directory `cwd`."""
    cwd.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        _command("main", data_flags=data_flags),
        cwd=cwd,
        env=compile_cache_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def uninterrupted_run(tmp_path_factory, data_flags):
    """(workdir, CompletedProcess) of an uninterrupted tiny run started with no --workdir from an empty
    directory; run once per test session (tests/faults_test.py compares against it too).

    Under pytest-xdist the workers share it: the first to need it runs it under a file lock in the session's
    temporary root and records the result there; a worker that needs it later (this file and
    tests/faults_test.py may run on different workers) reads that record instead of training again.
    """
    if "trained" in _SESSION:
        return _SESSION["trained"]
    shared = shared_temp_dir(tmp_path_factory, "uninterrupted_run")
    with open(shared / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        record = shared / "result.json"
        if not record.exists():
            result = _run_uninterrupted(shared / "cwd", data_flags)
            fields = ("args", "returncode", "stdout", "stderr")
            record.write_text(json.dumps({k: getattr(result, k) for k in fields}))
        result = subprocess.CompletedProcess(**json.loads(record.read_text()))
    _SESSION["trained"] = (shared / "cwd" / "runs" / "tiny", result)
    return _SESSION["trained"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_data_flags):
    """An uninterrupted tiny run, started with no --workdir from an empty directory."""
    return uninterrupted_run(tmp_path_factory, small_data_flags)


def test_main_writes_default_workdir_checkpoints_events_and_scores(trained):
    """The run prints its default workdir and leaves checkpoints, TensorBoard events and eval_val.json."""
    workdir, result = trained
    assert f"workdir: {workdir}" in result.stdout
    config = tiny.get_config()
    assert (workdir / "checkpoints" / str(config.num_train_steps) / "state").is_dir()
    assert (workdir / "best" / str(config.num_train_steps) / "variables").is_dir()
    assert list(workdir.glob("events.out.tfevents.*"))
    scores = json.loads((workdir / "eval_val.json").read_text())
    assert set(scores["per_class_iou"]) == set(camvid.CLASS_NAMES)
    assert 0 <= scores["miou"] <= 1 and 0 <= scores["pixel_accuracy"] <= 1
    assert "parameter" in result.stderr.lower() or "Total" in result.stderr  # parameter overview logged


def test_evaluate_cli_reproduces_the_training_evaluation(trained, tmp_path, small_camvid, small_data_flags):
    """`evaluate` on the workdir's best checkpoint gives the scores training recorded, and prints a table."""
    workdir, _ = trained
    output = tmp_path / "eval.json"
    result = subprocess.run(
        _command(
            "evaluate",
            f"--workdir={workdir}",
            f"--output={output}",
            "--split=val",
            data_flags=small_data_flags,
        ),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    got = json.loads(output.read_text())
    recorded = json.loads((workdir / "eval_val.json").read_text())
    assert got["miou"] == pytest.approx(recorded["miou"], abs=1e-6)
    assert got["pixel_accuracy"] == pytest.approx(recorded["pixel_accuracy"], abs=1e-6)
    assert np.asarray(got["confusion_matrix"]).sum() == non_void_pixels(small_camvid[0], "val")
    assert "Bicyclist" in result.stdout and "miou" in result.stdout


def test_evaluate_missing_split_names_it(trained, small_camvid):
    """Asking for a split the local copy lacks is a DatasetError naming it."""
    config = tiny.get_config()
    config.dataset_dir, config.tfds_data_dir = map(str, small_camvid)
    with pytest.raises(camvid.DatasetError, match='split "test"'):
        evaluate.evaluate_checkpoint(config, str(trained[0]), "test")


def test_evaluate_one_sequence_scores_exactly_its_frames(trained, small_camvid):
    """`--sequence` (here 0006R0 of train, the sequence to hold out) scores every non-void pixel of that
    sequence's frames once and nothing else; a sequence the split lacks is a DatasetError naming it."""
    config = tiny.get_config()
    config.dataset_dir, config.tfds_data_dir = map(str, small_camvid)
    result = evaluate.evaluate_checkpoint(config, str(trained[0]), "train", "0006R0")
    scored = np.asarray(result["confusion_matrix"]).sum()
    assert scored == non_void_pixels(small_camvid[0], "train", "0006R0")
    assert 0 < scored < non_void_pixels(small_camvid[0], "train")
    assert result["sequence"] == "0006R0"
    with pytest.raises(camvid.DatasetError, match='sequence "0006R0" has no frames in split "val"'):
        evaluate.evaluate_checkpoint(config, str(trained[0]), "val", "0006R0")


def test_incompatible_workdir_is_a_clear_error(trained, small_data_flags):
    """Resuming a workdir with another model width fails with a message naming the difference."""
    result = subprocess.run(
        _command("main", f"--workdir={trained[0]}", "--config.model.width=0.5", data_flags=small_data_flags),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0
    assert "incompatible model" in result.stderr and "width" in result.stderr


def test_unknown_config_key_is_named(tmp_path):
    """A misspelt override fails before training, naming the key."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastscnn_jax.main",
            f"--config={TINY}",
            "--config.bacth_size=4",
            f"--workdir={tmp_path}",
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "bacth_size" in result.stderr and "Traceback" not in result.stderr


def test_missing_config_file_is_named(tmp_path):
    """A config path that does not exist fails at start with one message naming it."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastscnn_jax.main",
            "--config=configs/nonexistent.py",
            f"--workdir={tmp_path}",
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "configs/nonexistent.py" in result.stderr and "Traceback" not in result.stderr
