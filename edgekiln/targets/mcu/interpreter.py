"""The integer interpreter: runs an int8 TFLite model op by op with TFLM's reference kernels.

``simulate`` reads the model (``edgekiln.formats.tflite``), derives each operator's fixed-point
parameters exactly as TFLM's ``Prepare`` functions do (multipliers from float32 scales widened
to double, activation ranges from ``round(x / scale)``), and runs the numpy kernels of
``kernels.py`` on the whole batch at once. It is pure numpy: no child process is needed, and a
malformed model raises ``SimulationError`` naming the operator and tensor instead of crashing.

>>> import numpy as np
>>> from edgekiln.targets.mcu.interpreter import SUPPORTED_OPS
>>> "CONV_2D" in SUPPORTED_OPS and "SOFTMAX" in SUPPORTED_OPS
True
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.formats.tflite import TfliteModel, TfliteOperator, TfliteTensor, read_tflite
from edgekiln.targets.mcu import kernels as K
from edgekiln.targets.mcu.fixedpoint import (
    DOUBLE_ROUNDING,
    _round_half_away,
    preprocess_softmax_scaling,
    quantize_multiplier,
    quantize_multipliers,
)


class SimulationError(ValueError):
    """A model the simulator cannot run; the message names the operator, tensor and rule."""


@dataclass
class SimResult:
    """What one ``simulate`` call produced.

    ``outputs`` holds every model output in the model's own layout (NHWC for images), batch
    first. ``tensors`` maps tensor names to values (graph inputs, outputs and, with
    ``keep_intermediates=True``, every activation), ``order`` lists them in execution order.
    """

    outputs: list[np.ndarray]
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)

    @property
    def output(self) -> np.ndarray:
        """The first output."""
        return self.outputs[0]


def load_model(model: TfliteModel | bytes | bytearray | str | Path) -> TfliteModel:
    """A TfliteModel from a model, its bytes or a path (FileNotFoundError names a missing file)."""
    if isinstance(model, TfliteModel):
        return model
    if isinstance(model, str | Path):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"TFLite model {str(path)!r} does not exist; export it first")
        return read_tflite(path)
    return read_tflite(bytes(model))


def simulate(
    model: TfliteModel | bytes | str | Path,
    x_int8: np.ndarray,
    keep_intermediates: bool = False,
    *,
    rounding: str = DOUBLE_ROUNDING,
) -> SimResult:
    """Run ``model`` on the batch ``x_int8`` (the model's input layout and dtype, batch first).

    >>> from edgekiln.formats.tflite import read_tflite  # doctest: +SKIP
    >>> simulate("model.tflite", x).output.shape  # doctest: +SKIP
    (8, 10)
    """
    m = load_model(model)
    if len(m.inputs) != 1:
        raise SimulationError(
            f"the simulator runs single-input models; this one has {len(m.inputs)}"
        )
    inp = m.tensor(m.inputs[0])
    x = np.asarray(x_int8)
    _check_input(inp, x)
    unsupported = sorted({op.opcode for op in m.operators} - set(SUPPORTED_OPS))
    if unsupported:
        raise SimulationError(
            f"the MCU simulator does not support {', '.join(unsupported)}; "
            f"it supports {', '.join(sorted(SUPPORTED_OPS))}"
        )
    with _one_blas_thread():
        values, order = _run_operators(m, inp, x, rounding)
    outputs = []
    for i in m.outputs:
        if i not in values:
            raise SimulationError(f"model output tensor {i} is never written by an operator")
        outputs.append(values[i])
    keep = set(values) if keep_intermediates else {inp.index, *m.outputs}
    tensors = {m.tensor(i).name: v for i, v in values.items() if i in keep}
    return SimResult(outputs, tensors, [n for n in order if n in tensors])


def _one_blas_thread() -> contextlib.AbstractContextManager:
    """Limit BLAS to one thread while the kernels run, when threadpoolctl is installed.

    The kernels make many mid-sized BLAS calls between numpy passes; OpenBLAS's worker
    threads spin between them. Measured on the 2-core development machine under load
    (benchmarks/mcu_sim.py): 2-6x more CPU time and up to 4x more wall time than one thread.
    Without threadpoolctl (scikit-learn's dependency) BLAS keeps its default.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _run_operators(
    m: TfliteModel, inp: TfliteTensor, x: np.ndarray, rounding: str
) -> tuple[dict[int, np.ndarray], list[str]]:
    values: dict[int, np.ndarray] = {inp.index: x}
    order = [inp.name]
    for op in m.operators:
        ctx = _OpContext(m, op, values, rounding)
        try:
            out = SUPPORTED_OPS[op.opcode](ctx)
        except SimulationError:
            raise
        except (ValueError, IndexError, TypeError, KeyError, OverflowError) as e:
            raise SimulationError(f"{ctx.where}: {type(e).__name__}: {e}") from e
        out_t = ctx.tensor_at(op.outputs[0])
        if out.dtype != out_t.dtype:
            raise SimulationError(
                f"{ctx.where}: output tensor {out_t.name!r} is {out_t.dtype}, "
                f"the kernel gave {out.dtype}"
            )
        values[out_t.index] = out
        order.append(out_t.name)
    return values, order


def _check_input(inp: TfliteTensor, x: np.ndarray) -> None:
    if x.dtype != inp.dtype:
        raise ValueError(
            f"model input {inp.name!r} is {inp.dtype}; got {x.dtype} data. Quantize with the "
            "input's scale and zero point first (run_mcu does this for float data)"
        )
    if x.ndim != len(inp.shape) or tuple(x.shape[1:]) != tuple(inp.shape[1:]):
        raise ValueError(
            f"model input {inp.name!r} has shape {tuple(inp.shape)} (batch first); got data "
            f"of shape {x.shape}. Pass (N, {', '.join(map(str, inp.shape[1:]))})"
        )
    if x.shape[0] == 0:
        raise ValueError("the batch is empty; pass at least one sample")


class _OpContext:
    """The view of one operator the kernels read: inputs, options and quantization."""

    def __init__(
        self, model: TfliteModel, op: TfliteOperator, values: dict[int, np.ndarray], rounding: str
    ) -> None:
        self.model, self.op, self.values, self.rounding = model, op, values, rounding
        self.where = f"operator {op.index} ({op.opcode})"

    def tensor_at(self, index: int) -> TfliteTensor:
        if not 0 <= index < len(self.model.tensors):
            raise SimulationError(f"{self.where} refers to tensor {index}, which does not exist")
        return self.model.tensor(index)

    def input_tensor(self, k: int) -> TfliteTensor:
        if k >= len(self.op.inputs) or self.op.inputs[k] < 0:
            raise SimulationError(f"{self.where} needs input {k}, which is missing")
        return self.tensor_at(self.op.inputs[k])

    def output_tensor(self, k: int = 0) -> TfliteTensor:
        if k >= len(self.op.outputs):
            raise SimulationError(f"{self.where} needs output {k}, which is missing")
        return self.tensor_at(self.op.outputs[k])

    def value(self, k: int) -> np.ndarray:
        """Input ``k``: a computed activation or a constant's data."""
        t = self.input_tensor(k)
        if t.data is not None:
            return t.data
        if t.index not in self.values:
            raise SimulationError(
                f"{self.where} reads tensor {t.index} ({t.name!r}) before any operator writes it"
            )
        return self.values[t.index]

    def constant(self, k: int) -> np.ndarray | None:
        """Constant input ``k`` (None when the optional input is absent)."""
        if k >= len(self.op.inputs) or self.op.inputs[k] < 0:
            return None
        t = self.tensor_at(self.op.inputs[k])
        if t.data is None:
            raise SimulationError(
                f"{self.where}: input {k} ({t.name!r}) must be a constant for the int8 kernel"
            )
        return t.data

    def required_constant(self, k: int, role: str) -> np.ndarray:
        """Constant input ``k`` the kernel cannot run without (``role``: "filter", "weights")."""
        data = self.constant(k)
        if data is None:
            raise SimulationError(
                f"{self.where} needs its {role} as input {k}, which is missing; "
                f"give the operator a constant int8 {role} tensor there"
            )
        return data

    def option(self, key: str, default: Any = None) -> Any:
        return self.op.options.get(key, default)

    def qparams(self, t: TfliteTensor) -> tuple[float, int]:
        """(scale, zero point) of a per-tensor quantized tensor."""
        if t.scale.size == 0:
            raise SimulationError(f"{self.where}: tensor {t.index} ({t.name!r}) has no scale")
        scale = float(t.scale[0])
        if not np.isfinite(scale) or scale <= 0:
            raise SimulationError(
                f"{self.where}: tensor {t.index} ({t.name!r}) has scale {scale}; it must be > 0"
            )
        zp = int(t.zero_point[0]) if t.zero_point.size else 0
        return scale, zp

    def activation_range(self, t: TfliteTensor) -> tuple[int, int]:
        """CalculateActivationRangeQuantized for the fused activation."""
        act = self.option("fused_activation_function", "NONE")
        scale, zp = self.qparams(t)

        def q(f: float) -> int:
            # TfLiteRound of the float32 quotient, rounded as a Python float (exact)
            return zp + _round_half_away(float(np.float32(f) / np.float32(scale)))

        if act == "NONE":
            return K.INT8_MIN, K.INT8_MAX
        if act == "RELU":
            return max(K.INT8_MIN, q(0.0)), K.INT8_MAX
        if act == "RELU6":
            return max(K.INT8_MIN, q(0.0)), min(K.INT8_MAX, q(6.0))
        if act == "RELU_N1_TO_1":
            return max(K.INT8_MIN, q(-1.0)), min(K.INT8_MAX, q(1.0))
        raise SimulationError(
            f"{self.where}: fused activation {act!r} is not supported for int8; "
            "use NONE, RELU, RELU6 or RELU_N1_TO_1"
        )

    def batch_shape(self, t: TfliteTensor, batch: int) -> tuple[int, ...]:
        """The stored shape with its batch dimension replaced by the simulated batch."""
        shape = tuple(int(s) for s in t.shape)
        return (batch, *shape[1:]) if shape else shape


def _padding(ctx: _OpContext, hw: tuple[int, int], k: tuple[int, int], s: tuple[int, int],
             d: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:  # fmt: skip
    mode = ctx.option("padding", "SAME")
    if mode not in ("SAME", "VALID"):
        raise SimulationError(f"{ctx.where}: padding {mode!r} must be SAME or VALID")
    fn = K.same_padding if mode == "SAME" else K.valid_padding
    oh, ph = fn(hw[0], k[0], s[0], d[0])
    ow, pw = fn(hw[1], k[1], s[1], d[1])
    if oh <= 0 or ow <= 0:
        raise SimulationError(
            f"{ctx.where}: a {k[0]}x{k[1]} window on a {hw[0]}x{hw[1]} input gives no output"
        )
    return (oh, ow), (ph, pw)


def _strides(ctx: _OpContext) -> tuple[tuple[int, int], tuple[int, int]]:
    s = (int(ctx.option("stride_h", 1)), int(ctx.option("stride_w", 1)))
    d = (int(ctx.option("dilation_h_factor", 1)), int(ctx.option("dilation_w_factor", 1)))
    if min(s) < 1 or min(d) < 1:
        raise SimulationError(f"{ctx.where}: strides {s} and dilations {d} must be >= 1")
    return s, d


def _conv_requant(ctx: _OpContext, channels: int) -> K.Requant:
    """PopulateConvolutionQuantizationParams: per-channel multipliers in double."""
    x_t, w_t, y_t = ctx.input_tensor(0), ctx.input_tensor(1), ctx.output_tensor()
    in_scale, _ = ctx.qparams(x_t)
    out_scale, out_zp = ctx.qparams(y_t)
    w_scale = w_t.scale.astype(np.float64)
    if w_scale.size not in (1, channels):
        raise SimulationError(
            f"{ctx.where}: filter {w_t.name!r} has {w_scale.size} scales for {channels} "
            "output channels; give one per channel or one per tensor"
        )
    w_scale = np.broadcast_to(w_scale, (channels,))
    mult, shift = quantize_multipliers(np.float64(in_scale) * w_scale / np.float64(out_scale))
    lo, hi = ctx.activation_range(y_t)
    return K.Requant(mult, shift, out_zp, lo, hi, ctx.rounding)


def _conv_2d(ctx: _OpContext) -> np.ndarray:
    x, w, b = ctx.value(0), ctx.required_constant(1, "filter"), ctx.constant(2)
    if x.ndim != 4 or w.ndim != 4 or x.shape[3] % w.shape[3] != 0:
        raise SimulationError(
            f"{ctx.where}: input {x.shape[1:]} and filter {w.shape} do not fit (NHWC, OHWI)"
        )
    s, d = _strides(ctx)
    out_hw, pad = _padding(ctx, x.shape[1:3], w.shape[1:3], s, d)
    _, zp = ctx.qparams(ctx.input_tensor(0))
    return K.conv_2d(x, w, b, input_zero_point=zp, stride=s, dilation=d, pad=pad,
                     out_hw=out_hw, requant=_conv_requant(ctx, w.shape[0]))  # fmt: skip


def _depthwise_conv_2d(ctx: _OpContext) -> np.ndarray:
    x, w, b = ctx.value(0), ctx.required_constant(1, "filter"), ctx.constant(2)
    m = int(ctx.option("depth_multiplier", 1)) or 1
    if x.ndim != 4 or w.ndim != 4 or w.shape[3] != x.shape[3] * m:
        raise SimulationError(
            f"{ctx.where}: input {x.shape[1:]} and filter {w.shape} do not fit depth "
            f"multiplier {m} (filter channels must be input channels x multiplier)"
        )
    s, d = _strides(ctx)
    out_hw, pad = _padding(ctx, x.shape[1:3], w.shape[1:3], s, d)
    _, zp = ctx.qparams(ctx.input_tensor(0))
    return K.depthwise_conv_2d(x, w, b, input_zero_point=zp, depth_multiplier=m, stride=s,
                               dilation=d, pad=pad, out_hw=out_hw,
                               requant=_conv_requant(ctx, w.shape[3]))  # fmt: skip


def _fully_connected(ctx: _OpContext) -> np.ndarray:
    x, w, b = ctx.value(0), ctx.required_constant(1, "weights"), ctx.constant(2)
    if w.ndim != 2 or x.size % (x.shape[0] * w.shape[1]) != 0:
        raise SimulationError(
            f"{ctx.where}: input {x.shape} does not flatten to rows of {w.shape[1]} values"
        )
    x_t, w_t, y_t = ctx.input_tensor(0), ctx.input_tensor(1), ctx.output_tensor()
    in_scale, in_zp = ctx.qparams(x_t)
    out_scale, out_zp = ctx.qparams(y_t)
    if w_t.scale.size > 1:  # per channel: double product, as for convolutions
        requant = _conv_requant(ctx, w.shape[0])
    else:  # per tensor: GetQuantizedConvolutionMultipler multiplies the scales in float32
        product = np.float64(np.float32(in_scale) * np.float32(w_t.scale[0]))
        mult, shift = quantize_multiplier(float(product / np.float64(out_scale)))
        lo, hi = ctx.activation_range(y_t)
        requant = K.Requant(np.array([mult]), np.array([shift]), out_zp, lo, hi, ctx.rounding)
    w_zp = int(w_t.zero_point[0]) if w_t.zero_point.size else 0
    out = K.fully_connected(x, w, b, input_zero_point=in_zp, weight_zero_point=w_zp,
                            requant=requant)  # fmt: skip
    if ctx.option("keep_num_dims", False):
        return out.reshape(*x.shape[:-1], w.shape[0])
    shape = ctx.batch_shape(y_t, x.shape[0])
    return out.reshape(shape) if int(np.prod(shape)) == out.size else out


def _add(ctx: _OpContext) -> np.ndarray:
    a, b = ctx.value(0), ctx.value(1)
    s1, z1 = ctx.qparams(ctx.input_tensor(0))
    s2, z2 = ctx.qparams(ctx.input_tensor(1))
    so, zo = ctx.qparams(ctx.output_tensor())
    left_shift = 20
    twice_max = 2.0 * float(max(np.float32(s1), np.float32(s2)))
    m1, sh1 = quantize_multiplier(s1 / twice_max)
    m2, sh2 = quantize_multiplier(s2 / twice_max)
    mo, sho = quantize_multiplier(twice_max / ((1 << left_shift) * so))
    lo, hi = ctx.activation_range(ctx.output_tensor())
    p = K.AddParams(-z1, -z2, m1, sh1, m2, sh2, mo, sho, zo, left_shift, lo, hi, ctx.rounding)
    try:
        np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise SimulationError(
            f"{ctx.where}: inputs {a.shape} and {b.shape} do not broadcast"
        ) from None
    return K.add(a, b, p)


def _pool(ctx: _OpContext, kernel: Callable[..., np.ndarray]) -> np.ndarray:
    x = ctx.value(0)
    if x.ndim != 4:
        raise SimulationError(f"{ctx.where}: pooling needs NHWC input, got shape {x.shape}")
    k = (int(ctx.option("filter_height", 1)), int(ctx.option("filter_width", 1)))
    s = (int(ctx.option("stride_h", 1)), int(ctx.option("stride_w", 1)))
    if min(k) < 1 or min(s) < 1:
        raise SimulationError(f"{ctx.where}: filter {k} and strides {s} must be >= 1")
    out_hw, pad = _padding(ctx, x.shape[1:3], k, s, (1, 1))
    lo, hi = ctx.activation_range(ctx.output_tensor())
    return kernel(x, kernel=k, stride=s, pad=pad, out_hw=out_hw, act_min=lo, act_max=hi)


def _mean(ctx: _OpContext) -> np.ndarray:
    x = ctx.value(0)
    axes_data = ctx.constant(1)
    if axes_data is None:
        raise SimulationError(f"{ctx.where}: MEAN needs a constant axis tensor")
    axes = tuple(sorted({int(a) % x.ndim for a in np.asarray(axes_data).reshape(-1)}))
    if 0 in axes:
        raise SimulationError(f"{ctx.where}: MEAN over the batch axis is not simulated")
    si, zi = ctx.qparams(ctx.input_tensor(0))
    so, zo = ctx.qparams(ctx.output_tensor())
    mult, shift = quantize_multiplier(float(np.float64(si) / np.float64(so)))
    return K.mean(x, axes, bool(ctx.option("keep_dims", False)), input_zero_point=zi,
                  output_zero_point=zo, multiplier=mult, shift=shift,
                  rounding=ctx.rounding)  # fmt: skip


def _reshape(ctx: _OpContext) -> np.ndarray:
    x = ctx.value(0)
    shape = ctx.batch_shape(ctx.output_tensor(), x.shape[0])
    if int(np.prod(shape)) != x.size:
        raise SimulationError(
            f"{ctx.where}: cannot reshape {x.shape[1:]} to {shape[1:]} (sizes differ)"
        )
    return x.reshape(shape)


def _concatenation(ctx: _OpContext) -> np.ndarray:
    xs = [ctx.value(k) for k in range(len(ctx.op.inputs))]
    axis = int(ctx.option("axis", -1)) % xs[0].ndim
    y_t = ctx.output_tensor()
    out_q = ctx.qparams(y_t)
    for k in range(len(xs)):
        t = ctx.input_tensor(k)
        scale, zp = ctx.qparams(t)
        if (np.float32(scale), zp) != (np.float32(out_q[0]), out_q[1]):
            raise SimulationError(
                f"{ctx.where}: input {k} ({t.name!r}) has scale {scale:g} and zero point {zp}, "
                f"the output {y_t.name!r} has {out_q[0]:g} and {out_q[1]}; TFLM's int8 "
                "CONCATENATION copies bytes and refuses inputs whose parameters differ from the "
                "output's. Share one observer across the concatenated branches in training"
            )
    if axis == 0:
        raise SimulationError(f"{ctx.where}: concatenation along the batch axis is not simulated")
    return K.concatenation(xs, axis)


def _softmax(ctx: _OpContext) -> np.ndarray:
    x = ctx.value(0)
    si, _ = ctx.qparams(ctx.input_tensor(0))
    so, zo = ctx.qparams(ctx.output_tensor())
    if zo != -128 or np.float32(so) != np.float32(1.0 / 256):
        raise SimulationError(
            f"{ctx.where}: int8 softmax output must have scale 1/256 and zero point -128 "
            f"(TFLM rule); got scale {so:g}, zero point {zo}"
        )
    beta = float(np.float32(ctx.option("beta", 1.0)))
    mult, shift, diff_min = preprocess_softmax_scaling(beta, float(np.float32(si)))
    return K.softmax(x, multiplier=mult, left_shift=shift, diff_min=diff_min)


def _pad(ctx: _OpContext) -> np.ndarray:
    x = ctx.value(0)
    paddings = np.asarray(ctx.constant(1)).astype(np.int64)
    if paddings.shape != (x.ndim, 2) or np.any(paddings < 0):
        raise SimulationError(
            f"{ctx.where}: paddings of shape {paddings.shape} must be ({x.ndim}, 2), non-negative"
        )
    _, zo = ctx.qparams(ctx.output_tensor())
    value = zo
    if len(ctx.op.inputs) > 2 and ctx.op.inputs[2] >= 0:
        value = int(np.asarray(ctx.constant(2)).reshape(-1)[0])
    return K.pad(x, paddings, value)


def _quantize(ctx: _OpContext) -> np.ndarray:
    x = ctx.value(0)
    so, zo = ctx.qparams(ctx.output_tensor())
    if x.dtype == np.float32:
        return K.quantize_float(x, so, zo)
    if x.dtype == np.int8:
        si, zi = ctx.qparams(ctx.input_tensor(0))
        mult, shift = quantize_multiplier(float(np.float64(si) / np.float64(so)))
        return K.requantize(x, input_zero_point=zi, output_zero_point=zo, multiplier=mult,
                            shift=shift, rounding=ctx.rounding)  # fmt: skip
    raise SimulationError(f"{ctx.where}: QUANTIZE from {x.dtype} is not simulated (float32, int8)")


def _dequantize(ctx: _OpContext) -> np.ndarray:
    x = ctx.value(0)
    si, zi = ctx.qparams(ctx.input_tensor(0))
    return K.dequantize(x, si, zi)


SUPPORTED_OPS: dict[str, Callable[[_OpContext], np.ndarray]] = {
    "CONV_2D": _conv_2d,
    "DEPTHWISE_CONV_2D": _depthwise_conv_2d,
    "FULLY_CONNECTED": _fully_connected,
    "ADD": _add,
    "MAX_POOL_2D": lambda ctx: _pool(ctx, K.max_pool_2d),
    "AVERAGE_POOL_2D": lambda ctx: _pool(ctx, K.average_pool_2d),
    "MEAN": _mean,
    "RESHAPE": _reshape,
    "CONCATENATION": _concatenation,
    "SOFTMAX": _softmax,
    "PAD": _pad,
    "QUANTIZE": _quantize,
    "DEQUANTIZE": _dequantize,
}
