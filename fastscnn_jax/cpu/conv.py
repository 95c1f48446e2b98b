"""XLA:CPU forms of Fast-SCNN's convolutions, behind `conv_general_dilated`, a drop-in for
`lax.conv_general_dilated` that `nn.Conv` takes as its `conv_general_dilated` attribute.

XLA:CPU runs grouped (depthwise) convolutions several times slower than PyTorch's CPU kernels, and computes
the kernel gradients of 1x1 and of few-channel 3x3 convolutions with slow full-image-window convolutions.
Here the same arithmetic is written as shifted multiply-adds and dots, with gradients written out where
XLA:CPU's own differentiation of those forms is slow. Every form gives `lax.conv_general_dilated`'s outputs
and gradients to float rounding (tests/cpu_test.py).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

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
    pad into the multiply-reduce well, a slice badly.
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
    kernel, `_depthwise_kernel_grad` at strides 1 and 2, which XLA:CPU computes faster than the
    differentiated shifted sum (whose nine shifted slices it also writes out in the forward pass). Same
    values and gradients as the grouped `nn.Conv` (tests/cpu_test.py).
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


def conv3x3_stride2_im2col(x: jax.Array, kernel: jax.Array, padding) -> jax.Array:
    """3x3 stride-2 convolution of NHWC `x` (few channels) with HWIO `kernel`, `padding` ((t, b), (l, r)).

    The gradient form of `conv3x3_stride2_shifted`. For the 3-channel stem, XLA:CPU's convolution is slow,
    forward and kernel gradient alike. Here the nine strided taps are concatenated on channels (27 for RGB,
    ordered as the kernel's (dy, dx, c)) and multiplied with the [27, C_out] kernel by `pointwise_conv`, whose
    kernel gradient is one 2-D dot. Same values.
    """
    channels = x.shape[-1]
    patches = jnp.concatenate(_conv3x3_taps(x, 2, padding), axis=-1)
    return pointwise_conv(patches, kernel.reshape(9 * channels, kernel.shape[-1]))


# The stem's 9 * C multiply-adds go into this many running sums, added at the end. One sum of all 27 is one
# chain of dependent multiply-adds per output vector, which XLA:CPU keeps in order (float addition does not
# reassociate); independent chains keep the vector units busy.
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
    normalisation before and the BatchNorm after. Gradients: those of `conv3x3_stride2_im2col` (the kernel
    gradient one 2-D dot, faster than the differentiated multiply-adds). Same values as
    `lax.conv_general_dilated`.
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
    input and of the output gradient, both as they lie in memory. JAX's own transpose of the dot makes
    XLA:CPU write the output gradient transposed ([C_out, pixels]) inside the BatchNorm backward fusion
    before it, a slow strided write.
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


# What `nn.Conv` passes for NHWC inputs and HWIO kernels.
_NHWC_HWIO = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def _is_plain_2d(lhs, rhs, lhs_dilation, rhs_dilation, kwargs) -> bool:
    """NHWC/HWIO, undilated, no batch groups or precision settings: what Fast-SCNN's `nn.Conv`s call."""
    return (
        kwargs.get("batch_group_count", 1) == 1
        and kwargs.get("precision") is None
        and kwargs.get("preferred_element_type") is None
        and all(d == 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
        and lhs.ndim == 4
        and kwargs.get("dimension_numbers")
        == lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
    )


def conv_general_dilated(
    lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, **kwargs
) -> jax.Array:
    """`lax.conv_general_dilated` (same arguments and result), with the CPU form where one applies.

    3x3 depthwise convolutions with padding 1 become `depthwise_conv3x3_shifted`; 1x1 stride-1 unpadded
    ones `pointwise_conv`; 3x3 stride-2 ones of inputs with at most 4 channels (the stem)
    `conv3x3_stride2_shifted`, when JAX has one device. Anything else is `lax.conv_general_dilated` itself.
    """
    strides = tuple(window_strides)
    if _is_plain_2d(lhs, rhs, lhs_dilation, rhs_dilation, kwargs):
        if isinstance(padding, str):  # 'SAME' / 'VALID', as nn.Conv passes its default
            padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
        padding = tuple(tuple(p) for p in padding)
        groups = kwargs.get("feature_group_count", 1)
        window = rhs.shape[:2]
        channels = lhs.shape[-1]
        if groups == channels == rhs.shape[3] and rhs.shape[:3] == (3, 3, 1) and padding == ((1, 1), (1, 1)):
            if strides[0] == strides[1]:
                return depthwise_conv3x3_shifted(lhs, rhs[:, :, 0, :], strides[0])
        if groups == 1 and window == (1, 1) and strides == (1, 1) and padding == ((0, 0), (0, 0)):
            return pointwise_conv(lhs, rhs[0, 0])
        # One device only: with the batch sharded over several (CPU) devices, this form gave parameter
        # updates further from the one-device ones than the plain convolution does (1e-3 relative after one
        # SGD step, against 1e-6; tests/train_test.py::test_one_device_equals_eight_devices).
        stem = groups == 1 and window == (3, 3) and strides == (2, 2) and channels <= 4
        if stem and jax.device_count() == 1:
            return conv3x3_stride2_shifted(lhs, rhs, padding)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, **kwargs)
