"""Build quantized graphs by hand, calibrated on float data: for tests and generated models.

The builder carries a float calibration batch through every op it adds (the reference
executor's float kernels), and gives each new activation asymmetric int8 parameters from
the observed min/max, the way training observers would. Weights are float arrays (or
random ones, seeded) quantized symmetric per output channel; biases become int32.

>>> b = GraphBuilder(np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 1, 4, 4), seed=0)
>>> y = b.conv(b.input, out_channels=2, kernel=3, padding=1, activation="relu")
>>> y = b.linear(b.flatten(y), out_features=3)
>>> g = b.build(outputs=[y])
>>> [op.type.value for op in g.ops], g.tensor(y).shape
(['conv', 'reshape', 'linear'], (1, 3))
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgekiln.ir.graph import (
    INT8_MAX,
    INT8_MIN,
    SOFTMAX_OUTPUT_SCALE,
    SOFTMAX_OUTPUT_ZERO_POINT,
    Activation,
    DType,
    Graph,
    GraphError,
    Op,
    OpType,
    QParams,
    Tensor,
)
from edgekiln.ir.reference import float_op


def activation_qparams(lo: float, hi: float) -> QParams:
    """Asymmetric int8 parameters for the range [lo, hi], widened to include 0 (TFLite rule)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = max((hi - lo) / (INT8_MAX - INT8_MIN), 1e-8)
    zero_point = int(np.clip(INT8_MIN - round(lo / scale), INT8_MIN, INT8_MAX))
    return QParams.per_tensor(scale, zero_point)


def weight_qparams(w: np.ndarray) -> QParams:
    """Symmetric narrow-range per-output-channel parameters (axis 0) for a float kernel."""
    amax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    return QParams.per_channel(np.maximum(amax / 127.0, 1e-8).astype(np.float32), axis=0)


class GraphBuilder:
    """Add ops one by one; each returns the name of its output tensor."""

    def __init__(self, calibration: np.ndarray, *, seed: int = 0, name: str = "model") -> None:
        """Start a graph whose single input is calibrated on ``calibration`` (N, C, *spatial)."""
        self._rng = np.random.default_rng(seed)
        self._tensors: dict[str, Tensor] = {}
        self._ops: list[Op] = []
        self._float: dict[str, np.ndarray] = {}
        self._name = name
        x = np.asarray(calibration, dtype=np.float32)
        self.input = self._activation("input", x)

    def conv(
        self,
        x: str,
        out_channels: int,
        kernel: int | Sequence[int],
        *,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[tuple[int, int]] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        activation: str = "none",
        weight: np.ndarray | None = None,
        bias: np.ndarray | None = None,
    ) -> str:
        """A 1-D or 2-D convolution (``groups == in_channels`` makes it depthwise)."""
        xs = self._float[x]
        nsp = xs.ndim - 2
        k = _tuple(kernel, nsp)
        if weight is None:
            fan_in = xs.shape[1] // groups * int(np.prod(k))
            weight = self._rng.normal(
                0, 1 / np.sqrt(fan_in), (out_channels, xs.shape[1] // groups, *k)
            )
        pads = (
            tuple((padding, padding) for _ in range(nsp))
            if isinstance(padding, int)
            else tuple(padding)
        )
        attrs = {
            "stride": _tuple(stride, nsp),
            "padding": pads,
            "dilation": _tuple(dilation, nsp),
            "groups": groups,
            "activation": Activation(activation),
        }
        return self._weighted(OpType.CONV, x, weight, bias, attrs)

    def linear(
        self,
        x: str,
        out_features: int,
        *,
        activation: str = "none",
        weight: np.ndarray | None = None,
        bias: np.ndarray | None = None,
    ) -> str:
        """A fully connected layer on a (N, C_in) tensor."""
        if weight is None:
            c_in = self._float[x].shape[1]
            weight = self._rng.normal(0, 1 / np.sqrt(c_in), (out_features, c_in))
        return self._weighted(
            OpType.LINEAR, x, weight, bias, {"activation": Activation(activation)}
        )

    def add(self, a: str, b: str, *, activation: str = "none") -> str:
        """Element-wise sum of two tensors of one shape."""
        return self._op(OpType.ADD, [a, b], {"activation": Activation(activation)})

    def max_pool(self, x: str, kernel: int, stride: int | None = None, padding: int = 0) -> str:
        """Max pooling; output shares the input's parameters."""
        return self._pool(OpType.MAX_POOL, x, kernel, stride, padding)

    def avg_pool(self, x: str, kernel: int, stride: int | None = None, padding: int = 0) -> str:
        """Average pooling (padding left out of the count); output shares the input's parameters."""
        return self._pool(OpType.AVG_POOL, x, kernel, stride, padding)

    def mean(self, x: str, keepdims: bool = False) -> str:
        """Global average over the spatial axes; output shares the input's parameters."""
        axes = tuple(range(2, self._float[x].ndim))
        return self._op(OpType.MEAN, [x], {"axes": axes, "keepdims": keepdims}, share=x)

    def flatten(self, x: str) -> str:
        """Reshape to (N, C * H * W); output shares the input's parameters."""
        size = int(np.prod(self._float[x].shape[1:]))
        return self._op(OpType.RESHAPE, [x], {"shape": (1, size)}, share=x)

    def concat(self, xs: Sequence[str]) -> str:
        """Concatenate along channels. Inputs must already share one set of parameters."""
        return self._op(OpType.CONCAT, list(xs), {"axis": 1}, share=xs[0])

    def requantize_like(self, x: str, like: str) -> str:
        """Give ``x`` the parameters of ``like`` through a 1x1 identity depthwise conv.

        Concatenation needs all inputs to share one set of parameters; in training one observer
        guards them all, and this helper builds the same thing for hand-made graphs.
        """
        c = self._float[x].shape[1]
        nsp = self._float[x].ndim - 2
        weight = np.ones((c, 1, *([1] * nsp)), dtype=np.float32)
        return self._weighted(
            OpType.CONV,
            x,
            weight,
            None,
            {
                "stride": (1,) * nsp,
                "padding": ((0, 0),) * nsp,
                "dilation": (1,) * nsp,
                "groups": c,
                "activation": Activation.NONE,
            },
            out_quant=self._tensors[like].quant,
        )

    def softmax(self, x: str, beta: float = 1.0) -> str:
        """Softmax over the last axis; output parameters are fixed to 1/256 and -128."""
        fixed = QParams.per_tensor(SOFTMAX_OUTPUT_SCALE, SOFTMAX_OUTPUT_ZERO_POINT)
        return self._op(OpType.SOFTMAX, [x], {"beta": float(beta)}, out_quant=fixed)

    def pad(self, x: str, padding: Sequence[tuple[int, int]]) -> str:
        """Zero padding (the quantized zero point) over every axis; parameters are shared."""
        return self._op(OpType.PAD, [x], {"padding": tuple(padding)}, share=x)

    def build(self, outputs: Sequence[str]) -> Graph:
        """The finished, validated graph."""
        graph = Graph(dict(self._tensors), list(self._ops), [self.input], list(outputs), self._name)
        graph.validate()
        return graph

    def float_value(self, name: str) -> np.ndarray:
        """The float value a tensor took on the calibration batch (for tests)."""
        return self._float[name]

    # ---- internals -------------------------------------------------------------------------

    def _pool(self, kind: OpType, x: str, kernel: int, stride: int | None, padding: int) -> str:
        nsp = self._float[x].ndim - 2
        attrs = {
            "kernel": _tuple(kernel, nsp),
            "stride": _tuple(kernel if stride is None else stride, nsp),
            "padding": tuple((padding, padding) for _ in range(nsp)),
        }
        return self._op(kind, [x], attrs, share=x)

    def _weighted(
        self,
        kind: OpType,
        x: str,
        weight: np.ndarray,
        bias: np.ndarray | None,
        attrs: dict,
        out_quant: QParams | None = None,
    ) -> str:
        weight = np.asarray(weight, dtype=np.float32)
        wq = weight_qparams(weight)
        w = self._constant("w", wq.quantize(weight), wq, DType.INT8)
        if bias is None:
            bias = self._rng.normal(0, 0.1, int(weight.shape[0]))
        in_scale = self._quant(x).scale  # (1,)
        bq = QParams.per_channel((in_scale * wq.scale).astype(np.float32), axis=0)  # (C_out,)
        b = self._constant(
            "b", bq.quantize(np.asarray(bias, np.float32), DType.INT32), bq, DType.INT32
        )
        return self._op(kind, [x, w, b], attrs, out_quant=out_quant)

    def _constant(self, prefix: str, data: np.ndarray, quant: QParams, dtype: DType) -> str:
        name = f"{prefix}{len(self._tensors)}"
        self._tensors[name] = Tensor(name, tuple(data.shape), dtype, quant, data)
        return name

    def _op(
        self,
        kind: OpType,
        inputs: list[str],
        attrs: dict,
        *,
        share: str | None = None,
        out_quant: QParams | None = None,
    ) -> str:
        op = Op(kind, inputs, [], attrs, name=f"{kind.value}{len(self._ops)}")
        real = [self._dequantized(name) for name in inputs]
        y = float_op(op, real, _View(self._tensors))
        if share is not None:
            out_quant = self._tensors[share].quant
        name = self._activation(f"t{len(self._tensors)}", y, out_quant)
        op.outputs.append(name)
        self._ops.append(op)
        return name

    def _activation(self, name: str, value: np.ndarray, quant: QParams | None = None) -> str:
        if quant is None:
            quant = activation_qparams(value.min(), value.max())
        self._tensors[name] = Tensor(name, (1, *value.shape[1:]), DType.INT8, quant)
        self._float[name] = quant.dequantize(quant.quantize(value))
        return name

    def _dequantized(self, name: str) -> np.ndarray:
        tensor = self._tensors[name]
        if tensor.data is None:
            return self._float[name]
        return self._quant(name).dequantize(tensor.data)

    def _quant(self, name: str) -> QParams:
        quant = self._tensors[name].quant
        if quant is None:  # every tensor the builder makes is quantized
            raise GraphError(
                f"tensor {name!r} has no quantization parameters, but every tensor of a "
                "GraphBuilder needs them; add tensors only through the builder's methods"
            )
        return quant


class _View:
    """The slice of Graph that the float kernels read (tensor lookup only)."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        self._tensors = tensors

    def tensor(self, name: str) -> Tensor:
        return self._tensors[name]


def _tuple(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    return (
        (int(value),) * n if isinstance(value, int | np.integer) else tuple(int(v) for v in value)
    )
