"""Training and evaluation: factories, loss, pure train/eval steps jit-compiled over a device mesh, the loop.

Data parallel: the batch is sharded over a one-axis `Mesh` of every device, parameters are replicated, and
`jax.jit` partitions the step. BatchNorm therefore normalises with the statistics of the global batch.
"""

import functools
import json
import os
import signal
import threading
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from flax import linen as nn
from flax.training import train_state
from jax.experimental import multihost_utils
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fastscnn_jax import camvid, checkpointing, input_pipeline, metrics, models, multihost

CLASS_WEIGHTINGS = ("none", "enet", "median_frequency")


class ConfigError(ValueError):
    """A config value that cannot work, or a workdir made with another model; the message names the key."""


class TrainState(train_state.TrainState):
    """TrainState with BatchNorm statistics."""

    batch_stats: Any


def model_signature(config: ml_collections.ConfigDict) -> dict:
    """The config values that fix parameter shapes: a workdir made with others cannot be resumed."""
    return {
        "num_classes": config.num_classes,
        "width": config.model.width,
        "aux_head": config.model.aux_head,
        "torch_compat": config.model.torch_compat,
    }


# Signature values of checkpoints written before a key existed.
_SIGNATURE_DEFAULTS = {"torch_compat": False}


def create_model(config: ml_collections.ConfigDict) -> models.FastSCNN:
    """Fast-SCNN as the config describes it."""
    return models.FastSCNN(
        num_classes=config.num_classes,
        width=config.model.width,
        dropout_rate=config.model.dropout_rate,
        aux_head=config.model.aux_head,
        depthwise_impl=config.model.depthwise_impl,
        dtype=jnp.dtype(config.model.dtype),
        torch_compat=config.model.torch_compat,
    )


def create_learning_rate_fn(config: ml_collections.ConfigDict, num_train_steps: int) -> optax.Schedule:
    """One-cycle schedule: linear warm-up for `warmup_pct` of the steps, then cosine decay."""
    warmup_steps = int(config.warmup_pct * num_train_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=config.learning_rate * config.initial_lr_fraction,
        peak_value=config.learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=max(num_train_steps, warmup_steps + 1),
        end_value=config.learning_rate * config.final_lr_fraction,
    )


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` in fewer XLA kernels: the same state (none) and the same updates when the
    norm is under `max_norm` (bit for bit); above it, `g * (max_norm / norm)`, within float rounding of
    optax's `(g / norm) * max_norm`.

    optax computes the norm leaf by leaf (a reduction per parameter array, three kernels for mid-sized ones
    on XLA:CPU) and divides each leaf by it (a kernel per leaf that XLA does not fuse into the two Adam
    moments it feeds). Here the squares of all leaves are summed in one reduction over their concatenation
    and the clip is a scalar factor, which fuses. For the 139 parameter arrays of Fast-SCNN, the optimizer
    update alone compiled to 424 instead of 812 kernels, in 7.4 instead of 12.1 s on one core of a 2-core AMD
    EPYC (and ran no slower); the tiny config's train step to 1,495 instead of 1,835 kernels, in ~10% less
    time (benchmarks/README.md, 2026-12-03 14:55-17:02).
    """

    def update_fn(updates, state, params=None):
        del params
        flat = ravel_pytree(updates)[0].astype(jnp.float32)  # the norm in float32 even for bfloat16 leaves
        norm = jnp.sqrt(jnp.sum(flat * flat))
        scale = jnp.where(norm < max_norm, jnp.ones_like(norm), max_norm / norm)
        return jax.tree.map(lambda leaf: leaf * scale.astype(leaf.dtype), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def create_optimizer(config: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule):
    """Global-norm clipping then AdamW; weight decay on convolution kernels only, not on BN or biases."""
    return optax.chain(
        clip_by_global_norm(config.grad_clip_norm),
        optax.adamw(
            learning_rate_fn,
            b1=config.adam_b1,
            b2=config.adam_b2,
            weight_decay=config.weight_decay,
            mask=lambda params: jax.tree.map(lambda p: p.ndim > 1, params),
        ),
    )


# XLA:CPU options for `init_variables`: LLVM at optimisation level 1 instead of 2. The init program is a
# threefry draw per kernel (the forward pass it traces is dead code), which LLVM spends most of the compile
# on; it runs once, in milliseconds either way. On a 2-core AMD EPYC without AVX-512 (2026-12-03), compile
# on one core: configs/camvid.py 19.5 -> 10.0 s, configs/tiny.py 24.8 -> 10.4 s; `create_train_state` for
# configs/camvid.py with no compilation cache, both cores, two processes each: 12.6 and 16.4 -> 9.2 and 7.3 s.
# Every variable is bit for bit the same (tests/train_test.py checks; level 0 changes 4% of them). Level 1
# for the train step would change its rounding and run slower, so only init uses it.
CPU_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def init_variables(model: nn.Module, rngs, *args, **kwargs) -> dict:
    """`model.init(rngs, *args, **kwargs)`, jit-compiled (on CPU with `CPU_INIT_COMPILER_OPTIONS`)."""
    options = CPU_INIT_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
    return jax.jit(functools.partial(model.init, **kwargs), compiler_options=options)(rngs, *args)


def create_train_state(
    config: ml_collections.ConfigDict, model: models.FastSCNN, rng: jax.Array, optimizer
) -> TrainState:
    """Initial parameters (every head, auxiliary included), BN statistics and optimizer state."""
    params_rng, dropout_rng = jax.random.split(rng)
    dummy = jnp.zeros((1, *config.crop_size, 3), jnp.float32)
    variables = init_variables(model, {"params": params_rng, "dropout": dropout_rng}, dummy, train=True)
    # `TrainState.create` without its eager `optimizer.init`: op by op, that compiled a program for each of
    # ~35 distinct shapes (1.3-1.8 s at every start on a 2-core CPU); jitted it is one (cached) program.
    return TrainState(
        step=0,
        apply_fn=model.apply,
        params=variables["params"],
        tx=optimizer,
        opt_state=jax.jit(optimizer.init)(variables["params"]),
        batch_stats=variables["batch_stats"],
    )


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


def _class_planes(x: jax.Array, axis: int) -> list[jax.Array]:
    """The slices of `x` along its class `axis`, one per class."""
    return [jax.lax.index_in_dim(x, k, axis, keepdims=False) for k in range(x.shape[axis])]


def _sum(planes: list[jax.Array]) -> jax.Array:
    """Elementwise sum of a list of arrays."""
    return functools.reduce(jnp.add, planes)


# Per-pixel sums and maxima over the classes are written as elementwise operations on the K class planes
# rather than as reductions over the class axis: with the classes before the pixels ([B, K, H, W]),
# XLA:CPU runs such a reduction as a separate strided kernel (~38 ms each at 384x480 batch 8), while the
# unrolled form fuses with its neighbours and stores no one-hot or per-class array.


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float, axis: int) -> jax.Array:
    """Per-pixel cross-entropy of float32 logits (classes along `axis`) against (smoothed) integer labels.

    logsumexp(logits) - <target, logits>, i.e. -<target, log_softmax(logits)>, with target the one-hot
    labels smoothed by `label_smoothing`. The gradient, softmax - target, is written out so that forward
    and backward each read the logits once (XLA's differentiation of log_softmax kept several
    full-resolution copies: at 384x480 the loss cost more than most layers).
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
# loss and the argmax. Upsampling by a stack (what `models.resize_bilinear_class_major` does) wrote the
# [B, K, H, W] logits out and read them back: at 384x480 batch 8 on XLA:CPU, loss + upsampling forward
# 23-35 -> 9 ms. The backward still writes (softmax - target) for every class and phase once (XLA does not
# duplicate the exponentials into the three row taps that read it): forward + backward 78-85 -> 73 ms.
# Same values to float rounding (the same weights, summed in the same order).


def height_phase_layout(x: jax.Array, scale: int) -> jax.Array:
    """[B, H, ...] -> [B, scale, H // scale, ...]: full-resolution row i * scale + r goes to [:, r, i]."""
    b, height = x.shape[:2]
    x = x.reshape((b, height // scale, scale) + x.shape[2:])
    return jnp.swapaxes(x, 1, 2)


def height_phase_planes(logits: jax.Array, scale: int) -> list[jax.Array]:
    """The K class planes of [B, K, h, W] `logits` upsampled in height by `scale`, each [B, scale, h, W].

    Plane k equals `height_phase_layout` of `models.resize_bilinear_class_major(logits, (h * scale, W))`
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


def loss_logits(
    logits: jax.Array, size, align_corners: bool = False, impl: str = "auto"
) -> tuple[jax.Array, int]:
    """[B, K, h, w] low-resolution logits in the form `segmentation_loss` takes for labels of `size`.

    Returns (logits, height_scale): the logits upsampled in width and, where the height grows by an integer
    factor that `models.resize_bilinear_class_major` would upsample by shifted sums, that factor
    (`height_scale` > 1: the height is upsampled inside the loss); else the logits at full size and 1.
    """
    height, width = size
    scale = None if align_corners or impl == "matrix" else models._integer_scale(height, logits.shape[2])
    if scale is None:
        return models.resize_bilinear_class_major(logits, size, align_corners, impl), 1
    return models.resize_bilinear_class_major(logits, (logits.shape[2], width), align_corners, impl), scale


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
    class_axis: int = -1,
    height_scale: int = 1,
) -> jax.Array:
    """Cross-entropy over non-void pixels, optionally class-weighted, label-smoothed and OHEM-filtered.

    Args:
      logits: float logits, [..., K] or with the K classes along `class_axis`.
      labels: integer labels, the shape of `logits` without the class axis; `ignore_label` (and any value
        outside 0..K-1) is void.
      ignore_label: the void label.
      weights: optional [K] class weights; the loss is their weighted mean (PyTorch's convention).
      label_smoothing: mass spread uniformly over the K classes.
      ohem_threshold: when > 0, only pixels whose true-class probability is below it count (OHEM).
      ohem_min_kept: with OHEM, at least this many of the hardest valid pixels always count.
      class_axis: the classes' axis of `logits` (1 for the train step's [B, K, H, W]).
      height_scale: > 1: `logits` are [B, K, H // height_scale, W] (class_axis 1), to be upsampled in
        height by this integer factor as `models.resize_bilinear_class_major` would (see `loss_logits`);
        the loss is computed without writing out the full-resolution logits.

    Returns:
      scalar loss.
    """
    axis = class_axis % logits.ndim
    num_classes = logits.shape[axis]
    expected = logits.shape[:axis] + logits.shape[axis + 1 :]
    if height_scale != 1:
        if axis != 1 or logits.ndim != 4:
            raise ValueError(f"height_scale needs [B, K, h, W] logits (class_axis 1), got {logits.shape}")
        expected = (expected[0], expected[1] * height_scale, expected[2])
    if labels.shape != expected:
        raise ValueError(
            f"labels {labels.shape} do not match logits {logits.shape} without class axis {class_axis}"
            + (f" upsampled {height_scale}x in height" if height_scale != 1 else "")
        )
    logits = logits.astype(jnp.float32)
    valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
    labels = jnp.where(valid, labels, 0)
    if height_scale != 1:
        valid = height_phase_layout(valid, height_scale)
        labels = height_phase_layout(labels, height_scale)
        ce = _phase_cross_entropy(logits, labels, float(label_smoothing), height_scale)
        planes = height_phase_planes(logits, height_scale) if ohem_threshold > 0 else None
    else:
        ce = _cross_entropy(logits, labels, float(label_smoothing), axis)
        planes = _class_planes(logits, axis) if ohem_threshold > 0 else None
    pixel_weight = valid.astype(jnp.float32)
    if weights is not None:
        per_class = [jnp.where(labels == k, weights[k], 0.0) for k in range(num_classes)]
        pixel_weight = pixel_weight * _sum(per_class)
    if ohem_threshold > 0:
        lse, true_logit = _logsumexp_and_target(planes, labels, 0.0)
        true_prob = jax.lax.stop_gradient(jnp.exp(true_logit - lse))
        threshold = jnp.float32(ohem_threshold)
        if ohem_min_kept > 0:
            flat = jnp.where(valid, true_prob, jnp.inf).reshape(-1)
            k = min(ohem_min_kept, flat.size)
            kth_smallest = -jax.lax.top_k(-flat, k)[0][-1]
            threshold = jnp.maximum(threshold, jnp.where(jnp.isfinite(kth_smallest), kth_smallest, 0.0))
        pixel_weight = pixel_weight * (true_prob <= threshold)
    return jnp.sum(pixel_weight * ce) / jnp.maximum(jnp.sum(pixel_weight), 1e-6)


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    config: ml_collections.ConfigDict,
    weights: jax.Array | None,
    dropout_rng: jax.Array,
) -> tuple[TrainState, metrics.TrainMetrics]:
    """One optimizer step on a (global) batch; returns the new state and the step's metrics."""
    step_rng = jax.random.fold_in(dropout_rng, state.step)
    loss_kwargs = dict(
        ignore_label=config.ignore_label,
        weights=weights,
        label_smoothing=config.label_smoothing,
        ohem_threshold=config.ohem_threshold,
        ohem_min_kept=config.ohem_min_kept,
        class_axis=1,
    )
    size = batch["label"].shape[1:]

    def upsampled(low):
        """The [B, K, h, w] logits as the loss takes them (see `loss_logits`)."""
        return loss_logits(low, size, align_corners=config.model.torch_compat)

    def loss_fn(params):
        """Total loss, with the main logits (as `loss_logits` gives them) and new BN statistics."""
        low, mutated = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            channels_first=True,  # [B, K, h, w] at 1/8 resolution, upsampled by `loss_logits`
            upsample=False,
            rngs={"dropout": step_rng},
            mutable=["batch_stats", "intermediates"],
        )
        logits, scale = upsampled(low)
        loss = segmentation_loss(logits, batch["label"], height_scale=scale, **loss_kwargs)
        if config.model.aux_head and config.aux_loss_weight > 0:
            (aux_low,) = mutated["intermediates"]["aux_logits"]
            aux_logits, aux_scale = upsampled(aux_low)
            loss = loss + config.aux_loss_weight * segmentation_loss(
                aux_logits, batch["label"], height_scale=aux_scale, **loss_kwargs
            )
        return loss, (logits, mutated["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    scale = size[0] // logits.shape[2]  # as `loss_logits` chose it (1: logits at full size)
    predictions, labels = predictions_and_labels(logits, batch["label"], scale)
    step_metrics = metrics.TrainMetrics.single_from_model_output(
        loss=loss,
        predictions=predictions,
        num_classes=config.num_classes,
        label=labels,
        valid=labels != config.ignore_label,
    )
    return state, step_metrics


def eval_step(
    variables: dict, batch: dict[str, jax.Array], *, model: models.FastSCNN, ignore_label: int
) -> metrics.EvalMetrics:
    """Confusion matrix of one batch; padding examples (`mask` False) and void pixels are left out.

    The logits come classes-first ([B, K, H, W]): the same values, and the full-resolution upsampling and
    argmax run 10-15% faster on XLA:CPU than with the classes as the minor axis (at 360x480).
    """
    logits = model.apply(variables, batch["image"], train=False, channels_first=True)
    valid = (batch["label"] != ignore_label) & batch["mask"][:, None, None]
    return metrics.EvalMetrics.single_from_model_output(
        logits=logits, class_axis=1, label=batch["label"], valid=valid
    )


class Preemption:
    """Context in which SIGTERM (what a preempted VM or `kill` sends) is noted instead of killing.

    The training loop asks `reached(step)` after each step, saves a checkpoint and returns, so a preempted run
    loses no steps. One process: a SIGTERM handler sets a flag (outside the main thread, where signals cannot
    be handled, it does nothing). Several processes: JAX's distributed runtime catches SIGTERM on any of them,
    tells the others, and `multihost_utils.reached_preemption_sync_point` names one step at which all of
    them save together (a process that stopped alone would leave the others waiting in the collective save).
    """

    def __init__(self):
        """Starts with no signal received."""
        self.received = False
        self._previous = None
        self._multiprocess = jax.process_count() > 1

    def __enter__(self) -> "Preemption":
        """Installs the SIGTERM handler (single process only; JAX's own handles multi-process jobs)."""
        if not self._multiprocess and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step` (multi-process: every process calls it at every step)."""
        if self._multiprocess:
            self.received = multihost_utils.reached_preemption_sync_point(step)
        return self.received

    def _handle(self, signum, frame) -> None:
        """Notes the signal."""
        del signum, frame
        self.received = True

    def __exit__(self, *exc) -> None:
        """Restores the previous handler."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@jax.jit
def all_finite(tree) -> jax.Array:
    """Whether every element of every array in `tree` is finite.

    One reduction over the leaves' concatenation: a reduction per leaf compiled to a kernel each on XLA:CPU
    (1.5-1.7 s to compile for Fast-SCNN's 139 parameter arrays, at every start without a compilation cache).
    """
    return jnp.all(jnp.isfinite(ravel_pytree(tree)[0]))


def create_mesh() -> Mesh:
    """One-axis mesh over every device of every process."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles global arrays, sharded on the batch axis, from this process's part of the batch."""
    sharding = NamedSharding(mesh, P("data"))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


# XLA:CPU options for the train step: LLVM may reassociate float arithmetic (and ignore the sign of zero),
# nothing else; NaNs, infinities, division and library functions are kept exact (the four `honor` options),
# so a NaN loss still shows (tests/train_test.py). Reassociation lets it reorder sums, e.g. split a long
# chain of additions into independent ones (which ops gained was not profiled). 384x480 batch-8 step on an
# AMD EPYC without AVX-512, 2 threads, both forms compiled in one process and timed alternately: 607 against
# 641 ms, 580 against 614 ms. Only rounding changes. Not used for inference, where the same options made
# batch-1 384x480 2-3% slower.
CPU_TRAIN_COMPILER_OPTIONS = {
    "xla_cpu_enable_fast_math": True,
    "xla_cpu_fast_math_honor_nans": True,
    "xla_cpu_fast_math_honor_infs": True,
    "xla_cpu_fast_math_honor_division": True,
    "xla_cpu_fast_math_honor_functions": True,
}


def make_train_step(config: ml_collections.ConfigDict, weights, dropout_rng: jax.Array, mesh: Mesh):
    """`train_step` jit-compiled for the mesh (state replicated and donated, batch sharded); on CPU with
    `CPU_TRAIN_COMPILER_OPTIONS`."""
    replicated = NamedSharding(mesh, P())
    on_cpu = all(d.platform == "cpu" for d in mesh.devices.flat)
    return jax.jit(
        functools.partial(train_step, config=config, weights=weights, dropout_rng=dropout_rng),
        in_shardings=(replicated, NamedSharding(mesh, P("data"))),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
        compiler_options=CPU_TRAIN_COMPILER_OPTIONS if on_cpu else None,
    )


def make_eval_step(model: models.FastSCNN, config: ml_collections.ConfigDict, mesh: Mesh):
    """`eval_step` jit-compiled for the mesh (variables replicated, batch sharded)."""
    return jax.jit(
        functools.partial(eval_step, model=model, ignore_label=config.ignore_label),
        in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))),
        out_shardings=NamedSharding(mesh, P()),
    )


def evaluate(
    eval_step_fn, variables: dict, builder, split: str, config, mesh: Mesh
) -> tuple[dict, np.ndarray]:
    """Scores of `variables` on a whole split at full resolution.

    Returns:
      (scores dict as `metrics.segmentation_scores` gives it, confusion matrix).
    """
    local_batch = config.eval_batch_size // jax.process_count()
    total = None
    for batch in input_pipeline.eval_batches(
        builder, split, local_batch, jax.process_index(), jax.process_count()
    ):
        step_metrics = eval_step_fn(variables, shard_batch(batch, mesh))
        total = step_metrics if total is None else total.merge(step_metrics)
    matrix = total.compute()["confusion"]
    return metrics.segmentation_scores(matrix, camvid.CLASS_NAMES[: config.num_classes]), matrix


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the config key for values that cannot work."""
    num_devices, num_processes = jax.device_count(), jax.process_count()
    for key in ("batch_size", "eval_batch_size"):
        value = config[key]
        if value <= 0 or value % num_processes:
            raise ConfigError(
                f"config.{key}={value} (global) must be a positive multiple of the number of processes "
                f"({num_processes}): each process loads {key} / {num_processes} examples"
            )
        if value % num_devices:
            raise ConfigError(
                f"config.{key}={value} must be a positive multiple of the number of devices ({num_devices})"
            )
    if config.learning_rate <= 0:
        raise ConfigError(f"config.learning_rate={config.learning_rate} must be > 0")
    if config.num_classes != camvid.NUM_CLASSES:
        raise ConfigError(
            f"config.num_classes={config.num_classes} does not match CamVid's {camvid.NUM_CLASSES} classes"
        )
    if config.ignore_label != camvid.IGNORE_LABEL:
        raise ConfigError(f"config.ignore_label={config.ignore_label} must be CamVid's {camvid.IGNORE_LABEL}")
    if len(config.crop_size) != 2 or min(config.crop_size) < 1:
        raise ConfigError(f"config.crop_size={tuple(config.crop_size)} must be (height, width), both >= 1")
    if not 0 < config.min_scale <= config.max_scale:
        raise ConfigError(
            f"config.min_scale/max_scale={config.min_scale}/{config.max_scale}: need 0 < min <= max"
        )
    try:
        models.resolve_depthwise_impl(config.model.depthwise_impl)
        class_weights(np.ones(1), config.class_weighting)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_compatible(saved: dict, config: ml_collections.ConfigDict, workdir: str) -> None:
    """Raises ConfigError when a workdir's checkpoints were made with other parameter shapes."""
    current = model_signature(config)
    saved = {**_SIGNATURE_DEFAULTS, **saved}
    differ = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if differ:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in differ.items())
        raise ConfigError(
            f"workdir {workdir} holds checkpoints of an incompatible model ({detail}); "
            "use a new --workdir or the matching config"
        )


def _flatten(d: dict, prefix: str = "") -> dict:
    """Flat {'a.b': value} view of a nested config dict, values as TensorBoard hparams accept them."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, int | float | str | bool) else str(v)
    return out


def _kept(checkpoints: checkpointing.Checkpoints, workdir: str) -> str:
    """What remains of a run that stops on non-finite numbers."""
    step = checkpoints.latest_step()
    if step is None:
        return f"No checkpoint had been saved yet in {workdir}."
    return f"The last good checkpoint (step {step}) in {workdir} is kept."


def _write_json(path: str, obj: Any) -> None:
    """Writes JSON atomically: a kill mid-write leaves the previous file, never a truncated one."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains, evaluating and checkpointing periodically; resumes from `workdir` when it has checkpoints.

    Args:
      config: hyperparameters (see configs/camvid.py).
      workdir: checkpoints, TensorBoard events and `eval_<split>.json` go here.

    Returns:
      scores of the best evaluation (`metrics.segmentation_scores` plus `step`).
    """
    validate_config(config)
    os.makedirs(workdir, exist_ok=True)
    mesh = create_mesh()
    replicated = NamedSharding(mesh, P())
    is_chief = jax.process_index() == 0

    # A workdir of another model fails here, before the data is loaded and anything is compiled.
    checkpoints = checkpointing.Checkpoints(workdir, config.checkpoints_to_keep)
    resuming = checkpoints.latest_step() is not None
    if resuming:
        check_compatible(checkpoints.latest_meta().get("model", {}), config, workdir)

    builder = camvid.get_builder(config.dataset_dir, config.tfds_data_dir or None, config.download_url)
    train_split = input_pipeline.InMemorySplit.from_builder(builder, "train")
    steps_per_epoch = max(len(train_split) // config.batch_size, 1)
    num_train_steps = (
        config.num_train_steps if config.num_train_steps > 0 else config.num_epochs * steps_per_epoch
    )
    weights = class_weights(train_split.class_pixel_counts(config.num_classes), config.class_weighting)
    logging.info(
        "Train: %d examples, %d steps (%d per epoch); class weights %s",
        len(train_split),
        num_train_steps,
        steps_per_epoch,
        weights,
    )

    model = create_model(config)
    learning_rate_fn = create_learning_rate_fn(config, num_train_steps)
    rng = jax.random.key(config.seed)
    init_rng, dropout_rng = jax.random.split(rng)
    state = create_train_state(config, model, init_rng, create_optimizer(config, learning_rate_fn))
    if is_chief:
        parameter_overview.log_parameter_overview(state.params)
    multihost.wait_for_all_processes("before_the_first_collective")
    state = jax.device_put(state, replicated)

    meta = {"step": 0, "best_miou": -1.0, "evals_since_best": 0, "model": model_signature(config)}
    if resuming:
        state, meta = checkpoints.restore_state(state)
        logging.info("Resuming from step %d (checkpoint in %s)", int(state.step), workdir)
    start_step = int(state.step)

    # Process 0 writes the job's summaries; the others' writer discards them.
    writer = metric_writers.create_default_writer(workdir) if is_chief else metric_writers.MultiWriter([])
    if start_step == 0:
        writer.write_hparams(_flatten(config.to_dict()))

    p_train_step = make_train_step(
        config, None if weights is None else jnp.asarray(weights), dropout_rng, mesh
    )
    p_eval_step = make_eval_step(model, config, mesh)
    local_batch = config.batch_size // jax.process_count()
    train_iter = input_pipeline.train_dataset(
        train_split,
        config,
        local_batch_size=local_batch,
        start_step=start_step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    ).as_numpy_iterator()

    report_progress = periodic_actions.ReportProgress(num_train_steps=num_train_steps, writer=writer)
    train_metrics = None
    best_scores = None
    logging.info("Training from step %d to %d.", start_step, num_train_steps)
    with Preemption() as preemption:
        for step in range(start_step + 1, num_train_steps + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, step_metrics = p_train_step(state, shard_batch(next(train_iter), mesh))
            train_metrics = step_metrics if train_metrics is None else train_metrics.merge(step_metrics)
            report_progress(step)
            is_last = step == num_train_steps

            if step % config.log_every_steps == 0 or is_last:
                computed = train_metrics.compute()
                loss = float(computed["loss"])
                if not np.isfinite(loss):
                    raise FloatingPointError(
                        f"train loss is {loss} at step {step}; stopping. {_kept(checkpoints, workdir)}"
                    )
                scores = metrics.segmentation_scores(
                    computed["confusion"], camvid.CLASS_NAMES[: config.num_classes]
                )
                writer.write_scalars(
                    step,
                    {
                        "train_loss": loss,
                        "train_miou": scores["miou"],
                        "train_pixel_accuracy": scores["pixel_accuracy"],
                        "learning_rate": float(learning_rate_fn(step - 1)),
                    },
                )
                train_metrics = None

            stop = False
            if step % config.eval_every_steps == 0 or is_last:
                with report_progress.timed("eval"):
                    variables = {"params": state.params, "batch_stats": state.batch_stats}
                    scores, matrix = evaluate(
                        p_eval_step, variables, builder, config.eval_split, config, mesh
                    )
                split = config.eval_split
                writer.write_scalars(
                    step,
                    {
                        f"{split}_miou": scores["miou"],
                        f"{split}_pixel_accuracy": scores["pixel_accuracy"],
                        f"{split}_mean_dice": scores["mean_dice"],
                        **{f"{split}_iou/{k}": v for k, v in scores["per_class_iou"].items()},
                    },
                )
                logging.info("Step %d %s:\n%s", step, split, metrics.format_table(scores))
                if scores["miou"] > meta["best_miou"]:
                    meta.update(best_miou=scores["miou"], evals_since_best=0)
                    best_scores = {"step": step, **scores}
                    checkpoints.save_best(step, variables, {**meta, "step": step, "scores": best_scores})
                    if is_chief:
                        _write_json(
                            os.path.join(workdir, f"eval_{split}.json"),
                            {**best_scores, "confusion_matrix": np.asarray(matrix).astype(int).tolist()},
                        )
                else:
                    meta["evals_since_best"] += 1
                patience = config.early_stopping_patience
                if patience > 0 and meta["evals_since_best"] >= patience:
                    logging.info(
                        "Early stopping at step %d: no %s mIoU gain in %d evaluations.", step, split, patience
                    )
                    stop = True

            preempted = preemption.reached(step)
            if step % config.checkpoint_every_steps == 0 or is_last or stop or preempted:
                # Never let a diverged state replace a good checkpoint.
                if not bool(all_finite(state.params)):
                    raise FloatingPointError(
                        f"parameters are not finite at step {step}; stopping without saving. "
                        f"{_kept(checkpoints, workdir)}"
                    )
                checkpoints.save_state(step, state, {**meta, "step": step})
            if preempted:
                logging.warning("SIGTERM at step %d: checkpoint saved; run the same command to resume.", step)
            if stop or preempted:
                break

    writer.flush()
    checkpoints.close()
    if best_scores is None and os.path.exists(os.path.join(workdir, f"eval_{config.eval_split}.json")):
        with open(os.path.join(workdir, f"eval_{config.eval_split}.json")) as f:
            best_scores = json.load(f)
    return best_scores
