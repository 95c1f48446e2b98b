"""Multi-process training on JAX's distributed runtime, proven on one machine over loopback (gloo on CPU).

Two processes with one CPU device each train the tiny config on the small CamVid of tests/conftest.py; one
process with two (fake) CPU devices trains on the same global batches. They must agree: per-step losses, final
parameters and the evaluation, which each process computes on its own share of the split.
"""

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow as tf

from configs import tiny
from fastscnn_jax import checkpointing, multihost, steps
from tests.conftest import non_void_pixels, xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")
STEPS = 4
# Few steps, a loss every step, one checkpoint and one evaluation at the end (a save costs each process
# more than a step here).
OVERRIDES = [
    f"--config.num_train_steps={STEPS}",
    "--config.log_every_steps=1",
    f"--config.checkpoint_every_steps={STEPS}",
    f"--config.eval_every_steps={STEPS}",
]


def _env(devices: int) -> dict:
    """CPU-only environment with `devices` local devices and the repository importable."""
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = xla_flags(f"--xla_force_host_platform_device_count={devices}")
    return env


def _free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _main(workdir, data_flags, *extra) -> list[str]:
    """argv of a tiny training run."""
    return [
        sys.executable,
        "-m",
        "fastscnn_jax.main",
        f"--config={TINY}",
        f"--workdir={workdir}",
        *data_flags,
        *OVERRIDES,
        *extra,
    ]


def _losses(workdir) -> dict[int, float]:
    """train_loss by step from the TensorBoard events of a workdir."""
    losses = {}
    for path in workdir.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag == "train_loss":
                    losses[event.step] = float(tf.make_ndarray(value.tensor))
    return losses


def _start_two(workdir, data_flags, logdir, *extra) -> tuple[list, list]:
    """Starts a tiny training run as two processes (one CPU device each) on a free loopback port.

    Returns the processes and, for each, the (stdout, stderr) files it writes: files, not pipes, because a
    pipe nobody reads until the end can fill and stall its process, and the files say why one ended early.
    """
    port = _free_port()
    processes, logs = [], []
    for i in range(2):
        out, err = logdir / f"process_{i}.out", logdir / f"process_{i}.err"
        argv = _main(workdir, data_flags, f"--coordinator_address=127.0.0.1:{port}")
        argv += ["--num_processes=2", f"--process_id={i}", *extra]
        with open(out, "w") as stdout, open(err, "w") as stderr:
            processes.append(subprocess.Popen(argv, env=_env(1), stdout=stdout, stderr=stderr))
        logs.append((out, err))
    return processes, logs


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_data_flags):
    """(2-process workdir, its two logs, 1-process-2-device workdir).

    The one-process run goes beside the two-process job, whose processes wait on each other at every
    collective and barrier, leaving CPU time the run can use.
    """
    root = tmp_path_factory.mktemp("multihost")
    two, one = root / "two_processes", root / "one_process"
    processes, logs = _start_two(two, small_data_flags, root)
    single_err = root / "one_process.err"
    with open(single_err, "w") as stderr:
        single = subprocess.Popen(
            _main(one, small_data_flags), env=_env(2), stdout=subprocess.DEVNULL, stderr=stderr
        )
    try:
        for p in [*processes, single]:
            p.wait(timeout=600)
    finally:
        for p in [*processes, single]:
            p.kill()
    outputs = [(out.read_text(), err.read_text()) for out, err in logs]
    for i, (p, (_, err)) in enumerate(zip(processes, outputs, strict=True)):
        assert p.returncode == 0, f"process {i}:\n{err[-4000:]}"
    assert single.returncode == 0, single_err.read_text()[-4000:]
    return two, outputs, one


def test_two_processes_equal_one_process_with_two_devices(runs, small_camvid):
    """Same losses at every step, same final parameters and BN statistics, same evaluation."""
    two, outputs, one = runs
    losses_two, losses_one = _losses(two), _losses(one)
    assert sorted(losses_two) == list(range(1, STEPS + 1)), "process 0 must write every step's loss"
    np.testing.assert_allclose(
        [losses_two[s] for s in sorted(losses_two)], [losses_one[s] for s in sorted(losses_one)], rtol=1e-5
    )
    final_two, _ = checkpointing.load_variables(str(two / "checkpoints" / str(STEPS)))
    final_one, _ = checkpointing.load_variables(str(one / "checkpoints" / str(STEPS)))
    for a, b in zip(jax.tree.leaves(final_two), jax.tree.leaves(final_one), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    scores_two = json.loads((two / "eval_val.json").read_text())
    scores_one = json.loads((one / "eval_val.json").read_text())
    # Each val pixel counted exactly once across the two processes (5 images: an uneven share),
    # void excluded.
    matrix_two = np.asarray(scores_two["confusion_matrix"])
    np.testing.assert_array_equal(
        matrix_two.sum(axis=1), np.asarray(scores_one["confusion_matrix"]).sum(axis=1)
    )
    assert matrix_two.sum() == non_void_pixels(small_camvid[0], "val")
    assert scores_two["miou"] == pytest.approx(scores_one["miou"], abs=1e-4)


def test_only_process_zero_reports(runs):
    """One copy of everything: process 0 prints the workdir and progress, process 1 stays quiet."""
    two, outputs, _ = runs
    (out0, err0), (out1, err1) = outputs
    assert "workdir:" in out0 and "workdir:" not in out1
    assert "Training from step" in err0 and "Training from step" not in err1
    assert len(list(two.glob("events.out.tfevents.*"))) == 1


def test_two_process_checkpoint_restores_in_one_process(runs):
    """The 2-process job's training state restores, optimizer included, in this single process."""
    two, _, one = runs
    config = tiny.get_config()
    config.num_train_steps = STEPS
    model = steps.create_model(config)
    tx = steps.create_optimizer(config, steps.create_learning_rate_fn(config, STEPS))
    # As train_and_evaluate does it: the initial state, replicated over this process's mesh, is the target.
    mesh = steps.create_mesh()
    abstract = jax.device_put(
        steps.create_train_state(config, model, jax.random.key(0), tx),
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
    )
    copy = one.parent / "restored"
    shutil.copytree(two, copy)
    checkpoints = checkpointing.Checkpoints(str(copy))
    state, meta = checkpoints.restore_state(abstract)
    checkpoints.close()
    assert int(state.step) == STEPS and meta["step"] == STEPS
    reference, _ = checkpointing.load_variables(str(one / "checkpoints" / str(STEPS)))
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(reference["params"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert jax.tree.leaves(state.opt_state)  # Adam moments came back too


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(coordinator_address="127.0.0.1:1234"), "without --num_processes, --process_id"),
        (dict(coordinator_address="h:1", num_processes=2, process_id=2), "--process_id=2 must be in"),
        (dict(mode="off", process_id=0), "--distributed=off contradicts --process_id"),
        (dict(mode="sometimes"), "must be one of"),
    ],
)
def test_bad_distributed_flags_are_named(kwargs, message):
    """Flag mistakes are caught before JAX is touched, naming the flags."""
    with pytest.raises(ValueError, match=message):
        multihost.initialize(**kwargs)


def test_cluster_detection():
    """Which environments start the distributed runtime on their own."""
    # A plain machine runs one process; a Cloud TPU VM (libtpu installed) lets JAX look for a slice.
    plain = "Cloud TPU VM" if importlib.util.find_spec("libtpu") else None
    assert multihost.detected_cluster({}) == plain
    assert multihost.detected_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) == plain
    assert multihost.detected_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == "SLURM"
    assert multihost.detected_cluster({"OMPI_COMM_WORLD_SIZE": "2"}) == "Open MPI"
    assert multihost.detected_cluster({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1"}) == "JAX_COORDINATOR_ADDRESS"
    assert multihost.detected_cluster({"TPU_WORKER_HOSTNAMES": "a,b"}) == "Cloud TPU slice"


def test_global_batch_must_divide_over_processes(monkeypatch):
    """A global batch that the processes cannot share equally is refused, naming the key."""
    config = tiny.get_config()
    config.batch_size = 3
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "device_count", lambda: 2)
    with pytest.raises(
        steps.ConfigError,
        match=r"config.batch_size=3 \(global\) must be a positive multiple of the number of processes \(2\)",
    ):
        steps.validate_config(config)
    config.batch_size = 4
    steps.validate_config(config)


def test_sigterm_to_one_process_stops_the_job_at_one_step(runs, tmp_path, small_data_flags):
    """Preemption of one host: JAX's runtime tells the others, all save the same step and exit cleanly.

    The job is the fixture's, so process 0 loads its programs from the compilation cache (process 1 compiles
    its own: JAX gives it other cache keys and lets only process 0 write). Process 1 gets SIGTERM as soon as
    process 0 logs the start of training, seconds before the first step can run, so the job stops before its
    last step: at step 1 in the runs seen, a step no periodic checkpoint saves.
    """
    workdir = tmp_path / "preempted"
    processes, files = _start_two(workdir, small_data_flags, tmp_path)
    logs = [err for _, err in files]

    def tails() -> str:
        return "".join(f"\nprocess {i}:\n{log.read_text()[-3000:]}" for i, log in enumerate(logs))

    try:
        deadline = time.time() + 400
        while "Training from step" not in logs[0].read_text():
            assert all(p.poll() is None for p in processes), f"a process ended before training:{tails()}"
            assert time.time() < deadline, f"training did not start in 400 s:{tails()}"
            time.sleep(0.02)
        processes[1].send_signal(signal.SIGTERM)
        for p in processes:
            p.wait(timeout=300)
    finally:
        for p in processes:
            p.kill()
    outputs = [log.read_text() for log in logs]
    for i, (p, err) in enumerate(zip(processes, outputs, strict=True)):
        assert p.returncode == 0, f"process {i}:\n{err[-4000:]}"
    stopped = [int(err.split("SIGTERM at step ")[1].split(":")[0]) for err in outputs]
    assert stopped[0] == stopped[1] and 1 <= stopped[0] < STEPS, stopped
    assert (workdir / "checkpoints" / str(stopped[0]) / "state").is_dir()
