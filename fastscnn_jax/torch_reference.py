"""PyTorch Fast-SCNNs: a peer of `models.FastSCNN` for speed comparisons, and Tramac's port for import tests.

`FastSCNN` below is layer for layer the network of `models.FastSCNN`, for speed comparisons only.

Same channels, strides, expansion 6, pyramid pooling (bins 1, 2, 3, 6; 1x1 conv to in/4 channels), feature
fusion and classifier as the Flax model, NCHW, BatchNorm eps 1e-5 and momentum 0.1 (PyTorch's convention for
Flax's 0.9), bilinear resizing with `align_corners=False`. Its parameter count equals the JAX model's without
the auxiliary head (1,136,763 for 11 classes), which `benchmark` asserts before comparing.

torch is an optional dependency (`pip install torch==2.13.0`): this module imports it at the top and is itself
imported only by `benchmark --compare-torch` and by tests. Nothing here loads or converts JAX weights: the two
networks are timed, not compared numerically.

`TramacFastSCNN` reproduces the network of Tramac's Fast-SCNN-pytorch (github.com/Tramac/Fast-SCNN-pytorch,
`models/fast_scnn.py`), with its module names, so that its `state_dict()` has that port's keys
(`learning_to_downsample.conv.conv.0.weight`, `global_feature_extractor.bottleneck1.0.block.0.conv.0.weight`,
`feature_fusion.conv_lower_res.0.bias`, `classifier.conv.1.weight`, `auxlayer.4.weight` ...). The tests make
random state dicts with it for `fastscnn_jax.convert_torch` and compare its logits with the imported model's.
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


# Tramac's Fast-SCNN-pytorch. Attribute names (and Sequential indices) are that port's, since they are the
# keys of its state dicts; its class names are kept too (`Classifer` included) to show the correspondence.
# PyTorch defaults throughout: BatchNorm eps 1e-5, momentum 0.1. It takes ImageNet-normalised NCHW input (the
# port's demo applies ToTensor and Normalize), and heights and widths that are multiples of 32: the fusion
# upsamples the 1/32 branch by exactly 4, which must meet the 1/8 branch.


class _ConvBNReLU(nn.Module):
    """Tramac's conv + BN + ReLU; padding 0 unless given (so its 3x3 stem is unpadded)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, padding=0):
        """Builds `conv` = Sequential(Conv2d without bias, BatchNorm2d, ReLU)."""
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies the three layers."""
        return self.conv(x)


class _DSConv(nn.Module):
    """Tramac's depthwise-separable conv: 3x3 depthwise (padding 1) BN ReLU, 1x1 BN ReLU."""

    def __init__(self, dw_channels: int, out_channels: int, stride: int = 1):
        """Builds `conv` = Sequential of the six layers."""
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(dw_channels, dw_channels, 3, stride, 1, groups=dw_channels, bias=False),
            nn.BatchNorm2d(dw_channels),
            nn.ReLU(True),
            nn.Conv2d(dw_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies the six layers."""
        return self.conv(x)


class _DWConv(nn.Module):
    """Tramac's 3x3 depthwise conv (padding 1) + BN + ReLU."""

    def __init__(self, dw_channels: int, out_channels: int, stride: int = 1):
        """Builds `conv` = Sequential(grouped Conv2d, BatchNorm2d, ReLU)."""
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(dw_channels, out_channels, 3, stride, 1, groups=dw_channels, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies the three layers."""
        return self.conv(x)


class LinearBottleneck(nn.Module):
    """Tramac's MobileNetV2 bottleneck: `block` = 1x1 expand, 3x3 depthwise, linear 1x1 + BN; shortcut."""

    def __init__(self, in_channels: int, out_channels: int, t: int = 6, stride: int = 2):
        """Builds the block; the shortcut is used at stride 1 with equal channel counts."""
        super().__init__()
        self.use_shortcut = stride == 1 and in_channels == out_channels
        self.block = nn.Sequential(
            _ConvBNReLU(in_channels, in_channels * t, 1),
            _DWConv(in_channels * t, in_channels * t, stride),
            nn.Conv2d(in_channels * t, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies the block (plus the input when the shortcut is used)."""
        out = self.block(x)
        return x + out if self.use_shortcut else out


class TramacPyramidPooling(nn.Module):
    """Tramac's pyramid pooling: `conv1`..`conv4` on 1, 2, 3, 6 bins, upsampled (align_corners), `out`."""

    def __init__(self, in_channels: int, out_channels: int):
        """Builds four 1x1 ConvBNReLU to in/4 channels and the fusing 1x1 ConvBNReLU."""
        super().__init__()
        inter = in_channels // 4
        self.conv1 = _ConvBNReLU(in_channels, inter, 1)
        self.conv2 = _ConvBNReLU(in_channels, inter, 1)
        self.conv3 = _ConvBNReLU(in_channels, inter, 1)
        self.conv4 = _ConvBNReLU(in_channels, inter, 1)
        self.out = _ConvBNReLU(in_channels * 2, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenates `x` with its four upsampled pooled branches and fuses them."""
        size = x.shape[2:]
        feats = [x]
        for bins, conv in zip((1, 2, 3, 6), (self.conv1, self.conv2, self.conv3, self.conv4), strict=True):
            y = conv(F.adaptive_avg_pool2d(x, bins))
            feats.append(F.interpolate(y, size, mode="bilinear", align_corners=True))
        return self.out(torch.cat(feats, 1))


class TramacLearningToDownsample(nn.Module):
    """Tramac's learning to downsample: `conv` (3x3 stride 2, no padding), `dsconv1`, `dsconv2` (stride 2)."""

    def __init__(self, dw_channels1: int = 32, dw_channels2: int = 48, out_channels: int = 64):
        """Builds the three stages."""
        super().__init__()
        self.conv = _ConvBNReLU(3, dw_channels1, 3, 2)
        self.dsconv1 = _DSConv(dw_channels1, dw_channels2, 2)
        self.dsconv2 = _DSConv(dw_channels2, out_channels, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the 1/8-resolution features."""
        return self.dsconv2(self.dsconv1(self.conv(x)))


class TramacGlobalFeatureExtractor(nn.Module):
    """Tramac's global feature extractor: `bottleneck1`..`bottleneck3` (3 blocks each), then `ppm`."""

    def __init__(
        self, in_channels=64, block_channels=(64, 96, 128), out_channels=128, t=6, num_blocks=(3, 3, 3)
    ):
        """Builds the three stages (strides 2, 2, 1) and the pyramid pooling."""
        super().__init__()

        def stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
            """`blocks` bottlenecks, the first with `stride`."""
            layers = [LinearBottleneck(inplanes, planes, t, stride)]
            layers += [LinearBottleneck(planes, planes, t, 1) for _ in range(1, blocks)]
            return nn.Sequential(*layers)

        self.bottleneck1 = stage(in_channels, block_channels[0], num_blocks[0], 2)
        self.bottleneck2 = stage(block_channels[0], block_channels[1], num_blocks[1], 2)
        self.bottleneck3 = stage(block_channels[1], block_channels[2], num_blocks[2], 1)
        self.ppm = TramacPyramidPooling(block_channels[2], out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the 1/32-resolution context features."""
        return self.ppm(self.bottleneck3(self.bottleneck2(self.bottleneck1(x))))


class FeatureFusionModule(nn.Module):
    """Tramac's feature fusion: lower x4 (align_corners), `dwconv`, `conv_lower_res`; `conv_higher_res`."""

    def __init__(self, highter_in_channels: int, lower_in_channels: int, out_channels: int, scale_factor=4):
        """Builds the branches; both 1x1 convolutions have biases, as in the port."""
        super().__init__()
        self.scale_factor = scale_factor
        self.dwconv = _DWConv(lower_in_channels, out_channels, 1)
        self.conv_lower_res = nn.Sequential(
            nn.Conv2d(out_channels, out_channels, 1), nn.BatchNorm2d(out_channels)
        )
        self.conv_higher_res = nn.Sequential(
            nn.Conv2d(highter_in_channels, out_channels, 1), nn.BatchNorm2d(out_channels)
        )
        self.relu = nn.ReLU(True)

    def forward(self, higher_res_feature: torch.Tensor, lower_res_feature: torch.Tensor) -> torch.Tensor:
        """Returns ReLU(higher + lower) at 1/8 resolution."""
        lower = F.interpolate(lower_res_feature, scale_factor=4, mode="bilinear", align_corners=True)
        lower = self.conv_lower_res(self.dwconv(lower))
        return self.relu(self.conv_higher_res(higher_res_feature) + lower)


class Classifer(nn.Module):
    """Tramac's classifier (sic): `dsconv1`, `dsconv2`, `conv` = Sequential(Dropout, 1x1 conv with bias)."""

    def __init__(self, dw_channels: int, num_classes: int, stride: int = 1):
        """Builds the two DSConvs and the dropout + 1x1 conv."""
        super().__init__()
        self.dsconv1 = _DSConv(dw_channels, dw_channels, stride)
        self.dsconv2 = _DSConv(dw_channels, dw_channels, stride)
        self.conv = nn.Sequential(nn.Dropout(0.1), nn.Conv2d(dw_channels, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns logits at the input resolution of this head."""
        return self.conv(self.dsconv2(self.dsconv1(x)))


class TramacFastSCNN(nn.Module):
    """Tramac's FastSCNN on ImageNet-normalised NCHW input; returns (logits[, aux logits]) at input size."""

    def __init__(self, num_classes: int, aux: bool = False):
        """Builds the network; `aux` adds `auxlayer` (and a second output), as in the port."""
        super().__init__()
        self.aux = aux
        self.learning_to_downsample = TramacLearningToDownsample(32, 48, 64)
        self.global_feature_extractor = TramacGlobalFeatureExtractor(64, (64, 96, 128), 128, 6, (3, 3, 3))
        self.feature_fusion = FeatureFusionModule(64, 128, 128)
        self.classifier = Classifer(128, num_classes)
        if aux:
            self.auxlayer = nn.Sequential(
                nn.Conv2d(64, 32, 3, padding=1, bias=False),
                nn.BatchNorm2d(32),
                nn.ReLU(True),
                nn.Dropout(0.1),
                nn.Conv2d(32, num_classes, 1),
            )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Returns (logits,) or (logits, aux logits), each [B, num_classes, H, W]."""
        size = x.shape[2:]
        higher = self.learning_to_downsample(x)
        lower = self.global_feature_extractor(higher)
        logits = self.classifier(self.feature_fusion(higher, lower))
        outputs = [F.interpolate(logits, size, mode="bilinear", align_corners=True)]
        if self.aux:
            outputs.append(F.interpolate(self.auxlayer(higher), size, mode="bilinear", align_corners=True))
        return tuple(outputs)
