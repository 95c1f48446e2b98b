"""Tests of the training loop (fastscnn_jax.train): early stopping, divergence, and the command's checks
before any data is read."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from fastscnn_jax import checkpointing, steps, train
from tests.conftest import make_fake_camvid, non_void_pixels, xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_batch_size_not_divisible_by_the_devices_is_named(tmp_path):
    """On 4 (fake CPU) devices, `--config.batch_size=6` stops the command before any data is read, naming
    the key, its value and the device count."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastscnn_jax.main",
            f"--config={os.path.join(REPO, 'configs', 'tiny.py')}",
            "--config.batch_size=6",
            "--config.dataset_dir=/nonexistent",
            f"--workdir={tmp_path}",
        ],
        env={
            **os.environ,
            "PYTHONPATH": REPO,
            "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=4"),
            "JAX_PLATFORMS": "cpu",
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "config.batch_size=6 must be a positive multiple of the number of devices (4)" in result.stderr


def _fake_run_config(tmp_path, sequences=("0001TP",)):
    """Tiny config training on a synthetic CamVid folder, evaluating and checkpointing every step."""
    config = tiny.get_config()
    camvid_dir = make_fake_camvid(tmp_path / "camvid", n=4, size=(32, 48), sequences=sequences)
    config.dataset_dir = str(camvid_dir)
    config.tfds_data_dir = str(tmp_path / "tfds")
    config.crop_size = (32, 48)
    config.batch_size = 2
    config.eval_batch_size = 2
    config.num_train_steps = 6
    config.eval_every_steps = 1
    config.checkpoint_every_steps = 1
    config.log_every_steps = 1
    return config


def test_early_stopping_and_divergence(tmp_path, monkeypatch):
    """No val gain for `patience` evaluations stops the run; a run whose parameters turn non-finite stops,
    naming the step, and keeps only the finite checkpoints before it."""
    config = _fake_run_config(tmp_path)
    config.learning_rate = 1e-12  # next to nothing is learned: val mIoU soon stops improving
    config.early_stopping_patience = 2
    config.checkpoint_every_steps = 100  # saved only when it stops (a save costs more than a step here)
    workdir = tmp_path / "early"
    train.train_and_evaluate(config, str(workdir))
    meta = checkpointing.Checkpoints(str(workdir)).latest_meta()
    assert meta["step"] < config.num_train_steps and meta["evals_since_best"] == 2, meta

    # Divergence at step 3, injected into the same compiled step (a learning rate that really diverges is
    # another program to compile): its parameters come back NaN.
    make_train_step = steps.make_train_step

    def diverging_at_step_3(*args, **kwargs):
        step = make_train_step(*args, **kwargs)

        def run(state, batch):
            state, step_metrics = step(state, batch)
            if int(state.step) == 3:
                state = state.replace(params=jax.tree.map(lambda p: p * np.nan, state.params))
            return state, step_metrics

        return run

    monkeypatch.setattr(steps, "make_train_step", diverging_at_step_3)
    config = _fake_run_config(tmp_path)
    config.learning_rate = 1e-12
    config.log_every_steps = 100  # the parameter check before saving must catch it on its own
    with pytest.raises(
        FloatingPointError, match="parameters are not finite at step 3; stopping without saving"
    ):
        train.train_and_evaluate(config, str(tmp_path / "diverged"))
    saved = sorted(int(p.name) for p in (tmp_path / "diverged" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [1, 2], saved
    for step in saved:
        variables, _ = checkpointing.load_variables(str(tmp_path / "diverged" / "checkpoints" / str(step)))
        assert bool(steps.all_finite(variables["params"])), f"non-finite checkpoint {step}"


def test_train_plus_val_with_a_held_out_sequence_and_moving_average(tmp_path):
    """`train_split='train+val'` trains on both splits without the frames of `holdout_sequence`; that
    sequence's train frames are evaluated (and select the best step) beside val. With `ema_decay` the moving
    average, not the raw weights, is what the best checkpoint and a training state give for inference. A
    held-out sequence the split lacks, or a split the dataset lacks, is refused, naming the key."""
    config = _fake_run_config(tmp_path, sequences=("0001TP", "0006R0"))
    config.train_split = "train+val"
    config.holdout_sequence = "0006R0"
    config.ema_decay = 0.9
    config.num_train_steps = -1
    config.num_epochs = 1
    config.batch_size = 1
    config.eval_batch_size = 1
    config.eval_every_steps = 4
    config.checkpoint_every_steps = 4
    workdir = tmp_path / "train_val"
    best = train.train_and_evaluate(config, str(workdir))
    # One epoch: the 0001TP frames of train and of val (2 + 2), the 0006R0 ones left out.
    assert best["step"] == 4
    held_out = json.loads((workdir / "eval_0006R0.json").read_text())
    val = json.loads((workdir / "eval_val.json").read_text())
    assert best["miou"] == held_out["miou"] and held_out["step"] == 4

    # The two 0006R0 train frames (train0001, train0003) and nothing else were scored: every non-void pixel
    # once. Val is scored whole.
    camvid_dir = pathlib.Path(config.dataset_dir)
    assert np.sum(held_out["confusion_matrix"]) == non_void_pixels(camvid_dir, "train", "0006R0")
    assert np.sum(val["confusion_matrix"]) == non_void_pixels(camvid_dir, "val")

    latest, latest_meta = checkpointing.load_variables(str(workdir / "checkpoints"))
    # What a release of the final state keeps: no digest of the training state the variables came from.
    assert latest_meta["step"] == 4 and checkpointing.DIGEST_KEY not in latest_meta
    best_variables, _ = checkpointing.load_variables(str(workdir / "best"))
    state = checkpointing._restore_arrays(workdir / "checkpoints" / "4" / "state")
    for name in ("params", "batch_stats"):
        jax.tree.map(np.testing.assert_array_equal, latest[name], state["ema"][name])
        jax.tree.map(np.testing.assert_array_equal, best_variables[name], state["ema"][name])
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), state["ema"]["params"], state["params"])
    assert max(jax.tree.leaves(moved)) > 0  # the average lags the raw weights

    config.holdout_sequence = "0016E5"
    with pytest.raises(steps.ConfigError, match=r"config.holdout_sequence='0016E5'.*0001TP, 0006R0"):
        train.train_and_evaluate(config, str(tmp_path / "bad"))
    config.holdout_sequence = ""
    config.train_split = "train+trainval"
    with pytest.raises(
        steps.ConfigError, match=r"config.train_split='train\+trainval': split \"trainval\" not found"
    ):
        train.train_and_evaluate(config, str(tmp_path / "bad"))
