"""Fast-SCNN (Poudel, Liwicki, Cipolla 2019) as Flax linen modules.

One module per block of the paper: learning-to-downsample, global feature extractor (inverted-residual
bottlenecks and a pyramid pooling module), feature fusion, classifier, and an optional auxiliary head.
The modules know nothing of configs or losses; `train.create_model` builds them from a config.

Resizing and adaptive pooling are written as matrix products with interpolation / pooling matrices that are
computed with numpy from the static shapes at trace time. Unlike `jax.image.resize`, this form lowers to plain
dot products, which the TFLite and ONNX converters accept, and it works for any input size. Upsampling by a
small integer factor, the common case (the 8x logits), is computed as shifted two-tap sums interleaved by a
stack and reshape (slices, multiplies, adds: just as exportable), which gives the matrices' values at a
fraction of their cost.

Speed on XLA:CPU (profiled at 384x480, see benchmarks/README.md): with the CPU forms (`depthwise_impl`
'shifted', the CPU default) 1x1 convolutions are dots, depthwise convolutions shifted multiply-adds, the
3-channel stem 27 shifted multiply-adds, each with a gradient written out where XLA:CPU's own was slow.
Every form gives the plain convolution's outputs and gradients (tests compare them).

`FastSCNN(torch_compat=True)` is the same network with the conventions of the widely used PyTorch port
(Tramac's Fast-SCNN-pytorch), so that its weights can be imported (`fastscnn_jax.convert_torch`): bilinear
resizing with `align_corners=True`, an unpadded first convolution, and biases on the feature-fusion 1x1
convolutions. The default (`False`) network is unchanged by it.
"""

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

# ImageNet statistics in 0..255 units: the network takes raw RGB and normalises inside the graph, so that
# exported models can be fed decoded photos directly.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

DEPTHWISE_IMPLS = ("auto", "shifted", "lax")

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def interpolation_matrix(out_size: int, in_size: int, align_corners: bool = False) -> np.ndarray:
    """[out_size, in_size] bilinear weights, half-pixel centres (PyTorch `align_corners=False`).

    With `align_corners`, PyTorch's `align_corners=True` instead: the corner pixels of input and output are
    aligned, output pixel i samples input position i * (in - 1) / (out - 1) (0 when out is 1).
    """
    if align_corners:
        return _align_corners_matrix(out_size, in_size)
    scale = in_size / out_size
    src = np.clip((np.arange(out_size) + 0.5) * scale - 0.5, 0.0, in_size - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = (src - lo).astype(np.float32)
    matrix = np.zeros((out_size, in_size), np.float32)
    np.add.at(matrix, (np.arange(out_size), lo), 1.0 - frac)
    np.add.at(matrix, (np.arange(out_size), hi), frac)
    return matrix


def _align_corners_matrix(out_size: int, in_size: int) -> np.ndarray:
    """Bilinear weights with `align_corners=True`, source positions in float32 as PyTorch computes them."""
    scale = np.float32((in_size - 1) / (out_size - 1)) if out_size > 1 else np.float32(0.0)
    src = np.arange(out_size, dtype=np.float32) * scale
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo.astype(np.float32)
    matrix = np.zeros((out_size, in_size), np.float32)
    np.add.at(matrix, (np.arange(out_size), lo), 1.0 - frac)
    np.add.at(matrix, (np.arange(out_size), hi), frac)
    return matrix


def pooling_matrix(bins: int, in_size: int) -> np.ndarray:
    """[bins, in_size] averaging weights of adaptive average pooling (PyTorch's bin edges)."""
    matrix = np.zeros((bins, in_size), np.float32)
    for i in range(bins):
        start = (i * in_size) // bins
        end = -((-(i + 1) * in_size) // bins)  # ceil
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def _separable_apply(x: jax.Array, rows: np.ndarray, cols: np.ndarray) -> jax.Array:
    """Applies a [H', H] matrix along height and a [W', W] matrix along width of NHWC `x`."""
    x = jnp.einsum("oh,bhwc->bowc", jnp.asarray(rows, x.dtype), x)
    return jnp.einsum("pw,bowc->bopc", jnp.asarray(cols, x.dtype), x)


# Integer upsampling factors up to this one are computed as shifted two-tap sums (`_upsample_axis`);
# other scales use the dense interpolation matrix.
MAX_SHIFTED_UPSAMPLE = 16


def _upsample_phases(scale: int) -> np.ndarray:
    """[scale, 3] weights of x[k - 1], x[k], x[k + 1] in output pixel k * scale + r (half-pixel centres)."""
    weights = np.zeros((scale, 3), np.float64)
    for r in range(scale):
        src = (r + 0.5) / scale - 0.5  # in (-0.5, 0.5): relative to input pixel k
        lo = math.floor(src)
        frac = np.float32(src - lo)  # the interpolation matrix's float32 weights
        weights[r, lo + 1] += 1.0 - frac
        weights[r, lo + 2] += frac
    return weights.astype(np.float32)


def _upsample_taps(x: jax.Array, axis: int) -> list[jax.Array]:
    """x[k - 1], x[k], x[k + 1] along `axis`, the edge pixels repeated."""
    n = x.shape[axis]
    first = lax.slice_in_dim(x, 0, 1, axis=axis)
    last = lax.slice_in_dim(x, n - 1, n, axis=axis)
    padded = jnp.concatenate([first, x, last], axis)
    return [lax.slice_in_dim(padded, t, t + n, axis=axis) for t in range(3)]


def _upsample_axis(x: jax.Array, axis: int, scale: int) -> jax.Array:
    """Bilinear (half-pixel) upsampling of `x` by the integer `scale` along `axis`, without a matrix.

    Output pixel k * scale + r is a weighted sum of input pixels k - 1, k and k + 1 (edges repeated, which is
    the interpolation matrix's clamping), the weights depending only on the phase r: three shifted copies of
    the input, `scale` weighted sums of them, interleaved by a stack and a reshape. This is what
    `interpolation_matrix` computes, with O(1) instead of O(in_size) operations per output and no gather,
    forward and backward (the dense form cost more than most layers of the network at 384x480).
    """
    weights = _upsample_phases(scale)
    taps = _upsample_taps(x, axis)
    phases = []
    for r in range(scale):
        terms = [taps[t] * weights[r, t].astype(x.dtype) for t in range(3) if weights[r, t] != 0]
        phases.append(functools.reduce(jnp.add, terms))
    shape = list(x.shape)
    shape[axis] *= scale
    return jnp.stack(phases, axis + 1).reshape(shape)


def _integer_scale(out_size: int, in_size: int) -> int | None:
    """The upsampling factor when `_upsample_axis` applies (an integer from 2 to MAX_SHIFTED_UPSAMPLE)."""
    if out_size % in_size == 0 and 2 <= out_size // in_size <= MAX_SHIFTED_UPSAMPLE:
        return out_size // in_size
    return None


RESIZE_IMPLS = ("auto", "matrix")


def resize_bilinear(
    x: jax.Array, size: Sequence[int], align_corners: bool = False, impl: str = "auto"
) -> jax.Array:
    """Bilinear resize of NHWC `x` to `size` (height, width); `align_corners` as in PyTorch.

    With `impl` 'auto', half-pixel (`align_corners=False`) upsampling by an integer factor along an axis (the
    8x logits, the 4x feature fusion) is computed as shifted two-tap sums (`_upsample_axis`); any other
    resize of an axis, and every resize with `impl` 'matrix', is a product with its interpolation matrix.
    Both give the same values (to float rounding).
    """
    if impl not in RESIZE_IMPLS:
        raise ValueError(f"resize impl must be one of {RESIZE_IMPLS}, got {impl!r}")
    height, width = size
    if (height, width) == x.shape[1:3]:
        return x
    for axis, out_size in ((1, height), (2, width)):
        in_size = x.shape[axis]
        if out_size == in_size:
            continue
        scale = None if align_corners or impl == "matrix" else _integer_scale(out_size, in_size)
        if scale is not None:
            x = _upsample_axis(x, axis, scale)
        else:
            matrix = jnp.asarray(interpolation_matrix(out_size, in_size, align_corners), x.dtype)
            spec = "oh,bhwc->bowc" if axis == 1 else "pw,bhwc->bhpc"
            x = jnp.einsum(spec, matrix, x)
    return x


def resize_bilinear_class_major(
    x: jax.Array, size: Sequence[int], align_corners: bool = False, impl: str = "auto"
) -> jax.Array:
    """`resize_bilinear` of [B, K, H, W] `x` (classes before pixels), giving [B, K, height, width].

    The training loss takes the logits in this layout (`FastSCNN(channels_first=True)`; the train step
    upsamples the width with this function and the height inside the loss, `train.loss_logits`): its
    per-pixel work at full resolution then runs along image rows rather than along the 11 classes, which
    XLA:CPU vectorises poorly (at 384x480 batch 8: upsampling + loss forward and backward ~110 instead of
    ~155 ms, twice per step with the aux head). The width is resized first, at the input's height, by its
    interpolation matrix (a dot over the minor axis); the height then as `resize_bilinear` would (shifted
    sums for an integer factor with `impl` 'auto', else the matrix). Same values as `resize_bilinear` (to
    float rounding).
    """
    if impl not in RESIZE_IMPLS:
        raise ValueError(f"resize impl must be one of {RESIZE_IMPLS}, got {impl!r}")
    height, width = size
    if width != x.shape[3]:
        matrix = jnp.asarray(interpolation_matrix(width, x.shape[3], align_corners), x.dtype)
        x = jnp.einsum("bkhw,pw->bkhp", x, matrix)
    if height != x.shape[2]:
        scale = None if align_corners or impl == "matrix" else _integer_scale(height, x.shape[2])
        if scale is not None:
            x = _upsample_axis(x, 2, scale)
        else:
            matrix = jnp.asarray(interpolation_matrix(height, x.shape[2], align_corners), x.dtype)
            x = jnp.einsum("oh,bkhw->bkow", matrix, x)
    return x


def adaptive_avg_pool(x: jax.Array, bins: int) -> jax.Array:
    """Adaptive average pooling of NHWC `x` to `bins` x `bins`."""
    return _separable_apply(x, pooling_matrix(bins, x.shape[1]), pooling_matrix(bins, x.shape[2]))


# The (dy, dx) offsets of a 3x3 window, in the order of `_conv3x3_taps` and of a flattened HWIO kernel.
_TAP_OFFSETS = [(dy, dx) for dy in range(3) for dx in range(3)]


def _conv3x3_taps(x: jax.Array, stride: int, padding) -> list[jax.Array]:
    """The nine (dy, dx) taps of a 3x3 window at `stride` over NHWC `x` padded by ((t, b), (l, r)).

    Tap (dy, dx) holds, at output pixel (h, w), the padded input at (stride * h + dy, stride * w + dx).
    """
    batch, height, width, channels = x.shape
    (top, bottom), (left, right) = padding
    out_h = (height + top + bottom - 3) // stride + 1
    out_w = (width + left + right - 3) // stride + 1
    padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    return [
        lax.slice(
            padded,
            (0, dy, dx, 0),
            (batch, dy + stride * (out_h - 1) + 1, dx + stride * (out_w - 1) + 1, channels),
            (1, stride, stride, 1),
        )
        for dy, dx in _TAP_OFFSETS
    ]


def _depthwise_shifted_forward(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """3x3 depthwise conv, padding 1, as nine shifted multiply-adds over the padded input."""
    taps = _conv3x3_taps(x, stride, ((1, 1), (1, 1)))
    terms = [tap * kernel[dy, dx] for (dy, dx), tap in zip(_TAP_OFFSETS, taps, strict=True)]
    return functools.reduce(jnp.add, terms)


def _tap_sum(x: jax.Array, grad: jax.Array, top: int, left: int) -> jax.Array:
    """Per channel, sum of `x` times `grad` placed at (top, left) of `x`'s frame (zeros elsewhere).

    The output gradient is padded to `x`'s size rather than `x` sliced to the gradient's: XLA:CPU fuses a
    pad into the multiply-reduce well, a slice badly (4x slower at 24x30x384).
    """
    bottom = x.shape[1] - top - grad.shape[1]
    right = x.shape[2] - left - grad.shape[2]
    placed = jnp.pad(grad, ((0, 0), (top, bottom), (left, right), (0, 0)))
    return jnp.sum(x * placed, axis=(0, 1, 2), dtype=jnp.float32)


def _depthwise_kernel_grad(x: jax.Array, grad: jax.Array, stride: int) -> jax.Array:
    """Gradient w.r.t. the [3, 3, C] kernel of `_depthwise_shifted_forward` (strides 1 and 2), float32.

    Tap (i, j) is the sum over batch and pixels of the padded input at (stride * h + i, stride * w + j)
    times the output gradient at (h, w). At stride 1 each tap is one `_tap_sum` over the padded input. At
    stride 2 the padded input is first split into its four row/column parity phases (a strided slice
    each, one copy of the input in all); tap (i, j) reads phase (i % 2, j % 2) shifted by (i // 2, j // 2),
    a stride-1 `_tap_sum` at a quarter of the size.
    """
    batch, height, width, channels = x.shape
    out_h, out_w = grad.shape[1:3]
    taps = {}
    if stride == 1:
        padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        for i in range(3):
            for j in range(3):
                taps[i, j] = _tap_sum(padded, grad, i, j)
    else:
        # Rows 0 .. 2 * out_h of the padded input (those the taps read), likewise columns.
        padded = jnp.pad(x, ((0, 0), (1, 2 * out_h - height), (1, 2 * out_w - width), (0, 0)))
        for a in range(2):
            for b in range(2):
                limit = (batch, 2 * out_h + 1 - a, 2 * out_w + 1 - b, channels)
                phase = lax.slice(padded, (0, a, b, 0), limit, (1, 2, 2, 1))
                for i in (a, a + 2) if a == 0 else (a,):
                    for j in (b, b + 2) if b == 0 else (b,):
                        taps[i, j] = _tap_sum(phase, grad, i // 2, j // 2)
    return jnp.stack([taps[i, j] for i in range(3) for j in range(3)]).reshape(3, 3, channels)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_conv3x3_shifted(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """3x3 depthwise conv, padding 1, as nine shifted multiply-adds (fast on XLA:CPU).

    The gradient is written out: w.r.t. the input, the transpose of the shifted sum (JAX's own); w.r.t. the
    kernel, `_depthwise_kernel_grad` at strides 1 and 2, which XLA:CPU computes 1.3-4x faster than the
    differentiated shifted sum (whose nine shifted slices it also writes out in the forward pass). Same
    values and gradients as `depthwise_conv3x3_lax` (tests).
    """
    return _depthwise_shifted_forward(x, kernel, stride)


def _depthwise_shifted_fwd(x, kernel, stride):
    """Forward pass; keeps the input and kernel."""
    return _depthwise_shifted_forward(x, kernel, stride), (x, kernel)


def _depthwise_shifted_bwd(stride, residuals, grad):
    """Input gradient by JAX's transpose of the (linear) shifted sum; kernel gradient as above."""
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda x: _depthwise_shifted_forward(x, kernel, stride), x)
    (grad_x,) = input_vjp(grad)
    if stride in (1, 2):
        grad_kernel = _depthwise_kernel_grad(x, grad, stride).astype(kernel.dtype)
    else:
        _, kernel_vjp = jax.vjp(lambda k: _depthwise_shifted_forward(x, k, stride), kernel)
        (grad_kernel,) = kernel_vjp(grad)
    return grad_x, grad_kernel


depthwise_conv3x3_shifted.defvjp(_depthwise_shifted_fwd, _depthwise_shifted_bwd)


def depthwise_conv3x3_lax(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """3x3 depthwise conv, padding 1, as a grouped `lax` convolution (fast with cuDNN / on TPU)."""
    return lax.conv_general_dilated(
        x,
        kernel[:, :, None, :],
        window_strides=(stride, stride),
        padding=((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )


def _lax_conv(x: jax.Array, kernel: jax.Array, stride: int, padding) -> jax.Array:
    """Plain NHWC/HWIO `lax` convolution."""
    return lax.conv_general_dilated(
        x, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def conv3x3_stride2_im2col(x: jax.Array, kernel: jax.Array, padding) -> jax.Array:
    """3x3 stride-2 convolution of NHWC `x` (few channels) with HWIO `kernel`, `padding` ((t, b), (l, r)).

    The gradient form of `conv3x3_stride2_shifted`. For the 3-channel stem, XLA:CPU's convolution is slow,
    forward and kernel gradient alike. Here the nine strided taps are concatenated on channels (27 for RGB,
    ordered as the kernel's (dy, dx, c)) and multiplied with the [27, C_out] kernel by `pointwise_conv`, whose
    kernel gradient is one 2-D dot: at 384x480 batch 8, forward and kernel gradient 48 ms instead of 113 ms
    for a 2x2 convolution over space-to-depth blocks (the form before) and 141 ms for the plain
    convolution. Same values.
    """
    channels = x.shape[-1]
    patches = jnp.concatenate(_conv3x3_taps(x, 2, padding), axis=-1)
    return pointwise_conv(patches, kernel.reshape(9 * channels, kernel.shape[-1]))


# The stem's 9 * C multiply-adds go into this many running sums, added at the end. One sum of all 27 is one
# chain of dependent multiply-adds per output vector, which XLA:CPU keeps in order (float addition does not
# reassociate): batch-1 384x480 stem ~2.6 -> ~1.9 ms on one core, 1.4-1.6 -> 1.0-1.3 ms on two (AMD EPYC).
_STEM_CHAINS = 4


def _conv3x3_stride2_shifted_forward(x: jax.Array, kernel: jax.Array, padding) -> jax.Array:
    """3x3 stride-2 convolution as 9 * C shifted, broadcast multiply-adds (C: the few input channels)."""
    taps = _conv3x3_taps(x, 2, padding)
    terms = [
        tap[..., c : c + 1] * kernel[dy, dx, c]
        for (dy, dx), tap in zip(_TAP_OFFSETS, taps, strict=True)
        for c in range(x.shape[-1])
    ]
    chains = [functools.reduce(jnp.add, terms[i::_STEM_CHAINS]) for i in range(min(_STEM_CHAINS, len(terms)))]
    return functools.reduce(jnp.add, chains)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3_stride2_shifted(x: jax.Array, kernel: jax.Array, padding) -> jax.Array:
    """3x3 stride-2 convolution of NHWC `x` (few channels) with HWIO `kernel`, `padding` ((t, b), (l, r)).

    The CPU form of the 3-channel stem. Forward: 27 shifted multiply-adds, which XLA:CPU fuses with the
    normalisation before and the BatchNorm after (at 384x480 with those: batch 1 1.3 ms, batch 8 20 ms;
    `conv3x3_stride2_im2col` 2.6 / 51 ms, the plain convolution 4.7 ms at batch 1). Gradients: those of
    `conv3x3_stride2_im2col` (the kernel gradient one 2-D dot; with the forward 59 ms at batch 8, against 94
    ms for the differentiated multiply-adds). Same values as `lax.conv_general_dilated`.
    """
    return _conv3x3_stride2_shifted_forward(x, kernel, padding)


def _conv3x3_stride2_shifted_fwd(x, kernel, padding):
    """Forward pass; keeps the input and kernel."""
    return _conv3x3_stride2_shifted_forward(x, kernel, padding), (x, kernel)


def _conv3x3_stride2_shifted_bwd(padding, residuals, grad):
    """Gradients w.r.t. input and kernel of `conv3x3_stride2_im2col`."""
    x, kernel = residuals
    _, vjp = jax.vjp(lambda x, k: conv3x3_stride2_im2col(x, k, padding), x, kernel)
    return vjp(grad)


conv3x3_stride2_shifted.defvjp(_conv3x3_stride2_shifted_fwd, _conv3x3_stride2_shifted_bwd)


@jax.custom_vjp
def pointwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """1x1 stride-1 convolution of NHWC `x` with a [C_in, C_out] `kernel`: a dot over channels.

    The gradient is written out so that the kernel gradient is one 2-D dot contracting the pixels of the
    input and of the output gradient, both as they lie in memory. JAX's own transpose of the dot made XLA:CPU
    write the output gradient transposed ([C_out, pixels]) inside the BatchNorm backward fusion before it,
    a slow strided write (~20% of the 384x480 train step; 1.27 -> 1.01 s with this form).
    """
    return lax.dot_general(x, kernel, (((3,), (0,)), ((), ())))


def _pointwise_conv_fwd(x, kernel):
    """Forward pass; keeps the input and kernel."""
    return pointwise_conv(x, kernel), (x, kernel)


def _pointwise_conv_bwd(residuals, grad):
    """Input gradient: grad . kernel^T; kernel gradient: x^T . grad over all pixels."""
    x, kernel = residuals
    grad_x = lax.dot_general(grad, kernel, (((3,), (1,)), ((), ())))
    pixels_x = x.reshape(-1, x.shape[-1])
    pixels_grad = grad.reshape(-1, grad.shape[-1])
    grad_kernel = lax.dot_general(pixels_x, pixels_grad, (((0,), (0,)), ((), ())))
    return grad_x, grad_kernel.astype(kernel.dtype)


pointwise_conv.defvjp(_pointwise_conv_fwd, _pointwise_conv_bwd)


def _make_conv_fn(cpu_forms: bool):
    """A `lax.conv_general_dilated` for `nn.Conv` that picks a faster equivalent form for some shapes.

    With `cpu_forms` (the 'shifted' depthwise setting, the CPU default): 1x1 stride-1 unpadded
    convolutions become `pointwise_conv`, a dot over channels (XLA:CPU computes the kernel gradient of a 1x1
    convolution as a full-image-window convolution with transposes, several times slower), and 3x3 stride-2
    convolutions of inputs with at most 4 channels (the stem) use `conv3x3_stride2_shifted` when JAX has
    one device. Anything else, and everything without `cpu_forms` (GPU/TPU, and the TFLite/ONNX export, whose
    converter turns a 1x1 dot into FULLY_CONNECTED, quantised per tensor instead of per channel: full-integer
    int8 agreement 94.8% instead of 97.6%), is `lax.conv_general_dilated` itself.
    """

    def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, **kwargs):
        """Same arguments and result as `lax.conv_general_dilated` (NHWC / HWIO, as `nn.Conv` calls it)."""
        dn = kwargs.get("dimension_numbers")
        plain = (
            kwargs.get("feature_group_count", 1) == 1
            and kwargs.get("batch_group_count", 1) == 1
            and kwargs.get("precision") is None
            and kwargs.get("preferred_element_type") is None
            and all(d == 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
            and lhs.ndim == 4
            and dn == lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
        )
        if plain:
            strides = tuple(window_strides)
            if isinstance(padding, str):  # "SAME" / "VALID": no padding for a 1x1 kernel at stride 1
                padding = ((0, 0), (0, 0)) if rhs.shape[:2] == (1, 1) and strides == (1, 1) else padding
            if not isinstance(padding, str):
                padding = tuple(tuple(p) for p in padding)
            if cpu_forms and rhs.shape[:2] == (1, 1) and strides == (1, 1) and padding == ((0, 0), (0, 0)):
                return pointwise_conv(lhs, rhs[0, 0])
            stem = rhs.shape[:2] == (3, 3) and strides == (2, 2) and lhs.shape[-1] <= 4
            # One device only: with the batch sharded over several (CPU) devices, this form (and the
            # space-to-depth form before it) gave parameter updates further from the one-device ones than
            # the plain convolution does (1e-3 relative after one SGD step, against 1e-6;
            # tests/train_test.py::test_one_device_equals_eight_devices); not yet understood.
            if cpu_forms and stem and not isinstance(padding, str) and jax.device_count() == 1:
                return conv3x3_stride2_shifted(lhs, rhs, padding)
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, **kwargs
        )

    return conv


def conv_fn_for(depthwise_impl: str):
    """`_make_conv_fn` with the CPU forms exactly when `depthwise_impl` resolves to 'shifted'."""
    return _make_conv_fn(resolve_depthwise_impl(depthwise_impl) == "shifted")


def resolve_depthwise_impl(impl: str) -> str:
    """'auto' picks the shifted form on CPU (XLA:CPU grouped convs are slow), `lax` elsewhere.

    'shifted' also selects the other CPU forms of `_make_conv_fn`: 1x1 convolutions as dots, the stem
    convolution as shifted multiply-adds.
    """
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(f"depthwise_impl must be one of {DEPTHWISE_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "shifted" if jax.default_backend() == "cpu" else "lax"
    return impl


class DepthwiseConv3x3(nn.Module):
    """3x3 depthwise convolution with padding 1 and no bias."""

    stride: int = 1
    impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Convolves each channel of NHWC `x` with its own 3x3 kernel."""
        kernel = self.param("kernel", _conv_init, (3, 3, x.shape[-1]), jnp.float32)
        kernel = kernel.astype(self.dtype)
        x = x.astype(self.dtype)
        if resolve_depthwise_impl(self.impl) == "shifted":
            return depthwise_conv3x3_shifted(x, kernel, self.stride)
        return depthwise_conv3x3_lax(x, kernel, self.stride)


# Batch variance in training as flax computes it by default, mean(x^2) - mean^2 in one pass over x. It loses
# digits where a channel's mean is large against its spread, so results depend on the order of the sums more
# than with the two-pass mean((x - mean)^2): one SGD step of a small model on 1 and on 8 CPU devices gave
# second losses 1e-3 apart with this form and 1.5e-6 apart with the two-pass one (on an AMD EPYC without
# AVX-512; tests/train_test.py uses the two-pass form). Not the default because the two-pass form made the
# 384x480 batch-8 train step 40% slower on XLA:CPU (1334 -> 1863 ms). Evaluation uses running statistics.
BN_FAST_VARIANCE = True


class ConvBN(nn.Module):
    """Convolution (or 3x3 depthwise convolution) + BatchNorm + optional ReLU."""

    features: int | None = None  # None: depthwise, keeps the channel count
    kernel_size: int = 1
    stride: int = 1
    relu: bool = True
    depthwise_impl: str = "auto"
    dtype: Any = jnp.float32
    padding: int | None = None  # of the regular conv; None: kernel_size // 2 ("same" at stride 1)
    use_bias: bool = False  # of the regular conv (BN follows, so only imported weights need one)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Applies conv, BN (batch statistics when training) and ReLU."""
        if self.features is None:
            x = DepthwiseConv3x3(self.stride, self.depthwise_impl, self.dtype)(x)
        else:
            pad = self.kernel_size // 2 if self.padding is None else self.padding
            x = nn.Conv(
                self.features,
                (self.kernel_size, self.kernel_size),
                strides=self.stride,
                padding=((pad, pad), (pad, pad)),
                use_bias=self.use_bias,
                kernel_init=_conv_init,
                dtype=self.dtype,
                conv_general_dilated=conv_fn_for(self.depthwise_impl),
            )(x)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
            use_fast_variance=BN_FAST_VARIANCE,
        )(x)
        return nn.relu(x) if self.relu else x


class DSConv(nn.Module):
    """Depthwise-separable convolution: 3x3 depthwise BN ReLU, then 1x1 BN ReLU."""

    features: int
    stride: int = 1
    depthwise_impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Applies the two convolutions."""
        x = ConvBN(None, 3, self.stride, depthwise_impl=self.depthwise_impl, dtype=self.dtype)(x, train)
        return ConvBN(self.features, 1, depthwise_impl=self.depthwise_impl, dtype=self.dtype)(x, train)


class InvertedResidual(nn.Module):
    """MobileNetV2 bottleneck: 1x1 expand, 3x3 depthwise, linear 1x1 project, residual at stride 1."""

    features: int
    stride: int
    expansion: int = 6
    depthwise_impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Applies the bottleneck."""
        impl = self.depthwise_impl
        y = ConvBN(x.shape[-1] * self.expansion, 1, depthwise_impl=impl, dtype=self.dtype)(x, train)
        y = ConvBN(None, 3, self.stride, depthwise_impl=impl, dtype=self.dtype)(y, train)
        y = ConvBN(self.features, 1, relu=False, depthwise_impl=impl, dtype=self.dtype)(y, train)
        if self.stride == 1 and x.shape[-1] == self.features:
            y = y + x.astype(y.dtype)
        return y


class PyramidPooling(nn.Module):
    """Pyramid pooling module: pooled context at several bin counts, upsampled and concatenated."""

    features: int
    bins: Sequence[int] = (1, 2, 3, 6)
    dtype: Any = jnp.float32
    align_corners: bool = False  # of the upsampling
    resize_impl: str = "auto"  # see `resize_bilinear`
    depthwise_impl: str = "auto"  # selects the 1x1 convolutions' form (`_make_conv_fn`)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Concatenates `x` with its upsampled pooled branches and fuses them with a 1x1 conv."""
        size = x.shape[1:3]
        branches = [x]
        for bins in self.bins:
            y = adaptive_avg_pool(x, bins)
            y = ConvBN(x.shape[-1] // 4, 1, depthwise_impl=self.depthwise_impl, dtype=self.dtype)(y, train)
            branches.append(resize_bilinear(y, size, self.align_corners, self.resize_impl))
        y = jnp.concatenate(branches, -1)
        return ConvBN(self.features, 1, depthwise_impl=self.depthwise_impl, dtype=self.dtype)(y, train)


class LearningToDownsample(nn.Module):
    """Conv 3x3 stride 2, then two stride-2 DSConvs: 1/8 resolution."""

    channels: Sequence[int] = (32, 48, 64)
    depthwise_impl: str = "auto"
    dtype: Any = jnp.float32
    stem_padding: int | None = None  # of the first conv; None: 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Returns the 1/8-resolution features shared by both branches."""
        x = ConvBN(
            self.channels[0],
            3,
            2,
            depthwise_impl=self.depthwise_impl,
            dtype=self.dtype,
            padding=self.stem_padding,
        )(x, train)
        x = DSConv(self.channels[1], 2, self.depthwise_impl, self.dtype)(x, train)
        return DSConv(self.channels[2], 2, self.depthwise_impl, self.dtype)(x, train)


class GlobalFeatureExtractor(nn.Module):
    """Three stages of inverted residuals (strides 2, 2, 1), then pyramid pooling: 1/32 resolution."""

    channels: Sequence[int] = (64, 96, 128)
    strides: Sequence[int] = (2, 2, 1)
    num_blocks: int = 3
    expansion: int = 6
    out_features: int = 128
    ppm_bins: Sequence[int] = (1, 2, 3, 6)
    depthwise_impl: str = "auto"
    dtype: Any = jnp.float32
    align_corners: bool = False  # of the pyramid pooling's upsampling
    resize_impl: str = "auto"  # see `resize_bilinear`

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Returns the low-resolution context features."""
        for features, stride in zip(self.channels, self.strides, strict=True):
            for i in range(self.num_blocks):
                x = InvertedResidual(
                    features, stride if i == 0 else 1, self.expansion, self.depthwise_impl, self.dtype
                )(x, train)
        return PyramidPooling(
            self.out_features,
            self.ppm_bins,
            self.dtype,
            self.align_corners,
            self.resize_impl,
            self.depthwise_impl,
        )(x, train)


class FeatureFusion(nn.Module):
    """Upsampled low-res branch (depthwise 3x3 + 1x1) plus 1x1 of the high-res branch, then ReLU."""

    features: int = 128
    depthwise_impl: str = "auto"
    dtype: Any = jnp.float32
    align_corners: bool = False  # of the upsampling of `low`
    resize_impl: str = "auto"  # see `resize_bilinear`
    conv_bias: bool = False  # biases on the two 1x1 convolutions

    @nn.compact
    def __call__(self, high: jax.Array, low: jax.Array, train: bool) -> jax.Array:
        """Fuses the 1/8 (`high`) and 1/32 (`low`) branches at 1/8 resolution."""
        low = resize_bilinear(low, high.shape[1:3], self.align_corners, self.resize_impl)
        low = ConvBN(None, 3, depthwise_impl=self.depthwise_impl, dtype=self.dtype)(low, train)
        pointwise = functools.partial(
            ConvBN, self.features, 1, relu=False, depthwise_impl=self.depthwise_impl, dtype=self.dtype
        )
        low = pointwise(use_bias=self.conv_bias)(low, train)
        high = pointwise(use_bias=self.conv_bias)(high, train)
        return nn.relu(high + low)


class Classifier(nn.Module):
    """Two DSConvs, dropout and a 1x1 convolution to class logits."""

    num_classes: int
    features: int = 128
    dropout_rate: float = 0.1
    depthwise_impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Returns logits at the input resolution of this head."""
        x = DSConv(self.features, 1, self.depthwise_impl, self.dtype)(x, train)
        x = DSConv(self.features, 1, self.depthwise_impl, self.dtype)(x, train)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        conv = conv_fn_for(self.depthwise_impl)
        return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, conv_general_dilated=conv)(x)


class AuxHead(nn.Module):
    """Auxiliary head on the learning-to-downsample output (training only)."""

    num_classes: int
    features: int = 32
    dropout_rate: float = 0.1
    dtype: Any = jnp.float32
    depthwise_impl: str = "auto"  # selects the convolutions' forms (`_make_conv_fn`)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Returns auxiliary logits at 1/8 resolution."""
        x = ConvBN(self.features, 3, depthwise_impl=self.depthwise_impl, dtype=self.dtype)(x, train)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        conv = conv_fn_for(self.depthwise_impl)
        return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, conv_general_dilated=conv)(x)


class FastSCNN(nn.Module):
    """Fast-SCNN. Takes raw RGB (0..255, any dtype, any size) NHWC; returns float32 logits at input size.

    With `aux_head` and `train=True`, the auxiliary logits (also at input size) are sown into the
    `intermediates` collection under `aux_logits`.

    `torch_compat=True` follows Tramac's Fast-SCNN-pytorch, layer for layer, for weights imported by
    `fastscnn_jax.convert_torch`: every bilinear resize (pyramid pooling, feature fusion, logits, aux
    logits) uses `align_corners=True`, the first 3x3 stride-2 convolution has no padding, and the two
    feature-fusion 1x1 convolutions have biases. Input stays raw RGB 0..255 normalised inside with the
    ImageNet statistics, which is what that port's `ToTensor` + `Normalize` computes. Where that port runs
    (heights and widths that are multiples of 32) the logits are the same; other sizes work here too, the
    1/32 branch being resized to the 1/8 branch's size.
    """

    num_classes: int
    width: float = 1.0  # channel multiplier; 1.0 is the paper's network
    dropout_rate: float = 0.1
    aux_head: bool = False
    depthwise_impl: str = "auto"
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32
    torch_compat: bool = False  # Tramac's PyTorch conventions (see above) for imported weights
    # 'auto': integer-factor upsampling as shifted sums (fast); 'matrix': every resize as interpolation
    # matrices (the form before; full-integer int8 TFLite quantises it better). Same values either way.
    resize_impl: str = "auto"

    def _ch(self, channels: int) -> int:
        """Scales a channel count by `width` (at least 8)."""
        return max(8, int(round(channels * self.width)))

    @nn.compact
    def __call__(
        self, images: jax.Array, train: bool = False, channels_first: bool = False, upsample: bool = True
    ) -> jax.Array:
        """Returns [B, H, W, num_classes] logits; with `channels_first`, [B, num_classes, H, W].

        `channels_first` (aux logits sown the same way) transposes the logits at 1/8 resolution and
        upsamples them with `resize_bilinear_class_major`: same values, faster per-pixel work at full
        resolution. `upsample=False` (the train step's choice, with `channels_first`) returns, and sows,
        the float32 logits at 1/8 resolution; `train.loss_logits` upsamples them for the loss.
        """
        size = images.shape[1:3]
        x = (images.astype(jnp.float32) - jnp.asarray(self.mean)) / jnp.asarray(self.std)
        x = x.astype(self.dtype)
        impl = self.depthwise_impl
        compat = self.torch_compat
        high = LearningToDownsample(
            tuple(self._ch(c) for c in (32, 48, 64)),
            impl,
            self.dtype,
            stem_padding=0 if compat else None,
            name="learning_to_downsample",
        )(x, train)
        low = GlobalFeatureExtractor(
            tuple(self._ch(c) for c in (64, 96, 128)),
            out_features=self._ch(128),
            depthwise_impl=impl,
            dtype=self.dtype,
            align_corners=compat,
            resize_impl=self.resize_impl,
            name="global_feature_extractor",
        )(high, train)
        fused = FeatureFusion(
            self._ch(128),
            impl,
            self.dtype,
            align_corners=compat,
            conv_bias=compat,
            resize_impl=self.resize_impl,
            name="feature_fusion",
        )(high, low, train)
        logits = Classifier(
            self.num_classes, self._ch(128), self.dropout_rate, impl, self.dtype, name="classifier"
        )(fused, train)
        if self.aux_head and train:
            aux = AuxHead(
                self.num_classes, self._ch(32), self.dropout_rate, self.dtype, impl, name="aux_head"
            )(high, train)
            aux = self._upsample(aux, size, channels_first, upsample)
            self.sow("intermediates", "aux_logits", aux.astype(jnp.float32))
        # Named, so that an export can find these ops (export.py keeps them in float in tflite_int8_mixed).
        with jax.named_scope("upsample_logits"):
            return self._upsample(logits, size, channels_first, upsample).astype(jnp.float32)

    def _upsample(
        self, logits: jax.Array, size: Sequence[int], channels_first: bool, upsample: bool = True
    ) -> jax.Array:
        """NHWC low-resolution `logits` resized to `size` (unless not `upsample`), NHWC or NCHW."""
        if not upsample:
            return jnp.transpose(logits, (0, 3, 1, 2)) if channels_first else logits
        if channels_first:
            logits = jnp.transpose(logits, (0, 3, 1, 2))
            return resize_bilinear_class_major(logits, size, self.torch_compat, self.resize_impl)
        return resize_bilinear(logits, size, self.torch_compat, self.resize_impl)
