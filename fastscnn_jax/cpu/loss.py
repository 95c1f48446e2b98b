"""The CPU layer's training loss: the same value and gradient as `steps.train_loss`, computed in forms that
XLA:CPU runs faster.

The logits are taken at 1/8 resolution with the classes first ([B, K, h, w]). The width is upsampled by a
matrix product; the height is upsampled inside the loss, phase by phase, so the full-resolution logits are
never written out; per-pixel sums and maxima over the classes are unrolled over the class planes; the
cross-entropy's gradient, softmax minus target, is written out so that forward and backward each read the
logits once. Tests compare values and gradients with the core's (tests/cpu_test.py).
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from fastscnn_jax import losses, models, steps


def resize_bilinear_class_major(
    x: jax.Array, size: Sequence[int], align_corners: bool = False, impl: str = "auto"
) -> jax.Array:
    """`resize_bilinear` of [B, K, H, W] `x` (classes before pixels), giving [B, K, height, width].

    The CPU training loss takes the logits in this layout (the width upsampled with this function, the
    height inside the loss, `loss_logits`): its per-pixel work at full resolution then runs along image
    rows rather than along the few classes, which XLA:CPU vectorises poorly. The width is resized first, at
    the input's height, by its interpolation matrix (a dot over the minor axis); the height then as
    `resize_bilinear` would (shifted sums for an integer factor with `impl` 'auto', else the matrix). Same
    values as `resize_bilinear` (to float rounding).
    """
    if impl not in models.RESIZE_IMPLS:
        raise ValueError(f"resize impl must be one of {models.RESIZE_IMPLS}, got {impl!r}")
    height, width = size
    if width != x.shape[3]:
        matrix = jnp.asarray(models.interpolation_matrix(width, x.shape[3], align_corners), x.dtype)
        x = jnp.einsum("bkhw,pw->bkhp", x, matrix)
    if height != x.shape[2]:
        scale = None if align_corners or impl == "matrix" else models._integer_scale(height, x.shape[2])
        if scale is not None:
            x = models._upsample_axis(x, 2, scale)
        else:
            matrix = jnp.asarray(models.interpolation_matrix(height, x.shape[2], align_corners), x.dtype)
            x = jnp.einsum("oh,bkhw->bkow", matrix, x)
    return x


def _class_planes(x: jax.Array, axis: int) -> list[jax.Array]:
    """The slices of `x` along its class `axis`, one per class."""
    return [jax.lax.index_in_dim(x, k, axis, keepdims=False) for k in range(x.shape[axis])]


def _sum(planes: list[jax.Array]) -> jax.Array:
    """Elementwise sum of a list of arrays."""
    return functools.reduce(jnp.add, planes)


# Per-pixel sums and maxima over the classes are written as elementwise operations on the K class planes
# rather than as reductions over the class axis: with the classes before the pixels ([B, K, H, W]),
# XLA:CPU runs such a reduction as a separate strided kernel, while the unrolled form fuses with its
# neighbours and stores no one-hot or per-class array.


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float, axis: int) -> jax.Array:
    """Per-pixel cross-entropy of float32 logits (classes along `axis`) against (smoothed) integer labels.

    logsumexp(logits) - <target, logits>, i.e. -<target, log_softmax(logits)>, with target the one-hot
    labels smoothed by `label_smoothing`. The gradient, softmax - target, is written out so that forward
    and backward each read the logits once (XLA's differentiation of log_softmax kept several
    full-resolution copies).
    """
    return _cross_entropy_fwd(logits, labels, label_smoothing, axis)[0]


def _logsumexp_and_target(planes, labels, label_smoothing):
    """Per-pixel logsumexp of the class planes and <target, logits>."""
    num_classes = len(planes)
    top = jax.lax.stop_gradient(functools.reduce(jnp.maximum, planes))
    lse = top + jnp.log(_sum([jnp.exp(p - top) for p in planes]))
    target_logit = _sum([jnp.where(labels == k, p, 0.0) for k, p in enumerate(planes)])
    if label_smoothing:
        target_logit = (1.0 - label_smoothing) * target_logit + label_smoothing / num_classes * _sum(planes)
    return lse, target_logit


def _cross_entropy_fwd(logits, labels, label_smoothing, axis):
    """Loss and residuals (logits, labels, logsumexp)."""
    lse, target_logit = _logsumexp_and_target(_class_planes(logits, axis), labels, label_smoothing)
    return lse - target_logit, (logits, labels, lse)


def _cross_entropy_bwd(label_smoothing, axis, residuals, grad):
    """Gradient w.r.t. logits, (softmax - target) * grad; none w.r.t. the integer labels."""
    logits, labels, lse = residuals
    num_classes = logits.shape[axis]
    planes = _class_planes(logits, axis)
    grads = []
    for k, p in enumerate(planes):
        target = (labels == k).astype(jnp.float32) * (1.0 - label_smoothing) + label_smoothing / num_classes
        grads.append((jnp.exp(p - lse) - target) * grad)
    return jnp.stack(grads, axis), None


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


# The train step's logits upsampled in height by an integer factor s, without the full-resolution array.
# Bilinear (half-pixel) upsampling by s makes output row i * s + r a weighted sum of input rows i - 1, i and
# i + 1 with weights that depend only on the phase r (`models._upsample_phases`). The loss and the confusion
# matrix are sums over pixels, so they can take the pixels in any order: with the labels rearranged to
# [B, s, h, W] (phase r, then low-resolution row i), each phase of the logits is an elementwise expression of
# the three row-shifted [B, h, W] class planes of the width-upsampled logits, which XLA fuses into the
# loss and the argmax. Upsampling by a stack (what `resize_bilinear_class_major` does) would write the
# [B, K, H, W] logits out and read them back. Same values to float rounding (the same weights, summed in the
# same order).


def height_phase_layout(x: jax.Array, scale: int) -> jax.Array:
    """[B, H, ...] -> [B, scale, H // scale, ...]: full-resolution row i * scale + r goes to [:, r, i]."""
    b, height = x.shape[:2]
    x = x.reshape((b, height // scale, scale) + x.shape[2:])
    return jnp.swapaxes(x, 1, 2)


def height_phase_planes(logits: jax.Array, scale: int) -> list[jax.Array]:
    """The K class planes of [B, K, h, W] `logits` upsampled in height by `scale`, each [B, scale, h, W].

    Plane k equals `height_phase_layout` of `resize_bilinear_class_major(logits, (h * scale, W))`
    [:, k], written as sums of shifted rows so that XLA can fuse it into whatever reads it.
    """
    taps = models._upsample_taps(logits, axis=2)
    return [_height_phases([tap[:, k, None] for tap in taps], scale) for k in range(logits.shape[1])]


def _height_phases(taps: list[jax.Array], scale: int) -> jax.Array:
    """The `scale` output-row phases from the three row taps, each with a size-1 phase axis at -3."""
    weights = models._upsample_phases(scale)
    return _sum([jnp.asarray(weights[:, t], tap.dtype)[:, None, None] * tap for t, tap in enumerate(taps)])


def _height_phase_grad(logits, labels, lse, label_smoothing, scale, grad):
    """Gradient w.r.t. [B, K, h, W] `logits` of `_phase_cross_entropy` (upstream gradient `grad`).

    (softmax - target) * grad for all classes and phases at once, [B, K, s, h, W], then the upsampling's
    transpose: each of the three row taps gets the phases' weighted sum, and the taps' own transpose
    (shifts and the repeated edge rows) gives the gradient of the logits.
    """
    num_classes = logits.shape[1]
    weights = models._upsample_phases(scale)
    taps, taps_vjp = jax.vjp(lambda x: models._upsample_taps(x, axis=2), logits)
    z = _height_phases([tap[:, :, None] for tap in taps], scale)
    classes = jnp.arange(num_classes)[:, None, None, None]
    target = (labels[:, None] == classes).astype(jnp.float32) * (1.0 - label_smoothing)
    target = target + label_smoothing / num_classes
    g = (jnp.exp(z - lse[:, None]) - target) * grad[:, None]
    per_tap = []
    for t in range(3):
        terms = [float(weights[r, t]) * g[:, :, r] for r in range(scale) if weights[r, t] != 0]
        per_tap.append(_sum(terms))
    (grad_logits,) = taps_vjp(per_tap)
    return grad_logits


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _phase_cross_entropy(
    logits: jax.Array, labels: jax.Array, label_smoothing: float, scale: int
) -> jax.Array:
    """`_cross_entropy` of `height_phase_planes(logits, scale)` against [B, scale, h, W] `labels`."""
    return _phase_cross_entropy_fwd(logits, labels, label_smoothing, scale)[0]


def _phase_cross_entropy_fwd(logits, labels, label_smoothing, scale):
    """Loss and residuals (the low-resolution logits, labels, logsumexp)."""
    planes = height_phase_planes(logits, scale)
    lse, target_logit = _logsumexp_and_target(planes, labels, label_smoothing)
    return lse - target_logit, (logits, labels, lse)


def _phase_cross_entropy_bwd(label_smoothing, scale, residuals, grad):
    """(softmax - target) * grad, recomputed from the low-resolution logits, through the upsampling."""
    logits, labels, lse = residuals
    return _height_phase_grad(logits, labels, lse, label_smoothing, scale, grad), None


_phase_cross_entropy.defvjp(_phase_cross_entropy_fwd, _phase_cross_entropy_bwd)


def argmax_planes(planes: list[jax.Array]) -> jax.Array:
    """Elementwise index of the largest of the class planes (the first on ties), as `jnp.argmax`."""
    best, index = planes[0], jnp.zeros(planes[0].shape, jnp.int32)
    for k, p in enumerate(planes[1:], 1):
        better = p > best
        best = jnp.where(better, p, best)
        index = jnp.where(better, k, index)
    return index


def loss_logits(logits: jax.Array, size, align_corners: bool = False) -> tuple[jax.Array, int]:
    """[B, K, h, w] low-resolution logits in the form `segmentation_loss` takes for labels of `size`.

    Returns (logits, height_scale): the logits upsampled in width and, where the height grows by an integer
    factor that `resize_bilinear_class_major` would upsample by shifted sums, that factor (`height_scale` >
    1: the height is upsampled inside the loss); else the logits at full size and 1.
    """
    height, width = size
    scale = None if align_corners else models._integer_scale(height, logits.shape[2])
    if scale is None:
        return resize_bilinear_class_major(logits, size, align_corners), 1
    return resize_bilinear_class_major(logits, (logits.shape[2], width), align_corners), scale


def predictions_and_labels(logits: jax.Array, labels: jax.Array, height_scale: int = 1):
    """argmax predictions of `loss_logits`' [B, K, h, W] logits and the [B, H, W] labels, in one layout."""
    if height_scale == 1:
        return argmax_planes(_class_planes(logits, 1)), labels
    planes = height_phase_planes(jax.lax.stop_gradient(logits), height_scale)
    return argmax_planes(planes), height_phase_layout(labels, height_scale)


def segmentation_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    ignore_label: int,
    weights: jax.Array | None = None,
    label_smoothing: float = 0.0,
    ohem_threshold: float = 0.0,
    ohem_min_kept: int = 0,
    height_scale: int = 1,
) -> jax.Array:
    """`losses.segmentation_loss` of [B, K, h, W] `loss_logits`, upsampled in height by `height_scale`
    inside the loss, against [B, H, W] `labels`. Same value to float rounding."""
    num_classes = logits.shape[1]
    expected = (logits.shape[0], logits.shape[2] * height_scale, logits.shape[3])
    if labels.shape != expected:
        raise ValueError(
            f"labels {labels.shape} do not match [B, K, h, W] logits {logits.shape} upsampled "
            f"{height_scale}x in height"
        )
    logits = logits.astype(jnp.float32)
    valid, labels = losses.valid_labels(labels, num_classes, ignore_label)
    if height_scale != 1:
        valid = height_phase_layout(valid, height_scale)
        labels = height_phase_layout(labels, height_scale)
        ce = _phase_cross_entropy(logits, labels, float(label_smoothing), height_scale)
        planes = height_phase_planes(logits, height_scale) if ohem_threshold > 0 else None
    else:
        ce = _cross_entropy(logits, labels, float(label_smoothing), 1)
        planes = _class_planes(logits, 1) if ohem_threshold > 0 else None
    pixel_weight = valid.astype(jnp.float32)
    if weights is not None:
        pixel_weight = pixel_weight * _sum(
            [jnp.where(labels == k, weights[k], 0.0) for k in range(num_classes)]
        )
    if ohem_threshold > 0:
        lse, true_logit = _logsumexp_and_target(planes, labels, 0.0)
        true_prob = jax.lax.stop_gradient(jnp.exp(true_logit - lse))
        pixel_weight = pixel_weight * losses.ohem_mask(true_prob, valid, ohem_threshold, ohem_min_kept)
    return losses.weighted_mean(ce, pixel_weight)


def train_loss(apply_fn, variables, batch, dropout_rng, *, config, weights):
    """`steps.train_loss` with the loss computed from the 1/8-resolution logits, classes first, upsampled
    inside the loss (`loss_logits`, `segmentation_loss`); predictions and labels come in the loss's pixel
    order, which the confusion matrix does not see."""
    low, mutated = apply_fn(
        variables,
        batch["image"],
        train=True,
        upsample=False,
        rngs={"dropout": dropout_rng},
        mutable=["batch_stats", "intermediates"],
    )
    size = batch["label"].shape[1:]
    loss_kwargs = steps.loss_settings(config, weights)

    def loss_of(low_logits):
        """The loss of NHWC 1/8-resolution logits, and the logits as the loss took them."""
        classes_first = jnp.transpose(low_logits, (0, 3, 1, 2))
        logits, scale = loss_logits(classes_first, size, align_corners=config.model.torch_compat)
        return segmentation_loss(logits, batch["label"], height_scale=scale, **loss_kwargs), (logits, scale)

    loss, (logits, scale) = loss_of(low)
    if config.model.aux_head and config.aux_loss_weight > 0:
        (aux_low,) = mutated["intermediates"]["aux_logits"]
        loss = loss + config.aux_loss_weight * loss_of(aux_low)[0]
    predictions, labels = predictions_and_labels(logits, batch["label"], scale)
    return loss, (predictions, labels, mutated["batch_stats"])
