"""The slow exact integer path: TFLM's accumulating kernels written with int64 numpy only.

Loops over kernel taps, int64 products and sums, then ``Requant.apply`` (which composes the
fixed-point primitives). The fast kernels (float BLAS, fused requantization, int32 taps,
batch chunks) are tested value for value against these.
"""

from __future__ import annotations

import numpy as np

from edgekiln.targets.mcu.fixedpoint import wrap_int32
from edgekiln.targets.mcu.kernels import Requant


def _padded_taps(x, kernel, stride, dilation, pad, out_hw, fill):
    n, h, w, c = x.shape
    need_h = (out_hw[0] - 1) * stride[0] + (kernel[0] - 1) * dilation[0] + 1
    need_w = (out_hw[1] - 1) * stride[1] + (kernel[1] - 1) * dilation[1] + 1
    xp = np.full((n, max(need_h, h + pad[0]), max(need_w, w + pad[1]), c), fill, np.int64)
    xp[:, pad[0] : pad[0] + h, pad[1] : pad[1] + w] = x
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            h0, w0 = i * dilation[0], j * dilation[1]
            rows = slice(h0, h0 + (out_hw[0] - 1) * stride[0] + 1, stride[0])
            cols = slice(w0, w0 + (out_hw[1] - 1) * stride[1] + 1, stride[1])
            yield i, j, xp[:, rows, cols]


def conv_2d(x, filters, bias, *, input_zero_point, stride, dilation, pad, out_hw,
            requant: Requant) -> np.ndarray:  # fmt: skip
    o, kh, kw, c = filters.shape
    groups = x.shape[3] // c
    og = o // groups
    xs = x.astype(np.int64) - input_zero_point
    acc = np.zeros((x.shape[0], *out_hw, o), np.int64)
    for i, j, tap in _padded_taps(xs, (kh, kw), stride, dilation, pad, out_hw, 0):
        for g in range(groups):
            wg = filters[g * og : (g + 1) * og, i, j, :].astype(np.int64)  # (og, c)
            acc[..., g * og : (g + 1) * og] += tap[..., g * c : (g + 1) * c] @ wg.T
    acc = wrap_int32(acc)
    if bias is not None:
        acc = wrap_int32(acc + bias.astype(np.int64))
    return requant.apply(acc)


def depthwise_conv_2d(x, filters, bias, *, input_zero_point, depth_multiplier, stride,
                      dilation, pad, out_hw, requant: Requant) -> np.ndarray:  # fmt: skip
    _, kh, kw, oc = filters.shape
    xs = np.repeat(x.astype(np.int64) - input_zero_point, depth_multiplier, axis=3)
    acc = np.zeros((x.shape[0], *out_hw, oc), np.int64)
    for i, j, tap in _padded_taps(xs, (kh, kw), stride, dilation, pad, out_hw, 0):
        acc += tap * filters[0, i, j].astype(np.int64)
    acc = wrap_int32(acc)
    if bias is not None:
        acc = wrap_int32(acc + bias.astype(np.int64))
    return requant.apply(acc)


def fully_connected(x, weights, bias, *, input_zero_point, weight_zero_point,
                    requant: Requant) -> np.ndarray:  # fmt: skip
    rows = x.reshape(-1, weights.shape[1]).astype(np.int64) - input_zero_point
    acc = wrap_int32(rows @ (weights.astype(np.int64) - weight_zero_point).T)
    if bias is not None:
        acc = wrap_int32(acc + bias.astype(np.int64))
    return requant.apply(acc)
