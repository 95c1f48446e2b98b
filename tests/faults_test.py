"""Faults while training: SIGTERM, kill -9 in the middle of a checkpoint save, and damaged checkpoints.

The end-to-end tests run the real command with configs/tiny.py (a checkpoint every 2 of 10 steps, 2 kept) on
the small CamVid of tests/conftest.py and compare final parameters with the uninterrupted run of
tests/main_test.py, sharing its JAX compilation cache so that each run here skips the compiling.
"""

import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastscnn_jax import checkpointing
from tests.main_test import TINY, _command, compile_cache_env, uninterrupted_run

# Runs `python -m fastscnn_jax.main` with orbax's commit of one checkpoint item held up: a test-only hook, so
# that the test can kill the process while that save is in progress. Production code has no such hook.
DRIVER = '''\
"""fastscnn_jax.main with the save of $HOLD_SAVE_OF held, after its files are written, before its commit."""
import os
import pathlib
import runpy
import time

from orbax.checkpoint._src.path import atomicity

finalize = atomicity.AtomicRenameTemporaryPath.finalize


async def held_finalize(self):
    if str(self.get_final()) == os.environ["HOLD_SAVE_OF"]:
        pathlib.Path(os.environ["HOLD_MARKER"]).touch()
        time.sleep(600)
    await finalize(self)

atomicity.AtomicRenameTemporaryPath.finalize = held_finalize
runpy.run_module("fastscnn_jax.main", run_name="__main__")
'''

FINAL = 10  # configs/tiny.py: num_train_steps


def _steps(workdir) -> list[int]:
    """Complete checkpoint steps of a workdir, oldest first."""
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _assert_same_variables(step_dir, reference_dir):
    """The params and batch_stats of two checkpoint folders are bit-equal."""
    got, _ = checkpointing.load_variables(str(step_dir))
    want, _ = checkpointing.load_variables(str(reference_dir))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


def _truncate_state(step_dir):
    """Cuts every array-data file of a checkpoint's state in half.

    Every one, not only the largest: how orbax splits a save into files differs between runs and CPUs, and
    a restore does not read all of them (cutting any of three small per-process b-tree files of a local run
    left its step restorable). In one CI run, with only step 8's largest file cut, the resume trained on
    and exited 0.
    """
    paths = sorted((step_dir / "state").rglob("d/*"))
    assert paths, f"no array-data files under {step_dir / 'state'}"
    for path in paths:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _swap_state(step_dir, other_step_dir):
    """Replaces the state files of one checkpoint with another's; its metadata (and SHA-256) stays."""
    shutil.rmtree(step_dir / "state")
    shutil.copytree(other_step_dir / "state", step_dir / "state")


def _run_main(workdir, data_flags):
    """The normal training command on `workdir`, to completion."""
    return subprocess.run(
        _command("main", f"--workdir={workdir}", data_flags=data_flags),
        env=compile_cache_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, small_data_flags):
    """One run interrupted three ways in turn, then finished:

    1. SIGTERM (as on preemption) once its first checkpoint (step 2) is written: it saves the step it is at
       and exits 0;
    2. the same command again, which resumes there and is killed (-9) while saving step 6;
    3. the newest complete checkpoint then damaged (every array file truncated);
    4. the same command again, to the end.

    One chain, because each start is a whole training process (most of this file's time), and each later
    start must handle what the earlier ones left: the SIGTERM save, the partial save, the damaged step.

    Returns a dict: workdir, `sigterm` (returncode, stderr and the step it stopped at), the kill (stderr of
    the killed run, complete steps and partial folders at the kill) and `final` (CompletedProcess).
    """
    uninterrupted_run(tmp_path_factory, small_data_flags)  # fills the compilation cache first
    root = tmp_path_factory.mktemp("interrupted")
    workdir = root / "run"
    command = [f"--config={TINY}", *small_data_flags, f"--workdir={workdir}"]

    process = subprocess.Popen(
        [sys.executable, "-m", "fastscnn_jax.main", *command],
        env=compile_cache_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 400
    while not (workdir / "checkpoints" / "2").is_dir():
        assert process.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    stopped = int(stderr.split("SIGTERM at step ")[1].split(":")[0]) if "SIGTERM at step " in stderr else None
    sigterm = {"returncode": process.returncode, "stderr": stderr, "stopped": stopped}
    assert stopped is not None and stopped < 6, f"not stopped before step 6 by SIGTERM:\n{stderr[-3000:]}"

    (root / "driver.py").write_text(DRIVER)
    marker = root / "save_in_progress"
    partial_item = workdir / "checkpoints" / f"6{checkpointing.PARTIAL_MARK}" / "state"
    env = {**compile_cache_env(), "HOLD_SAVE_OF": str(partial_item), "HOLD_MARKER": str(marker)}
    with open(root / "killed.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(root / "driver.py"), *command],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        deadline = time.time() + 400
        while not marker.exists():
            assert process.poll() is None, (root / "killed.log").read_text()[-3000:]
            assert time.time() < deadline, "the save of step 6 never started"
            time.sleep(0.05)
        steps_at_kill = _steps(workdir)
        partial_at_kill = sorted(
            p.name for p in (workdir / "checkpoints").glob(f"*{checkpointing.PARTIAL_MARK}*")
        )
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    _truncate_state(workdir / "checkpoints" / str(steps_at_kill[-1]))
    return {
        "workdir": workdir,
        "sigterm": sigterm,
        "killed_stderr": (root / "killed.log").read_text(),
        "steps_at_kill": steps_at_kill,
        "partial_at_kill": partial_at_kill,
        "final": _run_main(workdir, small_data_flags),
    }


def test_sigterm_saves_the_step_it_is_at_and_exits_0(interrupted):
    """SIGTERM after the first checkpoint: the run saves a checkpoint of the step it was at (any step, not
    only the periodic ones) and exits 0; the same command again resumes from it."""
    sigterm, stopped = interrupted["sigterm"], interrupted["sigterm"]["stopped"]
    assert sigterm["returncode"] == 0, sigterm["stderr"][-3000:]
    assert stopped >= 2  # after step 2's checkpoint
    killed_stderr = interrupted["killed_stderr"]
    assert f"Resuming from step {stopped}" in killed_stderr, killed_stderr[-3000:]
    # Kept (2 at a time): the two newest of the periodic steps 2 and 4 and the SIGTERM's step.
    assert interrupted["steps_at_kill"] == sorted({2, 4, stopped})[-2:]


def test_kill_during_save_then_a_damaged_step_resume_from_the_step_before(
    interrupted, tmp_path_factory, small_data_flags
):
    """kill -9 while step 6 is being written, then the newest complete step damaged: the rerun ignores the
    partial save, names the damaged step and why it does not restore, moves it aside, resumes from the step
    before and ends with the parameters (and the best checkpoint) of the uninterrupted run. (The step before
    is the SIGTERM's own save when that was step 3.)"""
    workdir, result = interrupted["workdir"], interrupted["final"]
    before, damaged = interrupted["steps_at_kill"]
    assert interrupted["partial_at_kill"] == [f"6{checkpointing.PARTIAL_MARK}"]
    assert result.returncode == 0, result.stderr[-4000:]
    checkpoints = workdir / "checkpoints"
    assert f"Checkpoint step {damaged} in {checkpoints} does not restore; skipping it." in result.stderr
    moved = workdir / checkpointing.CORRUPT_DIR / str(damaged)
    assert (
        f"Moved checkpoint step {damaged}, which does not restore, to {moved}; resuming from step {before}."
        in result.stderr
    ), result.stderr[-4000:]
    partial = checkpoints / f"6{checkpointing.PARTIAL_MARK}"
    assert (
        f"Ignoring partial checkpoint {partial} (a save that never completed: the process was killed while "
        f"saving); resuming from step {before}, the newest complete checkpoint." in result.stderr
    ), result.stderr[-4000:]
    assert f"Resuming from step {before}" in result.stderr
    assert not list(workdir.rglob(f"*{checkpointing.PARTIAL_MARK}*"))
    assert (moved / "state").is_dir() and _steps(workdir) == [8, FINAL]
    reference = uninterrupted_run(tmp_path_factory, small_data_flags)[0]
    _assert_same_variables(checkpoints / str(FINAL), reference / "checkpoints" / str(FINAL))
    _assert_same_variables(workdir / "best" / str(FINAL), reference / "best" / str(FINAL))


def test_no_restorable_checkpoint_stops_instead_of_starting_over(interrupted, tmp_path, small_data_flags):
    """Every checkpoint damaged (step 10: the state files of step 8, which orbax reads without error, caught
    by the SHA-256 saved with step 10; step 8: a truncated file): the command fails naming each step and why,
    and changes nothing."""
    workdir = tmp_path / "run"
    shutil.copytree(interrupted["workdir"], workdir)
    # Not a flipped byte as in the in-process test below: this run's arrays are zstd-compressed, and whether
    # a flipped byte gives wrong values (caught by the SHA-256) or a decoding error depends on the trained
    # values, which differ between CPUs (a CI run on another machine reported another reason for step 10).
    _swap_state(workdir / "checkpoints" / str(FINAL), workdir / "checkpoints" / "8")
    _truncate_state(workdir / "checkpoints" / "8")
    result = _run_main(workdir, small_data_flags)
    assert result.returncode != 0, result.stderr[-4000:]
    # One line from main, naming the folder and each step's reason, not a traceback of ours (orbax's threads
    # may still print "Event loop is closed" tracebacks at exit).
    assert "checkpointing.CheckpointError" not in result.stderr, result.stderr[-4000:]
    headline = f"error: {workdir / 'checkpoints'} holds checkpoints (steps 10, 8) but none restores"
    assert headline in result.stderr
    assert "(step 10: ValueError: the state read back has SHA-256 " in result.stderr
    assert "; step 8: ValueError: OUT_OF_RANGE: " in result.stderr
    assert "did not start from scratch" in result.stderr
    # Nothing moved: both steps in place, and only the fixture's damaged step set aside.
    assert _steps(workdir) == [8, FINAL]
    damaged = str(interrupted["steps_at_kill"][-1])
    assert [p.name for p in (workdir / checkpointing.CORRUPT_DIR).iterdir()] == [damaged]


# In-process checks of `Checkpoints` on a small state, one per kind of damage.


def _small_state(step: int) -> dict:
    """A small pytree standing in for a training state, different at each step."""
    return {
        "params": {"w": jnp.arange(600.0).reshape(20, 30) + step},
        "batch_stats": {"mean": jnp.full((3,), float(step))},
        "step": jnp.int32(step),
    }


def _delete_manifest(step_dir):
    """Deletes the OCDBT manifest of the state."""
    (step_dir / "state" / "manifest.ocdbt").unlink()


def _flip_a_byte(step_dir):
    """Flips one byte in the middle of the state's array data: orbax reads `_small_state` back without error
    (values from arange, the same on every machine), with wrong values."""
    path = max((step_dir / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate_meta(step_dir):
    """Cuts the JSON metadata in half."""
    path = step_dir / "meta" / "metadata"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# A failed restore leaves a tensorstore callback for orbax's closed event loop ("Event loop is closed").
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    "damage,why",
    [
        (_truncate_state, "OUT_OF_RANGE"),
        (_delete_manifest, "NOT_FOUND"),
        (_flip_a_byte, "the state read back has SHA-256"),
        (_truncate_meta, "JSONDecodeError"),
    ],
    ids=["truncated-data", "deleted-file", "flipped-byte", "truncated-meta"],
)
def test_restore_skips_a_damaged_step(tmp_path, caplog, damage, why):
    """The newest step damaged: metadata and state come from the step before, the warning says why, the
    damaged step is moved aside and can be saved again."""
    checkpoints = checkpointing.Checkpoints(str(tmp_path))
    for step in (2, 4):
        checkpoints.save_state(step, _small_state(step), {"step": step})
    checkpoints.close()
    damage(tmp_path / "checkpoints" / "4")

    checkpoints = checkpointing.Checkpoints(str(tmp_path))
    assert checkpoints.latest_step() == 4
    assert checkpoints.latest_meta()["step"] in (2, 4)  # the metadata of step 4 may be intact
    state, meta = checkpoints.restore_state(_small_state(0))
    assert meta == {"step": 2}
    jax.tree.map(np.testing.assert_array_equal, state, _small_state(2))
    assert why in checkpoints.bad_steps[4]
    assert f"Checkpoint step 4 in {tmp_path / 'checkpoints'} does not restore; skipping it. " in caplog.text
    assert why in caplog.text
    assert (tmp_path / checkpointing.CORRUPT_DIR / "4" / "state").is_dir()
    assert checkpoints.latest_step() == 2
    checkpoints.save_state(4, _small_state(4), {"step": 4})
    checkpoints.close()
    state, meta = checkpointing.Checkpoints(str(tmp_path)).restore_state(_small_state(0))
    assert meta == {"step": 4}
    jax.tree.map(np.testing.assert_array_equal, state, _small_state(4))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_nothing_restores_is_an_error_that_changes_nothing(tmp_path):
    """Every step damaged: CheckpointError naming each step and why; no folder moved."""
    checkpoints = checkpointing.Checkpoints(str(tmp_path))
    for step in (2, 4):
        checkpoints.save_state(step, _small_state(step), {"step": step})
    checkpoints.close()
    _flip_a_byte(tmp_path / "checkpoints" / "4")
    _delete_manifest(tmp_path / "checkpoints" / "2")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(
        checkpointing.CheckpointError, match=r"steps 4, 2\) but none restores \(step 4: .*SHA-256"
    ):
        checkpointing.Checkpoints(str(tmp_path)).restore_state(_small_state(0))
    _truncate_meta(tmp_path / "checkpoints" / "4")
    _truncate_meta(tmp_path / "checkpoints" / "2")
    with pytest.raises(checkpointing.CheckpointError, match="step 2: JSONDecodeError"):
        checkpointing.Checkpoints(str(tmp_path)).latest_meta()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_restore_onto_other_dtypes_is_not_a_checksum_error(tmp_path):
    """A state restored onto a target of other dtypes (a Python int step, as an un-placed TrainState has) is
    cast by orbax: not reported as damage."""
    checkpoints = checkpointing.Checkpoints(str(tmp_path))
    checkpoints.save_state(2, _small_state(2), {"step": 2})
    checkpoints.close()
    target = {**_small_state(0), "step": 0}
    state, meta = checkpointing.Checkpoints(str(tmp_path)).restore_state(target)
    assert meta == {"step": 2} and int(state["step"]) == 2
    np.testing.assert_array_equal(state["params"]["w"], _small_state(2)["params"]["w"])


def test_partial_first_save_is_reported_and_replaced(tmp_path, caplog):
    """A run killed during its first save: no checkpoint, a warning naming the partial folder, and the next
    save of that step succeeds."""
    partial = tmp_path / "checkpoints" / f"2{checkpointing.PARTIAL_MARK}"
    (partial / "state").mkdir(parents=True)
    checkpoints = checkpointing.Checkpoints(str(tmp_path))
    assert checkpoints.latest_step() is None and checkpoints.latest_meta() is None
    assert f"Ignoring partial checkpoint {partial}" in caplog.text and "starts from step 0" in caplog.text
    checkpoints.save_state(2, _small_state(2), {"step": 2})
    assert checkpoints.latest_step() == 2 and not partial.exists()
    checkpoints.close()


def test_best_saved_again_at_the_same_step_is_replaced(tmp_path, caplog):
    """A resumed run that evaluates a step again replaces that step's best checkpoint instead of failing."""
    checkpoints = checkpointing.Checkpoints(str(tmp_path))
    checkpoints.save_best(4, _small_state(4), {"step": 4, "scores": {"miou": 0.1}})
    checkpoints.save_best(4, _small_state(5), {"step": 4, "scores": {"miou": 0.2}})
    checkpoints.close()
    assert f"Replacing checkpoint step 4 in {tmp_path / 'best'}" in caplog.text
    variables, meta = checkpointing.load_variables(str(tmp_path))
    np.testing.assert_array_equal(variables["params"]["w"], _small_state(5)["params"]["w"])
    assert meta["scores"]["miou"] == 0.2
