"""Fast-SCNN (Poudel, Liwicki, Cipolla 2019) as Flax linen modules.

One module per block of the paper: learning-to-downsample, global feature extractor (inverted-residual
bottlenecks and a pyramid pooling module), feature fusion, classifier, and an optional auxiliary head.
The modules know nothing of configs or losses; `steps.create_model` builds them from a config.

Convolutions are `nn.Conv` (depthwise through `feature_group_count`) and normalisation `nn.BatchNorm`, both
taken as module attributes (`conv`, `norm`) in the manner of flax's `examples/imagenet`, so that a backend can
supply an equivalent faster form without touching this file (`fastscnn_jax/cpu` does so for XLA:CPU).

Resizing and adaptive pooling are written as matrix products with interpolation / pooling matrices computed
with numpy from the static shapes at trace time. Unlike `jax.image.resize`, this form lowers to plain dot
products, which the TFLite and ONNX converters accept, and it works for any input size. Upsampling by a small
integer factor, the common case (the 8x logits), is computed as shifted two-tap sums interleaved by a stack
and reshape: the matrices' values from slices, multiplies and adds, just as exportable and much cheaper.

`FastSCNN(torch_compat=True)` is the same network with the conventions of the widely used PyTorch port
(Tramac's Fast-SCNN-pytorch), so that its weights can be imported (`fastscnn_jax.convert_torch`): bilinear
resizing with `align_corners=True`, an unpadded first convolution, and biases on the feature-fusion 1x1
convolutions.
"""

import functools
import math
from collections.abc import Callable, Sequence
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

# A module class, or a partial of one with some attributes bound (flax examples/imagenet's ModuleDef).
ModuleDef = Callable[..., nn.Module]

# He initialisation over the fan-out, as PyTorch's kaiming_normal_(mode='fan_out') in the reference ports.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def interpolation_matrix(out_size: int, in_size: int, align_corners: bool = False) -> np.ndarray:
    """[out_size, in_size] bilinear weights, half-pixel centres (PyTorch `align_corners=False`).

    With `align_corners`, PyTorch's `align_corners=True` instead: the corner pixels of input and output are
    aligned, output pixel i samples input position i * (in - 1) / (out - 1) (0 when out is 1).
    """
    if align_corners:
        return _align_corners_matrix(out_size, in_size)
    lo, hi, frac = _half_pixel_taps(out_size, in_size)
    matrix = np.zeros((out_size, in_size), np.float32)
    np.add.at(matrix, (np.arange(out_size), lo), 1.0 - frac)
    np.add.at(matrix, (np.arange(out_size), hi), frac)
    return matrix


def _half_pixel_taps(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output pixel, the two input pixels it interpolates and the second one's weight (half-pixel
    centres, edges clamped)."""
    src = np.clip((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0, in_size - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, (src - lo).astype(np.float32)


def resize_bilinear_two_tap(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """`resize_bilinear` (half-pixel) of NHWC `x` to `size` as, per axis, two gathers of whole rows (or
    columns) and a weighted sum: the same values as the interpolation matrix, with no [out, in] constant.

    For the network's input resize onto its grid, which needs no gradient: a 360-to-352-row matrix would
    add 0.5 MB to every exported file.
    """
    for axis, out_size in ((1, size[0]), (2, size[1])):
        in_size = x.shape[axis]
        if out_size == in_size:
            continue
        lo, hi, frac = _half_pixel_taps(out_size, in_size)
        shape = [1] * x.ndim
        shape[axis] = out_size
        frac = jnp.asarray(frac.reshape(shape), x.dtype)
        low, high = jnp.take(x, lo, axis=axis), jnp.take(x, hi, axis=axis)
        x = low + (high - low) * frac
    return x


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


def adaptive_avg_pool(x: jax.Array, bins: int) -> jax.Array:
    """Adaptive average pooling of NHWC `x` to `bins` x `bins`."""
    return _separable_apply(x, pooling_matrix(bins, x.shape[1]), pooling_matrix(bins, x.shape[2]))


class ConvBN(nn.Module):
    """Convolution (or 3x3 depthwise convolution) + BatchNorm + optional ReLU."""

    features: int | None = None  # None: depthwise, keeps the channel count
    kernel_size: int = 1
    stride: int = 1
    relu: bool = True
    padding: int | None = None  # None: kernel_size // 2 ("same" at stride 1)
    use_bias: bool = False  # BN follows, so only imported weights need one
    conv: ModuleDef = nn.Conv  # FastSCNN binds the compute dtype into both
    norm: ModuleDef = nn.BatchNorm

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Applies conv, BN (batch statistics when training) and ReLU."""
        depthwise = self.features is None
        pad = self.kernel_size // 2 if self.padding is None else self.padding
        x = self.conv(
            x.shape[-1] if depthwise else self.features,
            (self.kernel_size, self.kernel_size),
            strides=self.stride,
            padding=((pad, pad), (pad, pad)),
            feature_group_count=x.shape[-1] if depthwise else 1,
            use_bias=self.use_bias,
            kernel_init=_conv_init,
        )(x)
        x = self.norm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
        return nn.relu(x) if self.relu else x


class DSConv(nn.Module):
    """Depthwise-separable convolution: 3x3 depthwise BN ReLU, then 1x1 BN ReLU."""

    features: int
    stride: int = 1
    conv_bn: ModuleDef = ConvBN

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Applies the two convolutions."""
        x = self.conv_bn(None, 3, self.stride)(x, train)
        return self.conv_bn(self.features, 1)(x, train)


class InvertedResidual(nn.Module):
    """MobileNetV2 bottleneck: 1x1 expand, 3x3 depthwise, linear 1x1 project, residual at stride 1."""

    features: int
    stride: int
    expansion: int = 6
    conv_bn: ModuleDef = ConvBN

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Applies the bottleneck."""
        y = self.conv_bn(x.shape[-1] * self.expansion, 1)(x, train)
        y = self.conv_bn(None, 3, self.stride)(y, train)
        y = self.conv_bn(self.features, 1, relu=False)(y, train)
        if self.stride == 1 and x.shape[-1] == self.features:
            y = y + x.astype(y.dtype)
        return y


class PyramidPooling(nn.Module):
    """Pyramid pooling module: pooled context at several bin counts, upsampled and concatenated."""

    features: int
    bins: Sequence[int] = (1, 2, 3, 6)
    align_corners: bool = False  # of the upsampling
    resize_impl: str = "auto"  # see `resize_bilinear`
    conv_bn: ModuleDef = ConvBN

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Concatenates `x` with its upsampled pooled branches and fuses them with a 1x1 conv."""
        size = x.shape[1:3]
        branches = [x]
        for bins in self.bins:
            y = self.conv_bn(x.shape[-1] // 4, 1)(adaptive_avg_pool(x, bins), train)
            branches.append(resize_bilinear(y, size, self.align_corners, self.resize_impl))
        return self.conv_bn(self.features, 1)(jnp.concatenate(branches, -1), train)


class LearningToDownsample(nn.Module):
    """Conv 3x3 stride 2, then two stride-2 DSConvs: 1/8 resolution."""

    channels: Sequence[int] = (32, 48, 64)
    stem_padding: int | None = None  # of the first conv; None: 1
    conv_bn: ModuleDef = ConvBN

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Returns the 1/8-resolution features shared by both branches."""
        x = self.conv_bn(self.channels[0], 3, 2, padding=self.stem_padding)(x, train)
        x = DSConv(self.channels[1], 2, self.conv_bn)(x, train)
        return DSConv(self.channels[2], 2, self.conv_bn)(x, train)


class GlobalFeatureExtractor(nn.Module):
    """Three stages of inverted residuals (strides 2, 2, 1), then pyramid pooling: 1/32 resolution."""

    channels: Sequence[int] = (64, 96, 128)
    strides: Sequence[int] = (2, 2, 1)
    num_blocks: int = 3
    expansion: int = 6
    out_features: int = 128
    ppm_bins: Sequence[int] = (1, 2, 3, 6)
    align_corners: bool = False  # of the pyramid pooling's upsampling
    resize_impl: str = "auto"  # see `resize_bilinear`
    conv_bn: ModuleDef = ConvBN

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Returns the low-resolution context features."""
        for features, stride in zip(self.channels, self.strides, strict=True):
            for i in range(self.num_blocks):
                block = InvertedResidual(features, stride if i == 0 else 1, self.expansion, self.conv_bn)
                x = block(x, train)
        pooling = PyramidPooling(
            self.out_features, self.ppm_bins, self.align_corners, self.resize_impl, self.conv_bn
        )
        return pooling(x, train)


class FeatureFusion(nn.Module):
    """Upsampled low-res branch (depthwise 3x3 + 1x1) plus 1x1 of the high-res branch, then ReLU."""

    features: int = 128
    align_corners: bool = False  # of the upsampling of `low`
    resize_impl: str = "auto"  # see `resize_bilinear`
    conv_bias: bool = False  # biases on the two 1x1 convolutions
    conv_bn: ModuleDef = ConvBN

    @nn.compact
    def __call__(self, high: jax.Array, low: jax.Array, train: bool) -> jax.Array:
        """Fuses the 1/8 (`high`) and 1/32 (`low`) branches at 1/8 resolution."""
        low = resize_bilinear(low, high.shape[1:3], self.align_corners, self.resize_impl)
        low = self.conv_bn(None, 3)(low, train)
        pointwise = functools.partial(self.conv_bn, self.features, 1, relu=False, use_bias=self.conv_bias)
        low = pointwise()(low, train)
        return nn.relu(pointwise()(high, train) + low)


class Classifier(nn.Module):
    """Two DSConvs, dropout and a 1x1 convolution to class logits."""

    num_classes: int
    features: int = 128
    dropout_rate: float = 0.1
    conv_bn: ModuleDef = ConvBN
    conv: ModuleDef = nn.Conv  # of the final 1x1 (with a bias: no BN after it)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Returns logits at the input resolution of this head."""
        x = DSConv(self.features, 1, self.conv_bn)(x, train)
        x = DSConv(self.features, 1, self.conv_bn)(x, train)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return self.conv(self.num_classes, (1, 1))(x)


class AuxHead(nn.Module):
    """Auxiliary head on the learning-to-downsample output (training only)."""

    num_classes: int
    features: int = 32
    dropout_rate: float = 0.1
    conv_bn: ModuleDef = ConvBN
    conv: ModuleDef = nn.Conv  # of the final 1x1 (with a bias: no BN after it)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Returns auxiliary logits at 1/8 resolution."""
        x = self.conv_bn(self.features, 3)(x, train)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return self.conv(self.num_classes, (1, 1))(x)


class FastSCNN(nn.Module):
    """Fast-SCNN. Takes raw RGB (0..255, any dtype, any size) NHWC; returns float32 logits at input size.

    With `aux_head` and `train=True`, the auxiliary logits (at the size of the main ones) are sown into the
    `intermediates` collection under `aux_logits`.

    `torch_compat=True` follows Tramac's Fast-SCNN-pytorch, layer for layer, for weights imported by
    `fastscnn_jax.convert_torch`: every bilinear resize (pyramid pooling, feature fusion, logits, aux
    logits) uses `align_corners=True`, the first 3x3 stride-2 convolution has no padding, and the two
    feature-fusion 1x1 convolutions have biases. Input stays raw RGB 0..255 normalised inside with the
    ImageNet statistics, which is what that port's `ToTensor` + `Normalize` computes. Where that port runs
    (heights and widths that are multiples of 32) the logits are the same; other sizes work here too, the
    1/32 branch being resized to the 1/8 branch's size.

    Images whose sides are not multiples of `input_multiple` are resized to the nearest sides that are
    (`grid_size`) and the logits resized back to the image's size. The network halves its resolution five
    times with "same" padding; at other sizes (CamVid's 360 rows: 45, 23 and 12 rows at 1/8, 1/16 and 1/32)
    the pixels of its 1/32 branch no longer sit where the 1/8 branch's upsample assumes, which the network
    never sees in training on such crops. On an unseen CamVid sequence that cost 1.1-1.5 mIoU points in
    three trained models (MODEL_CARD.md). `torch_compat` models run at the given size, as Tramac's does.
    """

    num_classes: int
    width: float = 1.0  # channel multiplier; 1.0 is the paper's network
    dropout_rate: float = 0.1
    aux_head: bool = False
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32
    torch_compat: bool = False  # Tramac's PyTorch conventions (see above) for imported weights
    # 'auto': integer-factor upsampling as shifted sums; 'matrix': every resize as interpolation matrices
    # (full-integer int8 TFLite quantises that form better). Same values either way.
    resize_impl: str = "auto"
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = nn.BatchNorm
    # `resize_bilinear`'s signature: the resize of the logits (and aux logits) to the input size.
    resize_logits: Callable = resize_bilinear
    # The network's total stride: inputs are resized to multiples of it (see above); 1 runs any size as is.
    input_multiple: int = 32

    def grid_size(self, size: Sequence[int]) -> tuple[int, ...]:
        """The size the network computes at for images of `size`: each side rounded to the nearest multiple
        of `input_multiple` (halves up, at least one multiple); `size` itself with `torch_compat`."""
        multiple = 1 if self.torch_compat else self.input_multiple
        return tuple(max(1, int(side / multiple + 0.5)) * multiple for side in size)

    def _ch(self, channels: int) -> int:
        """Scales a channel count by `width` (at least 8)."""
        return max(8, int(round(channels * self.width)))

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False, upsample: bool = True) -> jax.Array:
        """Returns [B, H, W, num_classes] float32 logits.

        `upsample=False` returns (and sows) the logits at 1/8 of `grid_size` instead, for a loss that
        upsamples them itself (`fastscnn_jax/cpu`).
        """
        size = images.shape[1:3]
        x = (images.astype(jnp.float32) - jnp.asarray(self.mean)) / jnp.asarray(self.std)
        x = resize_bilinear_two_tap(x, self.grid_size(size))  # no-op on the grid
        x = x.astype(self.dtype)
        conv = functools.partial(self.conv, dtype=self.dtype)
        conv_bn = functools.partial(ConvBN, conv=conv, norm=functools.partial(self.norm, dtype=self.dtype))
        compat = self.torch_compat
        high = LearningToDownsample(
            tuple(self._ch(c) for c in (32, 48, 64)),
            stem_padding=0 if compat else None,
            conv_bn=conv_bn,
            name="learning_to_downsample",
        )(x, train)
        low = GlobalFeatureExtractor(
            tuple(self._ch(c) for c in (64, 96, 128)),
            out_features=self._ch(128),
            align_corners=compat,
            resize_impl=self.resize_impl,
            conv_bn=conv_bn,
            name="global_feature_extractor",
        )(high, train)
        fused = FeatureFusion(
            self._ch(128),
            align_corners=compat,
            resize_impl=self.resize_impl,
            conv_bias=compat,
            conv_bn=conv_bn,
            name="feature_fusion",
        )(high, low, train)
        logits = Classifier(
            self.num_classes, self._ch(128), self.dropout_rate, conv_bn, conv, name="classifier"
        )(fused, train)
        if self.aux_head and train:
            aux = AuxHead(self.num_classes, self._ch(32), self.dropout_rate, conv_bn, conv, name="aux_head")(
                high, train
            )
            aux = self._upsample(aux, size) if upsample else aux
            self.sow("intermediates", "aux_logits", aux.astype(jnp.float32))
        if not upsample:
            return logits.astype(jnp.float32)
        # Named, so that an export can find these ops (export.py keeps them in float in tflite_int8_mixed).
        with jax.named_scope("upsample_logits"):
            return self._upsample(logits, size).astype(jnp.float32)

    def _upsample(self, logits: jax.Array, size: Sequence[int]) -> jax.Array:
        """NHWC low-resolution `logits` resized to `size`."""
        return self.resize_logits(logits, size, self.torch_compat, self.resize_impl)
