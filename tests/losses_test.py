"""Tests of fastscnn_jax.losses: the cross-entropy against a numpy reference, OHEM and class weights."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastscnn_jax import losses


def _reference_ce(logits, labels, ignore, weights=None, smoothing=0.0):
    """Numpy cross-entropy: weighted mean over non-void pixels."""
    k = logits.shape[-1]
    logits = logits.reshape(-1, k).astype(np.float64)
    labels = labels.reshape(-1)
    logp = logits - logits.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    total, norm = 0.0, 0.0
    for row, lab in zip(logp, labels, strict=True):
        if lab == ignore:
            continue
        target = np.full(k, smoothing / k)
        target[lab] += 1 - smoothing
        w = 1.0 if weights is None else weights[lab]
        total += w * -(target * row).sum()
        norm += w
    return total / norm


@pytest.fixture
def loss_inputs():
    """Random logits and labels (with void pixels) for 4 classes, void = 4."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 6, 4)).astype(np.float32) * 3
    labels = rng.integers(0, 5, size=(2, 5, 6))
    return logits, labels


def test_loss_matches_reference_and_ignores_void(loss_inputs):
    """Plain, class-weighted and label-smoothed losses equal a numpy reference; void pixels don't count."""
    logits, labels = loss_inputs
    weights = np.array([0.5, 2.0, 1.0, 3.0], np.float32)
    for w, eps in [(None, 0.0), (weights, 0.0), (None, 0.1), (weights, 0.2)]:
        got = losses.segmentation_loss(
            jnp.asarray(logits),
            jnp.asarray(labels),
            ignore_label=4,
            weights=None if w is None else jnp.asarray(w),
            label_smoothing=eps,
        )
        np.testing.assert_allclose(float(got), _reference_ce(logits, labels, 4, w, eps), rtol=1e-5)
    changed = logits.copy()
    changed[labels == 4] = 100.0  # any logits on void pixels
    np.testing.assert_allclose(
        float(losses.segmentation_loss(jnp.asarray(changed), jnp.asarray(labels), ignore_label=4)),
        float(losses.segmentation_loss(jnp.asarray(logits), jnp.asarray(labels), ignore_label=4)),
        rtol=1e-6,
    )


def test_loss_gradient_matches_log_softmax_autodiff(loss_inputs):
    """The loss's gradient equals autodiff of -<target, log_softmax> written out (weights, smoothing)."""
    logits, labels = loss_inputs
    weights = jnp.asarray([0.5, 2.0, 1.0, 3.0], jnp.float32)

    def reference(x, w, eps):
        """Weighted mean of -<smoothed one-hot, log_softmax> over non-void pixels, differentiated by JAX."""
        valid = labels != 4
        target = jax.nn.one_hot(np.where(valid, labels, 0), 4) * (1 - eps) + eps / 4
        ce = -jnp.sum(target * jax.nn.log_softmax(x), -1)
        pixel = valid * (1.0 if w is None else w[np.where(valid, labels, 0)])
        return jnp.sum(pixel * ce) / jnp.sum(pixel)

    for w, eps in [(None, 0.0), (weights, 0.0), (None, 0.1), (weights, 0.2)]:
        got = jax.grad(
            lambda x, w=w, eps=eps: losses.segmentation_loss(
                x, jnp.asarray(labels), ignore_label=4, weights=w, label_smoothing=eps
            )
        )(jnp.asarray(logits))
        expected = jax.grad(functools.partial(reference, w=w, eps=eps))(jnp.asarray(logits))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_ohem_keeps_only_hard_pixels(loss_inputs):
    """OHEM averages over pixels whose true-class probability is below the threshold (or the k hardest)."""
    logits, labels = loss_inputs
    probs = jax.nn.softmax(jnp.asarray(logits))
    valid = labels != 4
    true_prob = np.take_along_axis(np.asarray(probs), np.where(valid, labels, 0)[..., None], -1)[..., 0]
    hard = valid & (true_prob <= 0.3)
    assert 0 < hard.sum() < valid.sum()
    expected = _reference_ce(logits[hard][None], labels[hard][None], 4)
    got = losses.segmentation_loss(
        jnp.asarray(logits), jnp.asarray(labels), ignore_label=4, ohem_threshold=0.3
    )
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    # min_kept larger than the hard set: the k hardest valid pixels count.
    k = int(hard.sum()) + 5
    kth = np.sort(true_prob[valid])[k - 1]
    keep = valid & (true_prob <= kth)
    got = losses.segmentation_loss(
        jnp.asarray(logits), jnp.asarray(labels), ignore_label=4, ohem_threshold=0.3, ohem_min_kept=k
    )
    np.testing.assert_allclose(
        float(got), _reference_ce(logits[keep][None], labels[keep][None], 4), rtol=1e-5
    )


def test_class_weights():
    """ENet and median-frequency weights follow their formulas; absent classes get 0; bad names raise."""
    counts = np.array([700, 200, 100, 0])
    freq = counts / 1000
    np.testing.assert_allclose(
        losses.class_weights(counts, "enet")[:3], 1 / np.log(1.02 + freq[:3]), rtol=1e-6
    )
    np.testing.assert_allclose(
        losses.class_weights(counts, "median_frequency"), [0.2 / 0.7, 1.0, 2.0, 0.0], rtol=1e-6
    )
    assert losses.class_weights(counts, "enet")[3] == 0
    assert losses.class_weights(counts, "none") is None
    with pytest.raises(ValueError, match="class_weighting"):
        losses.class_weights(counts, "inverse")
