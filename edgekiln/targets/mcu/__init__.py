"""edgekiln's microcontroller target: ``mcu:<board>``.

A bit-exact integer simulator of TFLite Micro's int8 kernels (``interpreter.simulate``), an
arena planner and flash count (``memory``), board profiles (``boards``), a cited latency model
(``latency``) and a layer-by-layer comparison (``compare``). ``run_mcu`` ties them together
with the target conventions every edgekiln target follows.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edgekiln.formats.tflite import TfliteModel
from edgekiln.targets.base import Latency, TargetResult, check_labels
from edgekiln.targets.mcu.boards import BOARDS, Board, get_board
from edgekiln.targets.mcu.compare import LayerComparison, compare_layers, compare_results
from edgekiln.targets.mcu.interpreter import SUPPORTED_OPS, SimResult, SimulationError, simulate
from edgekiln.targets.mcu.latency import KERNEL_LIBRARIES, layer_costs
from edgekiln.targets.mcu.memory import memory_report

logger = logging.getLogger(__name__)

__all__ = [
    "BOARDS",
    "SUPPORTED_OPS",
    "Board",
    "LayerComparison",
    "SimResult",
    "SimulationError",
    "compare_layers",
    "compare_results",
    "get_board",
    "run_mcu",
    "simulate",
]


def run_mcu(
    artifact: str | Path,
    x: np.ndarray,
    y: np.ndarray | None = None,
    *,
    board: str | Board,
    kernels: str = "cmsis-nn",
    keep_intermediates: bool = False,
) -> TargetResult:
    """Simulate an int8 TFLite artifact on a microcontroller board.

    ``x`` is float32 in PyTorch's layout (NCHW) or the artifact's own (NHWC), quantized with
    the artifact's input scale and zero point, or int8 passed as is. The outputs are bit-exact
    with TFLM's reference kernels; latency is the latency model's estimate; ``details`` carry
    the arena and flash figures, the per-layer table and the budget check. A model over the
    board's SRAM or flash gives ``ok=False`` with its outputs still computed.
    ``keep_intermediates=True`` adds every activation to ``details["intermediates"]`` by tensor
    name, batch first, 4-D tensors in NCHW (as ``run_tflm`` and ``run_litert`` give them), for
    ``compare_results``.

    >>> r = run_mcu("model.tflite", x, y, board="nucleo-l4r5zi")  # doctest: +SKIP
    >>> r.target, r.latency.estimated  # doctest: +SKIP
    ('mcu:nucleo-l4r5zi', True)
    """
    b = get_board(board)
    if kernels not in KERNEL_LIBRARIES:
        raise ValueError(f"kernels must be one of {', '.join(KERNEL_LIBRARIES)}; got {kernels!r}")
    path = Path(artifact)
    if not path.is_file():
        raise FileNotFoundError(f"artifact {str(path)!r} does not exist; export it first")
    from edgekiln.formats.tflite import check_tflite

    model = check_tflite(path)
    xq, layout = _prepare_input(model, x)
    labels = check_labels(y, xq.shape[0])
    sim = simulate(model, xq, keep_intermediates=keep_intermediates)
    out_t = model.tensor(model.outputs[0])
    outputs = _to_pytorch_layout(sim.output, layout)
    mem = memory_report(model, kernels)
    costs = layer_costs(model, b, kernels)
    total_ms = sum(c.ms for c in costs)
    errors = _budget_errors(b, mem, costs)
    accuracy = None
    if labels is not None and outputs.ndim == 2:
        accuracy = float(np.mean(np.argmax(outputs, axis=1) == labels))
    details = {
        "board": b.__dict__ | {},
        "kernels": kernels,
        # Tested value for value against the tflite-micro wheel's reference kernels. That
        # CMSIS-NN's s8 kernels give the same integers is the kernels' design, not measured here.
        "bit_exact_with": "TFLM reference kernels (tflite-micro wheel), tested",
        "arena_bytes": mem.arena_bytes,
        "arena_total_bytes": mem.arena_total_bytes,
        "flash_bytes": mem.flash_bytes,
        "memory": mem.as_dict(),
        "layers": [c.as_dict() for c in costs],
        "budget": {
            "sram_bytes": b.sram_bytes,
            "flash_bytes": b.flash_bytes,
            "arena_need_bytes": mem.arena_total_bytes,
            "flash_need_bytes": mem.flash_bytes,
            "ok": not errors,
        },
        "ops": model.opcodes(),
        "input_layout": layout,
    }
    if keep_intermediates:  # by tensor name, batch first, 4-D in NCHW as TFLM and LiteRT give
        details["intermediates"] = {
            name: np.transpose(v, (0, 3, 1, 2)) if v.ndim == 4 else v
            for name, v in sim.tensors.items()
        }
        details["order"] = sim.order
    scale = float(out_t.scale[0]) if out_t.scale.size else None
    zp = int(out_t.zero_point[0]) if out_t.zero_point.size else None
    return TargetResult(
        target=b.target,
        artifact=str(path),
        ok=not errors,
        error="; ".join(errors) or None,
        outputs=outputs,
        output_scale=scale,
        output_zero_point=zp,
        accuracy=accuracy,
        latency=Latency(total_ms, total_ms, runs=0, warmup=0, threads=1, estimated=True),
        details=details,
    )


def _prepare_input(model: TfliteModel, x: np.ndarray) -> tuple[np.ndarray, str]:
    """Bring ``x`` to the artifact's layout and dtype; return it and the layout found."""
    inp = model.tensor(model.inputs[0])
    x = np.asarray(x)
    want = tuple(int(s) for s in inp.shape[1:])
    if x.ndim == len(inp.shape) and tuple(x.shape[1:]) == want:
        layout = "artifact"
    elif x.ndim == 4 and x.shape[1:] == (want[2], want[0], want[1]):
        x, layout = np.transpose(x, (0, 2, 3, 1)), "nchw"
    elif x.ndim == 3 and len(want) == 2 and x.shape[1:] == (want[1], want[0]):
        x, layout = np.transpose(x, (0, 2, 1)), "ncl"
    else:
        nchw = (want[2], want[0], want[1]) if len(want) == 3 else want
        raise ValueError(
            f"data of shape {x.shape} fits neither the artifact's input (N, {want}) nor "
            f"PyTorch's layout (N, {nchw}); pass one of them"
        )
    if x.dtype == inp.dtype:
        return np.ascontiguousarray(x), layout
    if x.dtype.kind != "f":
        raise ValueError(f"data must be float32 or {inp.dtype}; got {x.dtype}")
    if not np.all(np.isfinite(x)):
        bad = int(np.sum(~np.isfinite(x)))
        raise ValueError(f"data holds {bad} NaN or infinite values; clean them before running")
    if inp.dtype == np.float32:
        return x.astype(np.float32), layout
    scale, zp = float(inp.scale[0]), int(inp.zero_point[0])
    q = np.round(x.astype(np.float32) / np.float32(scale)) + zp
    info = np.iinfo(inp.dtype)
    return np.clip(q, info.min, info.max).astype(inp.dtype), layout


def _to_pytorch_layout(out: np.ndarray, layout: str) -> np.ndarray:
    if out.ndim == 4:
        return np.transpose(out, (0, 3, 1, 2))
    if out.ndim == 3:
        return np.transpose(out, (0, 2, 1))
    return out


def _budget_errors(b: Board, mem, costs) -> list[str]:
    errors = []
    if mem.arena_total_bytes > b.sram_bytes:
        peak = costs[mem.peak_op] if costs else None
        where = f" (live activations peak at operator {peak.index} {peak.opcode})" if peak else ""
        errors.append(
            f"arena needs {mem.arena_total_bytes} bytes but {b.name} has {b.sram_bytes} bytes of "
            f"SRAM; largest tensor {mem.largest_tensor!r} is {mem.largest_tensor_bytes} bytes"
            f"{where}"
        )
    if mem.flash_bytes > b.flash_bytes:
        errors.append(
            f"flash needs {mem.flash_bytes} bytes (model {mem.file_bytes} + runtime estimate "
            f"{mem.runtime_code_bytes}) but {b.name} has {b.flash_bytes} bytes; constants take "
            f"{mem.constant_bytes} bytes"
        )
    return errors
