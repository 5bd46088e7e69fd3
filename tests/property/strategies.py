"""Hypothesis strategies that generate valid PyTorch models from edgekiln's supported op set.

A model is a small frozen spec (``ModelSpec``: input, a tuple of blocks, a head, the data that
calibrates it), so a failing example shrinks to a readable spec that can be pasted into
``test_regressions.py``. ``build_model(spec)`` turns a spec into an ``nn.Module``;
``make_data(spec.data, shape, n)`` draws calibration and test batches.

Coverage (``model_specs`` draws every item):

- 1-D (Conv1d, MaxPool1d, AvgPool1d, ConstantPad1d) and 2-D models (Conv2d, MaxPool2d,
  AvgPool2d, ZeroPad2d), 1..4 input channels, square and non-square inputs;
- convolutions with kernel 1..5, stride 1..2, dilation 1..2, zero / symmetric / "same"
  padding, groups 1, 2 or depthwise (groups == channels, multiplier 1 or 2), optional
  BatchNorm (folded), ReLU / ReLU6 / none;
- residual adds (conv + skip, ReLU before or after the add), channel concatenations of two
  convolution branches, max and average pooling with and without padding, zero padding;
- heads: global average pooling (AdaptiveAvgPool), ``x.mean(dims)``, flatten, each followed by
  one or two Linear layers, optional softmax; or no head (the feature map is the output);
- nasty ranges: calibration data scaled from 1e-6 to 1e3, constant or all-zero inputs, one
  constant channel, huge outliers, all-negative data; convolutions whose bias pushes every
  output negative (a ReLU after it then sees the range [0, 0]) or whose first output channel
  is dead (all-zero weights), observers "minmax" or "moving_average", 50% pruning.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch import nn

# ---- the spec ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Conv:
    """A convolution with optional BatchNorm and activation. ``groups``: 1, 2 or "dw"."""

    out_channels: int
    kernel: int = 3
    stride: int = 1
    padding: int | str = 0  # an int (both sides) or "same"
    dilation: int = 1
    groups: int | str = 1
    activation: str = "none"  # "none" | "relu" | "relu6"
    batch_norm: bool = False
    bias_shift: float = 0.0  # added to the bias: 0, or a large value that saturates the range
    dead_channel: bool = False  # output channel 0 has all-zero weights


@dataclass(frozen=True)
class Residual:
    """``act(conv(x) + x)``, or ``relu(conv(x)) + x`` with ``inner_relu``."""

    kernel: int = 3
    activation: str = "none"
    inner_relu: bool = False


@dataclass(frozen=True)
class Concat:
    """``cat([conv_a(x), conv_b(x)], dim=1)`` with 1x1 / kxk branches ("same" padding)."""

    left: int
    right: int
    kernel: int = 3
    activation: str = "none"


@dataclass(frozen=True)
class Pool:
    """Max or average pooling (average leaves padding out of the count, as TFLite does)."""

    kind: str  # "max" | "avg"
    kernel: int = 2
    stride: int = 2
    padding: int = 0


@dataclass(frozen=True)
class Pad:
    """Zero padding of the spatial axes: ``before`` and ``after`` on every one."""

    before: int = 1
    after: int = 0


Block = Conv | Residual | Concat | Pool | Pad


@dataclass(frozen=True)
class Head:
    """What turns the feature map into the output. ``kind``: "gap" | "mean" | "flatten" | "none"."""

    kind: str = "gap"
    hidden: int = 0  # 0: one Linear; > 0: Linear(hidden) + ReLU + Linear
    classes: int = 4
    softmax: bool = False


@dataclass(frozen=True)
class Data:
    """How calibration and test data are drawn. ``kind`` names the nasty case."""

    kind: str = "normal"  # see DATA_KINDS
    log_scale: float = 0.0  # data scale is 10 ** log_scale
    seed: int = 0


DATA_KINDS = (
    "normal",
    "uniform",
    "outliers",
    "negative",
    "constant_channel",
    "constant",
    "zeros",
)


@dataclass(frozen=True)
class ModelSpec:
    """One generated model: input (channels, *spatial), blocks, head, data, recipe knobs."""

    channels: int
    spatial: tuple[int, ...]  # (L,) for 1-D, (H, W) for 2-D
    blocks: tuple[Block, ...]
    head: Head
    data: Data
    observer: str = "minmax"
    sparsity: float = 0.0
    seed: int = 0

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Per-sample input shape in PyTorch's layout."""
        return (self.channels, *self.spatial)


# ---- shapes --------------------------------------------------------------------------------


def conv_groups(groups: int | str, c_in: int, c_out: int) -> int:
    """The integer ``groups`` of a Conv spec at ``c_in`` input channels."""
    if groups == "dw":
        return c_in
    return int(groups)


def conv_padding(spec: Conv) -> tuple[int, int]:
    """Total (before, after) padding of one spatial axis."""
    if spec.padding == "same":
        total = spec.dilation * (spec.kernel - 1)
        return total // 2, total - total // 2
    return int(spec.padding), int(spec.padding)


def conv_out(n: int, spec: Conv) -> int:
    """Output length of a convolution along one spatial axis of length ``n``."""
    if spec.padding == "same":
        return n
    lo, hi = conv_padding(spec)
    return (n + lo + hi - spec.dilation * (spec.kernel - 1) - 1) // spec.stride + 1


def pool_out(n: int, spec: Pool) -> int:
    """Output length of a pool along one spatial axis of length ``n``."""
    return (n + 2 * spec.padding - spec.kernel) // spec.stride + 1


# ---- the strategies ------------------------------------------------------------------------

ACTIVATIONS = st.sampled_from(["none", "relu", "relu6"])


@st.composite
def conv_specs(draw: st.DrawFn, c_in: int, size: tuple[int, ...]) -> Conv | None:
    """A Conv valid on a (c_in, *size) input, or None when none fits."""
    kernel = draw(st.integers(1, min(5, min(size))))
    dilation = draw(st.sampled_from([1, 1, 2])) if kernel > 1 else 1
    if dilation * (kernel - 1) + 1 > min(size) + 2:
        dilation = 1
    groups_kind = draw(st.sampled_from([1, 1, 1, 2, "dw"]))
    if groups_kind == "dw":
        out = c_in * draw(st.sampled_from([1, 2]))
    elif groups_kind == 2 and c_in % 2 == 0:
        out = 2 * draw(st.integers(1, 4))
    else:
        groups_kind = 1
        out = draw(st.integers(1, 8))
    padding = draw(st.sampled_from([0, 1, "same"]))
    stride = draw(st.sampled_from([1, 1, 2]))
    if padding == "same":
        stride = 1  # PyTorch refuses padding="same" with stride > 1
    spec = Conv(
        out_channels=out,
        kernel=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups_kind,
        activation=draw(ACTIVATIONS),
        batch_norm=draw(st.booleans()),
        bias_shift=draw(st.sampled_from([0.0, 0.0, 0.0, -20.0, 20.0])),
        dead_channel=draw(st.booleans()) and out > 1,
    )
    if any(conv_out(n, spec) < 1 for n in size):
        return None
    return spec


@st.composite
def block_specs(draw: st.DrawFn, c: int, size: tuple[int, ...]) -> Block | None:
    """One block valid on a (c, *size) feature map."""
    kind = draw(st.sampled_from(["conv", "conv", "conv", "residual", "concat", "pool", "pad"]))
    if kind == "conv":
        return draw(conv_specs(c, size))
    if kind == "residual":
        k = draw(st.sampled_from([1, 3]))
        return Residual(k, draw(ACTIVATIONS), draw(st.booleans()))
    if kind == "concat":
        k = draw(st.sampled_from([1, 3]))
        return Concat(draw(st.integers(1, 4)), draw(st.integers(1, 4)), k, draw(ACTIVATIONS))
    if kind == "pad":
        return Pad(draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    k = draw(st.integers(2, 3))
    spec = Pool(
        draw(st.sampled_from(["max", "avg"])),
        kernel=k,
        stride=draw(st.integers(1, 2)),
        padding=draw(st.sampled_from([0, 0, 1])) if k == 3 else 0,
    )
    if any(pool_out(n, spec) < 1 for n in size):
        return None
    return spec


def block_output(block: Block, c: int, size: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    """Channels and spatial size after ``block``."""
    if isinstance(block, Conv):
        return block.out_channels, tuple(conv_out(n, block) for n in size)
    if isinstance(block, Residual):
        return c, size
    if isinstance(block, Concat):
        return block.left + block.right, size
    if isinstance(block, Pool):
        return c, tuple(pool_out(n, block) for n in size)
    return c, tuple(n + block.before + block.after for n in size)


@st.composite
def data_specs(draw: st.DrawFn) -> Data:
    """Calibration data: mostly ordinary, often nasty."""
    kind = draw(st.sampled_from(DATA_KINDS))
    log_scale = draw(st.sampled_from([0.0, 0.0, -1.0, 1.0, -3.0, 3.0, -6.0]))
    return Data(kind, log_scale, draw(st.integers(0, 2**16)))


@st.composite
def model_specs(draw: st.DrawFn, max_blocks: int = 4) -> ModelSpec:
    """A valid model spec (shapes checked block by block as the spec is drawn)."""
    dims = draw(st.sampled_from([2, 2, 1]))
    channels = draw(st.integers(1, 4))
    if dims == 2:
        spatial = (draw(st.integers(4, 12)), draw(st.integers(4, 12)))
    else:
        spatial = (draw(st.integers(6, 32)),)
    blocks: list[Block] = []
    c, size = channels, spatial
    for _ in range(draw(st.integers(1, max_blocks))):
        block = draw(block_specs(c, size))
        if block is None:
            continue
        blocks.append(block)
        c, size = block_output(block, c, size)
    head_kind = draw(st.sampled_from(["gap", "mean", "flatten", "none"]))
    if head_kind == "flatten" and c * int(np.prod(size)) > 2048:
        head_kind = "gap"
    head = Head(
        head_kind,
        hidden=draw(st.sampled_from([0, 0, 8])),
        classes=draw(st.integers(2, 10)),
        softmax=draw(st.booleans()) and head_kind != "none",
    )
    return ModelSpec(
        channels,
        spatial,
        tuple(blocks),
        head,
        draw(data_specs()),
        observer=draw(st.sampled_from(["minmax", "minmax", "moving_average"])),
        sparsity=draw(st.sampled_from([0.0, 0.0, 0.5])),
        seed=draw(st.integers(0, 2**16)),
    )


# ---- from spec to nn.Module ----------------------------------------------------------------


def _act(name: str) -> nn.Module:
    return {"none": nn.Identity(), "relu": nn.ReLU(), "relu6": nn.ReLU6()}[name]


class ConvBlock(nn.Module):
    """conv [-> BatchNorm] [-> activation]."""

    def __init__(self, spec: Conv, c_in: int, dims: int) -> None:
        super().__init__()
        conv_cls = nn.Conv2d if dims == 2 else nn.Conv1d
        bn_cls = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
        groups = conv_groups(spec.groups, c_in, spec.out_channels)
        self.conv = conv_cls(
            c_in,
            spec.out_channels,
            spec.kernel,
            stride=spec.stride,
            padding=spec.padding,
            dilation=spec.dilation,
            groups=groups,
        )
        with torch.no_grad():
            self.conv.bias.add_(spec.bias_shift)
            if spec.dead_channel:
                self.conv.weight[0].zero_()
        layers: list[nn.Module] = [self.conv]
        if spec.batch_norm:
            bn = bn_cls(spec.out_channels)
            with torch.no_grad():  # eval-mode statistics that are not the identity
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)
            layers.append(bn)
        if spec.activation != "none":  # no nn.Identity before a ReLU: prepare refuses it
            layers.append(_act(spec.activation))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ResidualBlock(nn.Module):
    """``act(conv(x) + x)`` or ``relu(conv(x)) + x``."""

    def __init__(self, spec: Residual, c: int, dims: int) -> None:
        super().__init__()
        conv_cls = nn.Conv2d if dims == 2 else nn.Conv1d
        self.conv = conv_cls(c, c, spec.kernel, padding=spec.kernel // 2)
        self.inner = nn.ReLU() if spec.inner_relu else nn.Identity()
        self.act = _act(spec.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.inner(self.conv(x)) + x)


class ConcatBlock(nn.Module):
    """Two convolution branches on one input, concatenated on channels."""

    def __init__(self, spec: Concat, c: int, dims: int) -> None:
        super().__init__()
        conv_cls = nn.Conv2d if dims == 2 else nn.Conv1d
        self.a = conv_cls(c, spec.left, 1)
        self.b = conv_cls(c, spec.right, spec.kernel, padding=spec.kernel // 2)
        self.act_a = _act(spec.activation)
        self.act_b = _act(spec.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.act_a(self.a(x)), self.act_b(self.b(x))], dim=1)


def _pool(spec: Pool, dims: int) -> nn.Module:
    if spec.kind == "max":
        cls = nn.MaxPool2d if dims == 2 else nn.MaxPool1d
        return cls(spec.kernel, spec.stride, spec.padding)
    cls = nn.AvgPool2d if dims == 2 else nn.AvgPool1d
    return cls(spec.kernel, spec.stride, spec.padding, count_include_pad=False)


def _pad(spec: Pad, dims: int) -> nn.Module:
    if dims == 2:
        return nn.ZeroPad2d((spec.before, spec.after, spec.before, spec.after))
    return nn.ConstantPad1d((spec.before, spec.after), 0.0)


class HeadBlock(nn.Module):
    """Global pooling, mean or flatten, then Linear layers and an optional softmax."""

    def __init__(self, spec: Head, c: int, size: tuple[int, ...]) -> None:
        super().__init__()
        self.kind = spec.kind
        self.dims = tuple(range(2, 2 + len(size)))
        pool_cls = nn.AdaptiveAvgPool2d if len(size) == 2 else nn.AdaptiveAvgPool1d
        self.pool = pool_cls(1) if spec.kind == "gap" else nn.Identity()
        self.flatten = nn.Flatten()
        features = c * int(np.prod(size)) if spec.kind == "flatten" else c
        layers: list[nn.Module] = []
        if spec.hidden:
            layers += [nn.Linear(features, spec.hidden), nn.ReLU()]
            features = spec.hidden
        layers.append(nn.Linear(features, spec.classes))
        self.linear = nn.Sequential(*layers)
        self.softmax = nn.Softmax(dim=1) if spec.softmax else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "mean":
            x = x.mean(dim=self.dims)
        else:
            x = self.flatten(self.pool(x))
        return self.softmax(self.linear(x))


class GeneratedNet(nn.Module):
    """The model a ``ModelSpec`` describes (weights drawn from ``spec.seed``)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        torch.manual_seed(spec.seed)
        dims = len(spec.spatial)
        c, size = spec.channels, spec.spatial
        layers: list[nn.Module] = []
        for block in spec.blocks:
            if isinstance(block, Conv):
                layers.append(ConvBlock(block, c, dims))
            elif isinstance(block, Residual):
                layers.append(ResidualBlock(block, c, dims))
            elif isinstance(block, Concat):
                layers.append(ConcatBlock(block, c, dims))
            elif isinstance(block, Pool):
                layers.append(_pool(block, dims))
            else:
                layers.append(_pad(block, dims))
            c, size = block_output(block, c, size)
        self.body = nn.Sequential(*layers)
        self.head = HeadBlock(spec.head, c, size) if spec.head.kind != "none" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def build_model(spec: ModelSpec) -> nn.Module:
    """The float ``nn.Module`` of ``spec``, in eval mode."""
    return GeneratedNet(spec).eval()


# ---- data ----------------------------------------------------------------------------------


def make_data(spec: Data, shape: tuple[int, ...], n: int, stream: int = 0) -> np.ndarray:
    """``n`` float32 samples of per-sample ``shape`` drawn the way ``spec`` says.

    ``stream`` picks an independent draw (0: calibration, 1: test data). Test data reaches
    past the calibrated range on purpose (1.5x), so the int8 clamps are exercised.
    """
    rng = np.random.default_rng([spec.seed, stream])
    scale = np.float32(10.0**spec.log_scale)
    full = (n, *shape)
    if spec.kind == "uniform":
        x = rng.uniform(-1, 1, full)
    elif spec.kind == "outliers":
        x = rng.normal(0, 1, full)
        mask = rng.random(full) < 0.002
        x[mask] *= 1000.0
    elif spec.kind == "negative":
        x = -np.abs(rng.normal(0, 1, full)) - 0.5
    elif spec.kind == "constant_channel":
        x = rng.normal(0, 1, full)
        x[:, 0] = 3.0
    elif spec.kind == "constant":
        x = np.full(full, -2.5)
    elif spec.kind == "zeros":
        x = np.zeros(full)
    else:
        x = rng.normal(0, 1, full)
    if stream:
        x = x * 1.5
    return (x * scale).astype(np.float32)


# ---- settings profiles ---------------------------------------------------------------------

PROFILE_ENV = "EDGEKILN_HYPOTHESIS"
EXAMPLES_ENV = "EDGEKILN_HYPOTHESIS_EXAMPLES"

settings.register_profile(
    "ci",
    max_examples=10,
    derandomize=True,  # a fixed, seeded sample: the same models on every CI run
    deadline=None,  # each model starts ~4 runtime child processes
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "long",
    max_examples=int(os.environ.get(EXAMPLES_ENV, "300")),
    derandomize=False,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)


def active_settings() -> settings:
    """The profile named by ``$EDGEKILN_HYPOTHESIS`` ("ci" by default, "long" for long runs)."""
    return settings.get_profile(os.environ.get(PROFILE_ENV, "ci"))
