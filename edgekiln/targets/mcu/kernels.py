"""TFLite Micro's int8 reference kernels as vectorised numpy functions (batch vectorised too).

Each kernel takes int8 arrays in TFLite's layout (NHWC activations, OHWI convolution filters,
``(1, KH, KW, C * M)`` depthwise filters, ``(O, I)`` fully connected weights) and explicit
quantization parameters, and returns exactly what TFLM's reference kernel stores. The
interpreter (``interpreter.py``) derives the parameters from a model the way TFLM's ``Prepare``
functions do.

Accumulation: products of int8 values are summed in float64 through BLAS. Every partial sum of
an int8 x int8 product is an integer below 2**53 in magnitude for any layer that fits in a
microcontroller (that needs more than 2**38 terms), so the float64 sums are exact; they are
then wrapped to int32 as TFLM's int32 accumulators would be.

CMSIS-NN's int8 kernels are written to be bit-exact with these reference kernels (same
multipliers, same ``arm_nn_requantize`` double rounding), so one set of kernels serves both
kernel libraries; only the latency model tells them apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgekiln.targets.mcu.fixedpoint import (
    DOUBLE_ROUNDING,
    INT32_MAX,
    SOFTMAX_ACCUM_INTEGER_BITS,
    exp_on_negative_values,
    get_reciprocal,
    multiply_by_quantized_multiplier,
    rescale,
    rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
    wrap_int32,
)

INT8_MIN, INT8_MAX = -128, 127


@dataclass(frozen=True)
class Requant:
    """Output requantization of an accumulating kernel: per-channel (or one) multiplier/shift."""

    multiplier: np.ndarray  # (C,) or (1,) int64, Q0.31 significands
    shift: np.ndarray  # same shape, int64, power-of-two exponent
    output_zero_point: int
    act_min: int = INT8_MIN
    act_max: int = INT8_MAX
    rounding: str = DOUBLE_ROUNDING

    def apply(self, acc: np.ndarray) -> np.ndarray:
        """int32 accumulators (channels last) -> int8 outputs."""
        out = multiply_by_quantized_multiplier(acc, self.multiplier, self.shift, self.rounding)
        out = out + self.output_zero_point
        return np.clip(out, self.act_min, self.act_max).astype(np.int8)


def same_padding(in_size: int, filter_size: int, stride: int, dilation: int) -> tuple[int, int]:
    """TFLite's SAME padding: (output size, padding before). Extra padding goes after.

    >>> same_padding(7, 3, 2, 1)  # out 4: total pad (4-1)*2+3-7 = 2, 1 before, 1 after
    (4, 1)
    """
    out = (in_size + stride - 1) // stride
    effective = (filter_size - 1) * dilation + 1
    total = max((out - 1) * stride + effective - in_size, 0)
    return out, total // 2


def valid_padding(in_size: int, filter_size: int, stride: int, dilation: int) -> tuple[int, int]:
    """TFLite's VALID padding: (output size, 0)."""
    effective = (filter_size - 1) * dilation + 1
    return (in_size - effective + stride) // stride, 0


def _windows(
    x: np.ndarray,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    pad: tuple[int, int],
    out: tuple[int, int],
    fill: float,
) -> list[np.ndarray]:
    """Strided views (N, OH, OW, C) of a padded NHWC array, one per kernel tap (kh, kw)."""
    _n, h, w, _c = x.shape
    need_h = (out[0] - 1) * stride[0] + (kernel[0] - 1) * dilation[0] + 1
    need_w = (out[1] - 1) * stride[1] + (kernel[1] - 1) * dilation[1] + 1
    after_h = max(need_h - h - pad[0], 0)
    after_w = max(need_w - w - pad[1], 0)
    xp = np.pad(x, ((0, 0), (pad[0], after_h), (pad[1], after_w), (0, 0)), constant_values=fill)
    taps = []
    for kh in range(kernel[0]):
        for kw in range(kernel[1]):
            h0, w0 = kh * dilation[0], kw * dilation[1]
            taps.append(
                xp[
                    :,
                    h0 : h0 + (out[0] - 1) * stride[0] + 1 : stride[0],
                    w0 : w0 + (out[1] - 1) * stride[1] + 1 : stride[1],
                    :,
                ]
            )
    return taps


def _to_int32(acc: np.ndarray) -> np.ndarray:
    return wrap_int32(np.rint(acc).astype(np.int64))


def conv_2d(
    x: np.ndarray,
    filters: np.ndarray,
    bias: np.ndarray | None,
    *,
    input_zero_point: int,
    stride: tuple[int, int],
    dilation: tuple[int, int],
    pad: tuple[int, int],
    out_hw: tuple[int, int],
    requant: Requant,
) -> np.ndarray:
    """CONV_2D int8 per channel: x (N,H,W,C), filters (O,KH,KW,C) -> (N,OH,OW,O) int8.

    Taps outside the input are skipped in TFLM; padding with the input zero point and
    subtracting it gives the same zero contribution.
    """
    o, kh, kw, c = filters.shape
    groups = x.shape[3] // c
    xf = x.astype(np.float64) - input_zero_point
    taps = _windows(xf, (kh, kw), stride, dilation, pad, out_hw, 0.0)
    cols = np.stack(taps, axis=3)  # (N, OH, OW, KH*KW, C_total)
    n = x.shape[0]
    if groups == 1:
        acc = cols.reshape(n, *out_hw, kh * kw * c) @ filters.reshape(o, -1).astype(np.float64).T
    else:  # grouped conv: each group of O/groups filters sees its C input channels
        og = o // groups
        parts = []
        for g in range(groups):
            cg = cols[..., g * c : (g + 1) * c].reshape(n, *out_hw, kh * kw * c)
            fg = filters[g * og : (g + 1) * og].reshape(og, -1).astype(np.float64)
            parts.append(cg @ fg.T)
        acc = np.concatenate(parts, axis=-1)
    acc = _to_int32(acc)
    if bias is not None:
        acc = wrap_int32(acc + bias.astype(np.int64))
    return requant.apply(acc)


def depthwise_conv_2d(
    x: np.ndarray,
    filters: np.ndarray,
    bias: np.ndarray | None,
    *,
    input_zero_point: int,
    depth_multiplier: int,
    stride: tuple[int, int],
    dilation: tuple[int, int],
    pad: tuple[int, int],
    out_hw: tuple[int, int],
    requant: Requant,
) -> np.ndarray:
    """DEPTHWISE_CONV_2D int8 per channel: filters (1,KH,KW,C*M); output channel c*M + m."""
    _, kh, kw, oc = filters.shape
    xf = x.astype(np.float64) - input_zero_point
    if depth_multiplier > 1:
        xf = np.repeat(xf, depth_multiplier, axis=3)  # channel c*M + m reads input channel c
    taps = _windows(xf, (kh, kw), stride, dilation, pad, out_hw, 0.0)
    f = filters.reshape(kh * kw, oc).astype(np.float64)
    acc = np.zeros((x.shape[0], *out_hw, oc), dtype=np.float64)
    for i, tap in enumerate(taps):
        acc += tap * f[i]
    acc = _to_int32(acc)
    if bias is not None:
        acc = wrap_int32(acc + bias.astype(np.int64))
    return requant.apply(acc)


def fully_connected(
    x: np.ndarray,
    weights: np.ndarray,
    bias: np.ndarray | None,
    *,
    input_zero_point: int,
    weight_zero_point: int,
    requant: Requant,
) -> np.ndarray:
    """FULLY_CONNECTED int8: x (N, ..., I) flattened to (-1, I), weights (O, I) -> (-1, O)."""
    _o, i = weights.shape
    xf = x.reshape(-1, i).astype(np.float64) - input_zero_point
    wf = weights.astype(np.float64) - weight_zero_point
    acc = _to_int32(xf @ wf.T)
    if bias is not None:
        acc = wrap_int32(acc + bias.astype(np.int64))
    return requant.apply(acc)


@dataclass(frozen=True)
class AddParams:
    """TFLM int8 ADD: inputs scaled to a shared Q(20) range, summed, then requantized."""

    input1_offset: int
    input2_offset: int
    input1_multiplier: int
    input1_shift: int
    input2_multiplier: int
    input2_shift: int
    output_multiplier: int
    output_shift: int
    output_zero_point: int
    left_shift: int = 20
    act_min: int = INT8_MIN
    act_max: int = INT8_MAX
    rounding: str = DOUBLE_ROUNDING


def add(a: np.ndarray, b: np.ndarray, p: AddParams) -> np.ndarray:
    """ADD int8 (numpy broadcasting covers TFLM's broadcast variant)."""
    a1 = (a.astype(np.int64) + p.input1_offset) << p.left_shift
    b1 = (b.astype(np.int64) + p.input2_offset) << p.left_shift
    sa = multiply_by_quantized_multiplier(a1, p.input1_multiplier, p.input1_shift, p.rounding)
    sb = multiply_by_quantized_multiplier(b1, p.input2_multiplier, p.input2_shift, p.rounding)
    raw = wrap_int32(sa + sb)
    out = multiply_by_quantized_multiplier(raw, p.output_multiplier, p.output_shift, p.rounding)
    return np.clip(out + p.output_zero_point, p.act_min, p.act_max).astype(np.int8)


def max_pool_2d(
    x: np.ndarray,
    *,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    pad: tuple[int, int],
    out_hw: tuple[int, int],
    act_min: int = INT8_MIN,
    act_max: int = INT8_MAX,
) -> np.ndarray:
    """MAX_POOL_2D int8: maximum over the window's valid taps, clamped to the activation."""
    taps = _windows(x.astype(np.int16), kernel, stride, (1, 1), pad, out_hw, -32768)
    out = np.max(np.stack(taps), axis=0)
    return np.clip(out, act_min, act_max).astype(np.int8)


def average_pool_2d(
    x: np.ndarray,
    *,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    pad: tuple[int, int],
    out_hw: tuple[int, int],
    act_min: int = INT8_MIN,
    act_max: int = INT8_MAX,
) -> np.ndarray:
    """AVERAGE_POOL_2D int8: sum of valid taps / their count, rounded half away from zero."""
    taps = _windows(x.astype(np.int64), kernel, stride, (1, 1), pad, out_hw, 0)
    ones = np.ones((1, *x.shape[1:3], 1), dtype=np.int64)
    counts = _windows(ones, kernel, stride, (1, 1), pad, out_hw, 0)
    acc = np.sum(np.stack(taps), axis=0)
    count = np.sum(np.stack(counts), axis=0)  # (1, OH, OW, 1), never 0 for valid padding
    half = count // 2
    num = np.where(acc > 0, acc + half, acc - half)
    out = _trunc_div(num, count)
    return np.clip(out, act_min, act_max).astype(np.int8)


def _trunc_div(num: np.ndarray, den: np.ndarray | int) -> np.ndarray:
    """C integer division (toward zero) of int64 arrays by positive divisors."""
    q = np.abs(num) // den
    return np.where(num < 0, -q, q)


def mean(
    x: np.ndarray,
    axes: tuple[int, ...],
    keepdims: bool,
    *,
    input_zero_point: int,
    output_zero_point: int,
    multiplier: int,
    shift: int,
    rounding: str = DOUBLE_ROUNDING,
) -> np.ndarray:
    """MEAN int8 as TFLM's reference reduce kernel (QuantizedMeanOrSum) computes it.

    The int32 sum less ``count * input_zero_point`` is requantized with the input/output scale
    ratio whose significand absorbs ``1 / count`` (shifted left by ``floor(log2(count))``, at
    most 32, then integer-divided by count). TFLM takes this path for equal input and output
    parameters too (older TFLite truncated ``sum / count`` there; the tests pin TFLM's choice).
    """
    total = np.sum(x.astype(np.int64), axis=axes, keepdims=keepdims)
    count = int(np.prod([x.shape[a] for a in axes]))
    if count == 0:
        return np.zeros(total.shape, dtype=np.int8)
    bits = count.bit_length() - 1  # 63 - CountLeadingZeros(count)
    bits = min(bits, 32, 31 + shift)
    mult = (multiplier << bits) // count  # int64 division of non-negatives
    shifted_sum = wrap_int32(total - input_zero_point * count)
    out = multiply_by_quantized_multiplier(shifted_sum, mult, shift - bits, rounding)
    return np.clip(out + output_zero_point, INT8_MIN, INT8_MAX).astype(np.int8)


def concatenation(xs: list[np.ndarray], axis: int) -> np.ndarray:
    """CONCATENATION int8: TFLM copies the int8 bytes of each input (it never requantizes)."""
    return np.concatenate(xs, axis=axis)


def pad(x: np.ndarray, paddings: np.ndarray, value: int) -> np.ndarray:
    """PAD int8 with the output zero point (or the given constant)."""
    return np.pad(x, [tuple(int(v) for v in p) for p in paddings], constant_values=value)


def quantize_float(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """QUANTIZE float32 -> int8: ``round(x / scale) + zero_point`` (half away from zero)."""
    q = np.asarray(x, dtype=np.float32) / np.float32(scale)
    rounded = np.sign(q) * np.floor(np.abs(q) + np.float32(0.5))
    with np.errstate(invalid="ignore"):
        out = np.nan_to_num(rounded, nan=0.0, posinf=2**31 - 1, neginf=-(2**31)) + zero_point
    return np.clip(out, INT8_MIN, INT8_MAX).astype(np.int8)


def requantize(
    x: np.ndarray,
    *,
    input_zero_point: int,
    output_zero_point: int,
    multiplier: int,
    shift: int,
    rounding: str = DOUBLE_ROUNDING,
) -> np.ndarray:
    """QUANTIZE int8 -> int8: ``(x - zp_in) * s_in / s_out + zp_out``, fixed point."""
    v = x.astype(np.int64) - input_zero_point
    out = multiply_by_quantized_multiplier(v, multiplier, shift, rounding) + output_zero_point
    return np.clip(out, INT8_MIN, INT8_MAX).astype(np.int8)


def dequantize(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """DEQUANTIZE int8 -> float32: ``scale * (x - zero_point)`` in double, stored as float."""
    return (float(scale) * (x.astype(np.float64) - zero_point)).astype(np.float32)


def softmax(x: np.ndarray, *, multiplier: int, left_shift: int, diff_min: int) -> np.ndarray:
    """SOFTMAX int8 -> int8 (output scale 1/256, zero point -128) over the last axis.

    TFLM's reference path: differences to the row maximum are scaled to Q5.26, exponentiated
    with gemmlowp's fixed-point exp, summed in Q12.19, and multiplied by the fixed-point
    reciprocal of the sum.
    """
    xi = x.astype(np.int64)
    diff = xi - xi.max(axis=-1, keepdims=True)
    valid = diff >= diff_min
    scaled = saturating_rounding_doubling_high_mul(wrap_int32(diff << left_shift), multiplier)
    exps = exp_on_negative_values(np.where(valid, scaled, 0))  # Q0.31
    terms = np.where(valid, rescale(exps, 0, SOFTMAX_ACCUM_INTEGER_BITS), 0)
    sum_of_exps = wrap_int32(np.sum(terms, axis=-1, keepdims=True))
    reciprocal, bits_over_unit = get_reciprocal(sum_of_exps, SOFTMAX_ACCUM_INTEGER_BITS)
    prod = saturating_rounding_doubling_high_mul(reciprocal, exps)
    unsat = rounding_divide_by_pot(prod, np.broadcast_to(bits_over_unit + 31 - 8, prod.shape))
    out = np.clip(unsat + INT8_MIN, INT8_MIN, INT8_MAX)
    return np.where(valid, out, INT8_MIN).astype(np.int8)


__all__ = [
    "INT32_MAX",
    "AddParams",
    "Requant",
    "add",
    "average_pool_2d",
    "concatenation",
    "conv_2d",
    "depthwise_conv_2d",
    "dequantize",
    "fully_connected",
    "max_pool_2d",
    "mean",
    "pad",
    "quantize_float",
    "requantize",
    "same_padding",
    "softmax",
    "valid_padding",
]
