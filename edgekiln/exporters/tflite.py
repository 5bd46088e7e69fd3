"""Write edgekiln's quantized graph as an int8 TFLite flatbuffer, without TensorFlow.

The file is built with the ``tflite`` package's generated schema functions and ``flatbuffers``.
Scales and zero points are exactly the graph's; what changes is the layout, because TFLite is
NHWC where the graph (PyTorch, ONNX) is NCHW:

- activations ``(N, C, H, W)`` become ``(N, H, W, C)``; 1-D ``(N, C, L)`` become ``(N, 1, L, C)``;
- convolution weights ``(O, I, kh, kw)`` become ``(O, kh, kw, I)``; depthwise weights
  ``(C*m, 1, kh, kw)`` become ``(1, kh, kw, C*m)``, quantized along dimension 3;
- a linear layer after a flatten gets its weight columns re-ordered from (C, H, W) to (H, W, C),
  since TFLite flattens an NHWC tensor: forgetting this gives a model that runs and is wrong;
- a reshape that is not such a flatten goes through TRANSPOSE ops so its element order is the
  graph's.

Padding becomes SAME or VALID when TFLite computes exactly the graph's padding; otherwise an
explicit PAD (with the zero point, the quantized 0.0) precedes a VALID convolution. Pools with
padding that is not SAME or VALID cannot be written (padding with a value would change what the
pool computes) and raise TfliteExportError.

Grouped convolution (1 < groups < C_in) is one CONV_2D whose filter has C_in / groups input
channels. Measured on this machine: LiteRT 2.3 (XNNPACK, builtin and reference kernels) and
TFLM's reference kernels run it and agree with the reference; CMSIS-NN supports it since
January 2024 (arm_convolve_s8). Older firmware kernels (CMSIS-NN before 2024, ESP-NN) do not:
``lower_grouped_conv=True`` writes SPLIT, one CONV_2D per group and a CONCATENATION on channels
instead. That is exact: every group's output carries the convolution's one output scale and zero
point, so the concatenation moves bytes and requantizes nothing.

>>> import numpy as np
>>> from edgekiln.ir.builder import GraphBuilder
>>> b = GraphBuilder(np.linspace(-1, 1, 32, dtype=np.float32).reshape(1, 2, 4, 4))
>>> g = b.build([b.linear(b.flatten(b.conv(b.input, 3, 3, padding=1)), 4)])
>>> from edgekiln.formats.tflite import read_tflite
>>> m = read_tflite(tflite_bytes(g))
>>> [op.opcode for op in m.operators], m.tensors[m.inputs[0]].shape
(['CONV_2D', 'RESHAPE', 'FULLY_CONNECTED'], (1, 4, 4, 2))
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import flatbuffers
import numpy as np
import tflite

from edgekiln.formats.tflite import OPCODES, check_tflite
from edgekiln.ir import Activation, Graph, Op, OpType, QParams, atomic_write

logger = logging.getLogger(__name__)

SIGNATURE_KEY = "serving_default"
BUFFER_ALIGNMENT = 16

# Operator versions written: the lowest version whose kernel accepts int8 with per-channel
# weights; runtimes accept any version up to the newest they register.
_INT8_VERSIONS = {
    "CONV_2D": 3,
    "DEPTHWISE_CONV_2D": 3,
    "FULLY_CONNECTED": 4,
    "ADD": 2,
    "MAX_POOL_2D": 2,
    "AVERAGE_POOL_2D": 2,
    "MEAN": 2,
    "RESHAPE": 1,
    "CONCATENATION": 2,
    "SOFTMAX": 2,
    "PAD": 2,
    "QUANTIZE": 2,
    "DEQUANTIZE": 2,
    "TRANSPOSE": 2,
    "SPLIT": 2,
}
_ACTIVATIONS = {
    Activation.NONE: tflite.ActivationFunctionType.NONE,
    Activation.RELU: tflite.ActivationFunctionType.RELU,
    Activation.RELU6: tflite.ActivationFunctionType.RELU6,
}
_TO_IR_ORDER = (0, 3, 1, 2)  # TRANSPOSE perm: NHWC -> NCHW
_TO_NHWC = (0, 2, 3, 1)  # TRANSPOSE perm: NCHW -> NHWC


class TfliteExportError(ValueError):
    """The graph holds something TFLite cannot express exactly; the message names the op."""


def write_tflite(
    graph: Graph,
    path: str | os.PathLike[str],
    *,
    float_io: bool = False,
    float_model: bool = False,
    lower_grouped_conv: bool = False,
) -> Path:
    """Write ``graph`` as a ``.tflite`` file at ``path`` (atomically) and return the path.

    By default inputs and outputs are int8 (what microcontroller firmware feeds and reads).
    ``float_io=True`` adds QUANTIZE / DEQUANTIZE at the boundary so the file takes and returns
    float32. ``float_model=True`` writes a float32 model with the graph's dequantized weights
    (for latency comparison; it computes in float, so it is not bit-compatible with the int8 one).
    ``lower_grouped_conv=True`` writes grouped convolutions as SPLIT + CONV_2D per group +
    CONCATENATION for firmware kernels without grouped support (see the module docstring).
    The bytes pass ``check_tflite`` before they are written.
    """
    data = tflite_bytes(
        graph, float_io=float_io, float_model=float_model, lower_grouped_conv=lower_grouped_conv
    )
    return atomic_write(path, lambda f: f.write(data))


def tflite_bytes(
    graph: Graph,
    *,
    float_io: bool = False,
    float_model: bool = False,
    lower_grouped_conv: bool = False,
) -> bytes:
    """The TFLite flatbuffer of ``graph`` as bytes (checked with ``check_tflite``)."""
    graph.validate()
    writer = _Writer(
        graph, float_io=float_io, float_model=float_model, lower_grouped_conv=lower_grouped_conv
    )
    data = writer.build()
    check_tflite(data)
    return data


# ---- layout helpers ------------------------------------------------------------------------


def _nhwc_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """TFLite shape of a graph activation: (N,C,H,W)->(N,H,W,C), (N,C,L)->(N,1,L,C)."""
    if len(shape) == 4:
        n, c, h, w = shape
        return (n, h, w, c)
    if len(shape) == 3:
        n, c, length = shape
        return (n, 1, length, c)
    return tuple(shape)


def _nhwc_axis(axis: int, rank: int) -> int:
    """TFLite axis of graph axis ``axis`` of a rank-``rank`` activation."""
    axis = axis % rank
    if rank == 4:
        return (0, 3, 1, 2)[axis]
    if rank == 3:
        return (0, 3, 2)[axis]
    return axis


def _same_memory_order(shape: tuple[int, ...]) -> bool:
    """True when NCHW and NHWC store this activation's elements in the same order."""
    return len(shape) <= 2 or shape[1] == 1 or int(np.prod(shape[2:])) == 1


def _ir_order_4d(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Graph-order 4-D shape of an activation: (N,C,H,W) as is, (N,C,L) as (N,C,1,L)."""
    return tuple(shape) if len(shape) == 4 else (shape[0], shape[1], 1, shape[2])


def _padding_modes(
    size: int, kernel: int, stride: int, dilation: int, pad: tuple[int, int]
) -> set[str]:
    """Which TFLite paddings ("SAME", "VALID") compute exactly ``pad`` on one spatial axis.

    The graph's output size is ``(size + b + e - eff_k) // stride + 1``. End padding that no
    window reaches changes nothing, so the end is compared as the part windows use.
    """
    begin, end = pad
    eff_k = (kernel - 1) * dilation + 1
    out = (size + begin + end - eff_k) // stride + 1
    used_end = max((out - 1) * stride + eff_k - size - begin, 0)
    modes = set()
    if begin == 0 and used_end == 0:
        modes.add("VALID")
    same_out = -(-size // stride)
    total = max((same_out - 1) * stride + eff_k - size, 0)
    if out == same_out and (begin, used_end) == (total // 2, total - total // 2):
        modes.add("SAME")
    return modes


# ---- the writer ----------------------------------------------------------------------------


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]
    type: int  # TensorType
    data: bytes | None = None
    scale: np.ndarray | None = None  # float32
    zero_point: np.ndarray | None = None  # int64
    quantized_dimension: int = 0


@dataclass
class _Operator:
    opcode: str
    inputs: list[int]
    outputs: list[int]
    options_type: str = "NONE"
    options: dict[str, Any] = field(default_factory=dict)  # CamelCase field -> value


class _Writer:
    """Collects TFLite tensors and operators for one graph, then serializes them."""

    def __init__(
        self, graph: Graph, *, float_io: bool, float_model: bool, lower_grouped_conv: bool
    ) -> None:
        self.graph = graph
        self.lower_grouped_conv = lower_grouped_conv
        self.float_model = float_model
        self.float_io = float_io and not float_model
        self.tensors: list[_Tensor] = []
        self.index: dict[str, int] = {}
        self.ops: list[_Operator] = []
        # 2-D tensors that TFLite holds in (H, W, C) order: graph name -> graph dims (C, H, W)
        self.hwc_flat: dict[str, tuple[int, ...]] = {}

    # -- tensors --

    def activation(self, name: str) -> int:
        """Index of the TFLite tensor for graph activation ``name`` (created on first use)."""
        if name in self.index:
            return self.index[name]
        t = self.graph.tensor(name)
        return self.new_activation(name, _nhwc_shape(t.shape), t.quant)

    def new_activation(self, name: str, shape: tuple[int, ...], quant: QParams | None) -> int:
        if self.float_model or quant is None:
            tensor = _Tensor(name, shape, tflite.TensorType.FLOAT32)
        else:
            tensor = _Tensor(
                name,
                shape,
                tflite.TensorType.INT8,
                scale=quant.scale.astype(np.float32),  # (1,)
                zero_point=quant.zero_point.astype(np.int64),  # (1,)
            )
        return self._add(tensor)

    def constant(
        self,
        name: str,
        data: np.ndarray,
        scale: np.ndarray | None = None,
        quantized_dimension: int = 0,
    ) -> int:
        types = {
            np.dtype(np.int8): tflite.TensorType.INT8,
            np.dtype(np.int32): tflite.TensorType.INT32,
            np.dtype(np.float32): tflite.TensorType.FLOAT32,
        }
        data = np.ascontiguousarray(data)
        tensor = _Tensor(
            name,
            tuple(data.shape),
            types[data.dtype],
            data.astype("<" + data.dtype.str[1:]).tobytes(),
        )
        if scale is not None:
            tensor.scale = np.asarray(scale, np.float32).reshape(-1)
            tensor.zero_point = np.zeros(tensor.scale.shape, np.int64)
            tensor.quantized_dimension = quantized_dimension
        return self._add(tensor)

    def int32_constant(self, name: str, values: Any) -> int:
        return self.constant(name, np.asarray(values, dtype=np.int32))

    def _add(self, tensor: _Tensor) -> int:
        if tensor.name in self.index:
            raise TfliteExportError(f"two TFLite tensors would be named {tensor.name!r}")
        self.index[tensor.name] = len(self.tensors)
        self.tensors.append(tensor)
        return len(self.tensors) - 1

    def quantized_constant(self, name: str, op: Op) -> tuple[np.ndarray, QParams]:
        """Data and scales of the weight or bias ``name`` that ``op`` reads."""
        t = self.graph.tensor(name)
        if t.data is None or t.quant is None:
            held = "an activation" if t.data is None else "a constant without scales"
            raise TfliteExportError(
                f"{_where(op)}: TFLite needs weight/bias {name!r} as a quantized constant "
                f"(int8 weight or int32 bias with scales), but the graph holds {held}; "
                "capture the model again so every weight and bias is quantized"
            )
        return t.data, t.quant

    def weights(
        self,
        name: str,
        op: Op,
        data_fn: Callable[[np.ndarray], np.ndarray],
        quantized_dimension: int,
    ) -> int:
        """Weights of constant ``name`` (read by ``op``) after the layout change ``data_fn``."""
        data, quant = self.quantized_constant(name, op)
        if self.float_model:
            real = quant.dequantize(data)
            return self.constant(name, data_fn(real).astype(np.float32))
        return self.constant(name, data_fn(data), quant.scale, quantized_dimension)

    def bias(self, name: str, op: Op, select: slice | None = None, suffix: str = "") -> int:
        data, quant = self.quantized_constant(name, op)  # (C_out,) int32
        if self.float_model:
            real = quant.dequantize(data)  # (C_out,) float32, scaled in float64
            return self.constant(name + suffix, real if select is None else real[select])
        scale = quant.scale  # (C_out,) float32
        if select is not None:
            data, scale = data[select], scale[select]
        return self.constant(name + suffix, data.astype(np.int32), scale, 0)

    def op(
        self,
        opcode: str,
        inputs: list[int],
        outputs: list[int],
        options_type: str = "NONE",
        **kw: Any,
    ) -> None:
        self.ops.append(_Operator(opcode, inputs, outputs, options_type, kw))

    # -- graph --

    def build(self) -> bytes:
        inputs, outputs = self.collect()
        return _serialize(self, inputs, outputs)

    def collect(self) -> tuple[list[int], list[int]]:
        """Emit every tensor and operator; return the subgraph's input and output indices."""
        g = self.graph
        inputs = []
        for name in g.inputs:
            q = self.activation(name)
            if self.float_io:
                f = self.new_activation(f"{name}:float", self.tensors[q].shape, None)
                self.op("QUANTIZE", [f], [q])
                q = f
            inputs.append(q)
        for op in g.ops:
            _EMITTERS[op.type](self, op)
        outputs = []
        for name in g.outputs:
            q = self.activation(name)
            if self.float_io:
                f = self.new_activation(f"{name}:float", self.tensors[q].shape, None)
                self.op("DEQUANTIZE", [q], [f])
                q = f
            outputs.append(q)
        return inputs, outputs


# ---- per-op emitters -----------------------------------------------------------------------


def _where(op: Op) -> str:
    return f"{op.type.value} op {op.name!r}" if op.name else f"{op.type.value} op"


def _spatial_2d(values: tuple, fill: Any) -> tuple:
    """A 1-D spatial tuple as the 2-D one TFLite sees (H of size 1 first)."""
    return (fill, *values) if len(values) == 1 else tuple(values)


def _emit_conv(w: _Writer, op: Op) -> None:
    x_name, w_name, b_name = op.inputs
    a = op.attrs
    x = w.graph.tensor(x_name)
    weight = w.graph.tensor(w_name)
    c_in, c_out, groups = x.shape[1], weight.shape[0], a["groups"]
    in_hw = _spatial_2d(tuple(x.shape[2:]), 1)
    k_hw = _spatial_2d(tuple(weight.shape[2:]), 1)
    stride = _spatial_2d(tuple(a["stride"]), 1)
    dilation = _spatial_2d(tuple(a["dilation"]), 1)
    pads = _spatial_2d(tuple(a["padding"]), (0, 0))

    mode = _mode(in_hw, k_hw, stride, dilation, pads)
    src = _pad_if_needed(w, op, x_name, in_hw, k_hw, stride, dilation, pads)
    padding = "VALID" if mode is None else mode  # None: an explicit PAD went in front
    out = w.activation(op.outputs[0])

    def to_4d(arr: np.ndarray) -> np.ndarray:  # (O, I, *k) -> (O, I, kh, kw)
        return arr.reshape(arr.shape[0], arr.shape[1], *k_hw)

    common = {
        "Padding": getattr(tflite.Padding, padding),
        "StrideH": stride[0],
        "StrideW": stride[1],
        "DilationHFactor": dilation[0],
        "DilationWFactor": dilation[1],
        "FusedActivationFunction": _ACTIVATIONS[a["activation"]],
    }
    if groups == 1 or (groups < c_in and not w.lower_grouped_conv):
        wt = w.weights(w_name, op, lambda d: to_4d(d).transpose(0, 2, 3, 1), 0)
        w.op("CONV_2D", [src, wt, w.bias(b_name, op)], [out], "Conv2DOptions", **common)
    elif groups == c_in:
        wt = w.weights(w_name, op, lambda d: to_4d(d).transpose(1, 2, 3, 0), 3)
        w.op(
            "DEPTHWISE_CONV_2D",
            [src, wt, w.bias(b_name, op)],
            [out],
            "DepthwiseConv2DOptions",
            DepthMultiplier=c_out // c_in,
            **common,
        )
    else:
        _emit_grouped_conv(w, op, src, out, groups, to_4d, common)


def _emit_grouped_conv(
    w: _Writer, op: Op, src: int, out: int, groups: int, to_4d: Any, common: dict
) -> None:
    """SPLIT on channels, one CONV_2D per group, CONCATENATION: exact (one output qparams)."""
    _, w_name, b_name = op.inputs
    weight, weight_quant = w.quantized_constant(w_name, op)
    out_t = w.graph.tensor(op.outputs[0])
    per_group = weight.shape[0] // groups
    src_shape = w.tensors[src].shape
    part_shape = (*src_shape[:3], src_shape[3] // groups)
    in_quant = w.graph.tensor(op.inputs[0]).quant
    base = op.outputs[0]
    parts = [w.new_activation(f"{base}/split{i}", part_shape, in_quant) for i in range(groups)]
    axis = w.int32_constant(f"{base}/split_axis", [3])
    w.op("SPLIT", [axis, src], parts, "SplitOptions", NumSplits=groups)
    out_shape = w.tensors[out].shape
    results = []
    for i, part in enumerate(parts):
        sel = slice(i * per_group, (i + 1) * per_group)
        data = to_4d(weight[sel]).transpose(0, 2, 3, 1)
        if w.float_model:
            real = to_4d(weight_quant.dequantize(weight)[sel]).transpose(0, 2, 3, 1)
            wt = w.constant(f"{w_name}/group{i}", real.astype(np.float32))
        else:
            wt = w.constant(f"{w_name}/group{i}", data, weight_quant.scale[sel], 0)
        bt = w.bias(b_name, op, sel, f"/group{i}")
        res = w.new_activation(f"{base}/group{i}", (*out_shape[:3], per_group), out_t.quant)
        w.op("CONV_2D", [part, wt, bt], [res], "Conv2DOptions", **common)
        results.append(res)
    w.op(
        "CONCATENATION",
        results,
        [out],
        "ConcatenationOptions",
        Axis=3,
        FusedActivationFunction=tflite.ActivationFunctionType.NONE,
    )


def _mode(
    in_hw: tuple[int, ...],
    k_hw: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    pads: tuple[tuple[int, int], ...],
) -> str | None:
    modes = {"SAME", "VALID"}
    for args in zip(in_hw, k_hw, stride, dilation, pads, strict=True):
        modes &= _padding_modes(*args)
    if not modes:
        return None
    return "VALID" if "VALID" in modes else "SAME"


def _pad_if_needed(
    w: _Writer,
    op: Op,
    x_name: str,
    in_hw: tuple[int, ...],
    k_hw: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    pads: tuple[tuple[int, int], ...],
) -> int:
    """The conv's input tensor: ``x`` itself, or an explicit PAD of it when SAME/VALID differ."""
    src = w.activation(x_name)
    if _mode(in_hw, k_hw, stride, dilation, pads) is not None:
        return src
    x = w.tensors[src]
    shape = (
        x.shape[0],
        x.shape[1] + pads[0][0] + pads[0][1],
        x.shape[2] + pads[1][0] + pads[1][1],
        x.shape[3],
    )
    name = f"{op.outputs[0]}/pad"
    paddings = w.int32_constant(f"{name}/paddings", [(0, 0), pads[0], pads[1], (0, 0)])
    padded = w.new_activation(name, shape, w.graph.tensor(x_name).quant)
    w.op("PAD", [src, paddings], [padded], "PadOptions")
    return padded


def _emit_linear(w: _Writer, op: Op) -> None:
    x_name, w_name, b_name = op.inputs
    chw = w.hwc_flat.get(x_name)

    def reorder(d: np.ndarray) -> np.ndarray:
        if chw is None:
            return d
        # columns in (C, H, W) order -> (H, W, C), matching TFLite's flatten of NHWC
        return (
            d.reshape(d.shape[0], *chw)
            .transpose(0, *range(2, len(chw) + 1), 1)
            .reshape(d.shape[0], -1)
        )

    wt = w.weights(w_name, op, reorder, 0)
    w.op(
        "FULLY_CONNECTED",
        [w.activation(x_name), wt, w.bias(b_name, op)],
        [w.activation(op.outputs[0])],
        "FullyConnectedOptions",
        FusedActivationFunction=_ACTIVATIONS[op.attrs["activation"]],
        KeepNumDims=False,
    )


def _emit_add(w: _Writer, op: Op) -> None:
    w.op(
        "ADD",
        [w.activation(n) for n in op.inputs],
        [w.activation(op.outputs[0])],
        "AddOptions",
        FusedActivationFunction=_ACTIVATIONS[op.attrs["activation"]],
    )


def _emit_pool(w: _Writer, op: Op) -> None:
    a = op.attrs
    x = w.graph.tensor(op.inputs[0])
    in_hw = _spatial_2d(tuple(x.shape[2:]), 1)
    k_hw = _spatial_2d(tuple(a["kernel"]), 1)
    stride = _spatial_2d(tuple(a["stride"]), 1)
    pads = _spatial_2d(tuple(a["padding"]), (0, 0))
    mode = _mode(in_hw, k_hw, stride, (1, 1), pads)
    if mode is None:
        raise TfliteExportError(
            f"{_where(op)}: padding {a['padding']} on input {x.shape} with kernel {a['kernel']} "
            f"and stride {a['stride']} is neither TFLite SAME nor VALID, and padding a pool "
            "with a value changes its result; use padding 0, or the padding TensorFlow's SAME "
            "computes (total = max((out-1)*stride + kernel - in, 0), begin = total // 2)"
        )
    opcode = "MAX_POOL_2D" if op.type == OpType.MAX_POOL else "AVERAGE_POOL_2D"
    w.op(
        opcode,
        [w.activation(op.inputs[0])],
        [w.activation(op.outputs[0])],
        "Pool2DOptions",
        Padding=getattr(tflite.Padding, mode),
        StrideH=stride[0],
        StrideW=stride[1],
        FilterHeight=k_hw[0],
        FilterWidth=k_hw[1],
        FusedActivationFunction=tflite.ActivationFunctionType.NONE,
    )


def _emit_mean(w: _Writer, op: Op) -> None:
    x = w.graph.tensor(op.inputs[0])
    rank = len(x.shape)
    axes = sorted({_nhwc_axis(ax, rank) for ax in op.attrs["axes"]})
    if rank == 3 and 2 in axes:
        axes = sorted({1, *axes})  # the H axis of size 1 that 1-D tensors carry in TFLite
    keep = bool(op.attrs["keepdims"])
    in_shape = _nhwc_shape(x.shape)
    natural = tuple((1 if keep else None) if i in axes else d for i, d in enumerate(in_shape))
    natural = tuple(d for d in natural if d is not None)
    expected = _nhwc_shape(w.graph.tensor(op.outputs[0]).shape)
    if natural != expected:
        raise TfliteExportError(
            f"{_where(op)}: MEAN over axes {op.attrs['axes']} (keepdims={keep}) of {x.shape} "
            f"gives TFLite shape {natural}, not the NHWC form {expected} of its output; "
            "reduce over all spatial axes (global average pooling) or keep the dimensions"
        )
    axes_t = w.int32_constant(f"{op.outputs[0]}/axes", axes)
    w.op(
        "MEAN",
        [w.activation(op.inputs[0]), axes_t],
        [w.activation(op.outputs[0])],
        "ReducerOptions",
        KeepDims=keep,
    )


def _emit_reshape(w: _Writer, op: Op) -> None:
    g = w.graph
    x_name, out_name = op.inputs[0], op.outputs[0]
    x, out = g.tensor(x_name), g.tensor(out_name)
    src = w.activation(x_name)
    if _same_memory_order(x.shape) and _same_memory_order(out.shape):
        _reshape(w, src, w.activation(out_name), _nhwc_shape(out.shape), out_name)
        return
    consumers = g.consumers(out_name)
    flatten_to_linear = (
        len(out.shape) == 2
        and out_name not in g.outputs
        and consumers
        and all(c.type == OpType.LINEAR and c.inputs[0] == out_name for c in consumers)
    )
    if flatten_to_linear:
        # TFLite flattens (N, H, W, C); the linear layer's columns are re-ordered to match.
        w.hwc_flat[out_name] = tuple(x.shape[1:])
        _reshape(w, src, w.activation(out_name), out.shape, out_name)
        return
    # General case: into graph order, reshape there, back to NHWC.
    if not _same_memory_order(x.shape):
        ir_shape = _ir_order_4d(x.shape)
        moved = w.new_activation(f"{out_name}/nchw_in", ir_shape, x.quant)
        perm = w.int32_constant(f"{out_name}/nchw_in/perm", _TO_IR_ORDER)
        w.op("TRANSPOSE", [src, perm], [moved], "TransposeOptions")
        src = moved
    dst = w.activation(out_name)
    if _same_memory_order(out.shape):
        _reshape(w, src, dst, _nhwc_shape(out.shape), out_name)
        return
    ir_shape = _ir_order_4d(out.shape)
    mid = w.new_activation(f"{out_name}/nchw_out", ir_shape, out.quant)
    _reshape(w, src, mid, ir_shape, out_name)
    perm = w.int32_constant(f"{out_name}/perm", _TO_NHWC)
    w.op("TRANSPOSE", [mid, perm], [dst], "TransposeOptions")


def _reshape(w: _Writer, src: int, dst: int, shape: tuple[int, ...], base: str) -> None:
    new_shape = [-1, *shape[1:]]  # batch free, so LiteRT can resize the input to a batch
    shape_t = w.int32_constant(f"{w.tensors[dst].name}/shape", new_shape)
    w.op("RESHAPE", [src, shape_t], [dst], "ReshapeOptions", NewShape=new_shape)


def _emit_concat(w: _Writer, op: Op) -> None:
    rank = len(w.graph.tensor(op.outputs[0]).shape)
    w.op(
        "CONCATENATION",
        [w.activation(n) for n in op.inputs],
        [w.activation(op.outputs[0])],
        "ConcatenationOptions",
        Axis=_nhwc_axis(op.attrs["axis"], rank),
        FusedActivationFunction=tflite.ActivationFunctionType.NONE,
    )


def _emit_softmax(w: _Writer, op: Op) -> None:
    x = w.graph.tensor(op.inputs[0])
    if len(x.shape) != 2:
        raise TfliteExportError(
            f"{_where(op)}: softmax input {x.name!r} has shape {x.shape}; the TFLite writer "
            "handles (N, C) only (flatten first)"
        )
    w.op(
        "SOFTMAX",
        [w.activation(op.inputs[0])],
        [w.activation(op.outputs[0])],
        "SoftmaxOptions",
        Beta=float(op.attrs["beta"]),
    )


def _emit_pad(w: _Writer, op: Op) -> None:
    x = w.graph.tensor(op.inputs[0])
    rank = len(x.shape)
    tfl_rank = len(_nhwc_shape(x.shape))
    paddings: list[tuple[int, ...]] = [(0, 0)] * tfl_rank
    for axis, pad in enumerate(op.attrs["padding"]):
        paddings[_nhwc_axis(axis, rank)] = tuple(int(p) for p in pad)
    pads = w.int32_constant(f"{op.outputs[0]}/paddings", paddings)
    w.op(
        "PAD",
        [w.activation(op.inputs[0]), pads],
        [w.activation(op.outputs[0])],
        "PadOptions",
    )


_EMITTERS = {
    OpType.CONV: _emit_conv,
    OpType.LINEAR: _emit_linear,
    OpType.ADD: _emit_add,
    OpType.MAX_POOL: _emit_pool,
    OpType.AVG_POOL: _emit_pool,
    OpType.MEAN: _emit_mean,
    OpType.RESHAPE: _emit_reshape,
    OpType.CONCAT: _emit_concat,
    OpType.SOFTMAX: _emit_softmax,
    OpType.PAD: _emit_pad,
}


# ---- serialization -------------------------------------------------------------------------


def _serialize(
    w: _Writer,
    inputs: list[int],
    outputs: list[int],
    *,
    schema_version: int = 3,
    identifier: bytes = b"TFL3",
    buffer0: bytes | None = None,
) -> bytes:
    """The flatbuffer bytes. The keywords exist so tests can write deliberately broken files."""
    b = flatbuffers.Builder(1024)

    # Buffers: 0 is the empty sentinel; each constant owns one, 16-byte aligned.
    buffer_of: dict[int, int] = {}
    data_vectors: list[int] = []
    for i, t in enumerate(w.tensors):
        if t.data is not None:
            buffer_of[i] = len(data_vectors) + 1
            data_vectors.append(_aligned_bytes(b, t.data))
    buffers = []
    buffer0_vec = None if buffer0 is None else _aligned_bytes(b, buffer0)
    for vec in [buffer0_vec, *data_vectors]:
        tflite.BufferStart(b)
        if vec is not None:
            tflite.BufferAddData(b, vec)
        buffers.append(tflite.BufferEnd(b))

    tensors = [_tensor(b, t, buffer_of.get(i, 0)) for i, t in enumerate(w.tensors)]

    opcode_names = list(dict.fromkeys(op.opcode for op in w.ops))
    opcodes = []
    for name in opcode_names:
        code = OPCODES[name]
        version = 1 if w.float_model else _INT8_VERSIONS.get(name, 1)
        tflite.OperatorCodeStart(b)
        tflite.OperatorCodeAddDeprecatedBuiltinCode(b, min(code, 127))
        tflite.OperatorCodeAddBuiltinCode(b, code)
        tflite.OperatorCodeAddVersion(b, version)
        opcodes.append(tflite.OperatorCodeEnd(b))

    operators = [_operator(b, op, opcode_names.index(op.opcode)) for op in w.ops]

    sub_name = b.CreateString(w.graph.name)
    tensors_vec = _table_vector(b, tflite.SubGraphStartTensorsVector, tensors)
    inputs_vec = b.CreateNumpyVector(np.asarray(inputs, np.int32))
    outputs_vec = b.CreateNumpyVector(np.asarray(outputs, np.int32))
    operators_vec = _table_vector(b, tflite.SubGraphStartOperatorsVector, operators)
    tflite.SubGraphStart(b)
    tflite.SubGraphAddTensors(b, tensors_vec)
    tflite.SubGraphAddInputs(b, inputs_vec)
    tflite.SubGraphAddOutputs(b, outputs_vec)
    tflite.SubGraphAddOperators(b, operators_vec)
    tflite.SubGraphAddName(b, sub_name)
    subgraph = tflite.SubGraphEnd(b)

    signature = _signature(b, w, inputs, outputs)
    description = b.CreateString(f"edgekiln export of graph {w.graph.name!r}")
    opcodes_vec = _table_vector(b, tflite.ModelStartOperatorCodesVector, opcodes)
    subgraphs_vec = _table_vector(b, tflite.ModelStartSubgraphsVector, [subgraph])
    buffers_vec = _table_vector(b, tflite.ModelStartBuffersVector, buffers)
    signatures_vec = _table_vector(b, tflite.ModelStartSignatureDefsVector, [signature])
    tflite.ModelStart(b)
    tflite.ModelAddVersion(b, schema_version)
    tflite.ModelAddOperatorCodes(b, opcodes_vec)
    tflite.ModelAddSubgraphs(b, subgraphs_vec)
    tflite.ModelAddDescription(b, description)
    tflite.ModelAddBuffers(b, buffers_vec)
    tflite.ModelAddSignatureDefs(b, signatures_vec)
    model = tflite.ModelEnd(b)
    b.Finish(model, file_identifier=identifier)
    return bytes(b.Output())


def _aligned_bytes(b: flatbuffers.Builder, payload: bytes) -> int:
    b.StartVector(1, len(payload), BUFFER_ALIGNMENT)
    b.head -= len(payload)
    b.Bytes[b.head : b.head + len(payload)] = payload
    b.vectorNumElems = len(payload)
    return b.EndVector()


def _table_vector(b: flatbuffers.Builder, start: Any, offsets: list[int]) -> int:
    start(b, len(offsets))
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return b.EndVector()


def _tensor(b: flatbuffers.Builder, t: _Tensor, buffer: int) -> int:
    name = b.CreateString(t.name)
    shape = b.CreateNumpyVector(np.asarray(t.shape, np.int32))
    quant = None
    if t.scale is not None:
        if t.zero_point is None:  # constant() and new_activation() always set both
            raise TfliteExportError(f"TFLite tensor {t.name!r} has scales but no zero points")
        scale = b.CreateNumpyVector(t.scale.astype(np.float32))
        zero_point = b.CreateNumpyVector(t.zero_point.astype(np.int64))
        tflite.QuantizationParametersStart(b)
        tflite.QuantizationParametersAddScale(b, scale)
        tflite.QuantizationParametersAddZeroPoint(b, zero_point)
        tflite.QuantizationParametersAddQuantizedDimension(b, t.quantized_dimension)
        quant = tflite.QuantizationParametersEnd(b)
    tflite.TensorStart(b)
    tflite.TensorAddShape(b, shape)
    tflite.TensorAddType(b, t.type)
    tflite.TensorAddBuffer(b, buffer)
    tflite.TensorAddName(b, name)
    if quant is not None:
        tflite.TensorAddQuantization(b, quant)
    return tflite.TensorEnd(b)


def _operator(b: flatbuffers.Builder, op: _Operator, opcode_index: int) -> int:
    options = None
    if op.options_type != "NONE":
        mod = importlib.import_module(f"tflite.{op.options_type}")
        vectors = {
            key: b.CreateNumpyVector(np.asarray(value, np.int32))
            for key, value in op.options.items()
            if isinstance(value, list | tuple)
        }
        mod.Start(b)
        for key, value in op.options.items():
            getattr(mod, f"Add{key}")(b, vectors.get(key, value))
        options = mod.End(b)
    ins = b.CreateNumpyVector(np.asarray(op.inputs, np.int32))
    outs = b.CreateNumpyVector(np.asarray(op.outputs, np.int32))
    tflite.OperatorStart(b)
    tflite.OperatorAddOpcodeIndex(b, opcode_index)
    tflite.OperatorAddInputs(b, ins)
    tflite.OperatorAddOutputs(b, outs)
    if options is not None:
        tflite.OperatorAddBuiltinOptionsType(b, getattr(tflite.BuiltinOptions, op.options_type))
        tflite.OperatorAddBuiltinOptions(b, options)
    return tflite.OperatorEnd(b)


def _signature(b: flatbuffers.Builder, w: _Writer, inputs: list[int], outputs: list[int]) -> int:
    def tensor_maps(names: list[str], indices: list[int]) -> list[int]:
        maps = []
        for name, index in zip(names, indices, strict=True):
            s = b.CreateString(name)
            tflite.TensorMapStart(b)
            tflite.TensorMapAddName(b, s)
            tflite.TensorMapAddTensorIndex(b, index)
            maps.append(tflite.TensorMapEnd(b))
        return maps

    ins = tensor_maps(w.graph.inputs, inputs)
    outs = tensor_maps(w.graph.outputs, outputs)
    ins_vec = _table_vector(b, tflite.SignatureDefStartInputsVector, ins)
    outs_vec = _table_vector(b, tflite.SignatureDefStartOutputsVector, outs)
    key = b.CreateString(SIGNATURE_KEY)
    tflite.SignatureDefStart(b)
    tflite.SignatureDefAddInputs(b, ins_vec)
    tflite.SignatureDefAddOutputs(b, outs_vec)
    tflite.SignatureDefAddSignatureKey(b, key)
    tflite.SignatureDefAddSubgraphIndex(b, 0)
    return tflite.SignatureDefEnd(b)
