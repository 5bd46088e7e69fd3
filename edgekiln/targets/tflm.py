"""Run a TFLite artifact on TensorFlow Lite Micro's kernels on the host, in a child process.

``tflite_micro.runtime`` runs TFLM's own (reference) kernels one sample at a time, as firmware
does. TFLM checks little: a malformed model or a too-small arena crashes the process, so the
artifact passes ``check_tflite`` first and the interpreter lives in a child process (measured:
an arena of 100 bytes for a small CNN ends the process with SIGSEGV; the caller gets a failed
TargetResult naming the signal).

Arena bytes are measured, not guessed. TFLM's recording allocator reports what it used only
through ``print_allocations()``, which writes to the C-level stderr (file descriptor 2); the
child points fd 2 at a temporary file, invokes once, prints the allocations and parses the
``Arena allocation total N bytes`` line. Measured on this machine: the model runs with exactly
N bytes and fails to allocate with N - 1 (tests/targets/test_tflm.py pins both). If the line is
missing (another TFLM build), the child finds the smallest working arena by bisection instead and
``details["arena_source"]`` says so.

Intermediate tensors: the interpreter's ``kPreserveAllTensors`` mode with ``GetTensor`` keeps
every tensor; ``keep_intermediates=True`` uses it in a second interpreter (that mode records no
allocations, and needs a larger arena than the planned one).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.formats.tflite import TfliteModel
from edgekiln.targets.base import IsolatedRunError, Latency, TargetResult, run_isolated
from edgekiln.targets.litert import (
    _version,
    activations_by_name,
    finish_result,
    input_layout,
    prepare_run,
    timing,
)

logger = logging.getLogger(__name__)

TARGET = "tflm"

# Builtin opcode -> the MicroMutableOpResolver method firmware calls to register its kernel.
OP_REGISTRATIONS: dict[str, str] = {
    "ADD": "AddAdd",
    "AVERAGE_POOL_2D": "AddAveragePool2D",
    "CONCATENATION": "AddConcatenation",
    "CONV_2D": "AddConv2D",
    "DEPTHWISE_CONV_2D": "AddDepthwiseConv2D",
    "DEQUANTIZE": "AddDequantize",
    "FULLY_CONNECTED": "AddFullyConnected",
    "MAX_POOL_2D": "AddMaxPool2D",
    "MEAN": "AddMean",
    "PAD": "AddPad",
    "PADV2": "AddPadV2",
    "QUANTIZE": "AddQuantize",
    "RESHAPE": "AddReshape",
    "SOFTMAX": "AddSoftmax",
    "SPLIT": "AddSplit",
    "TRANSPOSE": "AddTranspose",
    "MUL": "AddMul",
    "SUB": "AddSub",
    "RELU": "AddRelu",
    "RELU6": "AddRelu6",
    "LOGISTIC": "AddLogistic",
    "TANH": "AddTanh",
    "BATCH_MATMUL": "AddBatchMatMul",
    "STRIDED_SLICE": "AddStridedSlice",
    "SQUEEZE": "AddSqueeze",
    "HARD_SWISH": "AddHardSwish",
    "LEAKY_RELU": "AddLeakyRelu",
    "RESIZE_NEAREST_NEIGHBOR": "AddResizeNearestNeighbor",
    "L2_NORMALIZATION": "AddL2Normalization",
}
_ARENA_LINE = re.compile(r"Arena allocation total (\d+) bytes")


def op_registrations(model: TfliteModel) -> list[str]:
    """Sorted MicroMutableOpResolver calls a firmware needs for ``model``'s opcodes.

    Opcodes missing from OP_REGISTRATIONS are spelled the way TFLM names them (CamelCase of the
    opcode, e.g. ``GATHER`` -> ``AddGather``).

    >>> from edgekiln.exporters.tflite import tflite_bytes
    >>> from edgekiln.formats.tflite import read_tflite
    >>> from edgekiln.ir.builder import GraphBuilder
    >>> b = GraphBuilder(np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 1, 4, 4))
    >>> g = b.build([b.softmax(b.linear(b.flatten(b.conv(b.input, 2, 3)), 3))])
    >>> op_registrations(read_tflite(tflite_bytes(g)))
    ['AddConv2D', 'AddFullyConnected', 'AddReshape', 'AddSoftmax']
    """
    names = set()
    for opcode in model.opcodes():
        name = OP_REGISTRATIONS.get(opcode)
        if name is None:
            name = "Add" + "".join(part.capitalize() for part in opcode.split("_"))
        names.add(name)
    return sorted(names)


def run_tflm(
    artifact: str | Path,
    x: np.ndarray,
    y: np.ndarray | None = None,
    *,
    arena_size: int | None = None,
    keep_intermediates: bool = False,
    warmup: int = 2,
    runs: int = 20,
    timeout: float = 600.0,
) -> TargetResult:
    """Run ``artifact`` on TFLM's kernels on the host, one sample at a time.

    ``x`` and ``y`` follow the same rules as ``run_litert`` (float32 quantized with the
    artifact's input parameters or int8 as is; NCHW or the artifact's NHWC). ``arena_size``
    fixes the tensor arena (a firmware's ``kTensorArenaSize``); by default it is generous and
    the arena the model needed is measured and reported in ``details["arena_bytes"]``, with
    ``details["op_registrations"]`` listing the op resolver calls a firmware needs. Latency is
    the median of ``runs`` timed invokes after ``warmup`` ones (host CPU, not a microcontroller).

    Raises FileNotFoundError, ValueError or TfliteFormatError for a missing file, bad data or a
    malformed artifact before any child starts; a TFLM crash, hang or error (e.g. an arena too
    small) comes back as ``TargetResult(ok=False, error=...)``.
    """
    path, model, xb, labels = prepare_run(artifact, x, y)
    if arena_size is not None and arena_size < 1:
        raise ValueError(f"arena_size={arena_size}: pass a positive byte count or None")
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs={runs}, warmup={warmup}: need runs >= 1 and warmup >= 0")
    data = path.read_bytes()
    activation_bytes = sum(
        int(np.prod(t.shape)) * t.dtype.itemsize for t in model.tensors if t.data is None
    )
    generous = max(10 * len(data), 4 * activation_bytes + (1 << 20))
    options = {
        "arena_size": arena_size or generous,
        "preserve_arena": max(arena_size or 0, generous),
        "keep_intermediates": keep_intermediates,
        "warmup": warmup,
        "runs": runs,
    }
    try:
        raw = run_isolated(_tflm_child, data, xb, options, timeout=timeout)
    except IsolatedRunError as e:
        message = str(e)
        if "allocate" in message:
            message += (
                f" (arena_size={options['arena_size']} bytes; pass a larger arena_size, or None "
                "to measure what the model needs)"
            )
        return TargetResult(TARGET, str(path), ok=False, error=message)
    details: dict[str, Any] = {
        "runtime": f"tflite-micro {_version('tflite-micro')}",
        "kernels": "TFLM reference kernels on the host",
        "arena_bytes": raw["arena_bytes"],
        "arena_source": raw["arena_source"],
        "arena_size_given": options["arena_size"],
        "op_registrations": op_registrations(model),
        "ops": [op.opcode for op in model.operators],
        "threads": 1,
        "input_layout": input_layout(np.asarray(x), xb),
    }
    if keep_intermediates:
        details["intermediates"] = activations_by_name(model, raw["intermediates"])
    latency = Latency(raw["median_ms"], raw["p90_ms"], runs, warmup, threads=1)
    return finish_result(TARGET, path, model, raw["output"], labels, latency, details)


# ---- the child process -------------------------------------------------------------------


@contextlib.contextmanager
def _stderr_to_file() -> Iterator[list[str]]:
    """Point file descriptor 2 at a temporary file; the yielded list receives its text."""
    captured: list[str] = []
    libc = ctypes.CDLL(None)
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            libc.fflush(None)
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.append(tmp.read().decode("utf-8", errors="replace"))


def _tflm_child(data: bytes, xb: np.ndarray, options: dict[str, Any]) -> dict[str, Any]:
    from tflite_micro import runtime

    def make(arena: int, preserve: bool = False) -> Any:
        config = (
            runtime.InterpreterConfig.kPreserveAllTensors
            if preserve
            else runtime.InterpreterConfig.kAllocationRecording
        )
        return runtime.Interpreter.from_bytes(data, arena_size=arena, intrepreter_config=config)

    result: dict[str, Any] = {}
    error: Exception | None = None
    outputs: list[np.ndarray] = []
    with _stderr_to_file() as log:
        try:
            it = make(options["arena_size"])
            for i in range(len(xb)):
                it.set_input(xb[i : i + 1], 0)
                it.invoke()
                outputs.append(np.array(it.get_output(0)))
            it.print_allocations()
        except RuntimeError as e:
            error = e
    printed = "".join(log)
    if error is not None:
        lines = [ln for ln in printed.splitlines() if ln.strip()][-4:]
        raise RuntimeError(f"TFLM: {error}; TFLM's log ends: {' | '.join(lines)}")
    match = _ARENA_LINE.search(printed)
    if match is not None:
        result["arena_bytes"] = int(match.group(1))
        result["arena_source"] = "print_allocations"
    else:
        result["arena_bytes"] = _bisect_arena(make, xb[:1], options["arena_size"])
        result["arena_source"] = "bisection"
    result["output"] = np.concatenate(outputs)

    sample = xb[:1]
    times = []
    for i in range(options["warmup"] + options["runs"]):
        it.set_input(sample, 0)
        start = time.perf_counter()
        it.invoke()
        if i >= options["warmup"]:
            times.append((time.perf_counter() - start) * 1e3)
    result["median_ms"], result["p90_ms"] = timing(times)

    if options["keep_intermediates"]:
        result["intermediates"] = _intermediates(make(options["preserve_arena"], True), data, xb)
    return result


def _intermediates(it: Any, data: bytes, xb: np.ndarray) -> dict[str, np.ndarray]:
    from edgekiln.formats.tflite import read_tflite

    model = read_tflite(data)
    wanted = [t for t in model.tensors if t.data is None]
    per_sample: dict[str, list[np.ndarray]] = {t.name: [] for t in wanted}
    for i in range(len(xb)):
        it.set_input(xb[i : i + 1], 0)
        it.invoke()
        for t in wanted:
            per_sample[t.name].append(
                np.array(it.GetTensor(t.index, 0)["tensor_data"]).reshape(t.shape)
            )
    return {name: np.concatenate(values) for name, values in per_sample.items()}


def _bisect_arena(make: Any, sample: np.ndarray, upper: int) -> int:
    """Smallest arena (to 16 bytes) with which the model allocates and invokes."""

    def works(size: int) -> bool:
        try:
            it = make(size)
            it.set_input(sample, 0)
            it.invoke()
            return True
        except RuntimeError:
            return False

    lo, hi = 1024, upper  # below ~1 KiB TFLM crashes the process instead of failing cleanly
    while hi - lo > 16:
        mid = (lo + hi) // 2
        if works(mid):
            hi = mid
        else:
            lo = mid
    return hi
