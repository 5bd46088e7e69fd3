"""A numpy reference executor with quantize-dequantize semantics.

Each op dequantizes its int8 inputs, computes in float32 with the dequantized weights and
bias, applies its fused activation and quantizes the result with its output's parameters
(round half to even, as ONNX QuantizeLinear and ``torch.fake_quantize_*`` do). This is what
the fake-quantized PyTorch model computes, written without PyTorch, so exporters and targets
can be checked against it in LSB. It is a reference, not a fast path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np

from edgekiln.ir.graph import Activation, DType, Graph, GraphError, Op, OpType, Tensor


class TensorLookup(Protocol):
    """What the float kernels read of a graph: tensors by name (a Graph is one)."""

    def tensor(self, name: str) -> Tensor: ...


def run_reference(
    graph: Graph, inputs: Mapping[str, np.ndarray] | np.ndarray
) -> dict[str, np.ndarray]:
    """Run ``graph`` on int8 ``inputs`` (batch first) and return every activation tensor, int8.

    ``inputs`` is one array for a single-input graph or a mapping from input name to array.
    """
    if isinstance(inputs, np.ndarray):
        if len(graph.inputs) != 1:
            raise GraphError(f"graph has {len(graph.inputs)} inputs; pass a dict by name")
        inputs = {graph.inputs[0]: inputs}
    values: dict[str, np.ndarray] = {}
    for name in graph.inputs:
        x = np.asarray(inputs[name])
        if x.dtype != np.int8:
            raise GraphError(f"input {name!r} must be int8, got {x.dtype}")
        values[name] = x
    for op in graph.ops:
        real = [_real(graph, values, name) for name in op.inputs]
        out = graph.tensor(op.outputs[0])
        y = _KERNELS[op.type](op, real, graph)
        if out.quant is None:
            raise GraphError(f"activation {out.name!r} has no quantization")
        values[op.outputs[0]] = out.quant.quantize(y, DType.INT8)
    return values


def float_op(op: Op, real_inputs: list[np.ndarray], graph: TensorLookup) -> np.ndarray:
    """The float32 result of ``op`` on real-valued inputs (activation applied, not quantized)."""
    return _KERNELS[op.type](op, real_inputs, graph)


def _real(graph: Graph, values: dict[str, np.ndarray], name: str) -> np.ndarray:
    tensor = graph.tensor(name)
    q = values[name] if tensor.data is None else tensor.data
    if tensor.quant is None:
        return q.astype(np.float32)
    return tensor.quant.dequantize(q)


def _activate(y: np.ndarray, activation: Activation) -> np.ndarray:
    if activation == Activation.RELU:
        return np.maximum(y, 0.0)
    if activation == Activation.RELU6:
        return np.clip(y, 0.0, 6.0)
    return y


def _pad_spatial(x: np.ndarray, padding: tuple[tuple[int, int], ...], value: float) -> np.ndarray:
    widths = [(0, 0), (0, 0), *padding]
    return np.pad(x, widths, constant_values=value)


def _windows(
    x: np.ndarray, kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...]
) -> np.ndarray:
    """Sliding windows of a padded (N, C, *S) array: (N, C, *out_spatial, *kernel)."""
    spatial = x.shape[2:]
    out = tuple(
        (s - d * (k - 1) - 1) // st + 1
        for s, k, st, d in zip(spatial, kernel, stride, dilation, strict=True)
    )
    idx: list[np.ndarray] = []
    for dim, (o, k, st, d) in enumerate(zip(out, kernel, stride, dilation, strict=True)):
        pos = np.arange(o)[:, None] * st + np.arange(k)[None, :] * d  # (o, k)
        shape = [1] * (2 * len(out))
        shape[dim], shape[len(out) + dim] = o, k
        idx.append(pos.reshape(shape))
    index: tuple[slice | np.ndarray, ...] = (slice(None), slice(None), *idx)
    return x[index]


def _conv(op: Op, real: list[np.ndarray], graph: TensorLookup) -> np.ndarray:
    x, w, b = real
    a = op.attrs
    xp = _pad_spatial(x, a["padding"], 0.0)
    win = _windows(xp, w.shape[2:], a["stride"], a["dilation"])  # (N, C, *O, *K)
    n, c = x.shape[:2]
    groups = a["groups"]
    nsp = len(w.shape) - 2
    out_sp = win.shape[2 : 2 + nsp]
    win = win.reshape(n, groups, c // groups, *out_sp, -1)  # (N, G, Cg, *O, K)
    wg = w.reshape(groups, w.shape[0] // groups, w.shape[1], -1)  # (G, Og, Cg, K)
    y = np.einsum("ngc...k,gock->ngo...", win, wg, optimize=True)
    y = y.reshape(n, w.shape[0], *out_sp) + b.reshape(1, -1, *([1] * nsp))
    return _activate(y.astype(np.float32), a["activation"])


def _linear(op: Op, real: list[np.ndarray], graph: TensorLookup) -> np.ndarray:
    x, w, b = real
    return _activate((x @ w.T + b).astype(np.float32), op.attrs["activation"])


def _add(op: Op, real: list[np.ndarray], graph: TensorLookup) -> np.ndarray:
    return _activate(real[0] + real[1], op.attrs["activation"])


def _max_pool(op: Op, real: list[np.ndarray], graph: TensorLookup) -> np.ndarray:
    a = op.attrs
    xp = _pad_spatial(real[0], a["padding"], -np.inf)
    win = _windows(xp, a["kernel"], a["stride"], (1,) * len(a["kernel"]))
    return win.reshape(*win.shape[: 2 + len(a["kernel"])], -1).max(axis=-1)


def _avg_pool(op: Op, real: list[np.ndarray], graph: TensorLookup) -> np.ndarray:
    a = op.attrs
    nk = len(a["kernel"])
    ones = np.ones((1, 1, *real[0].shape[2:]), dtype=np.float32)
    win = _windows(_pad_spatial(real[0], a["padding"], 0.0), a["kernel"], a["stride"], (1,) * nk)
    cnt = _windows(_pad_spatial(ones, a["padding"], 0.0), a["kernel"], a["stride"], (1,) * nk)
    total = win.reshape(*win.shape[: 2 + nk], -1).sum(axis=-1)
    count = cnt.reshape(*cnt.shape[: 2 + nk], -1).sum(axis=-1)
    return (total / count).astype(np.float32)


def _mean(op: Op, real: list[np.ndarray], graph: TensorLookup) -> np.ndarray:
    return real[0].mean(axis=tuple(op.attrs["axes"]), keepdims=op.attrs["keepdims"])


def _reshape(op: Op, real: list[np.ndarray], graph: TensorLookup) -> np.ndarray:
    shape = op.attrs["shape"]
    return real[0].reshape(real[0].shape[0], *shape[1:])


def _concat(op: Op, real: list[np.ndarray], graph: TensorLookup) -> np.ndarray:
    return np.concatenate(real, axis=op.attrs["axis"])


def _softmax(op: Op, real: list[np.ndarray], graph: TensorLookup) -> np.ndarray:
    z = real[0] * op.attrs["beta"]
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def _pad(op: Op, real: list[np.ndarray], graph: TensorLookup) -> np.ndarray:
    return np.pad(real[0], op.attrs["padding"], constant_values=0.0)


_KERNELS = {
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
