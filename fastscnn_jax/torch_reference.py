"""A plain PyTorch Fast-SCNN, layer for layer the network of `models.FastSCNN`, for speed comparisons only.

Same channels, strides, expansion 6, pyramid pooling (bins 1, 2, 3, 6; 1x1 conv to in/4 channels), feature
fusion and classifier as the Flax model, NCHW, BatchNorm eps 1e-5 and momentum 0.1 (PyTorch's convention for
Flax's 0.9), bilinear resizing with `align_corners=False`. Its parameter count equals the JAX model's without
the auxiliary head (1,136,763 for 11 classes), which `benchmark` asserts before comparing.

torch is an optional dependency (`pip install torch==2.13.0`): this module imports it at the top and is itself
imported only by `benchmark --compare-torch`. Nothing here loads or converts JAX weights: the two networks are
timed, not compared numerically.
"""

import torch
import torch.nn.functional as F
from torch import nn

from fastscnn_jax.models import IMAGENET_MEAN, IMAGENET_STD

# PyTorch's momentum weights the new batch statistic; Flax's (0.9) weights the running one.
_BN_MOMENTUM = 0.1
_BN_EPS = 1e-5


class ConvBN(nn.Sequential):
    """Convolution (or 3x3 depthwise convolution when `out_channels` is None) + BatchNorm + optional ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None,
        kernel_size: int = 1,
        stride: int = 1,
        relu: bool = True,
    ):
        """Builds the layers; depthwise keeps the channel count."""
        depthwise = out_channels is None
        out_channels = in_channels if depthwise else out_channels
        layers = [
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride,
                padding=kernel_size // 2,
                groups=in_channels if depthwise else 1,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels, eps=_BN_EPS, momentum=_BN_MOMENTUM),
        ]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class DSConv(nn.Sequential):
    """Depthwise-separable convolution: 3x3 depthwise BN ReLU, then 1x1 BN ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        """Builds the two convolutions."""
        super().__init__(ConvBN(in_channels, None, 3, stride), ConvBN(in_channels, out_channels, 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 bottleneck: 1x1 expand, 3x3 depthwise, linear 1x1 project, residual at stride 1."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int = 6):
        """Builds the bottleneck."""
        super().__init__()
        hidden = in_channels * expansion
        self.block = nn.Sequential(
            ConvBN(in_channels, hidden, 1),
            ConvBN(hidden, None, 3, stride),
            ConvBN(hidden, out_channels, 1, relu=False),
        )
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies the bottleneck."""
        y = self.block(x)
        return y + x if self.residual else y


class PyramidPooling(nn.Module):
    """Pooled context at several bin counts, upsampled, concatenated with the input, fused by a 1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int, bins=(1, 2, 3, 6)):
        """Builds one 1x1 ConvBN per bin count and the fusing ConvBN."""
        super().__init__()
        self.bins = tuple(bins)
        self.branches = nn.ModuleList(ConvBN(in_channels, in_channels // 4, 1) for _ in self.bins)
        self.project = ConvBN(in_channels + len(self.bins) * (in_channels // 4), out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the fused context features."""
        size = x.shape[2:]
        outs = [x]
        for bins, branch in zip(self.bins, self.branches, strict=True):
            y = branch(F.adaptive_avg_pool2d(x, bins))
            outs.append(F.interpolate(y, size, mode="bilinear", align_corners=False))
        return self.project(torch.cat(outs, 1))


class FastSCNN(nn.Module):
    """Fast-SCNN on raw RGB (0..255) NCHW input; returns logits at the input size.

    With `aux_head` and in training mode, `forward` returns `(logits, aux_logits)`, as the JAX model sows
    its auxiliary logits; the auxiliary head is not part of the parameter count the benchmark checks.
    """

    def __init__(
        self, num_classes: int, width: float = 1.0, dropout_rate: float = 0.1, aux_head: bool = False
    ):
        """Builds the network; `width` scales channel counts like `models.FastSCNN._ch`."""
        super().__init__()

        def ch(c: int) -> int:
            """Scales a channel count by `width` (at least 8), as the JAX model does."""
            return max(8, int(round(c * width)))

        c32, c48, c64, c96, c128 = ch(32), ch(48), ch(64), ch(96), ch(128)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.learning_to_downsample = nn.Sequential(
            ConvBN(3, c32, 3, 2), DSConv(c32, c48, 2), DSConv(c48, c64, 2)
        )
        blocks = []
        in_channels = c64
        for out_channels, stride in ((c64, 2), (c96, 2), (c128, 1)):
            for i in range(3):
                blocks.append(InvertedResidual(in_channels, out_channels, stride if i == 0 else 1))
                in_channels = out_channels
        self.bottlenecks = nn.Sequential(*blocks)
        self.ppm = PyramidPooling(c128, c128)
        self.fusion_low = nn.Sequential(ConvBN(c128, None, 3), ConvBN(c128, c128, 1, relu=False))
        self.fusion_high = ConvBN(c64, c128, 1, relu=False)
        self.classifier = nn.Sequential(
            DSConv(c128, c128), DSConv(c128, c128), nn.Dropout(dropout_rate), nn.Conv2d(c128, num_classes, 1)
        )
        self.aux = (
            nn.Sequential(ConvBN(c64, c32, 3), nn.Dropout(dropout_rate), nn.Conv2d(c32, num_classes, 1))
            if aux_head
            else None
        )

    def forward(self, images: torch.Tensor):
        """Returns [B, num_classes, H, W] logits (and auxiliary logits when training with the aux head)."""
        size = images.shape[2:]
        x = (images - self.mean) / self.std
        high = self.learning_to_downsample(x)
        low = self.ppm(self.bottlenecks(high))
        low = F.interpolate(low, high.shape[2:], mode="bilinear", align_corners=False)
        fused = F.relu(self.fusion_high(high) + self.fusion_low(low))
        logits = F.interpolate(self.classifier(fused), size, mode="bilinear", align_corners=False)
        if self.aux is not None and self.training:
            aux = F.interpolate(self.aux(high), size, mode="bilinear", align_corners=False)
            return logits, aux
        return logits


def count_parameters(model: nn.Module, include_aux: bool = False) -> int:
    """Number of trainable scalars (BN running statistics are buffers, not counted), aux head excluded."""
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if p.requires_grad and (include_aux or not name.startswith("aux."))
    )
