"""The GraphBuilder graphs and comparison helpers every TFLite test uses (writer, LiteRT, TFLM).

Tolerances, in LSB of the compared tensor's output scale, and why:

- A requantizing op (conv, depthwise, linear, add, average pool, mean, softmax) computes its
  int32 accumulator exactly in every runtime. The reference then rounds ``acc * s_in * s_w /
  s_out`` in float (half to even); TFLite's integer kernels multiply by a Q31 fixed-point
  multiplier and shift, rounding half away from zero (ADD first rescales both inputs with
  20 extra bits; MEAN and AVERAGE_POOL divide with rounding). The two pre-rounding values
  differ by far less than one step (the multiplier's error is below 2**-31 relative), so the
  rounded results can disagree only near a rounding boundary, and then by one step:
  ``REQUANT_LSB = 1`` per op, given identical int8 inputs. Softmax's fixed-point exp is good
  to well under a step as well, so 1 holds there too.
- Data movement (max pool, reshape, concatenation of equal parameters, pad, transpose) copies
  int8 values: 0 LSB.

Given identical inputs per op is what ``stepwise_lsb`` checks, op by op, on a runtime's own
intermediate tensors. End to end, differences propagate through later ops; ``chain_bound``
allows one step per requantizing op on the path, which every graph here stays within (the
measured values are in the tests and in the report).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edgekiln.exporters.tflite import _Writer
from edgekiln.ir import DType, Graph, OpType
from edgekiln.ir.builder import GraphBuilder
from edgekiln.ir.reference import float_op, run_reference

REQUANT_LSB = 1
MOVE_OPS = {OpType.MAX_POOL, OpType.RESHAPE, OpType.CONCAT, OpType.PAD}

_RNG = np.random.default_rng(0)
CAL_2D = _RNG.normal(0, 1, (4, 4, 9, 9)).astype(np.float32)
CAL_1D = _RNG.normal(0, 1, (4, 3, 20)).astype(np.float32)


def _conv1d(b: GraphBuilder) -> str:
    return b.conv(b.input, 5, 3, padding=1, activation="relu")


def _conv2d(b: GraphBuilder) -> str:
    return b.conv(b.input, 6, 3, padding=1)


def _depthwise(b: GraphBuilder) -> str:
    return b.conv(b.input, 8, 3, padding=1, groups=4)


def _grouped(b: GraphBuilder) -> str:
    return b.conv(b.input, 6, 3, padding=1, groups=2)


def _dilated(b: GraphBuilder) -> str:
    return b.conv(b.input, 6, 3, padding=2, dilation=2)


def _stride2_asym(b: GraphBuilder) -> str:
    # PyTorch-style padding ((1, 0), (0, 2)) is neither SAME nor VALID: an explicit PAD
    return b.conv(b.input, 6, 3, stride=2, padding=[(1, 0), (0, 2)])


def _stride2_torch(b: GraphBuilder) -> str:
    # k=3, s=2, p=1 on 9: TF SAME pads (1, 1) too, so this one is written as SAME
    return b.conv(b.input, 6, 3, stride=2, padding=1)


def _flatten_linear(b: GraphBuilder) -> str:
    return b.linear(b.flatten(b.conv(b.input, 6, 3, padding=1)), 7, activation="relu")


def _add_relu(b: GraphBuilder) -> str:
    return b.add(b.conv(b.input, 4, 3, padding=1), b.input, activation="relu")


def _relu6(b: GraphBuilder) -> str:
    return b.conv(b.input, 6, 3, padding=1, activation="relu6")


def _max_pool(b: GraphBuilder) -> str:
    return b.max_pool(b.input, 2)


def _avg_pool(b: GraphBuilder) -> str:
    return b.avg_pool(b.input, 3, 2, padding=1)


def _mean(b: GraphBuilder) -> str:
    return b.mean(b.input)


def _mean_keepdims(b: GraphBuilder) -> str:
    return b.mean(b.input, keepdims=True)


def _reshape(b: GraphBuilder) -> str:
    return b.flatten(b.input)  # a flatten that is an output: TRANSPOSE to NCHW, then RESHAPE


def _concat(b: GraphBuilder) -> str:
    x = b.conv(b.input, 4, 3, padding=1)
    return b.concat([x, b.requantize_like(b.conv(b.input, 3, 1), x)])


def _softmax(b: GraphBuilder) -> str:
    return b.softmax(b.linear(b.mean(b.input), 10), beta=0.5)


def _pad(b: GraphBuilder) -> str:
    return b.pad(b.input, [(0, 0), (0, 0), (1, 2), (2, 1)])


# name -> (calibration data, builder function, requantizing ops on the longest path)
CASES: dict[str, tuple[np.ndarray, Callable[[GraphBuilder], str], int]] = {
    "conv1d": (CAL_1D, _conv1d, 1),
    "conv2d": (CAL_2D, _conv2d, 1),
    "depthwise": (CAL_2D, _depthwise, 1),
    "grouped": (CAL_2D, _grouped, 1),
    "dilated": (CAL_2D, _dilated, 1),
    "stride2_asym_pad": (CAL_2D, _stride2_asym, 1),
    "stride2_same": (CAL_2D, _stride2_torch, 1),
    "flatten_linear": (CAL_2D, _flatten_linear, 2),
    "add_relu": (CAL_2D, _add_relu, 2),
    "relu6": (CAL_2D, _relu6, 1),
    "max_pool": (CAL_2D, _max_pool, 0),
    "avg_pool": (CAL_2D, _avg_pool, 1),
    "mean": (CAL_2D, _mean, 1),
    "mean_keepdims": (CAL_2D, _mean_keepdims, 1),
    "reshape": (CAL_2D, _reshape, 0),
    "concat": (CAL_2D, _concat, 2),
    "softmax": (CAL_2D, _softmax, 3),
    "pad": (CAL_2D, _pad, 0),
}


def case_graph(name: str) -> Graph:
    """The calibrated graph of one case."""
    cal, build, _ = CASES[name]
    b = GraphBuilder(cal, seed=1, name=name)
    return b.build([build(b)])


def chain_bound(name: str) -> int:
    """End-to-end LSB bound of a case: one step per requantizing op on the path."""
    return CASES[name][2] * REQUANT_LSB


def sample_data(name: str, n: int = 6, seed: int = 2) -> np.ndarray:
    """Float samples around the calibration data (NCHW), some beyond its range."""
    cal = CASES[name][0]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(cal), n)
    return (cal[idx] + rng.normal(0, 0.4, (n, *cal.shape[1:]))).astype(np.float32)


def reference_output(graph: Graph, x: np.ndarray) -> np.ndarray:
    """The reference's int8 output for float ``x``, quantized with the graph input's params."""
    xq = graph.tensor(graph.inputs[0]).quant.quantize(x)
    return run_reference(graph, xq)[graph.outputs[0]]


def lsb(a: np.ndarray, b: np.ndarray) -> int:
    """Largest absolute difference of two int8 arrays, in steps."""
    return int(np.abs(a.astype(np.int32) - b.astype(np.int32).reshape(a.shape)).max())


def float_graph_output(graph: Graph, x: np.ndarray) -> np.ndarray:
    """The graph computed in float32 with dequantized constants and no activation rounding."""
    values = {graph.inputs[0]: x.astype(np.float32)}
    for op in graph.ops:
        real = [values[n] if n in values else _constant(graph, n) for n in op.inputs]
        values[op.outputs[0]] = float_op(op, real, graph)
    return values[graph.outputs[0]]


def _constant(graph: Graph, name: str) -> np.ndarray:
    t = graph.tensor(name)
    if t.dtype == DType.INT32:
        return (t.data * t.quant.scale.astype(np.float64)).astype(np.float32)
    return t.quant.dequantize(t.data)


def stepwise_lsb(graph: Graph, intermediates: dict[str, np.ndarray]) -> dict[str, int]:
    """Per op: LSB between the runtime's output and the reference op run on the runtime's inputs.

    ``intermediates`` are a target's ``details["intermediates"]`` (PyTorch layout). A flatten
    that feeds a linear layer is stored in TFLite's (H, W, C) order; it is put back in the
    graph's (C, H, W) order before comparing.
    """
    writer = _Writer(graph, float_io=False, float_model=False, lower_grouped_conv=False)
    writer.collect()
    values: dict[str, np.ndarray] = {}
    for name, tensor in graph.tensors.items():
        if tensor.data is not None or name not in intermediates:
            continue
        v = intermediates[name]
        if name in writer.hwc_flat:
            c, *spatial = writer.hwc_flat[name]
            v = v.reshape(len(v), *spatial, c)
            v = np.moveaxis(v, -1, 1).reshape(len(v), -1)
        values[name] = v.reshape(len(v), *tensor.shape[1:])
    diffs = {}
    for op in graph.ops:
        real = []
        for name in op.inputs:
            t = graph.tensor(name)
            real.append(
                _constant(graph, name) if t.data is not None else t.quant.dequantize(values[name])
            )
        out = graph.tensor(op.outputs[0])
        expected = out.quant.quantize(float_op(op, real, graph))
        diffs[op.name] = lsb(expected, values[op.outputs[0]])
    return diffs


def op_bound(graph: Graph, op_name: str) -> int:
    """Stepwise bound of one op: 0 for data movement, REQUANT_LSB otherwise."""
    op = next(o for o in graph.ops if o.name == op_name)
    return 0 if op.type in MOVE_OPS else REQUANT_LSB
