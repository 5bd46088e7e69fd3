"""The fast kernels against the slow exact integer path, value for value.

Tolerance: zero. The fast kernels only change how exact integer arithmetic is carried out
(float BLAS where ``exact_float_dtype`` proves it exact, fused requantization, int32 taps,
lookup tables, batch chunks), never what is computed.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgekiln.targets.mcu import fixedpoint as fp
from edgekiln.targets.mcu import kernels as K
from edgekiln.targets.mcu.fixedpoint import quantize_multipliers
from tests.targets.mcu import reference_kernels as R

I32_MIN, I32_MAX = -(2**31), 2**31 - 1


def _requant(rng, channels, *, low=1e-4, high=0.05, zp=None, act=(-128, 127)):
    mult, shift = quantize_multipliers(rng.uniform(low, high, channels))
    zero_point = int(rng.integers(-128, 128)) if zp is None else zp
    return K.Requant(mult, shift, zero_point, *act)


def test_fast_double_rounding_equals_the_composed_primitives():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.integers(I32_MIN, I32_MAX, 50_000, endpoint=True),
                        [I32_MIN, I32_MAX, 0, -1, 1, 2**30, -(2**30)]])  # fmt: skip
    for trial in range(200):
        c = int(rng.integers(1, 6))
        xs = rng.choice(x, (400, c))
        mult = rng.integers(0, 2**31, c)
        mult[0] = rng.choice([0, 2**30, I32_MAX, mult[0]])
        shift = rng.integers(-35, 8, c) if trial % 2 else np.full(c, rng.integers(-31, 1))
        fast = fp.multiply_by_quantized_multiplier(xs, mult, shift)
        ref = fp.multiply_by_quantized_multiplier_reference(xs, mult, shift)
        assert np.array_equal(fast, ref), (trial, mult, shift)


def test_fused_channels_first_requantization_equals_apply():
    rng = np.random.default_rng(1)
    for trial in range(60):
        c = int(rng.integers(1, 9))
        rq = _requant(rng, c, low=1e-6 if trial % 3 else 0.3, high=0.9)
        acc = rng.integers(-(2**30), 2**30, (c, 500))
        acc[:, :4] = [-(2**30), 2**30 - 1, 0, -1]
        offset = rng.integers(-(2**30), 2**30, c)
        expected = rq.apply((acc + offset[:, None]).T).T
        for dtype in (np.int64, np.float64):
            got = rq.apply_channels_first(acc.astype(dtype), offset, may_overflow=False)
            assert np.array_equal(got, expected), trial
    # the wrap-around path (accumulators leave int32) goes through the general route
    acc = np.array([[2**31 - 10, -(2**31)]], np.int64)
    offset = np.array([100])
    rq = _requant(rng, 1)
    got = rq.apply_channels_first(acc, offset, may_overflow=True)
    assert np.array_equal(got, rq.apply(fp.wrap_int32(acc + 100).T).T)


def test_exact_float_dtype_bounds():
    assert K.exact_float_dtype(np.full((2, 1032), 127, np.int8), 128) == np.float32
    assert K.exact_float_dtype(np.full((2, 1033), 127, np.int8), 128) == np.float64
    assert K.exact_float_dtype(np.zeros((2, 3), np.int8), 128) == np.float32


CONV_CASES = {  # name: (x shape NHWC, filter OHWI, stride, dilation, pad, weight range)
    "3x3_s1_same": ((5, 9, 9, 3), (4, 3, 3, 3), (1, 1), (1, 1), (1, 1), 127),
    "5x5_s3": ((3, 13, 11, 6), (7, 5, 5, 6), (3, 3), (1, 1), (2, 2), 127),
    "dilated_valid": ((2, 12, 12, 2), (3, 3, 3, 2), (1, 1), (2, 2), (0, 0), 127),
    "pointwise": ((4, 6, 7, 16), (8, 1, 1, 16), (1, 1), (1, 1), (0, 0), 127),
    "pointwise_s2": ((4, 7, 7, 5), (6, 1, 1, 5), (2, 2), (1, 1), (0, 0), 127),
    "float64_path": ((2, 6, 6, 130), (3, 3, 3, 130), (1, 1), (1, 1), (1, 1), 127),  # K=1170
    "grouped": ((3, 8, 8, 8), (6, 3, 3, 4), (1, 1), (1, 1), (1, 1), 127),
    "rect_kernel": ((3, 49, 10, 1), (16, 10, 4, 1), (2, 2), (1, 1), (4, 1), 127),
}


def _out_hw(x_shape, f_shape, stride, dilation, pad):
    h, w = x_shape[1:3]
    kh, kw = f_shape[1:3]
    eff = ((kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1)
    return ((h + 2 * pad[0] - eff[0]) // stride[0] + 1, (w + 2 * pad[1] - eff[1]) // stride[1] + 1)


@pytest.mark.parametrize("name", sorted(CONV_CASES))
def test_conv_2d_equals_the_integer_reference(name, monkeypatch):
    monkeypatch.setattr(K, "CHUNK_OUTPUTS", 300)  # several batch chunks and requant slices
    monkeypatch.setattr(K, "CHUNK_VALUES", 2000)
    x_shape, f_shape, stride, dilation, pad, wmax = CONV_CASES[name]
    rng = np.random.default_rng(len(name))
    x = rng.integers(-128, 128, x_shape).astype(np.int8)
    w = rng.integers(-wmax, wmax + 1, f_shape).astype(np.int8)
    b = rng.integers(-20_000, 20_000, f_shape[0]).astype(np.int32)
    kw = dict(input_zero_point=int(rng.integers(-128, 128)), stride=stride, dilation=dilation,
              pad=pad, out_hw=_out_hw(x_shape, f_shape, stride, dilation, pad),
              requant=_requant(rng, f_shape[0], act=(-100, 90)))  # fmt: skip
    assert np.array_equal(K.conv_2d(x, w, b, **kw), R.conv_2d(x, w, b, **kw))
    assert np.array_equal(K.conv_2d(x, w, None, **kw), R.conv_2d(x, w, None, **kw))


@pytest.mark.parametrize(
    ("shape", "mult", "stride", "dilation", "pad"),
    [((4, 9, 9, 8), 1, (1, 1), (1, 1), (1, 1)), ((3, 12, 10, 3), 2, (2, 2), (2, 2), (0, 0)),
     ((5, 25, 5, 64), 1, (1, 1), (1, 1), (1, 1)), ((2, 7, 7, 5), 3, (2, 1), (1, 1), (1, 1))],
)  # fmt: skip
def test_depthwise_equals_the_integer_reference(shape, mult, stride, dilation, pad, monkeypatch):
    monkeypatch.setattr(K, "CHUNK_OUTPUTS", 500)
    rng = np.random.default_rng(shape[0])
    x = rng.integers(-128, 128, shape).astype(np.int8)
    oc = shape[3] * mult
    w = rng.integers(-128, 128, (1, 3, 3, oc)).astype(np.int8)  # includes -128 weights
    b = rng.integers(-5000, 5000, oc).astype(np.int32)
    f_shape = (oc, 3, 3, shape[3])
    kw = dict(input_zero_point=int(rng.integers(-128, 128)), depth_multiplier=mult,
              stride=stride, dilation=dilation, pad=pad,
              out_hw=_out_hw(shape, f_shape, stride, dilation, pad),
              requant=_requant(rng, oc))  # fmt: skip
    got = K.depthwise_conv_2d(x, w, b, **kw)
    assert np.array_equal(got, R.depthwise_conv_2d(x, w, b, **kw))


@pytest.mark.parametrize("weight_zero_point", [0, 3])
def test_fully_connected_equals_the_integer_reference(weight_zero_point, monkeypatch):
    monkeypatch.setattr(K, "CHUNK_VALUES", 1000)
    rng = np.random.default_rng(7)
    x = rng.integers(-128, 128, (37, 300)).astype(np.int8)
    w = rng.integers(-127, 128, (10, 300)).astype(np.int8)
    b = rng.integers(-(2**31), 2**31 - 1, 10).astype(np.int32)  # huge biases: int32 wraps
    kw = dict(input_zero_point=-7, weight_zero_point=weight_zero_point,
              requant=_requant(rng, 1))  # fmt: skip
    assert np.array_equal(K.fully_connected(x, w, b, **kw), R.fully_connected(x, w, b, **kw))


def test_add_lookup_table_equals_the_step_by_step_kernel():
    rng = np.random.default_rng(3)
    a = rng.integers(-128, 128, (70_000,)).astype(np.int8)
    b = rng.integers(-128, 128, (70_000,)).astype(np.int8)
    for s1, s2, so in ((0.05, 0.07, 0.09), (0.001, 0.3, 0.2), (0.04, 0.04, 0.03)):
        twice = 2 * max(s1, s2)
        m1, sh1 = fp.quantize_multiplier(s1 / twice)
        m2, sh2 = fp.quantize_multiplier(s2 / twice)
        mo, sho = fp.quantize_multiplier(twice / ((1 << 20) * so))
        p = K.AddParams(3, -10, m1, sh1, m2, sh2, mo, sho, -20, 20, -100, 127)
        assert np.array_equal(K.add(a, b, p), K.add_reference(a, b, p))
        broadcast = b[:16].reshape(1, 16)
        assert np.array_equal(K.add(a.reshape(-1, 16)[:4096], broadcast, p),
                              K.add_reference(a.reshape(-1, 16)[:4096], broadcast, p))  # fmt: skip
