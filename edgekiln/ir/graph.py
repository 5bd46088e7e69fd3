"""edgekiln's quantized graph: the one artifact every exporter and target reads.

The graph is framework-free (numpy only). Layout is PyTorch's: activations are
``(N, C, *spatial)`` with ``N == 1`` in stored shapes, convolution weights are
``(C_out, C_in / groups, *kernel)`` and linear weights are ``(C_out, C_in)``. Exporters
that need another layout (TFLite is NHWC) convert when they write.

Quantization follows the TFLite int8 scheme (see DESIGN.md):

- activations: int8, asymmetric, per tensor,
  ``q = clamp(round(x / scale) + zero_point, -128, 127)``; float *model inputs* are quantized
  by :func:`quantize_input`, which multiplies by the float32 reciprocal as the fake-quantized
  model does (``x / scale`` and ``x * (1 / scale)`` round to different integers for some x);
- weights: int8, symmetric, per output channel (axis 0), narrow range ``[-127, 127]``, zero point 0;
- biases: int32, ``scale[c] = input_scale * weight_scale[c]``, zero point 0.

Every op reads and writes int8 activation tensors; constants are int8 weights or int32 biases.
Graph inputs and outputs are int8 tensors carrying their quantization; exporters add the
float boundary (QUANTIZE / DEQUANTIZE) when asked.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class DType(str, enum.Enum):
    """Element type of a graph tensor."""

    INT8 = "int8"
    INT32 = "int32"
    FLOAT32 = "float32"

    @property
    def numpy(self) -> np.dtype[Any]:
        """The matching numpy dtype."""
        return np.dtype(self.value)


class Activation(str, enum.Enum):
    """Activation fused into the op that precedes it (the output range absorbs it)."""

    NONE = "none"
    RELU = "relu"
    RELU6 = "relu6"


class OpType(str, enum.Enum):
    """The graph's operators. Attributes each one carries are listed in ``OP_ATTRS``."""

    CONV = "conv"  # inputs: x, weight, bias; 1-D or 2-D, regular, depthwise or grouped
    LINEAR = "linear"  # inputs: x (N, C_in), weight (C_out, C_in), bias (C_out,)
    ADD = "add"  # inputs: a, b (same shape)
    MAX_POOL = "max_pool"  # inputs: x
    AVG_POOL = "avg_pool"  # inputs: x
    MEAN = "mean"  # inputs: x; global average pooling is MEAN over the spatial axes
    RESHAPE = "reshape"  # inputs: x; flatten is a RESHAPE to (N, C * H * W)
    CONCAT = "concat"  # inputs: x0, x1, ...
    SOFTMAX = "softmax"  # inputs: x (N, C); output scale 1/256, zero point -128 (TFLite rule)
    PAD = "pad"  # inputs: x; pads with the input's zero point (the quantized 0.0)


# Attribute names per op; every op carries exactly these keys (tuples hold one entry per
# spatial dimension, so 1-D convolution has 1-tuples).
OP_ATTRS: dict[OpType, tuple[str, ...]] = {
    OpType.CONV: ("stride", "padding", "dilation", "groups", "activation"),
    OpType.LINEAR: ("activation",),
    OpType.ADD: ("activation",),
    OpType.MAX_POOL: ("kernel", "stride", "padding"),
    OpType.AVG_POOL: ("kernel", "stride", "padding"),
    OpType.MEAN: ("axes", "keepdims"),
    OpType.RESHAPE: ("shape",),
    OpType.CONCAT: ("axis",),
    OpType.SOFTMAX: ("beta",),
    OpType.PAD: ("padding",),
}
# ``padding`` is ``((begin, end), ...)`` per spatial dimension for CONV and the pools; for PAD it
# is ``((begin, end), ...)`` over every axis of the input, batch and channels included.
# AVG_POOL divides by the number of *valid* (unpadded) elements, as TFLite does.

# Ops whose int8 kernels require the output's scale and zero point to equal the input's.
SHARED_QPARAMS_OPS = frozenset(
    {OpType.MAX_POOL, OpType.AVG_POOL, OpType.MEAN, OpType.RESHAPE, OpType.CONCAT, OpType.PAD}
)

INT8_MIN, INT8_MAX = -128, 127
SOFTMAX_OUTPUT_SCALE = 1.0 / 256.0
SOFTMAX_OUTPUT_ZERO_POINT = -128


class GraphError(ValueError):
    """A graph that breaks one of the rules above; the message names the tensor or op."""


@dataclass(frozen=True)
class QParams:
    """Affine quantization of one tensor: ``real = scale * (q - zero_point)``.

    ``scale`` is float32 and ``zero_point`` int32, both of shape ``(1,)`` per tensor or
    ``(C,)`` per channel along ``axis``.

    >>> QParams.per_tensor(0.05, -10).dequantize(np.array([-10, 10], dtype=np.int8))
    array([0., 1.], dtype=float32)
    """

    scale: np.ndarray  # (1,) or (C,) float32
    zero_point: np.ndarray  # same shape, int32
    axis: int | None = None  # quantized dimension for per-channel; None per tensor

    @staticmethod
    def per_tensor(scale: float, zero_point: int) -> QParams:
        """Per-tensor parameters from one scale and one zero point."""
        return QParams(
            np.asarray([scale], dtype=np.float32), np.asarray([zero_point], dtype=np.int32)
        )

    @staticmethod
    def per_channel(scale: np.ndarray, axis: int = 0) -> QParams:
        """Symmetric per-channel parameters (zero point 0) along ``axis``."""
        scale = np.asarray(scale, dtype=np.float32).reshape(-1)
        return QParams(scale, np.zeros(scale.shape, dtype=np.int32), axis)

    @property
    def is_per_channel(self) -> bool:
        """True when the parameters vary along ``axis``."""
        return self.axis is not None

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """Real values of the integer tensor ``q`` (float32).

        An int32 tensor (a bias) is scaled in float64 and rounded to float32 once: its values
        need more bits than float32 carries exactly.
        """
        scale, zero_point = self._broadcast(q.ndim)
        if q.dtype == np.int32:
            real = scale.astype(np.float64) * (q.astype(np.float64) - zero_point)
            return real.astype(np.float32)
        return (scale * (q.astype(np.float32) - zero_point)).astype(np.float32)

    def quantize(self, x: np.ndarray, dtype: DType = DType.INT8) -> np.ndarray:
        """Round-half-to-even and clamp to ``dtype``: what ONNX QuantizeLinear does.

        ``round(f32(x) / scale) + zero_point``, a float32 division. The reference executor rounds
        op results with it, and it maps values already on the grid (weights, fake-quantized
        outputs) back to their integers, where every rounding rule agrees. A float *model input*
        goes through :meth:`quantize_input` instead, the fake-quantized model's arithmetic.
        """
        scale, zero_point = self._broadcast(x.ndim)
        info = np.iinfo(dtype.numpy)
        q = np.round(x.astype(np.float32) / scale) + zero_point
        return np.clip(q, info.min, info.max).astype(dtype.numpy)

    def quantize_input(self, x: np.ndarray) -> np.ndarray:
        """Float model input ``x`` as the int8 the fake-quantized model sees: see
        :func:`quantize_input`. Per-tensor parameters only (inputs are per tensor).

        >>> QParams.per_tensor(0.1, 0).quantize_input(np.array([1.55], dtype=np.float32))
        array([16], dtype=int8)
        """
        if self.is_per_channel:
            raise GraphError(
                f"quantize_input takes per-tensor parameters, got {self.scale.size} scales along "
                f"axis {self.axis}; model inputs are quantized per tensor"
            )
        return quantize_input(x, float(self.scale[0]), int(self.zero_point[0]))

    def _broadcast(self, ndim: int) -> tuple[np.ndarray, np.ndarray]:
        if self.axis is None:
            return self.scale.reshape(()), self.zero_point.reshape(()).astype(np.float32)
        shape = [1] * ndim
        shape[self.axis] = -1
        return self.scale.reshape(shape), self.zero_point.reshape(shape).astype(np.float32)

    def equals(self, other: QParams) -> bool:
        """Exact equality of scales, zero points and axis."""
        return (
            self.axis == other.axis
            and np.array_equal(self.scale, other.scale)
            and np.array_equal(self.zero_point, other.zero_point)
        )


def quantize_input(
    x: np.ndarray,
    scale: float,
    zero_point: int,
    dtype: np.dtype[Any] | type[np.integer[Any]] = np.int8,
) -> np.ndarray:
    """Quantize a float model input the way the fake-quantized PyTorch model does.

    ``clamp(rint(f32(x) * f32(1 / scale)) + zero_point)`` to the range of ``dtype``, in float32,
    ``rint`` rounding half to even: the arithmetic of ``torch.fake_quantize_per_tensor_affine``
    (``zero_point + nearbyint(x * (1.0f / scale))``), which edgekiln's activation quantizers
    compute. The targets quantize float data given to an integer-input artifact with this, so
    every runtime gets the integers the trained model saw, and agreement measures the runtime.

    It is not ONNX QuantizeLinear (:meth:`QParams.quantize`, ``round(x / scale)``): ``x / scale``
    and ``x * (1 / scale)`` can differ by one float32 unit in the last place, and near a half
    step that moves the integer by one. Here ``1.55 / 0.1`` gives 15 and ``1.55 * (1 / 0.1)``
    gives 16 in float32, as the fake-quantized model does:

    >>> x = np.array([1.55, -0.25, 300.0], dtype=np.float32)  # -2.5 steps: half to even
    >>> quantize_input(x, 0.1, 0)
    array([ 16,  -2, 127], dtype=int8)
    >>> QParams.per_tensor(0.1, 0).quantize(x)  # QuantizeLinear's division
    array([ 15,  -2, 127], dtype=int8)
    >>> quantize_input(x, 0.1, 128, np.uint8)  # a uint8 input (zero point 128)
    array([144, 126, 255], dtype=uint8)

    Args:
        x: Real values, any shape; cast to float32 first. Must be finite (callers check).
        scale: Positive scale, used as float32 (the artifact stores float32).
        zero_point: Integer zero point.
        dtype: The integer type of the input tensor (int8, or uint8 for some ONNX models).

    Returns:
        An array of the shape of ``x`` and type ``dtype``.
    """
    inv_scale = np.float32(1.0) / np.float32(scale)  # float32, as torch.reciprocal gives it
    info = np.iinfo(dtype)
    q = np.rint(np.asarray(x, dtype=np.float32) * inv_scale) + np.float32(zero_point)
    return np.clip(q, info.min, info.max).astype(dtype)


@dataclass
class Tensor:
    """A named tensor: an activation (``data is None``) or a constant."""

    name: str
    shape: tuple[int, ...]
    dtype: DType
    quant: QParams | None = None
    data: np.ndarray | None = None

    @property
    def is_constant(self) -> bool:
        """True for weights and biases."""
        return self.data is not None


@dataclass
class Op:
    """One operator. ``name`` is the source of the op (a module path like ``features.3``)."""

    type: OpType
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    name: str = ""


@dataclass
class Graph:
    """A topologically sorted quantized graph."""

    tensors: dict[str, Tensor]
    ops: list[Op]
    inputs: list[str]
    outputs: list[str]
    name: str = "model"
    metadata: dict[str, Any] = field(default_factory=dict)

    def tensor(self, name: str) -> Tensor:
        """The tensor called ``name``; a GraphError names it when it is missing."""
        try:
            return self.tensors[name]
        except KeyError:
            raise GraphError(f"graph has no tensor {name!r}") from None

    def producer(self, name: str) -> Op | None:
        """The op that writes tensor ``name`` (None for inputs and constants)."""
        for op in self.ops:
            if name in op.outputs:
                return op
        return None

    def consumers(self, name: str) -> list[Op]:
        """The ops that read tensor ``name``, in graph order."""
        return [op for op in self.ops if name in op.inputs]

    def constants(self) -> list[Tensor]:
        """Weights and biases, in name order."""
        return [t for _, t in sorted(self.tensors.items()) if t.is_constant]

    def validate(self) -> None:
        """Check the graph's rules; raise GraphError naming the first tensor or op breaking one."""
        from edgekiln.ir.validate import validate_graph

        validate_graph(self)
