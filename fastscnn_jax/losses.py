"""The segmentation loss: optax's softmax cross-entropy over non-void pixels, with optional class weights,
label smoothing and online hard example mining (OHEM), and the class weights' estimators."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

CLASS_WEIGHTINGS = ("none", "enet", "median_frequency")


def class_weights(pixel_counts: np.ndarray, method: str) -> np.ndarray | None:
    """Per-class loss weights from train pixel counts.

    `enet`: 1 / ln(1.02 + frequency) (Paszke et al. 2016); `median_frequency`: median(freq) / freq
    (Eigen & Fergus 2015); `none`: no weighting. Classes with no pixels get weight 0.
    """
    if method not in CLASS_WEIGHTINGS:
        raise ValueError(f"config.class_weighting must be one of {CLASS_WEIGHTINGS}, got {method!r}")
    if method == "none":
        return None
    freq = pixel_counts / max(pixel_counts.sum(), 1)
    with np.errstate(divide="ignore"):
        if method == "enet":
            weights = 1.0 / np.log(1.02 + freq)
        else:
            weights = np.median(freq[freq > 0]) / freq
    return np.where(freq > 0, weights, 0.0).astype(np.float32)


def valid_labels(labels: jax.Array, num_classes: int, ignore_label: int) -> tuple[jax.Array, jax.Array]:
    """(pixels that count, labels with the void ones set to 0): void is `ignore_label` and anything
    outside 0..num_classes-1."""
    valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
    return valid, jnp.where(valid, labels, 0)


def ohem_mask(true_prob: jax.Array, valid: jax.Array, threshold: float, min_kept: int) -> jax.Array:
    """Pixels OHEM keeps: those whose true-class probability is at most `threshold`, and at least the
    `min_kept` hardest valid pixels (the threshold is raised to the `min_kept`-th smallest probability)."""
    threshold = jnp.float32(threshold)
    if min_kept > 0:
        flat = jnp.where(valid, true_prob, jnp.inf).reshape(-1)
        k = min(min_kept, flat.size)
        kth_smallest = -jax.lax.top_k(-flat, k)[0][-1]
        threshold = jnp.maximum(threshold, jnp.where(jnp.isfinite(kth_smallest), kth_smallest, 0.0))
    return true_prob <= threshold


def weighted_mean(per_pixel: jax.Array, pixel_weight: jax.Array) -> jax.Array:
    """Sum of `per_pixel * pixel_weight` over the weights' sum (PyTorch's weighted-mean convention)."""
    return jnp.sum(pixel_weight * per_pixel) / jnp.maximum(jnp.sum(pixel_weight), 1e-6)


def segmentation_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    ignore_label: int,
    weights: jax.Array | None = None,
    label_smoothing: float = 0.0,
    ohem_threshold: float = 0.0,
    ohem_min_kept: int = 0,
) -> jax.Array:
    """Cross-entropy over non-void pixels, optionally class-weighted, label-smoothed and OHEM-filtered.

    Args:
      logits: [..., K] float logits at the labels' resolution.
      labels: integer labels, `logits`' shape without its last axis; `ignore_label` (and any value outside
        0..K-1) is void.
      ignore_label: the void label.
      weights: optional [K] class weights; the loss is their weighted mean (PyTorch's convention).
      label_smoothing: mass spread uniformly over the K classes.
      ohem_threshold: when > 0, only pixels whose true-class probability is at most this count (OHEM).
      ohem_min_kept: with OHEM, at least this many of the hardest valid pixels always count.

    Returns:
      scalar loss.
    """
    num_classes = logits.shape[-1]
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels {labels.shape} do not match logits {logits.shape} without the class axis")
    logits = logits.astype(jnp.float32)
    valid, labels = valid_labels(labels, num_classes, ignore_label)
    hard_ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    if label_smoothing:
        targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
        ce = optax.softmax_cross_entropy(logits, targets)
    else:
        ce = hard_ce
    pixel_weight = valid.astype(jnp.float32)
    if weights is not None:
        pixel_weight = pixel_weight * jnp.asarray(weights, jnp.float32)[labels]
    if ohem_threshold > 0:
        true_prob = jax.lax.stop_gradient(jnp.exp(-hard_ce))
        pixel_weight = pixel_weight * ohem_mask(true_prob, valid, ohem_threshold, ohem_min_kept)
    return weighted_mean(ce, pixel_weight)
