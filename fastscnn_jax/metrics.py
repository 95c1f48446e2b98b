"""Segmentation metrics as clu metrics: a confusion matrix accumulated over a split, and scores from it.

Steps return a `clu.metrics.Collection`; the host merges them and computes at log time. Void pixels and
padding examples are masked out before anything is counted.
"""

from collections.abc import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics

CONFUSION_IMPLS = ("auto", "bincount", "onehot")


def confusion_matrix(
    predictions: jax.Array, labels: jax.Array, valid: jax.Array, num_classes: int, impl: str = "auto"
) -> jax.Array:
    """[num_classes, num_classes] counts, rows = true class, columns = predicted class.

    Args:
      predictions: integer class predictions, any shape.
      labels: integer labels, same shape; values outside 0..num_classes-1 must be masked by `valid`.
      valid: boolean mask, same shape: pixels that count.
      num_classes: number of real classes.
      impl: 'bincount' counts label * K + prediction with `jnp.bincount` (a scatter-add, far cheaper on
        XLA:CPU than the one-hot product); 'onehot' is the product of
        [num_classes, pixels] one-hot planes (matrix units, no scatter); 'auto': 'onehot' on TPU,
        'bincount' elsewhere.

    Returns:
      float32 confusion matrix.
    """
    if impl not in CONFUSION_IMPLS:
        raise ValueError(f"confusion matrix impl must be one of {CONFUSION_IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "onehot" if jax.default_backend() == "tpu" else "bincount"
    if impl == "bincount":
        cells = num_classes * num_classes
        index = jnp.where(valid, labels * num_classes + predictions, cells).reshape(-1)
        counts = jnp.bincount(index, length=cells + 1)[:cells]
        return counts.astype(jnp.float32).reshape(num_classes, num_classes)
    classes = jnp.arange(num_classes)[:, None]
    valid = valid.reshape(1, -1)
    true = ((labels.reshape(1, -1) == classes) & valid).astype(jnp.float32)
    pred = (predictions.reshape(1, -1) == classes).astype(jnp.float32)
    return jnp.einsum("tn,pn->tp", true, pred, precision=jax.lax.Precision.HIGHEST)


@flax.struct.dataclass
class ConfusionMatrix(metrics.Metric):
    """Confusion matrix summed over every batch it is merged with."""

    matrix: jax.Array

    @classmethod
    def from_model_output(
        cls,
        *,
        label: jax.Array,
        valid: jax.Array,
        logits: jax.Array | None = None,
        class_axis: int = -1,
        predictions: jax.Array | None = None,
        num_classes: int | None = None,
        **_,
    ) -> "ConfusionMatrix":
        """Counts argmax(logits) (classes along `class_axis`) or `predictions` against `label` where `valid`.

        With `predictions` (integer classes, the shape of `label`), `num_classes` is required and
        `logits` is not used.
        """
        if predictions is None:
            if logits is None:
                raise ValueError("ConfusionMatrix needs logits or predictions")
            num_classes = logits.shape[class_axis]
            predictions = jnp.argmax(logits, class_axis)
        elif num_classes is None:
            raise ValueError("ConfusionMatrix from predictions needs num_classes")
        return cls(confusion_matrix(predictions, label, valid, num_classes))

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Sums the counts."""
        return type(self)(self.matrix + other.matrix)

    def compute(self) -> np.ndarray:
        """Returns the accumulated matrix as float64 numpy."""
        return np.asarray(self.matrix, np.float64)


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
    """What a train step reports."""

    loss: metrics.Average.from_output("loss")
    confusion: ConfusionMatrix


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
    """What an eval step reports."""

    confusion: ConfusionMatrix


def segmentation_scores(matrix: np.ndarray, class_names: Sequence[str]) -> dict:
    """mIoU, pixel accuracy, mean Dice and per-class IoU from a confusion matrix.

    Classes absent from both labels and predictions (zero denominator) are left out of the means and
    reported as NaN in `per_class_iou`.

    Args:
      matrix: [K, K] counts, rows true, columns predicted.
      class_names: K names, keys of `per_class_iou`.

    Returns:
      dict with `miou`, `pixel_accuracy`, `mean_dice` (floats) and `per_class_iou` (name -> float).
    """
    matrix = np.asarray(matrix, np.float64)
    if matrix.shape != (len(class_names), len(class_names)):
        raise ValueError(f"confusion matrix {matrix.shape} does not match {len(class_names)} class names")
    tp = np.diag(matrix)
    fp = matrix.sum(0) - tp
    fn = matrix.sum(1) - tp
    union = tp + fp + fn
    present = union > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(present, tp / union, np.nan)
        dice = np.where(present, 2 * tp / (2 * tp + fp + fn), np.nan)
    total = matrix.sum()
    return {
        "miou": float(np.nanmean(iou)) if present.any() else float("nan"),
        "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
        "mean_dice": float(np.nanmean(dice)) if present.any() else float("nan"),
        "per_class_iou": {name: float(v) for name, v in zip(class_names, iou, strict=True)},
    }


def format_table(scores: dict) -> str:
    """Per-class IoU table plus the summary scores, for printing."""
    lines = [f"{'class':<14}{'IoU':>8}"]
    lines += [f"{name:<14}{iou:>8.4f}" for name, iou in scores["per_class_iou"].items()]
    lines.append("-" * 22)
    for key in ("miou", "pixel_accuracy", "mean_dice"):
        lines.append(f"{key:<14}{scores[key]:>8.4f}")
    return "\n".join(lines)
