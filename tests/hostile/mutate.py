"""Hostile inputs: the file every target gets, and its truncated, flipped and patched copies.

Mutations of a ``.tflite`` file are made on the bytes: truncation, bit flips, and field
patches written at the exact offset of a flatbuffer field (a tensor's shape, type, buffer
index, scale, zero point, quantized dimension; an operator's opcode index or tensor indices;
the subgraph's inputs; the model's version). Mutations of a ``.onnx`` file are made on the
protobuf (scales, zero points, shapes, op types, element types, opset) or on its bytes.

Each test judges and counts what a target made of a mutant with ``tests.hostile.tally``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import onnx
import tflite
from onnx import TensorProto, numpy_helper

from edgekiln.ir import Graph
from edgekiln.ir.builder import GraphBuilder


def hostile_graph() -> Graph:
    """A small CNN with every kind of op the exporters write: the file to mutate."""
    x = np.random.default_rng(0).normal(0, 1, (8, 3, 8, 8)).astype(np.float32)
    b = GraphBuilder(x, seed=0, name="hostile")
    c = b.conv(b.input, 4, 3, padding=1, activation="relu")
    d = b.conv(c, 4, 3, padding=1, groups=4)
    a = b.add(c, d, activation="relu")
    p = b.max_pool(a, 2)
    q = b.avg_pool(p, 2, 1)
    m = b.mean(q)
    return b.build([b.softmax(b.linear(m, 5))])


# ---- bytes ---------------------------------------------------------------------------------


def truncations(data: bytes, count: int) -> Iterator[tuple[str, bytes]]:
    """The file cut at the header offsets and at ``count`` offsets spread over it."""
    offsets = {0, 1, 4, 7, 8, 12, 16, 32, len(data) - 1}
    offsets |= {int(v) for v in np.linspace(40, len(data) - 2, count)}
    for n in sorted(o for o in offsets if 0 <= o < len(data)):
        yield f"truncate@{n}", data[:n]


def bit_flips(data: bytes, count: int, seed: int = 0) -> Iterator[tuple[str, bytes]]:
    """``count`` copies of the file, each with one bit flipped (seeded positions)."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        i, bit = int(rng.integers(0, len(data))), int(rng.integers(0, 8))
        out = bytearray(data)
        out[i] ^= 1 << bit
        yield f"flip@{i}.{bit}", bytes(out)


# ---- TFLite field patches ------------------------------------------------------------------


def _patch(data: bytearray, pos: int, fmt: str, value: Any) -> None:
    struct.pack_into("<" + fmt, data, pos, value)


def _field_pos(table: Any, slot: int) -> int | None:
    """Byte position of field ``slot`` of a flatbuffer table (None when stored as default)."""
    o = table._tab.Offset(4 + 2 * slot)
    return table._tab.Pos + o if o else None


def _vector_pos(table: Any, slot: int, index: int, size: int) -> int | None:
    o = table._tab.Offset(4 + 2 * slot)
    if not o or index >= table._tab.VectorLen(o):
        return None
    return table._tab.Vector(o) + index * size


def tflite_field_mutants(data: bytes) -> Iterator[tuple[str, bytes]]:
    """Copies of ``data`` with one schema field set to a hostile value each."""
    model = tflite.Model.GetRootAsModel(data, 0)
    sub = model.Subgraphs(0)
    n_tensors = sub.TensorsLength()
    n_ops = sub.OperatorsLength()
    tensors = [sub.Tensors(i) for i in range(n_tensors)]
    const = next(t for t in tensors if t.Buffer() > 0 and t.Quantization().ScaleLength() > 1)
    act = next(t for t in tensors if t.Buffer() == 0 and t.Quantization() is not None)
    op = sub.Operators(n_ops - 2)  # the FULLY_CONNECTED before the softmax

    patches: list[tuple[str, int | None, str, Any]] = [
        ("version=2", _field_pos(model, 0), "I", 2),
        ("identifier=XXXX", 4, "4s", b"XXXX"),
        ("subgraph.input=999", _vector_pos(sub, 1, 0, 4), "i", 999),
        ("subgraph.output=-7", _vector_pos(sub, 2, 0, 4), "i", -7),
        ("operator.opcode_index=99", _field_pos(op, 0), "I", 99),
        ("operator.input=9999", _vector_pos(op, 1, 0, 4), "i", 9999),
        ("operator.input=-3", _vector_pos(op, 1, 0, 4), "i", -3),
        ("operator.weights=-1", _vector_pos(op, 1, 1, 4), "i", -1),
        ("operator.output=input", _vector_pos(op, 2, 0, 4), "i", sub.Inputs(0)),
    ]
    for label, t in (("const", const), ("activation", act)):
        q = t.Quantization()
        patches += [
            (f"{label}.shape[0]=0", _vector_pos(t, 0, 0, 4), "i", 0),
            (f"{label}.shape[1]=-1", _vector_pos(t, 0, 1, 4), "i", -1),
            (f"{label}.shape[1]=1e6", _vector_pos(t, 0, 1, 4), "i", 1_000_000),
            (f"{label}.type=FLOAT32", _field_pos(t, 1), "b", tflite.TensorType.FLOAT32),
            (f"{label}.type=99", _field_pos(t, 1), "b", 99),
            (f"{label}.buffer=9999", _field_pos(t, 2), "I", 9999),
            (f"{label}.scale=0", _vector_pos(q, 2, 0, 4), "f", 0.0),
            (f"{label}.scale=nan", _vector_pos(q, 2, 0, 4), "f", float("nan")),
            (f"{label}.scale=-1", _vector_pos(q, 2, 0, 4), "f", -1.0),
            (f"{label}.scale=inf", _vector_pos(q, 2, 0, 4), "f", float("inf")),
            (f"{label}.scale=1e-30", _vector_pos(q, 2, 0, 4), "f", 1e-30),
            (f"{label}.zero_point=1000", _vector_pos(q, 3, 0, 8), "q", 1000),
            (f"{label}.quantized_dimension=7", _field_pos(q, 6), "i", 7),
        ]
    patches.append(("const.buffer=other", _field_pos(const, 2), "I", const.Buffer() + 1))
    for name, pos, fmt, value in patches:
        if pos is None:
            continue  # the field is stored as its default: nothing to patch
        out = bytearray(data)
        _patch(out, pos, fmt, value)
        yield name, bytes(out)


# ---- ONNX field mutations ------------------------------------------------------------------


def _init(model: onnx.ModelProto, name: str) -> TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def _set_init(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    _init(model, name).CopyFrom(numpy_helper.from_array(value, name))


def onnx_field_mutants(data: bytes) -> Iterator[tuple[str, bytes]]:
    """Copies of an edgekiln QDQ model with one field set to a hostile value each."""
    base = onnx.load_from_string(data)
    q = next(n for n in base.graph.node if n.op_type == "QuantizeLinear")
    int8_inits = {t.name for t in base.graph.initializer if t.data_type == TensorProto.INT8}
    wdq = next(
        n
        for n in base.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in int8_inits and n.attribute
    )
    conv = next(n for n in base.graph.node if n.op_type == "Conv")

    def mutant(edit: Callable[[onnx.ModelProto], None]) -> bytes:
        m = onnx.ModelProto()
        m.CopyFrom(base)
        edit(m)
        return m.SerializeToString()

    scale, zp, w = q.input[1], q.input[2], wdq.input[0]
    edits: list[tuple[str, Callable[[onnx.ModelProto], None]]] = [
        ("activation.scale=0", lambda m: _set_init(m, scale, np.float32(0.0))),
        ("activation.scale=nan", lambda m: _set_init(m, scale, np.float32("nan"))),
        ("activation.scale=-1", lambda m: _set_init(m, scale, np.float32(-1.0))),
        ("activation.zero_point=int32", lambda m: _set_init(m, zp, np.int32(5))),
        ("weight.scale=0", lambda m: _set_init(m, wdq.input[1], np.zeros(4, np.float32))),
        ("weight.shape", lambda m: _set_init(m, w, np.zeros((2, 2), np.int8))),
        ("weight.dtype=float64", lambda m: _set_init(m, w, np.zeros((4, 3, 3, 3)))),
        ("conv.op_type=Bogus", lambda m: _node(m, conv.name).__setattr__("op_type", "Bogus")),
        ("conv.input_removed", lambda m: _node(m, conv.name).input.pop()),
        ("conv.input=missing", lambda m: _node(m, conv.name).input.__setitem__(0, "nowhere")),
        ("input.elem_type=DOUBLE", lambda m: _elem(m.graph.input[0], TensorProto.DOUBLE)),
        ("input.shape=5x5", lambda m: _dims(m.graph.input[0], [1, 5, 5])),
        ("output.elem_type=BOOL", lambda m: _elem(m.graph.output[0], TensorProto.BOOL)),
        ("opset=1", lambda m: m.opset_import[0].__setattr__("version", 1)),
        ("ir_version=99", lambda m: m.__setattr__("ir_version", 99)),
        ("no_outputs", lambda m: m.graph.ClearField("output")),
        ("cycle", lambda m: _node(m, conv.name).input.__setitem__(0, conv.output[0])),
    ]
    for name, edit in edits:
        yield name, mutant(edit)


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _elem(value: onnx.ValueInfoProto, elem_type: int) -> None:
    value.type.tensor_type.elem_type = elem_type


def _dims(value: onnx.ValueInfoProto, dims: list[int]) -> None:
    shape = value.type.tensor_type.shape
    del shape.dim[1:]
    for d in dims:
        shape.dim.add().dim_value = d
