"""TFLite Micro's int8 reference kernels as vectorised numpy functions (batch vectorised too).

Each kernel takes int8 arrays in TFLite's layout (NHWC activations, OHWI convolution filters,
``(1, KH, KW, C * M)`` depthwise filters, ``(O, I)`` fully connected weights) and explicit
quantization parameters, and returns exactly what TFLM's reference kernel stores. The
interpreter (``interpreter.py``) derives the parameters from a model the way TFLM's ``Prepare``
functions do.

Accumulation: convolutions and fully connected layers sum int8 x int8 products through BLAS
in float32 or float64 (``exact_float_dtype`` picks the narrowest one that is exact for the layer
and proves why), depthwise convolutions in int32; the sums are then the exact integers TFLM's
int32 accumulators hold (wrapped to int32 where they could overflow). The batch runs in chunks
of ``CHUNK_VALUES`` so temporaries stay small.

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
        """int32 accumulators (channels last, int64 array) -> int8 outputs."""
        out = multiply_by_quantized_multiplier(acc, self.multiplier, self.shift, self.rounding)
        return _clamp_to_int8(out, self.output_zero_point, self.act_min, self.act_max)

    def apply_in_slices(
        self, acc: np.ndarray, offset: np.ndarray, may_overflow: bool
    ) -> np.ndarray:
        """``apply_channels_first`` over column slices of about CHUNK_OUTPUTS values, so the
        int64 temporaries of each slice stay in cache."""
        c, r = acc.shape
        step = max(1, CHUNK_OUTPUTS // c)
        if r <= step:
            return self.apply_channels_first(acc, offset, may_overflow)
        out = np.empty((c, r), dtype=np.int8)
        for k in range(0, r, step):
            out[:, k : k + step] = self.apply_channels_first(acc[:, k : k + step], offset,
                                                            may_overflow)  # fmt: skip
        return out

    def apply_channels_first(
        self, acc: np.ndarray, offset: np.ndarray, may_overflow: bool
    ) -> np.ndarray:
        """(C, R) accumulators plus a per-channel int offset (C,) -> (C, R) int8.

        ``acc`` holds exact integers (float or int dtype) that still lack ``offset`` (bias
        less the input zero point's share); their sum is TFLM's int32 accumulator, wrapped to
        int32 when ``may_overflow``. Channels first, so every numpy pass runs along R with
        one constant per channel.
        """
        c = acc.shape[0]
        mult = np.broadcast_to(self.multiplier, (c,)).reshape(c, 1)
        shift = np.broadcast_to(self.shift, (c,)).reshape(c, 1)
        right = -shift
        fast = (
            self.rounding == DOUBLE_ROUNDING
            and not may_overflow
            and mult.min() >= 0
            and mult.max() <= INT32_MAX
            and shift.max() <= 0
            and right.max() <= 31
        )
        if not fast:
            total = acc.astype(np.int64)
            total += offset.reshape(c, 1)
            if may_overflow:
                total = wrap_int32(total)
            out = multiply_by_quantized_multiplier(total, mult, shift, self.rounding)
            return _clamp_to_int8(out, self.output_zero_point, self.act_min, self.act_max)
        # Fused double rounding (fixedpoint._double_rounding_fast proves the two steps for
        # P = v*M + 2**30, v = acc + offset): high = P >> 31, result = (high + half + neg) >> e
        # with neg = -1 for high < 0 (e > 0). Since (P >> 31) + k == (P + k * 2**31) >> 31 and
        # (a >> 31) >> e == a >> (31 + e), result = (P + (half + neg) * 2**31) >> (31 + e), and
        # P's sign is high's. Magnitudes: no overflow means |acc|, |offset|, |v| < 2**31, so
        # |acc*M|, |offset*M|, |P| < 2**62 and adding half * 2**31 <= 2**61 stays in int64.
        p = acc.astype(np.int64)
        p *= mult
        p += offset.reshape(c, 1).astype(np.int64) * mult + (1 << 30)
        neg = p >> 63  # -1 where negative
        neg &= np.where(right > 0, -(1 << 31), 0)  # neg * 2**31, only where e > 0
        neg += ((np.int64(1) << right) >> 1) << 31  # half * 2**31
        p += neg
        p >>= 31 + right
        return _clamp_to_int8(p, self.output_zero_point, self.act_min, self.act_max)


def _clamp_to_int8(out: np.ndarray, zero_point: int, act_min: int, act_max: int) -> np.ndarray:
    """``clip(out + zero_point, act_min, act_max)`` as int8 (``out`` is int64 and consumed).

    Clamps before adding the zero point, then adds it in int8: the clamped values lie in
    [act_min - zp, act_max - zp], so int8 arithmetic (mod 256) lands exactly on the result
    in [act_min, act_max]. One int64 pass fewer than adding first.
    """
    np.clip(out, act_min - zero_point, act_max - zero_point, out=out)
    y = out.astype(np.int8)
    y += np.int8(zero_point)
    return y


# Output values per batch chunk (at least one sample): the int64 requantization temporaries
# of a chunk (1 MB) stay near a core's L2 cache; im2col buffers are capped separately. Tuned
# on the captured reference models at batch 256 (2^15 to 2^19 tried; CPU seconds).
CHUNK_OUTPUTS = 1 << 17
CHUNK_VALUES = 1 << 21
_FLOAT32_EXACT = 2**24  # every integer of magnitude <= 2**24 is a float32
_FLOAT64_EXACT = 2**53


def exact_float_dtype(weights: np.ndarray, max_abs_input: int) -> np.dtype | None:
    """The narrowest float dtype in which a BLAS dot product of int8 data is exact, or None.

    ``weights`` is (O, K) int8; the inputs are integers with ``|x| <= max_abs_input``.

    Proof: every product ``x_k * w_ok`` is an integer of magnitude ``<= max_abs_input *
    |w_ok|``. Whatever order and blocking BLAS sums in (with or without fused multiply-add),
    each partial sum is the sum of a subset of one row's products, so an integer of magnitude
    ``<= B = max_abs_input * max_o sum_k |w_ok|``. If ``B <= 2**24`` (float32) or ``2**53``
    (float64) every product and partial sum is representable, so every rounding step is exact
    and the float result is the integer sum. For int8 data ``B <= 128 * 127 * K``: float32
    covers any K up to 1032 (worst case; real weights allow far more), float64 any K below
    5.5e11, i.e. every layer a microcontroller can hold.

    >>> exact_float_dtype(np.full((4, 576), 127, np.int8), 128)  # 128 * 127 * 576 < 2**24
    dtype('float32')
    >>> exact_float_dtype(np.full((4, 2048), 127, np.int8), 128)  # K above 1032
    dtype('float64')
    """
    l1 = np.abs(weights.reshape(weights.shape[0], -1).astype(np.int64)).sum(axis=1)
    bound = int(max_abs_input) * int(l1.max(initial=0))
    if bound <= _FLOAT32_EXACT:
        return np.dtype(np.float32)
    if bound <= _FLOAT64_EXACT:
        return np.dtype(np.float64)
    return None


def _dot(a: np.ndarray, b: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
    """``a @ b`` of integer-valued arrays, exactly (float BLAS when ``dtype`` allows)."""
    if dtype is None:
        return a.astype(np.int64) @ b.astype(np.int64)
    return a.astype(dtype, copy=False) @ b.astype(dtype, copy=False)


def _offset(
    filters_2d: np.ndarray, bias: np.ndarray | None, zero_point: int
) -> tuple[np.ndarray, bool]:
    """Per output channel ``bias - zero_point * sum(w)`` and whether int32 could overflow.

    The kernels multiply raw int8 inputs (padded with the zero point) and add this offset,
    which equals TFLM's ``sum((x - zp) * w) + bias``. TFLM's int32 sum wraps; the int64 sum
    wrapped at the end is the same number (two's complement addition is modular), so the
    wrap is needed only when ``255 * sum|w| + |bias|`` could leave the int32 range.
    """
    w = filters_2d.astype(np.int64)
    b = np.zeros(w.shape[0], np.int64) if bias is None else bias.astype(np.int64).reshape(-1)
    b = np.broadcast_to(b, (w.shape[0],))
    offset = b - zero_point * w.sum(axis=1)
    bound = 255 * np.abs(w).sum(axis=1) + np.abs(b)
    return offset, bool(bound.max(initial=0) >= 2**31)


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


def _pad_nhwc(
    x: np.ndarray,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    pad: tuple[int, int],
    out: tuple[int, int],
    fill: int,
) -> np.ndarray:
    """``x`` padded with ``fill`` before (``pad``) and after (what the windows still need)."""
    _n, h, w, _c = x.shape
    need_h = (out[0] - 1) * stride[0] + (kernel[0] - 1) * dilation[0] + 1
    need_w = (out[1] - 1) * stride[1] + (kernel[1] - 1) * dilation[1] + 1
    after_h = max(need_h - h - pad[0], 0)
    after_w = max(need_w - w - pad[1], 0)
    if not (pad[0] or pad[1] or after_h or after_w):
        return x
    return np.pad(x, ((0, 0), (pad[0], after_h), (pad[1], after_w), (0, 0)), constant_values=fill)


def _tap(xp: np.ndarray, kh: int, kw: int, stride, dilation, out, h_axis: int = 1) -> np.ndarray:
    """The strided view of padded ``xp`` that kernel tap (kh, kw) reads: (N, OH, OW, C) for
    NHWC, or (C, N, OH, OW) with ``h_axis=2``."""
    h0, w0 = kh * dilation[0], kw * dilation[1]
    index = [slice(None)] * xp.ndim
    index[h_axis] = slice(h0, h0 + (out[0] - 1) * stride[0] + 1, stride[0])
    index[h_axis + 1] = slice(w0, w0 + (out[1] - 1) * stride[1] + 1, stride[1])
    return xp[tuple(index)]


def _chunks(n: int, outputs_per_sample: int, values_per_sample: int = 0) -> list[slice]:
    """Sample ranges holding about CHUNK_OUTPUTS outputs (and CHUNK_VALUES im2col values)."""
    step = min(
        CHUNK_OUTPUTS // max(outputs_per_sample, 1), CHUNK_VALUES // max(values_per_sample, 1)
    )
    step = max(1, step)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


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

    Taps outside the input are skipped in TFLM; padding with the input zero point gives them
    a zero ``(x - zp) * w`` too. im2col of the raw int8 values (one strided copy per tap into
    a float buffer), one BLAS matmul per batch chunk, the zero point folded into the bias.
    """
    o, kh, kw, c = filters.shape
    groups = x.shape[3] // c
    n = x.shape[0]
    oh, ow = out_hw
    out = np.empty((n, oh, ow, o), dtype=np.int8)
    og = o // groups
    for g in range(groups):
        xg = x if groups == 1 else x[..., g * c : (g + 1) * c]
        fg = filters[g * og : (g + 1) * og].reshape(og, kh * kw * c)
        bg = None if bias is None else bias[g * og : (g + 1) * og]
        rq = requant if groups == 1 else _requant_slice(requant, slice(g * og, (g + 1) * og))
        out[..., g * og : (g + 1) * og] = _conv_group(
            xg, fg, bg, (kh, kw), input_zero_point, stride, dilation, pad, out_hw, rq
        )
    return out


def _requant_slice(r: Requant, sel: slice) -> Requant:
    mult = r.multiplier if r.multiplier.size == 1 else r.multiplier[sel]
    shift = r.shift if r.shift.size == 1 else r.shift[sel]
    return Requant(mult, shift, r.output_zero_point, r.act_min, r.act_max, r.rounding)


def _conv_group(x, w2d, bias, kernel, zp, stride, dilation, pad, out_hw, requant) -> np.ndarray:
    """One group of CONV_2D: x (N,H,W,C) int8, w2d (O, KH*KW*C) int8 -> (N,OH,OW,O) int8.

    im2col channels first: the input is transposed once to (C, N, H, W), each tap copies a
    (C, n, OH, OW) block into rows of a (KH*KW*C, n*OH*OW) float matrix (long contiguous
    runs even for C = 3), and ``w2d @ cols`` gives (O, rows) for the requantization.
    """
    (kh, kw), (oh, ow) = kernel, out_hw
    n, c, o = x.shape[0], x.shape[3], w2d.shape[0]
    dtype = exact_float_dtype(w2d, 128)  # raw int8 inputs: |x| <= 128
    work = np.float64 if dtype is None else dtype
    w = w2d.astype(work)  # (O, K), K ordered (kh, kw, c)
    offset, may_overflow = _offset(w2d, bias, zp)
    out = np.empty((n, oh, ow, o), dtype=np.int8)
    pointwise = (kh, kw) == (1, 1) and stride == (1, 1) and (oh, ow) == x.shape[1:3]
    xp = x if pointwise else _pad_nhwc(x, kernel, stride, dilation, pad, out_hw, zp)
    xc = np.ascontiguousarray(xp.transpose(3, 0, 1, 2))  # (C, N, H, W)
    for sl in _chunks(n, oh * ow * o, oh * ow * kh * kw * c):
        m = sl.stop - sl.start
        if pointwise:  # 1x1, stride 1: the input is already the im2col matrix
            cols = xc[:, sl].reshape(c, m * oh * ow).astype(work)
        else:
            cols = np.empty((kh * kw, c, m, oh, ow), dtype=work)
            for i in range(kh):
                for j in range(kw):
                    cols[i * kw + j] = _tap(xc[:, sl], i, j, stride, dilation, out_hw, h_axis=2)
            cols = cols.reshape(kh * kw * c, m * oh * ow)
        acc = _dot(w, cols, dtype)  # (O, rows): channels first for the requantization
        y = requant.apply_in_slices(acc, offset, may_overflow)
        out[sl] = y.reshape(o, m, oh, ow).transpose(1, 2, 3, 0)
    return out


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
    """DEPTHWISE_CONV_2D int8 per channel: filters (1,KH,KW,C*M); output channel c*M + m.

    KH*KW vectorised multiply-adds over strided views of the padded input, one batch chunk at
    a time, in int32 (the input is widened once: int8 x int32 passes take numpy's slow
    buffered casting loop). Exact: each product is at most 128 * 127 in magnitude, so any
    kernel under 132,000 taps sums in int32 without overflow.
    """
    _, kh, kw, oc = filters.shape
    n = x.shape[0]
    oh, ow = out_hw
    if depth_multiplier > 1:
        x = np.repeat(x, depth_multiplier, axis=3)  # channel c*M + m reads input channel c
    f = filters.reshape(kh * kw, oc).astype(np.int32)
    offset, may_overflow = _offset(f.T, bias, input_zero_point)
    xp = _pad_nhwc(x, (kh, kw), stride, dilation, pad, out_hw, input_zero_point)
    if oc < DEPTHWISE_CHANNELS_FIRST_BELOW:
        return _depthwise_channels_first(xp, f, offset, may_overflow, stride, dilation, out_hw,
                                         (kh, kw), requant)  # fmt: skip
    xp = xp.astype(np.int32)
    out = np.empty((n, oh, ow, oc), dtype=np.int8)
    for sl in _chunks(n, oh * ow * oc):
        m = sl.stop - sl.start
        acc = np.zeros((m, oh, ow, oc), dtype=np.int32)
        tmp = np.empty_like(acc)
        for i in range(kh):
            for j in range(kw):
                np.multiply(_tap(xp[sl], i, j, stride, dilation, out_hw), f[i * kw + j], out=tmp)
                acc += tmp
        y = requant.apply_channels_first(acc.reshape(-1, oc).T, offset, may_overflow)
        out[sl] = y.T.reshape(m, oh, ow, oc)
    return out


# Below this many channels a channels-last pass has too short an inner loop: channels first
# runs along output rows instead (tuned like CHUNK_OUTPUTS: 32, 64, 128 tried; MobileNet's
# 48x48x8 layer went from 116 to 85 ms at batch 256).
DEPTHWISE_CHANNELS_FIRST_BELOW = 64


def _depthwise_channels_first(xp, f, offset, may_overflow, stride, dilation, out_hw, kernel,
                              requant: Requant) -> np.ndarray:  # fmt: skip
    """Depthwise taps on a (C, N, H, W) int32 copy: each pass runs along output rows."""
    (kh, kw), (oh, ow) = kernel, out_hw
    n, oc = xp.shape[0], xp.shape[3]
    xc = np.ascontiguousarray(xp.transpose(3, 0, 1, 2), dtype=np.int32)  # (C, N, Hp, Wp)
    fc = f.T.reshape(oc, kh * kw, 1, 1, 1)  # one weight per channel and tap
    out = np.empty((n, oh, ow, oc), dtype=np.int8)
    for sl in _chunks(n, oh * ow * oc):
        m = sl.stop - sl.start
        acc = np.zeros((oc, m, oh, ow), dtype=np.int32)
        tmp = np.empty_like(acc)
        for i in range(kh):
            for j in range(kw):
                tap = _tap(xc[:, sl], i, j, stride, dilation, out_hw, h_axis=2)
                np.multiply(tap, fc[:, i * kw + j], out=tmp)
                acc += tmp
        y = requant.apply_channels_first(acc.reshape(oc, -1), offset, may_overflow)
        out[sl] = y.reshape(oc, m, oh, ow).transpose(1, 2, 3, 0)
    return out


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
    o, i = weights.shape
    rows = x.reshape(-1, i)
    if weight_zero_point != 0:  # rare (int8 weights are symmetric): shift both operands.
        # float64 is exact here: |products| <= 255 * 255, so any I below 1.3e11 (see
        # exact_float_dtype's proof)
        wf = weights.astype(np.int64) - weight_zero_point
        acc = _dot(rows.astype(np.int64) - input_zero_point, wf.T, np.dtype(np.float64))
        acc = wrap_int32(acc.astype(np.int64))
        if bias is not None:
            acc = wrap_int32(acc + bias.astype(np.int64))
        return requant.apply(acc)
    dtype = exact_float_dtype(weights, 128)
    w = weights.astype(np.float64 if dtype is None else dtype)
    offset, may_overflow = _offset(weights, bias, input_zero_point)
    out = np.empty((rows.shape[0], o), dtype=np.int8)
    for sl in _chunks(rows.shape[0], 0, i):
        acc = _dot(w, rows[sl].T, dtype)  # (O, rows)
        out[sl] = requant.apply_in_slices(acc, offset, may_overflow).T
    return out


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
    """ADD int8 (numpy broadcasting covers TFLM's broadcast variant).

    The output is a function of the two int8 inputs alone, so large inputs go through a
    65,536-entry table of ``add_reference`` over every (a, b) pair: exact by construction.
    """
    if a.dtype != np.int8 or b.dtype != np.int8 or max(a.size, b.size) < 1 << 16:
        return add_reference(a, b, p)
    grid = np.arange(-128, 128, dtype=np.int64)
    table = add_reference(grid[:, None], grid[None, :], p).reshape(-1)  # [a + 128, b + 128]
    index = a.astype(np.int32) + 128
    index <<= 8
    index = index + (b.astype(np.int32) + 128)  # broadcasts
    return table[index]


def add_reference(a: np.ndarray, b: np.ndarray, p: AddParams) -> np.ndarray:
    """ADD int8 computed step by step as TFLM's reference kernel does."""
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
    xp = _pad_nhwc(x.astype(np.int16), kernel, stride, (1, 1), pad, out_hw, -32768)
    out = _tap(xp, 0, 0, stride, (1, 1), out_hw).copy()
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            if i or j:
                np.maximum(out, _tap(xp, i, j, stride, (1, 1), out_hw), out=out)
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
    xp = _pad_nhwc(x.astype(np.int64), kernel, stride, (1, 1), pad, out_hw, 0)
    ones = _pad_nhwc(np.ones((1, *x.shape[1:3], 1), np.int64), kernel, stride, (1, 1), pad,
                     out_hw, 0)  # fmt: skip
    acc = np.zeros((x.shape[0], *out_hw, x.shape[3]), dtype=np.int64)
    count = np.zeros((1, *out_hw, 1), dtype=np.int64)  # never 0 for SAME or VALID padding
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            acc += _tap(xp, i, j, stride, (1, 1), out_hw)
            count += _tap(ones, i, j, stride, (1, 1), out_hw)
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
    q = np.asarray(x, dtype=np.float32) / np.float32(scale)  # float32, as TFLM divides
    # std::round of a float32: |q| + 0.5 taken in float64, where it is exact (in float32,
    # 0.49999997 + 0.5 rounds up to 1.0 and the result would be 1, not 0)
    rounded = np.sign(q) * np.floor(np.abs(q).astype(np.float64) + 0.5)
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
    "add_reference",
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
