"""Tests of the shipped CamVid weights: evaluate and predict use them by default, matching the model card."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fastscnn_jax import camvid, checkpointing
from tests.conftest import TEST_XLA_FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_CARD_EVAL = os.path.join(REPO, "docs", "eval_val.json")


def _run(module, *args):
    """Runs `python -m fastscnn_jax.<module>` from the repository root, as a user would.

    With XLA's default optimisation level, not the suite's level 0 (tests/conftest.py): these run the
    full-width network over whole 360x480 images, 101 of them for evaluate, where running takes longer than
    compiling.
    """
    flags = os.environ.get("XLA_FLAGS", "").replace(TEST_XLA_FLAGS, "").strip()
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2", "XLA_FLAGS": flags}
    return subprocess.run(
        [sys.executable, "-m", f"fastscnn_jax.{module}", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_shipped_weights_are_small_and_carry_their_settings():
    """The released file holds params and BN statistics (no optimizer state) and its model settings."""
    assert os.path.getsize(checkpointing.DEFAULT_WEIGHTS) < 8 * 2**20
    variables, meta = checkpointing.load_variables(checkpointing.DEFAULT_WEIGHTS)
    assert set(variables) == {"params", "batch_stats"}
    assert meta["model"]["num_classes"] == camvid.NUM_CLASSES


def test_evaluate_defaults_to_shipped_weights_and_reproduces_the_model_card(
    tmp_path, real_camvid_builder, real_camvid_dir, real_tfds_dir
):
    """`evaluate` with no checkpoint scores the shipped weights on real val: >= 0.60 mIoU, as on the card."""
    output = tmp_path / "eval_val.json"
    result = _run(
        "evaluate",
        f"--config.dataset_dir={real_camvid_dir}",
        f"--config.tfds_data_dir={real_tfds_dir}",
        f"--output={output}",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    scores = json.loads(output.read_text())
    card = json.loads(open(MODEL_CARD_EVAL).read())
    assert scores["miou"] >= 0.60
    assert scores["miou"] == pytest.approx(card["miou"], abs=1e-4)
    assert scores["pixel_accuracy"] == pytest.approx(card["pixel_accuracy"], abs=1e-4)
    assert (tmp_path / "eval_val.png").is_file()  # the confusion-matrix plot


def test_predict_defaults_to_shipped_weights(tmp_path, real_camvid_dir):
    """`predict` with no checkpoint segments a real val photo mostly right, at its size."""
    name = "0016E5_07959.png"
    result = _run("predict", f"--input={real_camvid_dir / 'val' / name}", f"--output={tmp_path}")
    assert result.returncode == 0, result.stderr[-4000:]
    mask = np.asarray(Image.open(tmp_path / name.replace(".png", "_mask.png")))
    truth = np.asarray(Image.open(real_camvid_dir / "valannot" / name))
    assert mask.shape == truth.shape == (360, 480)
    valid = truth != camvid.IGNORE_LABEL
    assert (mask[valid] == truth[valid]).mean() > 0.8
