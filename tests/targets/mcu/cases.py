"""Single-op int8 models with nasty parameters, shared by the bit-exactness tests and benchmark."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tests.targets.mcu._tfl import ACT, FLOAT32, INT8, INT32, OPT, PAD, B, Net, options

Case = tuple[bytes, np.ndarray]  # (model bytes, input batch)
BATCH = 24


def _x(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(-128, 128, (BATCH, *shape[1:])).astype(np.int8)


def _conv(rng, *, depthwise=False, mult=1, padding=PAD.SAME, stride=1, dilation=1, act=ACT.NONE,
          in_scale=0.05, in_zp=-3, out_scale=0.1, out_zp=5, bias=True, k=3, hw=9, c=3, o=4,
          per_channel=True) -> Case:  # fmt: skip
    n = Net()
    x = n.act((1, hw, hw, c), in_scale, in_zp)
    oc = c * mult if depthwise else o
    w_shape = (1, k, k, oc) if depthwise else (oc, k, k, c)
    w_scale = rng.uniform(0.001, 0.02, oc if per_channel else 1)
    w_data = rng.integers(-127, 128, w_shape).astype(np.int8)
    w = n.const(w_data, INT8, w_scale, 3 if depthwise else 0)
    ws = np.asarray(n.sg.tensors[-1].quantization.scales, np.float64)
    inputs = [x, w]
    if bias:
        b_scale = np.broadcast_to(in_scale * ws, (oc,))
        inputs.append(n.const(rng.integers(-3000, 3000, oc).astype(np.int32), INT32, b_scale,
                              0))  # fmt: skip
    eff = (k - 1) * dilation + 1
    out = (hw + stride - 1) // stride if padding == PAD.SAME else (hw - eff + stride) // stride
    y = n.act((1, out, out, oc), out_scale, out_zp)
    common = dict(padding=padding, strideW=stride, strideH=stride, dilationWFactor=dilation,
                  dilationHFactor=dilation, fusedActivationFunction=act)  # fmt: skip
    if depthwise:
        n.op(B.DEPTHWISE_CONV_2D, inputs, [y], OPT.DepthwiseConv2DOptions,
             options("DepthwiseConv2DOptionsT", depthMultiplier=mult, **common))  # fmt: skip
    else:
        n.op(B.CONV_2D, inputs, [y], OPT.Conv2DOptions, options("Conv2DOptionsT", **common))
    return n.build([x], [y]), _x(rng, (1, hw, hw, c))


def _fc(rng, *, per_channel, act=ACT.NONE, in_scale=0.02, in_zp=10, out_scale=0.07, out_zp=-20,
        k=64, o=10) -> Case:  # fmt: skip
    n = Net()
    x = n.act((1, k), in_scale, in_zp)
    ws = rng.uniform(0.002, 0.01, o if per_channel else 1)
    w = n.const(rng.integers(-127, 128, (o, k)).astype(np.int8), INT8, ws, 0)
    b = n.const(rng.integers(-5000, 5000, o).astype(np.int32), INT32,
                np.broadcast_to(in_scale * ws, (o,)), 0)  # fmt: skip
    y = n.act((1, o), out_scale, out_zp)
    n.op(B.FULLY_CONNECTED, [x, w, b], [y], OPT.FullyConnectedOptions,
         options("FullyConnectedOptionsT", fusedActivationFunction=act))  # fmt: skip
    return n.build([x], [y]), _x(rng, (1, k))


def _add(rng, s1, z1, s2, z2, so, zo, act=ACT.NONE) -> Case:
    n = Net()
    shape = (1, 6, 6, 5)
    x = n.act(shape, s1, z1)
    # the second operand comes from a requantizing QUANTIZE of x, so both are activations
    x2 = n.act(shape, s2, z2)
    n.op(B.QUANTIZE, [x], [x2])
    y = n.act(shape, so, zo)
    n.op(B.ADD, [x, x2], [y], OPT.AddOptions, options("AddOptionsT", fusedActivationFunction=act))
    return n.build([x], [y]), _x(rng, shape)


def _pool(rng, code, *, k, stride, padding, act=ACT.NONE, hw=10, c=3, scale=0.03, zp=7) -> Case:
    n = Net()
    x = n.act((1, hw, hw, c), scale, zp)
    out = (hw + stride - 1) // stride if padding == PAD.SAME else (hw - k + stride) // stride
    y = n.act((1, out, out, c), scale, zp)
    n.op(code, [x], [y], OPT.Pool2DOptions,
         options("Pool2DOptionsT", padding=padding, strideW=stride, strideH=stride,
                 filterWidth=k, filterHeight=k, fusedActivationFunction=act))  # fmt: skip
    return n.build([x], [y]), _x(rng, (1, hw, hw, c))


def _mean(rng, *, keepdims, si=0.04, zi=-7, so=0.04, zo=-7, hw=5, c=6) -> Case:
    n = Net()
    x = n.act((1, hw, hw, c), si, zi)
    axes = n.const(np.array([1, 2], dtype=np.int32), INT32)
    y = n.act((1, 1, 1, c) if keepdims else (1, c), so, zo)
    n.op(B.MEAN, [x, axes], [y], OPT.ReducerOptions, options("ReducerOptionsT", keepDims=keepdims))
    return n.build([x], [y]), _x(rng, (1, hw, hw, c))


def _reshape(rng) -> Case:
    n = Net()
    x = n.act((1, 3, 4, 5), 0.1, 3)
    shape = n.const(np.array([1, 60], dtype=np.int32), INT32)
    y = n.act((1, 60), 0.1, 3)
    n.op(
        B.RESHAPE, [x, shape], [y], OPT.ReshapeOptions, options("ReshapeOptionsT", newShape=[1, 60])
    )
    return n.build([x], [y]), _x(rng, (1, 3, 4, 5))


def _concat(rng, *, same) -> Case:
    n = Net()
    x = n.act((1, 4, 4, 3), 0.05, -10)
    x2 = n.act((1, 4, 4, 3), 0.05 if same else 0.11, -10 if same else 40)
    n.op(B.QUANTIZE, [x], [x2])
    y = n.act((1, 4, 4, 6), 0.05, -10)
    n.op(B.CONCATENATION, [x, x2], [y], OPT.ConcatenationOptions,
         options("ConcatenationOptionsT", axis=3))  # fmt: skip
    return n.build([x], [y]), _x(rng, (1, 4, 4, 3))


def _softmax(rng, *, scale, zp, beta=1.0, depth=10) -> Case:
    n = Net()
    x = n.act((1, depth), scale, zp)
    y = n.act((1, depth), 1 / 256, -128)
    n.op(B.SOFTMAX, [x], [y], OPT.SoftmaxOptions, options("SoftmaxOptionsT", beta=beta))
    return n.build([x], [y]), _x(rng, (1, depth))


def _pad(rng) -> Case:
    n = Net()
    x = n.act((1, 4, 5, 3), 0.02, 17)
    p = n.const(np.array([[0, 0], [1, 2], [2, 0], [0, 1]], dtype=np.int32), INT32)
    y = n.act((1, 7, 7, 4), 0.02, 17)
    n.op(B.PAD, [x, p], [y])
    return n.build([x], [y]), _x(rng, (1, 4, 5, 3))


def _quantize_float(rng) -> Case:
    n = Net()
    x = n.act((1, 50), 0, 0, FLOAT32)
    y = n.act((1, 50), 0.0173, -9)
    n.op(B.QUANTIZE, [x], [y])
    xs = rng.normal(0, 1.5, (BATCH, 50)).astype(np.float32)
    xs[0, :8] = np.array([0.0173 * 0.5, -0.0173 * 0.5, 0.0173 * 1.5, 100, -100, 0, 2.5, -2.5])
    return n.build([x], [y]), xs.astype(np.float32)


def _quantize_float_near_half(rng) -> Case:
    """Quotients on and just below half steps, where rounding ``|q| + 0.5`` in float32 carries
    0.49999997 up to 1 and TFLM's std::round does not (scale 1/64, so x / scale is exact)."""
    n = Net()
    x = n.act((1, 16), 0, 0, FLOAT32)
    y = n.act((1, 16), 0.015625, -9)
    n.op(B.QUANTIZE, [x], [y])
    below_half = np.nextafter(np.float32(0.5), np.float32(0))  # 0.49999997
    q = np.array([below_half, -below_half, 0.5, -0.5, 1.5, 2.5, -2.5, 3.5,
                  1 + below_half, -(2 + below_half), 7.5, -7.5, 0.25, 126.5, -119.5, 0.0],
                 dtype=np.float32)  # fmt: skip
    xs = np.tile(q * np.float32(0.015625), (BATCH, 1))
    xs[1:] += rng.normal(0, 0.01, (BATCH - 1, 16)).astype(np.float32)
    return n.build([x], [y]), xs.astype(np.float32)


def _requantize(rng, si, zi, so, zo) -> Case:
    n = Net()
    x = n.act((1, 64), si, zi)
    y = n.act((1, 64), so, zo)
    n.op(B.QUANTIZE, [x], [y])
    return n.build([x], [y]), _x(rng, (1, 64))


def _dequantize(rng) -> Case:
    n = Net()
    x = n.act((1, 64), 0.0371, -17)
    y = n.act((1, 64), 0, 0, FLOAT32)
    n.op(B.DEQUANTIZE, [x], [y])
    return n.build([x], [y]), _x(rng, (1, 64))


CASES: dict[str, Callable[[np.random.Generator], Case]] = {
    "conv_same_s2_relu": lambda r: _conv(r, stride=2, act=ACT.RELU),
    "conv_valid_dil2_relu6_tiny": lambda r: _conv(
        r,
        padding=PAD.VALID,
        dilation=2,
        act=ACT.RELU6,
        in_scale=1e-4,
        in_zp=-128,
        out_scale=3e-3,
        out_zp=127,
        bias=False,
        hw=11,
    ),
    "conv_1x1_per_tensor": lambda r: _conv(r, k=1, c=16, o=8, per_channel=False, out_zp=-100),
    "conv_5x5_s3_same": lambda r: _conv(r, k=5, stride=3, hw=13, out_scale=0.9, in_zp=100),
    "dw_same_s1": lambda r: _conv(r, depthwise=True, c=8, act=ACT.RELU),
    "dw_mult2_valid_s2_dil": lambda r: _conv(
        r, depthwise=True, c=3, mult=2, padding=PAD.VALID, stride=2, dilation=2, hw=12
    ),
    "dw_big_out_scale": lambda r: _conv(r, depthwise=True, c=5, out_scale=50.0, out_zp=-128),
    "fc_per_tensor": lambda r: _fc(r, per_channel=False),
    "fc_per_channel_relu": lambda r: _fc(r, per_channel=True, act=ACT.RELU, in_zp=-128),
    "fc_tiny_out_scale": lambda r: _fc(r, per_channel=False, out_scale=1e-3, out_zp=0, k=300),
    "add_relu": lambda r: _add(r, 0.05, -3, 0.07, 10, 0.09, -20, ACT.RELU),
    "add_ratio": lambda r: _add(r, 0.001, 120, 0.3, -128, 0.2, 0),
    "add_relu6": lambda r: _add(r, 0.04, 0, 0.04, 0, 0.03, -100, ACT.RELU6),
    "max_pool_same_3_s2": lambda r: _pool(r, B.MAX_POOL_2D, k=3, stride=2, padding=PAD.SAME),
    "max_pool_valid_2_relu": lambda r: _pool(
        r, B.MAX_POOL_2D, k=2, stride=2, padding=PAD.VALID, act=ACT.RELU
    ),
    "avg_pool_same_3_s1": lambda r: _pool(r, B.AVERAGE_POOL_2D, k=3, stride=1, padding=PAD.SAME),
    "avg_pool_valid_4_s2": lambda r: _pool(
        r, B.AVERAGE_POOL_2D, k=4, stride=2, padding=PAD.VALID, hw=11
    ),
    "mean_same_keepdims": lambda r: _mean(r, keepdims=True),
    "mean_same_flat": lambda r: _mean(r, keepdims=False, hw=7),
    "mean_requant": lambda r: _mean(r, keepdims=False, so=0.013, zo=30),
    "mean_requant_keepdims": lambda r: _mean(r, keepdims=True, si=0.5, zi=100, so=0.02, zo=-1),
    "reshape": _reshape,
    "concat_same": lambda r: _concat(r, same=True),
    "concat_different": lambda r: _concat(r, same=False),
    "softmax_small_scale": lambda r: _softmax(r, scale=0.05, zp=0),
    "softmax_large_scale": lambda r: _softmax(r, scale=0.5, zp=-20),
    "softmax_beta_depth100": lambda r: _softmax(r, scale=0.1, zp=3, beta=0.7, depth=100),
    "softmax_tiny_scale": lambda r: _softmax(r, scale=0.004, zp=10, depth=7),
    "pad": _pad,
    "quantize_float": _quantize_float,
    "quantize_float_near_half": _quantize_float_near_half,
    "requantize_up": lambda r: _requantize(r, 0.01, 5, 0.037, -20),
    "requantize_down": lambda r: _requantize(r, 0.3, -100, 0.011, 3),
    "dequantize": _dequantize,
}


def build_cases(seed: int = 0) -> dict[str, Case]:
    """Every case, built with one seeded generator per case (stable across runs)."""
    return {
        name: fn(np.random.default_rng([seed, i])) for i, (name, fn) in enumerate(CASES.items())
    }


def chain(seed: int = 0) -> Case:
    """A small CNN of every accumulating op, for per-layer (intermediate tensor) comparison."""
    rng = np.random.default_rng(seed)
    n = Net()
    x = n.act((1, 12, 12, 3), 0.02, -5)

    def conv(src, shape_in, o, scale_out, zp_out, *, depthwise=False, stride=1, act=ACT.RELU):
        c = shape_in[3]
        oc = c if depthwise else o
        w_shape = (1, 3, 3, oc) if depthwise else (oc, 3, 3, c)
        ws = rng.uniform(0.002, 0.02, oc)
        w = n.const(rng.integers(-127, 128, w_shape).astype(np.int8), INT8, ws,
                    3 if depthwise else 0)  # fmt: skip
        in_scale = float(src.quantization.scales[0])
        b = n.const(rng.integers(-2000, 2000, oc).astype(np.int32), INT32, in_scale * ws, 0)
        hw = (shape_in[1] + stride - 1) // stride
        y = n.act((1, hw, hw, oc), scale_out, zp_out)
        common = dict(padding=PAD.SAME, strideW=stride, strideH=stride, dilationWFactor=1,
                      dilationHFactor=1, fusedActivationFunction=act)  # fmt: skip
        if depthwise:
            n.op(B.DEPTHWISE_CONV_2D, [src, w, b], [y], OPT.DepthwiseConv2DOptions,
                 options("DepthwiseConv2DOptionsT", depthMultiplier=1, **common))  # fmt: skip
        else:
            n.op(
                B.CONV_2D, [src, w, b], [y], OPT.Conv2DOptions, options("Conv2DOptionsT", **common)
            )
        return y, (1, hw, hw, oc)

    a, sa = conv(x, (1, 12, 12, 3), 8, 0.05, -128)
    b, sb = conv(a, sa, 8, 0.06, -128, depthwise=True, stride=2)
    c, sc = conv(b, sb, 8, 0.08, -20, act=ACT.NONE)
    d = n.act(sc, 0.1, -10)
    n.op(B.QUANTIZE, [b], [e := n.act(sb, 0.08, -20)])
    n.op(
        B.ADD, [c, e], [d], OPT.AddOptions, options("AddOptionsT", fusedActivationFunction=ACT.RELU)
    )
    p = n.act((1, 3, 3, 8), 0.1, -10)
    n.op(B.MAX_POOL_2D, [d], [p], OPT.Pool2DOptions,
         options("Pool2DOptionsT", padding=PAD.VALID, strideW=2, strideH=2, filterWidth=2,
                 filterHeight=2))  # fmt: skip
    axes = n.const(np.array([1, 2], dtype=np.int32), INT32)
    g = n.act((1, 8), 0.1, -10)
    n.op(B.MEAN, [p, axes], [g], OPT.ReducerOptions, options("ReducerOptionsT", keepDims=False))
    ws = rng.uniform(0.002, 0.02, 1)
    w = n.const(rng.integers(-127, 128, (5, 8)).astype(np.int8), INT8, ws, 0)
    bias = n.const(rng.integers(-500, 500, 5).astype(np.int32), INT32, 0.1 * ws, 0)
    f = n.act((1, 5), 0.07, 3)
    n.op(B.FULLY_CONNECTED, [g, w, bias], [f], OPT.FullyConnectedOptions,
         options("FullyConnectedOptionsT"))  # fmt: skip
    s = n.act((1, 5), 1 / 256, -128)
    n.op(B.SOFTMAX, [f], [s], OPT.SoftmaxOptions, options("SoftmaxOptionsT", beta=1.0))
    return n.build([x], [s]), _x(rng, (1, 12, 12, 3))
