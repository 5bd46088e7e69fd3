"""Reference architectures, in plain ``torch.nn``, ready for int8 capture.

Every factory returns an ``nn.Module`` whose ``forward`` is a straight line of layers:
``torch.fx.symbolic_trace`` captures it, and every op is one the int8 exporters support
(convolutions, BatchNorm directly after a convolution or linear layer, ReLU after a convolution,
linear layer or residual add, pooling, flatten, linear). Models output logits (classification) or
a reconstruction (autoencoder); there is no softmax and no dropout. MLPerf Tiny trains with
dropout; at inference it is the identity, so leaving it out changes no deployed number.

The four MLPerf Tiny models re-express the Keras reference definitions of MLPerf Tiny v1.x
(https://github.com/mlcommons/tiny, ``benchmark/training/*``) layer by layer. Parameter counts in
the docstrings are PyTorch ``parameters()`` counts, which leave out BatchNorm running statistics;
Keras' "trainable params" counts the same set, so the two agree exactly.

Padding. Stride-1 convolutions with odd kernels use ``padding=k // 2``, which is exactly
TensorFlow's ``SAME``. Stride-2 3x3 convolutions on even inputs use ``padding=1``: the output shape
equals ``SAME``, but ``SAME`` pads (0, 1) (nothing before, one after) where PyTorch pads (1, 1).
The TFLite writer therefore emits an explicit PAD before such a convolution; a model trained here
and run there computes the same numbers, it is only not weight-compatible with a Keras checkpoint.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

__all__ = [
    "DSCNN",
    "FCAutoencoder",
    "MobileNetV1",
    "ResNet8",
    "SmallCNN",
    "ds_cnn",
    "fc_autoencoder",
    "mobilenet_v1_025",
    "resnet8",
    "small_cnn",
]


# Building blocks: each one is a convolution (or linear layer), its BatchNorm, then ReLU.


def conv_bn_relu(
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    groups: int = 1,
) -> nn.Sequential:
    """Conv2d -> BatchNorm2d -> ReLU; the exporters fold the BatchNorm and fuse the ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


def conv_bn(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
) -> nn.Sequential:
    """Conv2d -> BatchNorm2d, for the branch that ends in a residual add (ReLU comes after it)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding),
        nn.BatchNorm2d(out_channels),
    )


def depthwise_separable(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """Depthwise 3x3 (``groups=in_channels``) + BN + ReLU, then pointwise 1x1 + BN + ReLU.

    Shape: (N, in_channels, H, W) -> (N, out_channels, ceil(H / stride), ceil(W / stride)).
    """
    return nn.Sequential(
        conv_bn_relu(in_channels, in_channels, 3, stride, padding=1, groups=in_channels),
        conv_bn_relu(in_channels, out_channels, 1),
    )


def count_parameters(model: nn.Module) -> int:
    """Number of scalars in ``model.parameters()`` (BatchNorm running statistics excluded).

    >>> count_parameters(resnet8())
    78186
    """
    return sum(p.numel() for p in model.parameters())


# 1. small_cnn: the default model for MNIST (28x28) and scikit-learn digits (8x8).


class SmallCNN(nn.Module):
    """Stem conv, one residual block, two max pools, flatten, linear head.

    Shape: (N, in_channels, S, S) -> (N, num_classes) logits, S = ``input_size``.
    """

    def __init__(self, num_classes: int, in_channels: int, input_size: int, width: int) -> None:
        super().__init__()
        self.stem = conv_bn_relu(in_channels, width, 3, padding=1)  # (N, w, S, S)
        self.block_conv1 = conv_bn_relu(width, width, 3, padding=1)
        self.block_conv2 = conv_bn(width, width, 3, padding=1)
        self.block_relu = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)  # (N, w, S/2, S/2)
        self.conv = conv_bn_relu(width, 2 * width, 3, padding=1)
        self.pool2 = nn.MaxPool2d(2)  # (N, 2w, S/4, S/4)
        self.flatten = nn.Flatten()  # (N, 2w * (S/4)^2), NCHW order
        self.fc = nn.Linear(2 * width * (input_size // 4) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.block_relu(x + self.block_conv2(self.block_conv1(x)))
        x = self.pool1(x)
        x = self.pool2(self.conv(x))
        return self.fc(self.flatten(x))


def small_cnn(
    num_classes: int = 10, in_channels: int = 1, input_size: int = 28, width: int = 16
) -> SmallCNN:
    """Small residual CNN, the default model for MNIST and the 8x8 scikit-learn digits.

    Layers: conv 3x3 (``width``) + BN + ReLU; a residual block of two conv 3x3 + BN (ReLU after
    the first and after the add); max pool 2; conv 3x3 (``2 * width``) + BN + ReLU; max pool 2;
    flatten; linear. The flatten sits on a spatial feature map on purpose: it exercises the
    NCHW -> NHWC weight re-ordering of the TFLite writer.

    Input (``in_channels``, ``input_size``, ``input_size``): (1, 28, 28) for MNIST, use
    ``input_size=8`` for digits. Parameters (``width=16``, 10 classes): 25,290 at 28x28,
    10,890 at 8x8. Output: (N, num_classes) logits.

    Raises:
        ValueError: if ``input_size`` is not a positive multiple of 4 (two 2x2 max pools), or
            a size argument is not positive.

    >>> small_cnn()(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """
    _check_positive(num_classes=num_classes, in_channels=in_channels, width=width)
    if input_size <= 0 or input_size % 4 != 0:
        raise ValueError(
            f"small_cnn needs input_size to be a positive multiple of 4 (it has two 2x2 max "
            f"pools), got input_size={input_size}; resize or pad the images, e.g. 28 for MNIST "
            f"or 8 for the scikit-learn digits"
        )
    return SmallCNN(num_classes, in_channels, input_size, width)


# 2. MLPerf Tiny keyword spotting: DS-CNN, input (1, 49, 10) MFCC features.


class DSCNN(nn.Module):
    """DS-CNN: conv 10x4 stride 2, four depthwise-separable blocks, average pool, linear.

    Shape: (N, 1, 49, 10) -> (N, num_classes) logits.
    """

    def __init__(self, num_classes: int, filters: int = 64) -> None:
        super().__init__()
        # Keras SAME pads rows (4, 5) and columns (1, 1) here; symmetric (5, 1) gives the same
        # (25, 5) output. The exporter writes the padding explicitly.
        self.stem = conv_bn_relu(1, filters, (10, 4), stride=(2, 2), padding=(5, 1))
        self.blocks = nn.Sequential(*(depthwise_separable(filters, filters) for _ in range(4)))
        self.pool = nn.AvgPool2d((25, 5))  # (N, 64, 25, 5) -> (N, 64, 1, 1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(filters, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))  # (N, 64, 25, 5)
        return self.fc(self.flatten(self.pool(x)))


def ds_cnn(num_classes: int = 12) -> DSCNN:
    """MLPerf Tiny keyword-spotting DS-CNN (Speech Commands, 12 classes).

    Reference: MLPerf Tiny v1.x, ``benchmark/training/keyword_spotting/keras_model.py``
    (``ds_cnn``), https://github.com/mlcommons/tiny; after Zhang et al., "Hello Edge" (2017).
    Layers: conv 64 10x4 stride 2 + BN + ReLU; four times (depthwise 3x3 + BN + ReLU, pointwise
    1x1 64 + BN + ReLU); average pool 25x5; flatten; linear. The reference's two dropout layers
    are left out (identity at inference).

    Input (1, 49, 10): 49 frames x 10 MFCC coefficients, one channel. Parameters: 23,756 for
    12 classes, the reference's trainable count (the NXP eIQ model zoo lists 23,756 for the
    MLCommons model; with the 1,152 BatchNorm running statistics the total is 24,908).
    Output: (N, num_classes) logits.

    >>> count_parameters(ds_cnn())
    23756
    """
    _check_positive(num_classes=num_classes)
    return DSCNN(num_classes)


# 3. MLPerf Tiny visual wake words: MobileNetV1 alpha 0.25, input (3, 96, 96).

# (output channels, stride) of the 13 depthwise-separable blocks of MobileNetV1 at alpha 0.25.
MOBILENET_V1_025_BLOCKS: tuple[tuple[int, int], ...] = (
    (16, 1),
    (32, 2),
    (32, 1),
    (64, 2),
    (64, 1),
    (128, 2),
    (128, 1),
    (128, 1),
    (128, 1),
    (128, 1),
    (128, 1),
    (256, 2),
    (256, 1),
)


class MobileNetV1(nn.Module):
    """MobileNetV1 body (conv 3x3 stride 2, 13 depthwise-separable blocks), pool, linear.

    Shape: (N, 3, 96, 96) -> (N, num_classes) logits; the last feature map is (N, 256, 3, 3).
    """

    def __init__(self, num_classes: int, stem_channels: int = 8) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, stem_channels, 3, stride=2, padding=1)  # (N, 8, 48, 48)
        blocks = []
        channels = stem_channels
        for out_channels, stride in MOBILENET_V1_025_BLOCKS:
            blocks.append(depthwise_separable(channels, out_channels, stride))
            channels = out_channels
        self.blocks = nn.Sequential(*blocks)  # (N, 256, 3, 3)
        self.pool = nn.AvgPool2d(3)  # (N, 256, 1, 1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(self.flatten(self.pool(x)))


def mobilenet_v1_025(num_classes: int = 2) -> MobileNetV1:
    """MLPerf Tiny visual-wake-words MobileNetV1, width multiplier alpha = 0.25.

    Reference: MLPerf Tiny v1.x, ``benchmark/training/visual_wake_words/vww_model.py``
    (``mobilenet_v1``, itself from Silicon Labs' EEMBC person-detection model),
    https://github.com/mlcommons/tiny; after Howard et al., "MobileNets" (2017).
    Layers: conv 8 3x3 stride 2 + BN + ReLU; 13 depthwise-separable blocks (depthwise 3x3 + BN +
    ReLU, pointwise 1x1 + BN + ReLU) with outputs 16, 32 (s2), 32, 64 (s2), 64, 128 (s2),
    5 x 128, 256 (s2), 256; average pool 3x3; flatten; linear.

    Input (3, 96, 96) RGB. Parameters: 216,322 for 2 classes, the reference's trainable count;
    with the 5,472 BatchNorm running statistics the total is 221,794, the figure the NXP eIQ
    model zoo lists for the MLCommons model.
    Output: (N, num_classes) logits.

    >>> count_parameters(mobilenet_v1_025())
    216322
    """
    _check_positive(num_classes=num_classes)
    return MobileNetV1(num_classes)


# 4. MLPerf Tiny image classification: ResNet-8 on CIFAR-10, input (3, 32, 32).


class ResidualStack(nn.Module):
    """Two conv 3x3 + BN (ReLU between), added to the (projected) input, then ReLU.

    Shape: (N, in_channels, H, W) -> (N, out_channels, H / stride, W / stride). With
    ``stride=2`` the shortcut is a 1x1 stride-2 convolution (no BatchNorm, as in the reference).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv_bn_relu(in_channels, out_channels, 3, stride, padding=1)
        self.conv2 = conv_bn(out_channels, out_channels, 3, padding=1)
        self.shortcut: nn.Module = (
            nn.Identity() if stride == 1 else nn.Conv2d(in_channels, out_channels, 1, stride)
        )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.shortcut(x) + self.conv2(self.conv1(x)))


class ResNet8(nn.Module):
    """ResNet-8: stem conv, three residual stacks (16, 32, 64 filters), pool, linear.

    Shape: (N, 3, 32, 32) -> (N, num_classes) logits.
    """

    def __init__(self, num_classes: int, filters: int = 16) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, filters, 3, padding=1)  # (N, 16, 32, 32)
        self.stack1 = ResidualStack(filters, filters, stride=1)  # (N, 16, 32, 32)
        self.stack2 = ResidualStack(filters, 2 * filters, stride=2)  # (N, 32, 16, 16)
        self.stack3 = ResidualStack(2 * filters, 4 * filters, stride=2)  # (N, 64, 8, 8)
        self.pool = nn.AvgPool2d(8)  # (N, 64, 1, 1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * filters, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stack3(self.stack2(self.stack1(self.stem(x))))
        return self.fc(self.flatten(self.pool(x)))


def resnet8(num_classes: int = 10) -> ResNet8:
    """MLPerf Tiny image-classification ResNet-8 (CIFAR-10).

    Reference: MLPerf Tiny v1.x, ``benchmark/training/image_classification/keras_model.py``
    (``resnet_v1_eembc`` with 16 filters, the v1.0 reference), https://github.com/mlcommons/tiny;
    after He et al., "Deep Residual Learning" (2016). Layers: conv 16 3x3 + BN + ReLU; three
    residual stacks of 16, 32 (stride 2), 64 (stride 2) filters, each conv 3x3 + BN + ReLU,
    conv 3x3 + BN, add (1x1 stride-2 conv shortcut when downsampling), ReLU; average pool 8x8;
    flatten; linear.

    Input (3, 32, 32) RGB. Parameters: 78,186 for 10 classes, the reference's trainable count
    (its Keras total, 78,666, adds the 480 BatchNorm running statistics).
    Output: (N, num_classes) logits.

    >>> count_parameters(resnet8())
    78186
    """
    _check_positive(num_classes=num_classes)
    return ResNet8(num_classes)


# 5. MLPerf Tiny anomaly detection: fully connected autoencoder, input 640 (5 frames x 128 mels).


def linear_bn_relu(in_features: int, out_features: int) -> nn.Sequential:
    """Linear -> BatchNorm1d -> ReLU; the exporters fold the BatchNorm and fuse the ReLU."""
    return nn.Sequential(
        nn.Linear(in_features, out_features), nn.BatchNorm1d(out_features), nn.ReLU()
    )


class FCAutoencoder(nn.Module):
    """Dense autoencoder 640 -> 128 x4 -> 8 -> 128 x4 -> 640.

    Shape: (N, input_dim) -> (N, input_dim) reconstruction.
    """

    def __init__(self, input_dim: int = 640, hidden: int = 128, bottleneck: int = 8) -> None:
        super().__init__()
        sizes = [input_dim, hidden, hidden, hidden, hidden, bottleneck]
        sizes += [hidden, hidden, hidden, hidden]
        self.layers = nn.Sequential(*(linear_bn_relu(a, b) for a, b in itertools.pairwise(sizes)))
        self.output = nn.Linear(hidden, input_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.layers(x))


def fc_autoencoder(input_dim: int = 640) -> FCAutoencoder:
    """MLPerf Tiny anomaly-detection autoencoder (ToyADMOS / DCASE 2020 task 2 baseline).

    Reference: MLPerf Tiny v1.x, ``benchmark/training/anomaly_detection/keras_model.py``
    (``get_model``, after the DCASE 2020 baseline by Hitachi), https://github.com/mlcommons/tiny.
    Layers: four dense 128 + BN + ReLU, dense 8 + BN + ReLU (bottleneck), four dense 128 + BN +
    ReLU, dense ``input_dim`` (linear output).

    Input (640,): 5 stacked frames of 128 log-mel energies. Parameters: 267,928 at
    ``input_dim=640``, the reference's trainable count (its total is 269,992 with BatchNorm
    statistics; the MLPerf Tiny paper rounds it to 0.27 M). Output: (N, input_dim)
    reconstruction; the anomaly score is the reconstruction error.

    >>> count_parameters(fc_autoencoder())
    267928
    """
    _check_positive(input_dim=input_dim)
    return FCAutoencoder(input_dim)


def _check_positive(**sizes: int) -> None:
    """Raise ValueError naming the first size argument that is not a positive integer."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {name}={value!r}")
