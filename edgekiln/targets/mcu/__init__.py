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

from edgekiln.targets.base import Latency, TargetResult
from edgekiln.targets.litert import input_layout, prepare_run, pytorch_outputs
from edgekiln.targets.mcu.boards import BOARDS, Board, get_board
from edgekiln.targets.mcu.compare import LayerComparison, compare_layers, compare_results
from edgekiln.targets.mcu.interpreter import SUPPORTED_OPS, SimResult, SimulationError, simulate
from edgekiln.targets.mcu.latency import (
    KERNEL_LIBRARIES,
    LayerCost,
    flash_wait_states,
    layer_costs,
)
from edgekiln.targets.mcu.memory import MemoryReport, memory_report

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

    ``x`` follows the rules of ``run_tflm`` and ``run_litert`` (one shared function reads it):
    float32 quantized with the artifact's input scale and zero point, or int8 passed as is, in
    PyTorch's layout (NCHW, or (N, C, L) for a 1-D model) or the artifact's own (NHWC, or
    (N, 1, L, C)); outputs come back in the layout the data came in. The outputs are bit-exact
    with TFLM's reference kernels; latency is the latency model's estimate; ``details`` carry
    the arena and flash figures, the per-layer table, the budget check and the flash wait
    states the estimate used (``flash_wait_states_assumed`` is True when the board gives none
    and the latency model's anchor's were taken). ``arena_bytes`` is
    the planned arena (activations and scratch buffers, what TFLM's planner places: equal to
    the "head" TFLM prints for reference kernels); ``arena_total_bytes`` adds the estimated
    interpreter state and is the figure checked against the board's SRAM
    (``budget["arena_need_bytes"]``). A model over the board's SRAM or flash gives
    ``ok=False`` with its outputs still computed, and the error names the budget, the need and
    the largest activation or constant tensor with its operator.
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
    path, model, xq, labels = prepare_run(artifact, x, y)
    layout = input_layout(np.asarray(x), xq)
    sim = simulate(model, xq, keep_intermediates=keep_intermediates)
    out_t = model.tensor(model.outputs[0])
    outputs = pytorch_outputs(sim.output, layout)
    mem = memory_report(model, kernels)
    costs = layer_costs(model, b, kernels)
    wait_states, wait_states_assumed = flash_wait_states(b)
    total_ms = sum(c.ms for c in costs)
    errors = _budget_errors(b, mem, costs)
    accuracy = None
    if labels is not None and outputs.ndim == 2:
        accuracy = float(np.mean(np.argmax(outputs, axis=1) == labels))
    details = {
        "board": b.__dict__ | {},
        "kernels": kernels,
        # the wait states of the latency estimate; assumed (the anchor's) when the board has none
        "flash_wait_states": wait_states,
        "flash_wait_states_assumed": wait_states_assumed,
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


def _budget_errors(b: Board, mem: MemoryReport, costs: list[LayerCost]) -> list[str]:
    """Why the model does not fit ``b``: each budget, the need, and the largest tensor or layer."""
    errors = []
    if mem.arena_total_bytes > b.sram_bytes:
        peak = costs[mem.peak_op] if costs else None
        where = f" (live activations peak at operator {peak.index} {peak.opcode})" if peak else ""
        errors.append(
            f"arena needs {mem.arena_total_bytes} bytes but {b.name} has {b.sram_bytes} bytes of "
            f"SRAM; largest tensor {mem.largest_tensor!r} is {mem.largest_tensor_bytes} bytes"
            f"{where}; shrink that activation (fewer channels, an earlier stride or pool) or "
            "pick a board with more SRAM"
        )
    if mem.flash_bytes > b.flash_bytes:
        op = mem.largest_constant_op
        user = ""
        if 0 <= op < len(costs):
            user = f" (read by operator {op} {costs[op].opcode} writing {costs[op].output!r})"
        errors.append(
            f"flash needs {mem.flash_bytes} bytes (model {mem.file_bytes} + runtime estimate "
            f"{mem.runtime_code_bytes}) but {b.name} has {b.flash_bytes} bytes; constants take "
            f"{mem.constant_bytes} bytes, the largest, {mem.largest_constant!r}, "
            f"{mem.largest_constant_bytes} bytes{user}; prune or shrink that layer, or pick a "
            "board with more flash"
        )
    return errors
