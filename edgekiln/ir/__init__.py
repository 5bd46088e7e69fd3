"""edgekiln's framework-free quantized graph (numpy only; imports nothing else of edgekiln)."""

from edgekiln.ir.graph import (
    INT8_MAX,
    INT8_MIN,
    OP_ATTRS,
    SHARED_QPARAMS_OPS,
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
from edgekiln.ir.serialize import atomic_write, load_graph, save_graph

__all__ = [
    "INT8_MAX",
    "INT8_MIN",
    "OP_ATTRS",
    "SHARED_QPARAMS_OPS",
    "SOFTMAX_OUTPUT_SCALE",
    "SOFTMAX_OUTPUT_ZERO_POINT",
    "Activation",
    "DType",
    "Graph",
    "GraphError",
    "Op",
    "OpType",
    "QParams",
    "Tensor",
    "atomic_write",
    "load_graph",
    "save_graph",
]
