"""Run an int8 (or float) TFLite artifact on LiteRT (``ai-edge-litert``), in a child process.

LiteRT is TensorFlow Lite's maintained successor and runs under numpy 2. Its Python interpreter
picks kernels through ``experimental_op_resolver_type``: ``AUTO`` (the default) applies the
XNNPACK delegate, ``BUILTIN_WITHOUT_DEFAULT_DELEGATES`` runs LiteRT's own optimized builtin
kernels, and ``BUILTIN_REF`` its reference kernels (the ones TFLM's kernels are ported from).

Measured on this machine (tests/targets/test_litert.py, 18 single-feature graphs, 32 samples):
XNNPACK requantizes in float and agreed with edgekiln's float reference to 0 LSB on 16 graphs
and 1 LSB on two; the builtin and reference kernels use TFLite's integer fixed-point multipliers
and differ by at most 1 LSB per requantizing op.

Batches: the input is resized to the whole batch and run once. Measured on the benchmark CNN
(benchmarks/tflite_latency.py, 256 samples, one thread): resize 9.4 ms vs a batch-1 loop 10.1 ms
with XNNPACK, 38.8 vs 42.0 ms with the builtin kernels, outputs identical; a small gain, and one
call. Latency is measured on a separate batch-1 interpreter.

>>> import numpy as np, tempfile, os
>>> from edgekiln.ir.builder import GraphBuilder
>>> from edgekiln.exporters.tflite import write_tflite
>>> b = GraphBuilder(np.linspace(-1, 1, 32, dtype=np.float32).reshape(2, 1, 4, 4))
>>> path = os.path.join(tempfile.mkdtemp(), "m.tflite")
>>> path = write_tflite(b.build([b.conv(b.input, 2, 3)]), path)
>>> r = run_litert(path, np.zeros((3, 1, 4, 4), np.float32), runs=3, warmup=1)
>>> r.ok, r.outputs.shape, r.outputs.dtype
(True, (3, 2, 2, 2), dtype('int8'))
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.formats.tflite import TfliteModel, TfliteTensor, check_tflite
from edgekiln.ir.graph import quantize_input
from edgekiln.targets.base import (
    IsolatedRunError,
    Latency,
    TargetResult,
    check_labels,
    run_isolated,
)

logger = logging.getLogger(__name__)

TARGET = "litert"


def run_litert(
    artifact: str | Path,
    x: np.ndarray,
    y: np.ndarray | None = None,
    *,
    xnnpack: bool = True,
    reference_kernels: bool = False,
    threads: int = 1,
    warmup: int = 5,
    runs: int = 50,
    keep_intermediates: bool = False,
    timeout: float = 300.0,
) -> TargetResult:
    """Run the TFLite file ``artifact`` on LiteRT and return outputs, accuracy and latency.

    ``x`` is float32 data (quantized with the artifact's own input scale and zero point) or int8
    data passed as is, in PyTorch's NCHW layout or the artifact's NHWC layout (told apart by
    shape; NCHW wins when both fit). ``y`` holds integer labels for top-1 accuracy.
    ``xnnpack=False`` selects LiteRT's builtin kernels without the default XNNPACK delegate;
    ``reference_kernels=True`` its reference kernels. ``keep_intermediates=True`` returns every
    tensor in ``details["intermediates"]`` (by tensor name, batch first, 4-D ones in NCHW);
    XNNPACK keeps no intermediates, so it is turned off for that run and the details say so.

    Raises FileNotFoundError, ValueError or TfliteFormatError for a missing file, bad data or
    a malformed artifact, before any child starts. A crash, hang or runtime error comes back as
    ``TargetResult(ok=False, error=...)``.
    """
    path, model, xb, labels = prepare_run(artifact, x, y)
    if threads < 1 or runs < 1 or warmup < 0:
        raise ValueError(
            f"threads={threads}, runs={runs}, warmup={warmup}: need threads >= 1, runs >= 1 "
            "and warmup >= 0"
        )
    if keep_intermediates and xnnpack and not reference_kernels:
        xnnpack = False  # the delegate hides intermediate tensors
        logger.info("keep_intermediates: running %s without XNNPACK", path)
    resolver = (
        "BUILTIN_REF"
        if reference_kernels
        else ("AUTO" if xnnpack else "BUILTIN_WITHOUT_DEFAULT_DELEGATES")
    )
    options = {
        "resolver": resolver,
        "threads": threads,
        "warmup": warmup,
        "runs": runs,
        "keep_intermediates": keep_intermediates,
    }
    try:
        raw = run_isolated(_litert_child, path.read_bytes(), xb, options, timeout=timeout)
    except IsolatedRunError as e:
        error = str(e)
        if resolver == "AUTO" and "XNNPACK" in error:
            error += xnnpack_diagnosis(model)
        return TargetResult(TARGET, str(path), ok=False, error=error)
    details = {
        "runtime": f"ai-edge-litert {_version('ai-edge-litert')}",
        "op_resolver": resolver,
        "xnnpack": raw["xnnpack_applied"],  # a DELEGATE node after allocation, not the resolver
        "threads": threads,
        "batch_mode": "resize",
        "ops": [op.opcode for op in model.operators],
        "intermediates_without_xnnpack": keep_intermediates,
        "input_dtype": str(xb.dtype),
        "input_layout": input_layout(np.asarray(x), xb),
    }
    latency = Latency(raw["median_ms"], raw["p90_ms"], runs, warmup, threads)
    if keep_intermediates:
        details["intermediates"] = activations_by_name(model, raw["intermediates"])
    return finish_result(TARGET, path, model, raw["output"], labels, latency, details)


# XNNPACK's int8 convolution and fully connected operators refuse a requantization scale
# ``input_scale * filter_scale / output_scale`` of 256 or more ("failed to prepare"); measured
# on this machine: 94 runs, 787 fails. Such a scale comes from an output range near zero (a ReLU
# that saw only negative values during calibration gets the minimum scale).
XNNPACK_MAX_REQUANT_SCALE = 256.0


def xnnpack_diagnosis(model: TfliteModel) -> str:
    """Why XNNPACK may have refused ``model``: the ops whose requantization scale it rejects.

    Returns an empty string when no op exceeds ``XNNPACK_MAX_REQUANT_SCALE``.
    """
    found = []
    for op in model.operators:
        if op.opcode not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            continue
        x, w = (model.tensors[i] for i in op.inputs[:2])
        out = model.tensors[op.outputs[0]]
        if not (x.scale.size and w.scale.size and out.scale.size):
            continue
        ratio = float(np.max(x.scale[0] * w.scale.astype(np.float64)) / out.scale[0])
        if ratio >= XNNPACK_MAX_REQUANT_SCALE:
            found.append(
                f"operator {op.index} ({op.opcode}) writing {out.name!r}: input scale x filter "
                f"scale / output scale = {ratio:.4g} (output scale {float(out.scale[0]):.3g})"
            )
    if not found:
        return ""
    return (
        ". XNNPACK accepts requantization scales below "
        f"{XNNPACK_MAX_REQUANT_SCALE:g}; too large in {'; '.join(found)}. The output range of "
        "that layer is near zero (e.g. a ReLU whose input was negative on all calibration "
        "data): calibrate with data that reaches it, or run with xnnpack=False"
    )


# ---- shared with the TFLM and mcu targets ----------------------------------------------------


def prepare_run(
    artifact: str | Path, x: np.ndarray, y: np.ndarray | None
) -> tuple[Path, TfliteModel, np.ndarray, np.ndarray | None]:
    """Check the artifact and turn ``x`` into the batch its input tensor takes.

    Returns the path, the checked model, the input batch (artifact layout and dtype) and the
    labels. Raises before any runtime sees the file.
    """
    path = Path(artifact)
    if not path.is_file():
        raise FileNotFoundError(
            f"TFLite artifact {str(path)!r} does not exist; export one with "
            "edgekiln.exporters.tflite.write_tflite(graph, path)"
        )
    model = check_tflite(path)
    if len(model.inputs) != 1:
        raise ValueError(
            f"{path.name} has {len(model.inputs)} inputs; edgekiln's TFLite targets feed "
            "single-input models"
        )
    x = np.asarray(x)
    xb = input_batch(model.tensors[model.inputs[0]], x, path.name)
    return path, model, xb, check_labels(y, xb.shape[0])


def input_layout(x: np.ndarray, xb: np.ndarray) -> str:
    """How ``x`` was given: "NCL" (1-D PyTorch), "NCHW" or the artifact's own layout."""
    if x.ndim == 3 and xb.ndim == 4:
        return "NCL"
    if x.ndim == 4 and x.shape != xb.shape:
        return "NCHW"
    return "artifact"


def input_batch(tensor: TfliteTensor, x: np.ndarray, artifact: str) -> np.ndarray:
    """``x`` in the input tensor's layout and dtype (quantized with its own parameters).

    Float data for an int8 input is quantized by ``edgekiln.ir.graph.quantize_input``, the
    fake-quantized model's ``rint(x * (1 / scale)) + zero_point``, so LiteRT, TFLM and the
    simulator all get the integers training saw. A float-input artifact quantizes in its
    QUANTIZE op instead, and there the kernels differ (measured on near-half-step inputs,
    ai-edge-litert 2.3): XNNPACK and the builtin kernels multiply by the reciprocal and round
    half to even, as the fake-quantized model does; the reference kernels and TFLM compute
    ``TfLiteRound(x / scale)``, half away from zero, one integer off on exact half steps.
    """
    x = np.asarray(x)
    shape = tuple(tensor.shape[1:])
    pytorch = _pytorch_shape(tensor.shape)
    if x.ndim >= 1 and tuple(x.shape[1:]) == pytorch:
        x = _from_pytorch_layout(x, tensor.shape)
    elif x.ndim == 3 and len(shape) == 3 and shape[0] == 1 and x.shape[1:] == shape[:0:-1]:
        x = np.ascontiguousarray(x.transpose(0, 2, 1)[:, None])  # 1-D (N, C, L) -> (N, 1, L, C)
    elif tuple(x.shape[1:]) != shape:
        raise ValueError(
            f"data x has shape {x.shape}; {artifact} takes a batch of {pytorch} (PyTorch "
            f"layout) or {shape} (its own layout) per sample, e.g. "
            f"({x.shape[0] if x.ndim else 1}, {', '.join(map(str, pytorch))})"
        )
    if x.shape[0] < 1:
        raise ValueError(f"data x has shape {x.shape}: an empty batch; pass at least one sample")
    if tensor.dtype == np.float32:
        if x.dtype == np.int8:
            raise ValueError(
                f"data x is int8 but {artifact} takes float32 input; pass real-valued float32 data"
            )
        return _finite(x, artifact).astype(np.float32)
    if x.dtype == tensor.dtype:
        return np.ascontiguousarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(
            f"data x has dtype {x.dtype}; {artifact} takes {tensor.dtype}: pass float32 data "
            f"(quantized here with the artifact's input scale) or {tensor.dtype} data as is"
        )
    if tensor.scale.size != 1:
        raise ValueError(
            f"{artifact} input tensor {tensor.name!r} has {tensor.scale.size} scales; float data "
            "needs one per-tensor scale to quantize with"
        )
    x = _finite(x, artifact)
    scale = float(tensor.scale[0])
    zero_point = int(tensor.zero_point[0]) if tensor.zero_point.size else 0
    # the integers the fake-quantized model's input quantizer gives, not round(x / scale)
    return quantize_input(x, scale, zero_point, tensor.dtype)


def _finite(x: np.ndarray, artifact: str) -> np.ndarray:
    bad = ~np.isfinite(x)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"data x for {artifact} holds {int(bad.sum())} NaN/inf values (first at index "
            f"{first}); clean or drop those samples"
        )
    return x


def _pytorch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Per-sample PyTorch shape of an NHWC TFLite tensor: (H, W, C) -> (C, H, W)."""
    if len(shape) == 4:
        return (shape[3], shape[1], shape[2])
    return tuple(shape[1:])


def _from_pytorch_layout(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if len(shape) == 4:
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    return x


def to_pytorch_layout(value: np.ndarray) -> np.ndarray:
    """A runtime tensor in PyTorch layout: 4-D NHWC becomes NCHW, others stay."""
    return value.transpose(0, 3, 1, 2) if value.ndim == 4 else value


def pytorch_outputs(output: np.ndarray, layout: str) -> np.ndarray:
    """The model's output for data given in ``layout`` (as ``input_layout`` names it), in
    PyTorch layout: 4-D NHWC becomes NCHW, and a 1-D model fed (N, C, L) answers (N, C, L)."""
    outputs = to_pytorch_layout(output)
    if layout == "NCL" and outputs.ndim == 4 and outputs.shape[2] == 1:
        outputs = outputs[:, :, 0]  # TFLite's (N, 1, L, C) -> (N, C, 1, L) -> (N, C, L)
    return outputs


def activations_by_name(model: TfliteModel, values: dict[str, np.ndarray]) -> dict[str, Any]:
    """The activation (non-constant) tensors among ``values``, in PyTorch layout."""
    names = {t.name for t in model.tensors if t.data is None}
    return {name: to_pytorch_layout(v) for name, v in values.items() if name in names}


def finish_result(
    target: str,
    path: Path,
    model: TfliteModel,
    output: np.ndarray,
    labels: np.ndarray | None,
    latency: Latency,
    details: dict[str, Any],
) -> TargetResult:
    """The TargetResult of a successful run: layout, output parameters and accuracy."""
    out_tensor = model.tensors[model.outputs[0]]
    outputs = pytorch_outputs(output, details.get("input_layout", "artifact"))
    scale = zero_point = None
    if out_tensor.scale.size == 1:
        scale = float(out_tensor.scale[0])
        zero_point = int(out_tensor.zero_point[0]) if out_tensor.zero_point.size else 0
    accuracy = None
    if labels is not None and outputs.ndim == 2:
        accuracy = float(np.mean(np.argmax(outputs, axis=1) == labels))
    return TargetResult(
        target,
        str(path),
        ok=True,
        outputs=outputs,
        output_scale=scale,
        output_zero_point=zero_point,
        accuracy=accuracy,
        latency=latency,
        details=details,
    )


def timing(samples_ms: list[float]) -> tuple[float, float]:
    """Median and 90th percentile of per-run times in milliseconds."""
    return float(statistics.median(samples_ms)), float(np.percentile(samples_ms, 90))


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


# ---- the child process -------------------------------------------------------------------


def _litert_child(data: bytes, xb: np.ndarray, options: dict[str, Any]) -> dict[str, Any]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import warnings

    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = getattr(OpResolverType, options["resolver"])

    def interpreter(preserve: bool) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the debugging notice for preserve_all_tensors
            return Interpreter(
                model_content=data,
                num_threads=options["threads"],
                experimental_op_resolver_type=resolver,
                experimental_preserve_all_tensors=preserve,
            )

    it = interpreter(options["keep_intermediates"])
    inp = it.get_input_details()[0]
    out = it.get_output_details()[0]
    it.resize_tensor_input(inp["index"], list(xb.shape))
    it.allocate_tensors()
    it.set_tensor(inp["index"], xb)
    it.invoke()
    result: dict[str, Any] = {"output": it.get_tensor(out["index"]).copy()}
    # AUTO asks for XNNPACK; the delegate takes the ops it supports at allocation and shows up
    # as a DELEGATE node, and none appears when it takes none (measured: int8 AVERAGE_POOL_2D)
    result["xnnpack_applied"] = any(op["op_name"] == "DELEGATE" for op in it._get_ops_details())
    if options["keep_intermediates"]:
        tensors = {}
        for t in it.get_tensor_details():
            try:
                value = it.get_tensor(t["index"])
            except ValueError:
                continue  # tensors without data (optional inputs)
            tensors[t["name"]] = np.array(value)
        result["intermediates"] = tensors
    del it

    single = interpreter(False)
    inp1 = single.get_input_details()[0]
    single.allocate_tensors()
    sample = xb[:1]
    times = []
    for i in range(options["warmup"] + options["runs"]):
        single.set_tensor(inp1["index"], sample)
        start = time.perf_counter()
        single.invoke()
        if i >= options["warmup"]:
            times.append((time.perf_counter() - start) * 1e3)
    result["median_ms"], result["p90_ms"] = timing(times)
    return result
