"""One generated model through the whole flow, and the properties checked on it.

``check_spec(spec, workdir)`` builds the model, prepares, calibrates, captures, exports ONNX and
TFLite, runs ONNX Runtime, LiteRT (builtin kernels with intermediates, and XNNPACK), TFLM and
the MCU simulator, and checks:

- ``sim_equals_tflm``: the simulator equals TFLM bit for bit, on every activation tensor;
- ``identical_qparams``: each activation's scale and zero point, each weight's per-channel
  scales and each bias's scales are the same float32 / int values in the graph, the ONNX file
  and the TFLite file (and every Q/DQ node of one tensor agrees);
- ``per_op_lsb``: each op, run by a runtime on the runtime's own int8 inputs, is within that
  runtime's per-op bound (``PER_OP_LSB``, derived in docs/fidelity-bounds.md) of the reference;
- ``end_to_end_lsb``: each runtime's output, and the fake-quantized PyTorch model's, is within
  the bound obtained by propagating the per-op bounds through the graph, value by value
  (``reference_bound``); a runtime whose bound leaves no output value less than the int8
  range around it checked nothing and is counted as vacuous (``Outcome.vacuous``,
  ``end_to_end_summary``);
- ``no_crash``: every stage either succeeds or refuses with a documented error (``REFUSALS``).

A violation is returned in ``Outcome.violations`` (never raised), so a long run can count them.
``Outcome.values`` counts the values each property compared; ``end_to_end_checked:<runtime>``
counts the output values whose end-to-end bound could have failed.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from edgekiln.exporters.onnx import write_onnx
from edgekiln.exporters.tflite import _Writer, write_tflite
from edgekiln.formats.tflite import read_tflite
from edgekiln.ir import Activation, DType, Graph, OpType
from edgekiln.ir.reference import _activate, float_op, run_reference
from edgekiln.targets.litert import input_batch, run_litert, to_pytorch_layout
from edgekiln.targets.mcu import simulate
from edgekiln.targets.onnxruntime import run_onnxruntime
from edgekiln.targets.tflm import run_tflm
from tests.property.strategies import ModelSpec, build_model, make_data

N_CALIBRATION = 32
N_TEST = 8

REQUANT_OPS = frozenset(
    {OpType.CONV, OpType.LINEAR, OpType.ADD, OpType.AVG_POOL, OpType.MEAN, OpType.SOFTMAX}
)
MOVE_OPS = frozenset({OpType.MAX_POOL, OpType.RESHAPE, OpType.CONCAT, OpType.PAD})
INT8_SPAN = 255  # two int8 values differ by at most this: an end-to-end bound this large is vacuous


def _bounds(requant: int) -> dict[OpType, int]:
    return {**{op: requant for op in REQUANT_OPS}, **{op: 0 for op in MOVE_OPS}}


# Per-op bound in LSB of the op's output scale, given identical int8 inputs, against the
# reference (round half to even of the float32 result). Derivations: docs/fidelity-bounds.md.
PER_OP_LSB: dict[str, dict[OpType, int]] = {
    "fake_quant": _bounds(1),  # PyTorch float32 kernels: other summation order, same rounding
    "onnxruntime": _bounds(1),  # int8 x int8 kernels, float32 multiplier, round half to even
    "litert": _bounds(1),  # builtin kernels: Q31 multiplier, round half away from zero
    "litert_xnnpack": _bounds(1),  # XNNPACK: float requantization
    "tflm": _bounds(1),  # TFLM reference kernels: as LiteRT's builtin ones
}

# Errors that are documented refusals, not crashes: (exception type name, text in message).
REFUSALS = (
    ("CaptureError", "does not fit int32"),
    ("TfliteExportError", "cannot be written"),
    ("TfliteExportError", "padding"),
)
# A runtime that refuses an artifact and names why (ok=False, counted, not a violation).
RUNTIME_REFUSALS = ("XNNPACK accepts requantization scales below",)


@dataclass
class Outcome:
    """What happened to one generated model."""

    spec: ModelSpec
    status: str = "ok"  # "ok" | "refused" | "violation"
    stage: str = ""
    message: str = ""
    op_types: Counter = field(default_factory=Counter)
    values: Counter = field(default_factory=Counter)  # property -> values compared (see below)
    max_step_lsb: dict[str, dict[str, int]] = field(default_factory=dict)  # runtime -> op -> lsb
    end_to_end: dict[str, tuple[int, int]] = field(default_factory=dict)  # runtime -> (lsb, bound)
    vacuous: list[str] = field(default_factory=list)  # runtimes whose end-to-end check was vacuous
    static_bound: dict[str, int] = field(default_factory=dict)  # runtime -> propagated_bound
    violations: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)  # runtimes that refused, naming why
    seconds: float = 0.0

    def fail(self, prop: str, message: str) -> None:
        """Record a property violation."""
        self.status = "violation"
        self.violations.append(f"{prop}: {message}")

    def report(self) -> str:
        """Human-readable summary (for assertion messages)."""
        lines = [f"spec={self.spec!r}", f"status={self.status} stage={self.stage}"]
        lines += self.violations
        if self.message:
            lines.append(self.message)
        lines.append(f"end_to_end={self.end_to_end} vacuous={self.vacuous}")
        lines.append(f"max_step_lsb={self.max_step_lsb}")
        return "\n".join(lines)


# ---- the flow ------------------------------------------------------------------------------


def check_spec(spec: ModelSpec, workdir: str | Path | None = None) -> Outcome:
    """Run one spec through every stage and runtime; return the outcome (never raises)."""
    start = time.perf_counter()
    out = Outcome(spec)
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="edgekiln-prop-") as tmp:
            _run(spec, Path(tmp), out)
    else:
        _run(spec, Path(workdir), out)
    out.seconds = time.perf_counter() - start
    return out


def _refused(e: Exception) -> bool:
    name, text = type(e).__name__, str(e)
    return any(name == n and t in text for n, t in REFUSALS)


def _run(spec: ModelSpec, work: Path, out: Outcome) -> None:
    from edgekiln import Recipe, capture, prepare
    from edgekiln.pipeline.train import calibrate, predict

    stage = "build"
    try:
        model = build_model(spec)
        cal = make_data(spec.data, spec.input_shape, N_CALIBRATION, 0)
        x = make_data(spec.data, spec.input_shape, N_TEST, 1)
        stage = "prepare"
        recipe = Recipe(observer=spec.observer, sparsity=spec.sparsity)
        prepared = prepare(model, torch.from_numpy(cal[:4]), recipe)
        stage = "calibrate"
        calibrate(prepared, cal, batch_size=8)
        stage = "capture"
        graph = capture(prepared.eval())
        fq = predict(prepared, x)
        stage = "export"
        onnx_path = write_onnx(graph, work / "m.onnx", int8_io=True)
        tflite_path = write_tflite(graph, work / "m.tflite")
    except Exception as e:  # every stage must refuse cleanly or succeed
        out.stage, out.message = stage, f"{type(e).__name__}: {e}"
        if _refused(e):
            out.status = "refused"
        else:
            out.fail("no_crash", f"{stage} raised {type(e).__name__}: {e}")
        return
    out.op_types.update(op.type.value for op in graph.ops)
    check_graph(graph, onnx_path, tflite_path, x, out, fake_quant=fq)


def check_graph(
    graph: Graph,
    onnx_path: Path,
    tflite_path: Path,
    x: np.ndarray,
    out: Outcome,
    fake_quant: np.ndarray | None = None,
) -> None:
    """Every runtime property on one captured graph and its two artifacts."""
    out.stage = "runtimes"
    xq = graph.tensor(graph.inputs[0]).quant.quantize(x)  # (N, C, *S) int8
    reference = run_reference(graph, xq)
    _check_qparams(graph, onnx_path, tflite_path, out)

    results: dict[str, Any] = {}
    calls = {
        "onnxruntime": lambda: run_onnxruntime(onnx_path, xq, runs=0, keep_intermediates=True),
        "litert": lambda: run_litert(tflite_path, xq, runs=1, warmup=0, keep_intermediates=True),
        "litert_xnnpack": lambda: run_litert(tflite_path, xq, runs=1, warmup=0),
        "tflm": lambda: run_tflm(tflite_path, xq, runs=1, warmup=0, keep_intermediates=True),
    }
    for name, call in calls.items():
        try:
            r = call()
        except Exception as e:
            out.fail("no_crash", f"{name} raised {type(e).__name__}: {e}")
            continue
        if not r.ok:
            if any(text in (r.error or "") for text in RUNTIME_REFUSALS):
                out.refusals.append(f"{name}: {r.error}")
            else:
                out.fail("no_crash", f"{name} failed: {r.error}")
            continue
        results[name] = r

    model = read_tflite(tflite_path)
    try:
        xb = input_batch(model.tensor(model.inputs[0]), xq, tflite_path.name)
        sim = simulate(model, xb, keep_intermediates=True)
    except Exception as e:
        out.fail("no_crash", f"simulator raised {type(e).__name__}: {e}")
        sim = None

    if sim is not None and "tflm" in results:
        _check_sim_equals_tflm(sim, results["tflm"], out)

    hwc = _hwc_flat(graph)
    for name, r in results.items():
        output = r.outputs.reshape(reference[graph.outputs[0]].shape)
        if "intermediates" in r.details:
            values = _ir_values(
                graph, r.details["intermediates"], hwc if name != "onnxruntime" else {}
            )
            values[graph.inputs[0]] = xq
            _check_stepwise(graph, values, name, out)
        _check_end_to_end(graph, reference, output, name, out)
    if fake_quant is not None:
        oq = graph.tensor(graph.outputs[0]).quant.quantize(fake_quant)
        own_input = _fake_quant_input_lsb(graph, x, xq)
        _check_end_to_end(graph, reference, oq, "fake_quant", out, own_input)


def _fake_quant_input_lsb(graph: Graph, x: np.ndarray, xq: np.ndarray) -> int:
    """How far the fake-quantized model's own quantization of ``x`` is from ``xq``, in LSB.

    The model multiplies by the float32 reciprocal of the scale (``x * (1 / s)``), the graph
    divides (``x / s``): near a tie the two can round one step apart, so this is measured.
    """
    from edgekiln.pipeline.quant import activation_spec, fake_quantize

    q = graph.tensor(graph.inputs[0]).quant
    scale = torch.tensor(float(q.scale.reshape(-1)[0]), dtype=torch.float32)
    zero_point = torch.tensor(int(q.zero_point.reshape(-1)[0]), dtype=torch.int32)
    real = fake_quantize(torch.from_numpy(x), scale, zero_point, activation_spec(8))
    return lsb(xq, q.quantize(real.numpy()))


# ---- properties ----------------------------------------------------------------------------


def _check_sim_equals_tflm(sim: Any, tflm: Any, out: Outcome) -> None:
    tflm_values = tflm.details["intermediates"]
    compared = 0
    for name, value in sim.tensors.items():
        if name not in tflm_values:
            continue
        mine = to_pytorch_layout(value)
        theirs = np.asarray(tflm_values[name]).reshape(mine.shape)
        bad = int(np.count_nonzero(mine != theirs))
        compared += mine.size
        if bad:
            out.fail("sim_equals_tflm", f"tensor {name!r}: {bad} of {mine.size} values differ")
    out.values["sim_equals_tflm"] += compared
    if compared == 0:
        out.fail("sim_equals_tflm", "no tensor in common between the simulator and TFLM")


def _onnx_qparams(path: Path) -> tuple[dict[str, list[tuple[Any, Any]]], dict[str, np.ndarray]]:
    """Quantized tensor -> every (scale, zero point) a Q/DQ node gives it; initializers."""
    m = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    found: dict[str, list[tuple[Any, Any]]] = {}
    for node in m.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        tensor = node.output[0] if node.op_type == "QuantizeLinear" else node.input[0]
        scale = inits[node.input[1]]
        zp = inits[node.input[2]] if len(node.input) > 2 else np.zeros_like(scale, np.int8)
        found.setdefault(tensor, []).append((scale, zp))
    return found, inits


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    return a.shape == b.shape and np.array_equal(a, b)


def _check_qparams(graph: Graph, onnx_path: Path, tflite_path: Path, out: Outcome) -> None:
    onnx_q, _ = _onnx_qparams(onnx_path)
    tfl = {t.name: t for t in read_tflite(tflite_path).tensors}
    compared = 0
    for name, t in graph.tensors.items():
        want_scale = t.quant.scale.astype(np.float32)
        want_zp = t.quant.zero_point.astype(np.int64)
        # a bias: the ONNX writer recomputes input scale x weight scale, which must give
        # exactly the graph's float32 values (checked below like every other tensor)
        for scale, zp in onnx_q.get(name, []):
            compared += 1
            if not (
                _same(scale.astype(np.float32), want_scale) and _same(zp.astype(np.int64), want_zp)
            ):
                out.fail(
                    "identical_qparams",
                    f"ONNX {name!r}: scale {scale.reshape(-1)[:4]} zp {zp.reshape(-1)[:4]}, "
                    f"graph {want_scale[:4]} {want_zp[:4]}",
                )
        if name not in onnx_q and (not t.is_constant or t.dtype == DType.INT8):
            out.fail("identical_qparams", f"ONNX has no Q/DQ node for {name!r}")
        if name in tfl:
            tt = tfl[name]
            compared += 1
            zp = tt.zero_point if tt.zero_point.size else np.zeros_like(want_zp)
            if not (_same(tt.scale, want_scale) and _same(zp.astype(np.int64), want_zp)):
                out.fail(
                    "identical_qparams",
                    f"TFLite {name!r}: scale {tt.scale[:4]} zp {zp[:4]}, "
                    f"graph {want_scale[:4]} {want_zp[:4]}",
                )
        elif not t.is_constant:
            out.fail("identical_qparams", f"TFLite has no tensor {name!r}")
    out.values["identical_qparams"] += compared


def _hwc_flat(graph: Graph) -> dict[str, tuple[int, ...]]:
    writer = _Writer(graph, float_io=False, float_model=False, lower_grouped_conv=False)
    writer.collect()
    return writer.hwc_flat


def _ir_values(
    graph: Graph, intermediates: dict[str, np.ndarray], hwc: dict[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
    """A runtime's intermediates as IR-shaped arrays (TFLite's (H, W, C) flattens reordered)."""
    values: dict[str, np.ndarray] = {}
    for name, tensor in graph.tensors.items():
        if tensor.is_constant or name not in intermediates:
            continue
        v = np.asarray(intermediates[name])
        if name in hwc:
            c, *spatial = hwc[name]
            v = np.moveaxis(v.reshape(len(v), *spatial, c), -1, 1).reshape(len(v), -1)
        values[name] = v.reshape(len(v), *tensor.shape[1:])
    return values


def _real_input(graph: Graph, name: str, values: dict[str, np.ndarray]) -> np.ndarray:
    t = graph.tensor(name)
    if t.data is None:
        return t.quant.dequantize(values[name])
    if t.dtype == DType.INT32:
        return (t.data * t.quant.scale.astype(np.float64)).astype(np.float32)
    return t.quant.dequantize(t.data)


def lsb(a: np.ndarray, b: np.ndarray) -> int:
    """Largest absolute difference of two integer arrays, in steps."""
    d = np.abs(np.asarray(a).astype(np.int64) - np.asarray(b).astype(np.int64).reshape(a.shape))
    return int(d.max()) if d.size else 0


def _check_stepwise(
    graph: Graph, values: dict[str, np.ndarray], runtime: str, out: Outcome
) -> None:
    bounds = PER_OP_LSB[runtime]
    worst = out.max_step_lsb.setdefault(runtime, {})
    for op in graph.ops:
        names = [n for n in op.inputs if graph.tensor(n).data is None] + op.outputs
        if any(n not in values for n in names):
            out.fail("per_op_lsb", f"{runtime} kept no value for one of {names} ({op.name})")
            continue
        real = [_real_input(graph, n, values) for n in op.inputs]
        expected = graph.tensor(op.outputs[0]).quant.quantize(float_op(op, real, graph))
        got = values[op.outputs[0]]
        diff = lsb(expected, got)
        out.values[f"per_op_lsb:{runtime}"] += got.size
        key = op.type.value
        worst[key] = max(worst.get(key, 0), diff)
        if diff > bounds[op.type]:
            out.fail(
                "per_op_lsb",
                f"{runtime} {op.type.value} op {op.name!r}: {diff} LSB > bound {bounds[op.type]}",
            )


# ---- the end-to-end bound ------------------------------------------------------------------


def op_gain(graph: Graph, op: Any) -> list[float]:
    """Per input: how many output LSB one input LSB can move the op's exact result, at most.

    conv / linear: ``max_c sum |w_q[c]| * s_in * s_w[c] / s_out`` (the kernel's l1 norm per
    output channel in LSB); add: ``s_in / s_out`` per operand; average pool, mean, max pool and
    data movement: 1 (shared parameters); softmax: ``s_in / (2 * s_out)`` (each softmax output's
    gradient row sums to ``2 p (1 - p) <= 1/2`` in absolute value). Fused ReLU / ReLU6 and the
    int8 clamp are 1-Lipschitz and do not add to it.
    """
    s_out = float(graph.tensor(op.outputs[0]).quant.scale[0])
    s_in = float(graph.tensor(op.inputs[0]).quant.scale[0])
    if op.type in (OpType.CONV, OpType.LINEAR):
        w = graph.tensor(op.inputs[1])
        l1 = np.abs(w.data.astype(np.float64)).reshape(w.data.shape[0], -1).sum(axis=1)
        return [float(np.max(l1 * w.quant.scale.astype(np.float64))) * s_in / s_out]
    if op.type == OpType.ADD:
        return [float(graph.tensor(n).quant.scale[0]) / s_out for n in op.inputs]
    if op.type == OpType.SOFTMAX:
        return [s_in * float(op.attrs["beta"]) / (2.0 * s_out)]
    return [1.0] * len(op.inputs)


def propagated_bound(graph: Graph, per_op: dict[OpType, int], input_lsb: int = 0) -> dict[str, int]:
    """Largest LSB difference each activation can have from the reference, op by op.

    An op given inputs off by ``e_i`` LSB has an exact result off by at most
    ``d = sum(gain_i * e_i)`` LSB; two reals ``d`` apart round (half to even) to integers at
    most ``floor(d) + 1`` apart (0 when ``d == 0``); the runtime's own rounding adds its
    per-op bound. Move ops copy values (``max e_i``). ``input_lsb``: how far the runtime's
    int8 input is from the reference's (0 but for the fake-quantized model, which quantizes
    the float input itself). Capped at ``INT8_SPAN`` (the int8 range), where it checks nothing.
    """
    e: dict[str, int] = {name: input_lsb for name in graph.inputs}
    for op in graph.ops:
        ins = [n for n in op.inputs if graph.tensor(n).data is None]
        errors = [e[n] for n in ins]
        if op.type in MOVE_OPS:
            bound = max(errors)
        else:
            d = sum(g * err for g, err in zip(op_gain(graph, op), errors, strict=False))
            bound = (math.floor(d * (1 + 1e-6)) + 1 if d > 0 else 0) + per_op[op.type]
        e[op.outputs[0]] = min(bound, INT8_SPAN)
    return e


def reference_bound(
    graph: Graph,
    reference: dict[str, np.ndarray],
    per_op: dict[OpType, int],
    input_lsb: int = 0,
) -> dict[str, np.ndarray]:
    """Per value: how far each activation of a runtime can be from the reference, in LSB.

    The argument of ``propagated_bound``, run on arrays (int64, each the shape of
    ``reference[t]``) with the reference's own values, so it is tighter and still sound:

    - the input errors reach each output value through its own taps: conv / linear convolve
      them with ``|w|`` (a padded border sees fewer taps), add rescales both, pools and means
      pool them, move ops move them;
    - the reference op run on the runtime's inputs then lies between its roundings of
      ``y - D`` and ``y + D`` (``y`` the reference's value before the fused activation, ``D``
      that reach), both through the activation and the int8 clamp; for a softmax, between the
      probabilities with each logit pushed by its error against the others (exact: ``p_j`` is
      monotone in every logit);
    - the per-op bound puts the runtime's int8 result within ``b`` of that int8 result. So a
      value that a ReLU or the int8 clamp saturates by more than ``D`` is within ``b``, a value
      whose inputs are all exact is within ``b``, and no bound exceeds the room the int8 range
      leaves around the reference value.

    ``D`` is widened by ``2**-20 * terms * sum|terms|`` (in LSB, over the sum's terms), more
    than the float32 error of both reference evaluations, so no rounding tie is decided in
    the bound's favour. ``input_lsb`` is as in ``propagated_bound``.
    """
    e: dict[str, np.ndarray] = {
        name: np.full(reference[name].shape, input_lsb, np.int64) for name in graph.inputs
    }
    for op in graph.ops:
        ins = [n for n in op.inputs if graph.tensor(n).data is None]
        if op.type in MOVE_OPS:  # int8 values copied: the errors move with them
            moved = float_op(op, [e[n].astype(np.float64) for n in ins], graph)
            e[op.outputs[0]] = np.rint(np.maximum(moved, 0)).astype(np.int64)
            continue
        e[op.outputs[0]] = _requant_bound(graph, op, reference, e, per_op[op.type])
    return e


def _requant_bound(
    graph: Graph,
    op: Any,
    reference: dict[str, np.ndarray],
    e: dict[str, np.ndarray],
    own: int,
) -> np.ndarray:
    """``reference_bound`` of one requantizing op's output, given its inputs' bounds ``e``."""
    out = graph.tensor(op.outputs[0])
    s_out = float(out.quant.scale[0])
    zp = float(out.quant.zero_point[0])
    real = [_real_input(graph, n, reference) for n in op.inputs]
    if op.type == OpType.SOFTMAX:
        lo, hi, moved = _softmax_interval(graph, op, real[0], e[op.inputs[0]])
    else:
        lo, hi, moved = _affine_interval(graph, op, real, e)
    # the reference op on the runtime's inputs gives a value in [lo, hi] (before rounding), so
    # an int8 in [lower, upper] (ties either way); the runtime's int8 is within own of that
    # int8 (the per-op bound holds after the clamp: a saturated value may still move by own)
    lower = np.clip(np.clip(np.ceil(lo / s_out + zp - 0.5), -128, 127) - own, -128, 127)
    upper = np.clip(np.clip(np.floor(hi / s_out + zp + 0.5), -128, 127) + own, -128, 127)
    r = reference[op.outputs[0]].astype(np.int64)
    bound = np.maximum(np.maximum(upper - r, r - lower), 0).astype(np.int64)
    return np.where(moved, bound, np.minimum(bound, own))


def _affine_interval(
    graph: Graph, op: Any, real: list[np.ndarray], e: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Conv, linear, add, average pool, mean: ``act(y -+ reach)`` in real units, and where
    ``reach`` holds an input error (False: every input of that value is exact)."""
    s_out = float(graph.tensor(op.outputs[0]).quant.scale[0])
    plain = replace(op, attrs={**op.attrs, "activation": Activation.NONE})
    if op.type in (OpType.CONV, OpType.LINEAR):  # the error map through |w|
        s_in = float(graph.tensor(op.inputs[0]).quant.scale[0])
        w_abs = np.abs(real[1].astype(np.float64))
        b = real[2].astype(np.float64)
        d = float_op(plain, [e[op.inputs[0]] * s_in, w_abs, np.zeros_like(b)], graph)
        magnitude = float_op(plain, [np.abs(real[0]), w_abs, np.abs(b)], graph)
        terms = w_abs[0].size + 1
    elif op.type == OpType.ADD:
        d = sum(e[n] * float(graph.tensor(n).quant.scale[0]) for n in op.inputs)
        magnitude, terms = np.abs(real[0]) + np.abs(real[1]), 2
    else:  # average pool, mean: the pooled errors (one shared scale)
        s_in = float(graph.tensor(op.inputs[0]).quant.scale[0])
        d = float_op(op, [e[op.inputs[0]] * s_in], graph)
        magnitude = float_op(op, [np.abs(real[0])], graph)
        if op.type == OpType.AVG_POOL:
            terms = int(np.prod(op.attrs["kernel"]))
        else:
            terms = int(np.prod(real[0].shape[1:])) // int(np.prod(d.shape[1:]))
    d = np.asarray(d, np.float64)  # real units, the shape of the output
    hair = (1e-4 + 2.0**-20 * terms * np.asarray(magnitude, np.float64) / s_out) * s_out
    reach = d * (1 + 1e-6 + 2.0**-20 * terms) + hair
    y = np.asarray(float_op(plain, real, graph), np.float64)  # before the activation
    act = op.attrs.get("activation", Activation.NONE)
    return _activate(y - reach, act), _activate(y + reach, act), d > 0


def _softmax_interval(
    graph: Graph, op: Any, x: np.ndarray, e_in: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exact range of each softmax output when each logit moves by at most its error.

    ``p_j = 1 / sum_k exp(z_k - z_j)`` is largest with ``z_j`` up and every other ``z_k`` down
    by their errors, smallest the other way round. Rows of ``(N, C)``; real units (0 to 1),
    widened by the float32 error of the reference's ``exp`` and sums.
    """
    s_in = float(graph.tensor(op.inputs[0]).quant.scale[0])
    s_out = float(graph.tensor(op.outputs[0]).quant.scale[0])
    beta = float(op.attrs["beta"])
    z = x.astype(np.float64) * beta
    delta = e_in * s_in * beta * (1 + 1e-6)
    gap = z[..., None, :] - z[..., :, None]  # [..., j, k] = z_k - z_j
    spread = delta[..., None, :] + delta[..., :, None]
    same = np.eye(z.shape[-1], dtype=bool)
    with np.errstate(over="ignore"):  # exp overflows to inf, and 1 / inf is the 0 it means
        p_hi = 1.0 / np.where(same, 1.0, np.exp(gap - spread)).sum(axis=-1)
        p_lo = 1.0 / np.where(same, 1.0, np.exp(gap + spread)).sum(axis=-1)
    hair = (1e-4 + 2.0**-20 * 4 * z.shape[-1] / s_out) * s_out
    return p_lo - hair, p_hi + hair, np.broadcast_to(delta.max(axis=-1, keepdims=True) > 0, z.shape)


def _check_end_to_end(
    graph: Graph,
    reference: dict[str, np.ndarray],
    got: np.ndarray,
    runtime: str,
    out: Outcome,
    input_lsb: int = 0,
) -> None:
    name = graph.outputs[0]
    per_op = PER_OP_LSB[runtime]
    want = reference[name].astype(np.int64)
    diff = np.abs(np.asarray(got).astype(np.int64).reshape(want.shape) - want)
    bound = reference_bound(graph, reference, per_op, input_lsb)[name]
    room = np.maximum(want + 128, 127 - want)  # the largest difference int8 leaves each value
    checked = int(np.count_nonzero(bound < room))
    out.values[f"end_to_end:{runtime}"] += got.size
    out.values[f"end_to_end_checked:{runtime}"] += checked
    out.end_to_end[runtime] = (int(diff.max(initial=0)), int(bound.max(initial=0)))
    out.static_bound[runtime] = propagated_bound(graph, per_op, input_lsb)[name]
    if checked == 0:
        out.vacuous.append(runtime)
    over = diff > bound
    if over.any():
        at = np.unravel_index(int(np.argmax(diff - bound)), diff.shape)
        out.fail(
            "end_to_end_lsb",
            f"{runtime}: {int(over.sum())} of {diff.size} output values exceed their bound, "
            f"the worst at {tuple(int(i) for i in at)}: {diff[at]} LSB from the reference "
            f"> {bound[at]}",
        )


_SUMMARY_KEYS = (
    "models",
    "max_lsb",
    "models_nonzero",
    "max_bound",
    "vacuous",
    "static_vacuous",
    "values",
    "values_checked",
)


def end_to_end_summary(outcomes: list[Outcome]) -> dict[str, dict[str, int]]:
    """Per runtime, over ``outcomes``: how the end-to-end check went, and how often it was vacuous.

    ``models``: outcomes with an end-to-end figure; ``max_lsb``, ``models_nonzero``: the largest
    output difference and how many models differed at all; ``max_bound``: the loosest per-value
    bound; ``vacuous``: models where no output value's bound was below the room int8 leaves it
    (the check could not fail); ``static_vacuous``: models whose ``propagated_bound`` reached
    ``INT8_SPAN``; ``values``, ``values_checked``: output values compared, and those whose bound
    could have failed.
    """
    rows: dict[str, dict[str, int]] = {}
    for o in outcomes:
        for runtime, (diff, bound) in o.end_to_end.items():
            row = rows.setdefault(runtime, dict.fromkeys(_SUMMARY_KEYS, 0))
            row["models"] += 1
            row["max_lsb"] = max(row["max_lsb"], diff)
            row["models_nonzero"] += diff > 0
            row["max_bound"] = max(row["max_bound"], bound)
            row["vacuous"] += runtime in o.vacuous
            row["static_vacuous"] += o.static_bound.get(runtime, 0) >= INT8_SPAN
            row["values"] += o.values[f"end_to_end:{runtime}"]
            row["values_checked"] += o.values[f"end_to_end_checked:{runtime}"]
    return rows
