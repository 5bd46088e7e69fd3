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
  the bound obtained by propagating the per-op bounds through the graph (``propagated_bound``);
- ``no_crash``: every stage either succeeds or refuses with a documented error (``REFUSALS``).

A violation is returned in ``Outcome.violations`` (never raised), so a long run can count them.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from edgekiln.exporters.onnx import write_onnx
from edgekiln.exporters.tflite import _Writer, write_tflite
from edgekiln.formats.tflite import read_tflite
from edgekiln.ir import DType, Graph, OpType
from edgekiln.ir.reference import float_op, run_reference
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
    values: Counter = field(default_factory=Counter)  # property -> values compared
    max_step_lsb: dict[str, dict[str, int]] = field(default_factory=dict)  # runtime -> op -> lsb
    end_to_end: dict[str, tuple[int, int]] = field(default_factory=dict)  # runtime -> (lsb, bound)
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
        lines.append(f"end_to_end={self.end_to_end}")
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
        _check_end_to_end(graph, reference, oq, "fake_quant", out)


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


def bias_rounding_lsb(graph: Graph, op: Any) -> float:
    """Half the int32 bias step of a conv / linear in output LSB: ``0.5 * max_c M_c``.

    The int8 graph holds the bias rounded to ``s_in * s_w[c]``; the fake-quantized PyTorch
    model adds the float bias. ``M_c = s_in * s_w[c] / s_out`` is the requantization
    multiplier, so the two differ by up to ``0.5 * M_c`` output LSB before rounding: nothing
    for ordinary ranges (M << 1), tens of LSB when a huge input range feeds a small output one.
    """
    if op.type not in (OpType.CONV, OpType.LINEAR):
        return 0.0
    s_in = float(graph.tensor(op.inputs[0]).quant.scale[0])
    s_out = float(graph.tensor(op.outputs[0]).quant.scale[0])
    s_w = graph.tensor(op.inputs[1]).quant.scale.astype(np.float64)
    return 0.5 * float(np.max(s_w)) * s_in / s_out


def propagated_bound(
    graph: Graph, per_op: dict[OpType, int], *, float_bias: bool = False
) -> dict[str, int]:
    """Largest LSB difference each activation can have from the reference, op by op.

    An op given inputs off by ``e_i`` LSB has an exact result off by at most
    ``d = sum(gain_i * e_i)`` LSB; two reals ``d`` apart round (half to even) to integers at
    most ``floor(d) + 1`` apart (0 when ``d == 0``); the runtime's own rounding adds its
    per-op bound. Move ops copy values (``max e_i``). Capped at 255 (the int8 range).
    ``float_bias=True`` (the fake-quantized PyTorch model) adds ``bias_rounding_lsb`` to the
    difference before rounding at each conv / linear.
    """
    e: dict[str, int] = {name: 0 for name in graph.inputs}
    for op in graph.ops:
        ins = [n for n in op.inputs if graph.tensor(n).data is None]
        errors = [e[n] for n in ins]
        if op.type in MOVE_OPS:
            bound = max(errors)
        else:
            d = sum(g * err for g, err in zip(op_gain(graph, op), errors, strict=False))
            own = per_op[op.type]
            if float_bias and op.type in (OpType.CONV, OpType.LINEAR):
                d += bias_rounding_lsb(graph, op)
                own = max(own - 1, 0)  # the rounding step below is the same one
            bound = (math.floor(d * (1 + 1e-6)) + 1 if d > 0 else 0) + own
        e[op.outputs[0]] = min(bound, 255)
    return e


def _check_end_to_end(
    graph: Graph, reference: dict[str, np.ndarray], got: np.ndarray, runtime: str, out: Outcome
) -> None:
    name = graph.outputs[0]
    per_op = PER_OP_LSB[runtime]
    bound = propagated_bound(graph, per_op, float_bias=runtime == "fake_quant")[name]
    diff = lsb(reference[name], got)
    out.values[f"end_to_end:{runtime}"] += got.size
    out.end_to_end[runtime] = (diff, bound)
    if diff > bound:
        out.fail("end_to_end_lsb", f"{runtime}: output {diff} LSB from the reference > {bound}")
