"""Tests of fastscnn_jax.metrics: confusion matrices, clu merging and scores, against hand-computed values."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from fastscnn_jax import metrics

# Eight pixels as a 2x4 image: the void pixel (label 11) and one real pixel are masked out.
LABELS = np.array([[0, 0, 1, 2], [2, 11, 1, 0]])
PREDICTIONS = np.array([[0, 1, 1, 2], [0, 2, 2, 0]])
VALID = np.array([[True, True, True, True], [True, False, False, True]])
# Rows true, columns predicted: (0,0) x2, (0,1), (1,1), (2,2), (2,0); the masked (1,2) pixel is not counted.
EXPECTED = np.array([[2, 1, 0], [0, 1, 0], [1, 0, 1]], np.float64)


def _logits(predictions: np.ndarray, num_classes: int, seed: int = 0) -> jnp.ndarray:
    """Random logits whose argmax is `predictions` (the predicted class gets a +10 margin)."""
    noise = np.random.default_rng(seed).uniform(-1, 1, (*predictions.shape, num_classes))
    return jnp.asarray(noise + 10.0 * np.eye(num_classes)[predictions], jnp.float32)


@pytest.mark.parametrize("impl", metrics.CONFUSION_IMPLS)
def test_confusion_matrix_hand_computed(impl):
    """Counts match a hand-computed matrix; masked pixels (void or not) are left out."""
    matrix = metrics.confusion_matrix(
        jnp.asarray(PREDICTIONS), jnp.asarray(LABELS), jnp.asarray(VALID), 3, impl=impl
    )
    assert matrix.shape == (3, 3)
    assert matrix.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(matrix), EXPECTED)


@pytest.mark.parametrize("impl", metrics.CONFUSION_IMPLS)
def test_confusion_matrix_large_counts_exact(impl):
    """Counts of a large random batch equal numpy's bincount exactly (no precision loss)."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 12, (4, 96, 128))
    predictions = rng.integers(0, 11, (4, 96, 128))
    valid = labels < 11
    matrix = metrics.confusion_matrix(
        jnp.asarray(predictions), jnp.asarray(labels), jnp.asarray(valid), 11, impl=impl
    )
    expected = np.bincount(labels[valid] * 11 + predictions[valid], minlength=121).reshape(11, 11)
    np.testing.assert_array_equal(np.asarray(matrix), expected)
    with pytest.raises(ValueError, match="bogus"):
        metrics.confusion_matrix(jnp.asarray(predictions), jnp.asarray(labels), valid, 11, "bogus")


def test_from_model_output_and_merge():
    """ConfusionMatrix counts argmax(logits); merging two batches sums their matrices."""
    first = metrics.ConfusionMatrix.from_model_output(
        logits=_logits(PREDICTIONS, 3), label=jnp.asarray(LABELS), valid=jnp.asarray(VALID)
    )
    np.testing.assert_array_equal(first.compute(), EXPECTED)
    labels2, predictions2 = np.array([[1, 2], [2, 2]]), np.array([[1, 0], [2, 2]])
    second = metrics.ConfusionMatrix.from_model_output(
        logits=_logits(predictions2, 3, seed=1), label=jnp.asarray(labels2), valid=jnp.ones((2, 2), bool)
    )
    expected2 = np.zeros((3, 3))
    expected2[1, 1], expected2[2, 0], expected2[2, 2] = 1, 1, 2
    np.testing.assert_array_equal(second.compute(), expected2)
    merged = first.merge(second).compute()
    assert merged.dtype == np.float64
    np.testing.assert_array_equal(merged, EXPECTED + expected2)
    # Classes before pixels (the train step's [B, K, H, W] logits), class_axis=1: the same counts.
    class_major = jnp.moveaxis(_logits(PREDICTIONS, 3), -1, 1)
    third = metrics.ConfusionMatrix.from_model_output(
        logits=class_major, label=jnp.asarray(LABELS), valid=jnp.asarray(VALID), class_axis=1
    )
    np.testing.assert_array_equal(third.compute(), EXPECTED)
    # Predictions instead of logits (the train step's way): the same counts; num_classes is then needed.
    fourth = metrics.ConfusionMatrix.from_model_output(
        predictions=jnp.asarray(PREDICTIONS),
        num_classes=3,
        label=jnp.asarray(LABELS),
        valid=jnp.asarray(VALID),
    )
    np.testing.assert_array_equal(fourth.compute(), EXPECTED)
    with pytest.raises(ValueError, match="needs num_classes"):
        metrics.ConfusionMatrix.from_model_output(
            predictions=jnp.asarray(PREDICTIONS), label=LABELS, valid=VALID
        )
    with pytest.raises(ValueError, match="logits or predictions"):
        metrics.ConfusionMatrix.from_model_output(label=jnp.asarray(LABELS), valid=jnp.asarray(VALID))


def test_eval_metrics_collection_merge_and_compute():
    """The clu EvalMetrics collection builds, merges and computes the summed confusion matrix."""
    batch = dict(logits=_logits(PREDICTIONS, 3), label=jnp.asarray(LABELS), valid=jnp.asarray(VALID))
    first = metrics.EvalMetrics.single_from_model_output(**batch)
    # Second batch: same pixels, all valid, so the masked-out pixels now count too.
    second = metrics.EvalMetrics.single_from_model_output(
        **{**batch, "valid": jnp.asarray(LABELS < 3), "logits": _logits(PREDICTIONS, 3, seed=2)}
    )
    extra = np.zeros((3, 3))
    extra[1, 2] = 1  # The pixel masked in the first batch but valid in the second.
    computed = first.merge(second).compute()
    np.testing.assert_array_equal(computed["confusion"], 2 * EXPECTED + extra)


def test_train_metrics_average_loss_and_confusion():
    """TrainMetrics averages the loss over merged steps and sums the confusion matrices."""
    batch = dict(logits=_logits(PREDICTIONS, 3), label=jnp.asarray(LABELS), valid=jnp.asarray(VALID))
    first = metrics.TrainMetrics.single_from_model_output(loss=jnp.float32(1.0), **batch)
    second = metrics.TrainMetrics.single_from_model_output(loss=jnp.float32(4.0), **batch)
    computed = first.merge(second).compute()
    assert math.isclose(float(computed["loss"]), 2.5, rel_tol=1e-6)
    np.testing.assert_array_equal(computed["confusion"], 2 * EXPECTED)


def test_segmentation_scores_three_classes():
    """mIoU, pixel accuracy and mean Dice of a 3-class matrix equal the hand-computed values."""
    matrix = np.array([[5, 1, 0], [2, 3, 1], [0, 0, 4]])
    # tp = 5, 3, 4; fp (column sum - tp) = 2, 1, 1; fn (row sum - tp) = 1, 3, 0.
    scores = metrics.segmentation_scores(matrix, ["a", "b", "c"])
    iou = [5 / 8, 3 / 7, 4 / 5]
    dice = [10 / 13, 6 / 10, 8 / 9]
    assert scores["per_class_iou"] == pytest.approx({"a": iou[0], "b": iou[1], "c": iou[2]})
    assert scores["miou"] == pytest.approx(sum(iou) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(12 / 16)
    assert scores["mean_dice"] == pytest.approx(sum(dice) / 3)
    assert all(isinstance(scores[k], float) for k in ("miou", "pixel_accuracy", "mean_dice"))


def test_segmentation_scores_absent_and_prediction_only_classes():
    """A class absent everywhere is NaN and left out of the means; a predicted-only class counts as 0."""
    matrix = np.array(
        [
            [3, 1, 0, 0],
            [1, 2, 0, 1],  # One 'b' pixel predicted as 'd'.
            [0, 0, 0, 0],  # 'c': neither in labels nor predictions.
            [0, 0, 0, 0],  # 'd': only predicted.
        ]
    )
    scores = metrics.segmentation_scores(matrix, ["a", "b", "c", "d"])
    per_class = scores["per_class_iou"]
    assert list(per_class) == ["a", "b", "c", "d"]
    assert math.isnan(per_class["c"])
    assert per_class["a"] == pytest.approx(3 / 5)
    assert per_class["b"] == pytest.approx(2 / 5)
    assert per_class["d"] == 0.0
    assert scores["miou"] == pytest.approx((3 / 5 + 2 / 5 + 0) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(5 / 8)
    assert scores["mean_dice"] == pytest.approx((6 / 8 + 4 / 7 + 0) / 3)


def test_segmentation_scores_empty_matrix_is_nan():
    """An all-zero matrix gives NaN scores rather than raising."""
    scores = metrics.segmentation_scores(np.zeros((2, 2)), ["a", "b"])
    assert all(math.isnan(scores[k]) for k in ("miou", "pixel_accuracy", "mean_dice"))
    assert all(math.isnan(v) for v in scores["per_class_iou"].values())


def test_segmentation_scores_shape_mismatch_raises():
    """A matrix that does not match the number of class names raises ValueError."""
    with pytest.raises(ValueError, match="class names"):
        metrics.segmentation_scores(np.eye(3), ["a", "b"])
    with pytest.raises(ValueError):
        metrics.segmentation_scores(np.ones((2, 3)), ["a", "b"])


def test_format_table_lists_classes_and_scores():
    """The table names every class with its IoU and shows the mIoU."""
    matrix = np.array([[5, 1, 0], [2, 3, 1], [0, 0, 4]])
    names = ["Sky", "Building", "Pedestrian"]
    table = metrics.format_table(metrics.segmentation_scores(matrix, names))
    lines = table.splitlines()
    for name, iou in zip(names, [5 / 8, 3 / 7, 4 / 5], strict=True):
        (line,) = [line for line in lines if line.startswith(name)]
        assert f"{iou:.4f}" in line
    miou = (5 / 8 + 3 / 7 + 4 / 5) / 3
    (line,) = [line for line in lines if line.startswith("miou")]
    assert f"{miou:.4f}" in line
    assert f"{12 / 16:.4f}" in table
