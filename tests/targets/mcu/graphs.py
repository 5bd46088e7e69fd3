"""GraphBuilder models for the MCU tests and benchmark (stand-ins until edgekiln.capture models
are wired in: swap ``GRAPHS`` entries for captured reference architectures)."""

from __future__ import annotations

import numpy as np

from edgekiln.ir.builder import GraphBuilder
from edgekiln.ir.graph import Graph


def every_op_cnn(seed: int = 0) -> Graph:
    """conv, depthwise, pad, add, max/avg pool, concat, mean, flatten, linear, softmax."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder(rng.normal(0, 1, (8, 3, 12, 12)).astype(np.float32), seed=seed)
    x = b.conv(b.input, 8, 3, padding=1, activation="relu")
    d = b.conv(x, 8, 3, padding=1, groups=8, activation="relu6")
    s = b.add(x, d, activation="relu")
    p = b.max_pool(s, 2)
    q = b.avg_pool(b.pad(p, ((0, 0), (0, 0), (1, 1), (1, 1))), 3, stride=1)
    c = b.concat([p, b.requantize_like(q, p)])
    g = b.mean(c)
    f = b.linear(b.flatten(b.conv(c, 4, 1)), 10, activation="relu")
    h = b.linear(g, 10)
    out = b.softmax(b.add(f, h))
    return b.build([out])


def conv1d_net(seed: int = 0) -> Graph:
    """A 1-D (Conv1d) model, (N, 3, 24) in and a (N, 6, 12) feature map out: conv, depthwise,
    max pool, 1x1 conv. TFLite holds its tensors as (N, 1, L, C)."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder(rng.normal(0, 1, (8, 3, 24)).astype(np.float32), seed=seed)
    x = b.conv(b.input, 8, 5, padding=2, activation="relu")
    x = b.conv(x, 8, 3, padding=1, groups=8, activation="relu6")
    x = b.max_pool(x, 2)
    return b.build([b.conv(x, 6, 1)])


def resnet8(seed: int = 0) -> Graph:
    """MLPerf Tiny's ResNet-8 shape (32x32x3, stacks of 16/32/64 channels, ~12.5 M MACs)."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder(rng.normal(0, 1, (2, 3, 32, 32)).astype(np.float32), seed=seed)
    x = b.conv(b.input, 16, 3, padding=1, activation="relu")
    for c, stride in ((16, 1), (32, 2), (64, 2)):
        y = b.conv(x, c, 3, stride=stride, padding=1, activation="relu")
        y = b.conv(y, c, 3, padding=1)
        short = x if stride == 1 else b.conv(x, c, 1, stride=stride)
        x = b.add(y, short, activation="relu")
    x = b.mean(x)
    return b.build([b.softmax(b.linear(x, 10))])


def ds_cnn(seed: int = 0) -> Graph:
    """MLPerf Tiny's DS-CNN keyword-spotting shape (49x10x1 input, 64 channels, 4 dw blocks)."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder(rng.normal(0, 1, (2, 1, 49, 10)).astype(np.float32), seed=seed)
    x = b.conv(b.input, 64, (10, 4), stride=2, padding=[(4, 5), (1, 2)], activation="relu")
    for _ in range(4):
        x = b.conv(x, 64, 3, padding=1, groups=64, activation="relu")
        x = b.conv(x, 64, 1, activation="relu")
    return b.build([b.softmax(b.linear(b.mean(x), 12))])


def mobilenet_v1_025(seed: int = 0) -> Graph:
    """MLPerf Tiny's visual wake words MobileNetV1 (alpha 0.25, 96x96x3)."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder(rng.normal(0, 1, (1, 3, 96, 96)).astype(np.float32), seed=seed)
    x = b.conv(b.input, 8, 3, stride=2, padding=[(0, 1), (0, 1)], activation="relu6")
    plan = [(16, 1), (32, 2), (32, 1), (64, 2), (64, 1), (128, 2)] + [(128, 1)] * 5
    plan += [(256, 2), (256, 1)]
    for c, s in plan:
        pad = [(0, 1), (0, 1)] if s == 2 else 1
        x = b.conv(x, x_channels(b, x), 3, stride=s, padding=pad, groups=x_channels(b, x),
                   activation="relu6")  # fmt: skip
        x = b.conv(x, c, 1, activation="relu6")
    return b.build([b.softmax(b.linear(b.mean(x), 2))])


def x_channels(b: GraphBuilder, name: str) -> int:
    return int(b.float_value(name).shape[1])


GRAPHS = {"resnet8": resnet8, "ds_cnn": ds_cnn, "mobilenet_v1_025": mobilenet_v1_025}
