"""Write a quantized Graph as an int8 ONNX model in QDQ form.

QDQ form keeps every operator in its float ONNX spelling and marks the quantization around it:

- weights are int8 initializers behind a per-axis ``DequantizeLinear`` (axis 0, zero point 0);
- biases are int32 initializers behind a per-axis ``DequantizeLinear`` whose scale is
  ``input_scale * weight_scale[c]`` (the scale an int8 kernel accumulates in);
- every activation is ``QuantizeLinear -> DequantizeLinear`` with the graph's own scale and
  zero point, so the int8 value of each activation is a named tensor in the file;
- fused activations sit between the op and its ``QuantizeLinear`` (``Relu``, ``Clip(0, 6)``).

A runtime either runs the float ops between exact Q/DQ pairs or fuses each
``DQ -> op -> Q`` unit into an int8 kernel (ONNX Runtime's QLinearConv, QGemm, ...). Both
compute the graph: the first exactly as ``edgekiln.ir.reference`` does, the second with the
runtime's own integer rounding.

Names: each int8 activation keeps its IR tensor name, each compute node its IR op name (the
module path). Other values are derived from them: ``<t>_real`` is the float result before
``QuantizeLinear``, ``<t>_preact`` the result before a fused activation, ``<t>_dq_<op>`` the
dequantized copy that op ``<op>`` reads (one ``DequantizeLinear`` per consumer, the unit each
QDQ-fusing runtime matches), ``<t>_float`` the float graph input/output when the model has
float IO. The metadata entry ``edgekiln.int8_tensors`` lists the int8 activation names.

>>> import numpy as np
>>> from edgekiln.ir.builder import GraphBuilder
>>> b = GraphBuilder(np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 1, 4, 4), seed=0)
>>> g = b.build([b.conv(b.input, out_channels=2, kernel=3, padding=1, activation="relu")])
>>> m = to_onnx_model(g)
>>> [n.op_type for n in m.graph.node]  # doctest: +NORMALIZE_WHITESPACE
['QuantizeLinear', 'DequantizeLinear', 'DequantizeLinear', 'DequantizeLinear', 'Conv',
 'Relu', 'QuantizeLinear', 'DequantizeLinear']
>>> m.graph.input[0].name, m.graph.output[0].name
('input_float', 't3_float')
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgekiln.ir import (
    Activation,
    DType,
    Graph,
    GraphError,
    Op,
    OpType,
    QParams,
    Tensor,
    atomic_write,
)

logger = logging.getLogger(__name__)

# Opset 21 is the newest opset whose QuantizeLinear / DequantizeLinear ONNX Runtime 1.32 fuses
# into int8 kernels on the CPU provider (per-axis Q/DQ exists since opset 13).
OPSET = 21
PRODUCER = "edgekiln"
BATCH_DIM = "N"

# A bias scale may differ from float32(input_scale * weight_scale) by float32 rounding only.
_BIAS_SCALE_RTOL = 1e-6


def write_onnx(
    graph: Graph,
    path: str | os.PathLike[str],
    *,
    int8_io: bool = False,
    float_model: bool = False,
) -> Path:
    """Write ``graph`` as an ONNX QDQ model at ``path`` (atomically) and return the path.

    ``int8_io=False`` (default) gives float32 input and output: the model quantizes its input
    with the input tensor's scale and zero point and dequantizes its output. ``int8_io=True``
    gives int8 input and output tensors carrying the graph's parameters. ``float_model=True``
    writes a plain float32 model of the dequantized weights instead (no Q/DQ at all): the
    starting point for post-training quantizers and fp32 baselines.

    Raises GraphError for a graph that breaks the IR's rules (non-finite data, shared
    parameters) or whose bias scales disagree with ``input_scale * weight_scale``.

    >>> import numpy as np, tempfile, onnx
    >>> from edgekiln.ir.builder import GraphBuilder
    >>> b = GraphBuilder(np.ones((1, 4), dtype=np.float32))
    >>> g = b.build([b.linear(b.input, out_features=3)])
    >>> p = write_onnx(g, tempfile.mkdtemp() + "/m.onnx", int8_io=True)
    >>> onnx.load(p).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT8
    True
    """
    model = to_onnx_model(graph, int8_io=int8_io, float_model=float_model)
    data = model.SerializeToString()
    return atomic_write(path, lambda f: f.write(data))


def to_onnx_model(
    graph: Graph, *, int8_io: bool = False, float_model: bool = False
) -> onnx.ModelProto:
    """The in-memory ONNX model ``write_onnx`` writes (same arguments, no file)."""
    graph.validate()
    if int8_io and float_model:
        raise ValueError(
            "int8_io=True and float_model=True contradict each other: a float model has float "
            "input and output; pass only one of them"
        )
    writer = _Writer(_lower_0d_convs(graph), int8_io=int8_io, float_model=float_model)
    return writer.model()


def _lower_0d_convs(graph: Graph) -> Graph:
    """A copy of ``graph`` where each convolution without spatial axes is a linear layer.

    A conv on (N, C) (``requantize_like`` after a linear layer) is a linear layer whose weight
    is block-diagonal, one block per group. ONNX Conv needs a spatial axis; the literal
    spelling Unsqueeze -> Conv -> Squeeze is rejected at load time by ORT 1.32's default QDQ
    passes, while Gemm is fused like any linear layer. The block-diagonal int8 weight keeps the
    per-channel scales, so the result is the same to the bit.
    """
    if not any(op.type == OpType.CONV and len(op.attrs["stride"]) == 0 for op in graph.ops):
        return graph
    tensors = dict(graph.tensors)
    ops = []
    for op in graph.ops:
        if op.type != OpType.CONV or len(op.attrs["stride"]) != 0:
            ops.append(op)
            continue
        weight = graph.tensor(op.inputs[1])
        if weight.data is None:
            raise GraphError(f"conv op {op.name!r}: weight {weight.name!r} is not a constant")
        groups = int(op.attrs["groups"])
        c_out, c_in_group = weight.data.shape
        dense = np.zeros((c_out, c_in_group * groups), dtype=np.int8)  # (C_out, C_in) int8
        per_group = c_out // groups
        for g in range(groups):
            rows = slice(g * per_group, (g + 1) * per_group)
            dense[rows, g * c_in_group : (g + 1) * c_in_group] = weight.data[rows]
        name = f"{weight.name}_block_diagonal" if groups > 1 else weight.name
        tensors[name] = Tensor(name, dense.shape, DType.INT8, weight.quant, dense)
        attrs = {"activation": op.attrs["activation"]}
        ops.append(
            Op(OpType.LINEAR, [op.inputs[0], name, op.inputs[2]], op.outputs, attrs, op.name)
        )
    return Graph(tensors, ops, graph.inputs, graph.outputs, graph.name, graph.metadata)


class _Writer:
    """Collects nodes and initializers for one graph; one method per step."""

    def __init__(self, graph: Graph, *, int8_io: bool, float_model: bool) -> None:
        self.g = graph
        self.int8_io = int8_io
        self.float_model = float_model
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, onnx.TensorProto] = {}
        self.dq_names: set[str] = set()

    def model(self) -> onnx.ModelProto:
        inputs = [self._graph_input(name) for name in self.g.inputs]
        for op in self.g.ops:
            self._op(op)
        outputs = [self._graph_output(name) for name in self.g.outputs]
        onnx_graph = helper.make_graph(
            self.nodes, self.g.name, inputs, outputs, initializer=list(self.inits.values())
        )
        model = helper.make_model(
            onnx_graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name=PRODUCER,
        )
        model.ir_version = 10  # opset 21 needs IR version 10; ORT 1.32 reads up to 11
        activations = [
            name for name, t in self.g.tensors.items() if not t.is_constant and t.quant is not None
        ]
        meta = {
            "edgekiln.format": "float" if self.float_model else "qdq",
            "edgekiln.int8_io": str(int(self.int8_io)),
            "edgekiln.int8_tensors": json.dumps([] if self.float_model else activations),
        }
        helper.set_model_props(model, meta)
        return model

    # ---- graph boundary --------------------------------------------------------------------

    def _graph_input(self, name: str) -> onnx.ValueInfoProto:
        tensor = self.g.tensor(name)
        shape: list[str | int] = [BATCH_DIM, *tensor.shape[1:]]
        if self.float_model:
            return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
        if self.int8_io:
            return helper.make_tensor_value_info(name, TensorProto.INT8, shape)
        self._quantize(f"{name}_float", name, node_name=f"{name}/QuantizeLinear")
        return helper.make_tensor_value_info(f"{name}_float", TensorProto.FLOAT, shape)

    def _graph_output(self, name: str) -> onnx.ValueInfoProto:
        tensor = self.g.tensor(name)
        shape: list[str | int] = [BATCH_DIM, *tensor.shape[1:]]
        if self.float_model:
            return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
        if self.int8_io:
            return helper.make_tensor_value_info(name, TensorProto.INT8, shape)
        scale, zero_point = self._qparams(name)
        self.nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [name, scale, zero_point],
                [f"{name}_float"],
                name=f"{name}/DequantizeLinear",
            )
        )
        return helper.make_tensor_value_info(f"{name}_float", TensorProto.FLOAT, shape)

    # ---- one IR op -------------------------------------------------------------------------

    def _op(self, op: Op) -> None:
        inputs = [self._read(name, op) for name in op.inputs]
        out = op.outputs[0]
        real = out if self.float_model else f"{out}_real"
        activation = op.attrs.get("activation", Activation.NONE)
        result = real if activation == Activation.NONE else f"{out}_preact"
        _EMITTERS[op.type](self, op, inputs, result)
        self._activate(activation, result, real, op)
        if not self.float_model:
            self._quantize(real, out, node_name=f"{op.name}/QuantizeLinear")

    def _read(self, name: str, consumer: Op) -> str:
        """The float value ``consumer`` reads for tensor ``name`` (a fresh DQ per consumer)."""
        tensor = self.g.tensor(name)
        if tensor.is_constant:
            return self._constant(name, consumer)
        if self.float_model:
            return name
        scale, zero_point = self._qparams(name)
        return self._dequantize(name, scale, zero_point, self._dq_name(name, consumer))

    def _constant(self, name: str, consumer: Op) -> str:
        """A weight or bias: int8/int32 initializer behind a per-axis DequantizeLinear."""
        tensor = self.g.tensor(name)
        quant = tensor.quant
        if quant is None or tensor.data is None:
            raise GraphError(f"constant {name!r} read by {consumer.name!r} has no quantization")
        if tensor.dtype == DType.INT32:
            quant = self._bias_qparams(consumer, name)
        if self.float_model:
            if name not in self.inits:
                real = quant.dequantize(tensor.data)  # (int32 biases in float64)
                self.inits[name] = numpy_helper.from_array(real, name)
            return name
        self.inits.setdefault(name, numpy_helper.from_array(tensor.data, name))
        zp_dtype = np.int8 if tensor.dtype == DType.INT8 else np.int32
        scale = self._init(f"{name}_scale", quant.scale.astype(np.float32))  # (C,) float32
        zero_point = self._init(f"{name}_zero_point", quant.zero_point.astype(zp_dtype))  # (C,)
        axis = quant.axis if quant.is_per_channel else None
        return self._dequantize(name, scale, zero_point, self._dq_name(name, consumer), axis)

    def _dequantize(
        self, name: str, scale: str, zero_point: str, out: str, axis: int | None = None
    ) -> str:
        """Append ``out = DequantizeLinear(name, scale, zero_point)`` (per axis when given)."""
        attrs: dict[str, Any] = {} if axis is None else {"axis": axis}
        self.nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [name, scale, zero_point],
                [out],
                name=f"{out}/DequantizeLinear",
                **attrs,
            )
        )
        return out

    def _dq_name(self, name: str, consumer: Op) -> str:
        """``<t>_dq_<op>``, numbered when one op reads ``t`` twice (``add(x, x)``)."""
        base = f"{name}_dq_{consumer.name}"
        out, k = base, 1
        while out in self.dq_names:
            out, k = f"{base}_{k}", k + 1
        self.dq_names.add(out)
        return out

    def _bias_qparams(self, op: Op, name: str) -> QParams:
        """Bias scale ``input_scale * weight_scale[c]``; the graph's own must agree with it."""
        x, w = (self.g.tensor(n) for n in op.inputs[:2])
        if x.quant is None or w.quant is None:
            raise GraphError(f"{op.type.value} op {op.name!r}: input or weight has no scale")
        expected = (x.quant.scale.astype(np.float32) * w.quant.scale.astype(np.float32)).astype(
            np.float32
        )  # (C_out,) float32
        stored = self.g.tensor(name).quant
        if stored is None or stored.scale.shape != expected.shape:
            raise GraphError(
                f"{op.type.value} op {op.name!r}: bias {name!r} needs {expected.shape[0]} "
                "per-channel scales (input scale * weight scale)"
            )
        if not np.allclose(stored.scale, expected, rtol=_BIAS_SCALE_RTOL, atol=0.0):
            worst = int(np.argmax(np.abs(stored.scale - expected) / expected))
            raise GraphError(
                f"{op.type.value} op {op.name!r}: bias {name!r} scale {stored.scale[worst]:.9g} "
                f"at channel {worst} is not input scale * weight scale = {expected[worst]:.9g}; "
                "int8 kernels add the int32 bias in that scale, so re-quantize the bias with it"
            )
        return QParams.per_channel(expected, axis=0)

    def _activate(self, activation: Activation, result: str, real: str, op: Op) -> None:
        if activation == Activation.RELU:
            self.nodes.append(helper.make_node("Relu", [result], [real], name=f"{op.name}/Relu"))
        elif activation == Activation.RELU6:
            lo = self._init("clip_min_0", np.asarray(0.0, dtype=np.float32))
            hi = self._init("clip_max_6", np.asarray(6.0, dtype=np.float32))
            self.nodes.append(
                helper.make_node("Clip", [result, lo, hi], [real], name=f"{op.name}/Clip")
            )

    def _quantize(self, real: str, out: str, *, node_name: str) -> None:
        scale, zero_point = self._qparams(out)
        self.nodes.append(
            helper.make_node("QuantizeLinear", [real, scale, zero_point], [out], name=node_name)
        )

    def _qparams(self, name: str) -> tuple[str, str]:
        """Names of the scalar scale (float32) and zero point (int8) initializers of ``name``."""
        quant = self.g.tensor(name).quant
        if quant is None or quant.is_per_channel:
            raise GraphError(f"activation {name!r} needs one per-tensor scale and zero point")
        scale = self._init(f"{name}_scale", np.asarray(quant.scale[0], dtype=np.float32))
        zero_point = self._init(f"{name}_zero_point", np.asarray(quant.zero_point[0], np.int8))
        return scale, zero_point

    def _init(self, name: str, value: np.ndarray) -> str:
        if name not in self.inits:
            self.inits[name] = numpy_helper.from_array(value, name)
        return name

    def _add(self, op_type: str, inputs: list[str], out: str, name: str, **attrs: Any) -> None:
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))


# ---- one emitter per IR op: (writer, op, float inputs, float output name) -------------------


def _pads(padding: tuple[tuple[int, int], ...]) -> list[int]:
    """IR ``((begin, end), ...)`` to ONNX ``[begin_0, begin_1, ..., end_0, end_1, ...]``."""
    return [int(p[0]) for p in padding] + [int(p[1]) for p in padding]


def _conv(w: _Writer, op: Op, ins: list[str], out: str) -> None:
    a = op.attrs
    kernel = list(w.g.tensor(op.inputs[1]).shape[2:])
    w._add(
        "Conv",
        ins,
        out,
        op.name,
        kernel_shape=kernel,
        strides=list(a["stride"]),
        pads=_pads(a["padding"]),
        dilations=list(a["dilation"]),
        group=int(a["groups"]),
    )


def _linear(w: _Writer, op: Op, ins: list[str], out: str) -> None:
    # Gemm with transB=1 reads the (C_out, C_in) weight as stored; ORT fuses it into QGemm.
    w._add("Gemm", ins, out, op.name, transB=1)


def _add(w: _Writer, op: Op, ins: list[str], out: str) -> None:
    w._add("Add", ins, out, op.name)


def _max_pool(w: _Writer, op: Op, ins: list[str], out: str) -> None:
    a = op.attrs
    w._add(
        "MaxPool",
        ins,
        out,
        op.name,
        kernel_shape=list(a["kernel"]),
        strides=list(a["stride"]),
        pads=_pads(a["padding"]),
    )


def _avg_pool(w: _Writer, op: Op, ins: list[str], out: str) -> None:
    a = op.attrs
    w._add(
        "AveragePool",
        ins,
        out,
        op.name,
        kernel_shape=list(a["kernel"]),
        strides=list(a["stride"]),
        pads=_pads(a["padding"]),
        count_include_pad=0,  # the IR divides by the valid (unpadded) count
    )


def _mean(w: _Writer, op: Op, ins: list[str], out: str) -> None:
    rank = len(w.g.tensor(op.inputs[0]).shape)
    axes = sorted(int(a) % rank for a in op.attrs["axes"])
    if axes == list(range(2, rank)) and op.attrs["keepdims"]:
        w._add("GlobalAveragePool", ins, out, op.name)
        return
    axes_name = w._init(f"{op.name}_axes", np.asarray(axes, dtype=np.int64))
    w._add("ReduceMean", [ins[0], axes_name], out, op.name, keepdims=int(op.attrs["keepdims"]))


def _reshape(w: _Writer, op: Op, ins: list[str], out: str) -> None:
    # 0 copies the (symbolic) batch dimension; the IR stores the shape with N == 1.
    shape = np.asarray([0, *op.attrs["shape"][1:]], dtype=np.int64)
    w._add("Reshape", [ins[0], w._init(f"{op.name}_shape", shape)], out, op.name)


def _concat(w: _Writer, op: Op, ins: list[str], out: str) -> None:
    w._add("Concat", ins, out, op.name, axis=int(op.attrs["axis"]))


def _softmax(w: _Writer, op: Op, ins: list[str], out: str) -> None:
    x = ins[0]
    beta = float(op.attrs["beta"])
    if beta != 1.0:
        scaled = f"{op.outputs[0]}_scaled"
        beta_name = w._init(f"{op.name}_beta", np.asarray(beta, dtype=np.float32))
        w._add("Mul", [x, beta_name], scaled, f"{op.name}/Mul")
        x = scaled
    w._add("Softmax", [x], out, op.name, axis=-1)


def _pad(w: _Writer, op: Op, ins: list[str], out: str) -> None:
    pads = w._init(f"{op.name}_pads", np.asarray(_pads(op.attrs["padding"]), dtype=np.int64))
    # The real value 0.0: between Q/DQ it is the input's zero point, as the IR pads.
    value = w._init(f"{op.name}_value", np.asarray(0.0, dtype=np.float32))
    w._add("Pad", [ins[0], pads, value], out, op.name, mode="constant")


_EMITTERS = {
    OpType.CONV: _conv,
    OpType.LINEAR: _linear,
    OpType.ADD: _add,
    OpType.MAX_POOL: _max_pool,
    OpType.AVG_POOL: _avg_pool,
    OpType.MEAN: _mean,
    OpType.RESHAPE: _reshape,
    OpType.CONCAT: _concat,
    OpType.SOFTMAX: _softmax,
    OpType.PAD: _pad,
}
