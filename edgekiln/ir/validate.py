"""The rules a Graph must keep before any exporter or target reads it."""

from __future__ import annotations

import numpy as np

from edgekiln.ir.graph import (
    OP_ATTRS,
    SHARED_QPARAMS_OPS,
    DType,
    Graph,
    GraphError,
    Op,
    OpType,
)


def validate_graph(graph: Graph) -> None:
    """Raise GraphError naming the first tensor or op of ``graph`` that breaks a rule."""
    _check_tensors(graph)
    _check_ops(graph)


def _check_tensors(graph: Graph) -> None:
    for name, tensor in graph.tensors.items():
        if name != tensor.name:
            raise GraphError(f"tensor stored under {name!r} is named {tensor.name!r}")
        if any(int(d) <= 0 for d in tensor.shape):
            raise GraphError(f"tensor {name!r} has a non-positive dimension: {tensor.shape}")
        if tensor.data is not None:
            if tensor.data.dtype != tensor.dtype.numpy:
                raise GraphError(
                    f"tensor {name!r} is declared {tensor.dtype.value} "
                    f"but holds {tensor.data.dtype} data"
                )
            if tuple(tensor.data.shape) != tuple(tensor.shape):
                raise GraphError(
                    f"tensor {name!r} is declared {tensor.shape} but holds {tensor.data.shape}"
                )
        q = tensor.quant
        if q is None:
            if tensor.dtype != DType.FLOAT32:
                raise GraphError(f"{tensor.dtype.value} tensor {name!r} has no quantization")
            continue
        if not np.all(np.isfinite(q.scale)) or np.any(q.scale <= 0):
            raise GraphError(
                f"tensor {name!r} has a non-finite or non-positive scale: {q.scale.tolist()}"
            )
        if q.scale.shape != q.zero_point.shape:
            raise GraphError(f"tensor {name!r}: scale and zero_point shapes differ")
        if q.axis is not None:
            if not 0 <= q.axis < len(tensor.shape):
                raise GraphError(f"tensor {name!r}: quantized axis {q.axis} out of range")
            if q.scale.shape[0] != tensor.shape[q.axis]:
                raise GraphError(
                    f"tensor {name!r}: {q.scale.shape[0]} scales for "
                    f"{tensor.shape[q.axis]} channels on axis {q.axis}"
                )


def _check_ops(graph: Graph) -> None:
    available = set(graph.inputs) | {n for n, t in graph.tensors.items() if t.is_constant}
    for name in graph.inputs + graph.outputs:
        graph.tensor(name)
    for op in graph.ops:
        where = f"{op.type.value} op {op.name!r}"
        missing = set(OP_ATTRS[op.type]) - set(op.attrs)
        if missing:
            raise GraphError(f"{where} lacks attributes {sorted(missing)}")
        for name in op.inputs:
            graph.tensor(name)
            if name not in available:
                raise GraphError(f"{where} reads {name!r} before any op writes it")
        for name in op.outputs:
            graph.tensor(name)
            if name in available:
                raise GraphError(f"{where} writes {name!r}, which is already written")
            available.add(name)
        if op.type in SHARED_QPARAMS_OPS:
            _check_shared_qparams(graph, op, where)
    for name in graph.outputs:
        if name not in available:
            raise GraphError(f"graph output {name!r} is never written")


def _check_shared_qparams(graph: Graph, op: Op, where: str) -> None:
    out = graph.tensor(op.outputs[0]).quant
    for name in op.inputs:
        q = graph.tensor(name).quant
        if q is None or out is None or not q.equals(out):
            raise GraphError(
                f"{where}: int8 kernels of {op.type.value} need the output's scale and zero point "
                f"to equal input {name!r}'s; share one observer for them in training"
            )
    if op.type == OpType.CONCAT and len(op.inputs) < 1:
        raise GraphError(f"{where} has no inputs")
