"""What sparsity buys in the artifact and on the device: sizes, MACs and estimated latency.

Top-level wiring (it reads the graph, writes TFLite and asks the MCU target's latency model),
so it imports ``edgekiln.ir``, ``edgekiln.exporters`` and ``edgekiln.targets.mcu``, never torch.

- :func:`artifact_stats`: one graph: per-layer weight sparsity and MACs, the ``.tflite`` size,
  its gzip size (what zeros save when the file is compressed for storage or an OTA update), and
  the latency model's estimate on a board.
- :func:`compare_sparsity`: a dense and a sparse graph side by side, with ratios: the report's
  before/after section (``report.json["sparsity"]``).
- :func:`sweep_point`: one row of a sparsity sweep (accuracy, size, latency at one sparsity).

Latency figures are the MCU latency model's ESTIMATES (``edgekiln.targets.mcu.latency``): they
count MACs, so channel removal (fewer MACs) shows in them and unstructured zeros (same MACs; TFLM
has no sparse kernels) do not. Gzip sizes are where unstructured zeros show.

Every dict is JSON-ready (ints, floats, strings, lists).
"""

from __future__ import annotations

import gzip
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.exporters.tflite import write_tflite
from edgekiln.formats.tflite import read_tflite
from edgekiln.ir import Graph, OpType
from edgekiln.targets.mcu.boards import Board, get_board
from edgekiln.targets.mcu.latency import layer_costs
from edgekiln.targets.mcu.memory import memory_report

__all__ = ["DEFAULT_BOARD", "artifact_stats", "compare_sparsity", "layer_sparsity", "sweep_point"]

DEFAULT_BOARD = "nucleo-l4r5zi"  # the MLPerf Tiny reference board
GZIP_LEVEL = 9


def layer_sparsity(graph: Graph) -> list[dict[str, Any]]:
    """Per CONV / LINEAR op: its name, int8 kernel shape, zero count, size and sparsity.

    >>> from edgekiln.ir import Activation, DType, Op, QParams, Tensor
    >>> w = np.array([[0, 3], [0, 0]], dtype=np.int8)
    >>> t = {"x": Tensor("x", (1, 2), DType.INT8, QParams.per_tensor(0.1, 0)),
    ...      "w": Tensor("w", (2, 2), DType.INT8, QParams.per_channel(np.ones(2)), w),
    ...      "b": Tensor("b", (2,), DType.INT32, QParams.per_channel(np.ones(2)),
    ...                  np.zeros(2, dtype=np.int32)),
    ...      "y": Tensor("y", (1, 2), DType.INT8, QParams.per_tensor(0.1, 0))}
    >>> g = Graph(t, [Op(OpType.LINEAR, ["x", "w", "b"], ["y"],
    ...                  {"activation": Activation.NONE}, "fc")], ["x"], ["y"])
    >>> layer_sparsity(g)
    [{'layer': 'fc', 'op': 'linear', 'shape': [2, 2], 'zeros': 3, 'total': 4, 'sparsity': 0.75}]
    """
    rows = []
    for op in graph.ops:
        if op.type not in (OpType.CONV, OpType.LINEAR):
            continue
        weight = graph.tensor(op.inputs[1])
        data = weight.data if weight.data is not None else np.zeros(weight.shape)
        zeros, total = int(np.count_nonzero(data == 0)), int(data.size)
        rows.append(
            {
                "layer": op.name or op.outputs[0],
                "op": op.type.value,
                "shape": [int(d) for d in weight.shape],
                "zeros": zeros,
                "total": total,
                "sparsity": zeros / total if total else 0.0,
            }
        )
    return rows


def artifact_stats(
    graph: Graph, board: str | Board = DEFAULT_BOARD, *, kernels: str = "cmsis-nn"
) -> dict[str, Any]:
    """Sizes, MACs and estimated latency of ``graph`` written as an int8 ``.tflite``.

    Returns ``{"board", "kernels", "tflite_bytes", "gzip_bytes", "macs", "estimated_ms",
    "arena_bytes", "weight_sparsity", "layers": [per-layer sparsity], "ops": [per-operator
    {"opcode", "output", "macs", "estimated_ms"}]}``. The file is written to a temporary
    directory with the exporter every target reads, so the size is the artifact's.

    Raises:
        ValueError: An unknown board or kernel library (the message lists the known ones).

    >>> stats = artifact_stats(graph, "nucleo-l4r5zi")  # doctest: +SKIP
    >>> stats["tflite_bytes"], stats["macs"], round(stats["estimated_ms"], 1)  # doctest: +SKIP
    (30816, 2312960, 70.4)
    """
    b = get_board(board)
    with tempfile.TemporaryDirectory(prefix="edgekiln-sparsity-") as tmp:
        path = write_tflite(graph, Path(tmp) / "model.tflite")
        data = path.read_bytes()
    model = read_tflite(data)
    costs = layer_costs(model, b, kernels)
    layers = layer_sparsity(graph)
    zeros = sum(row["zeros"] for row in layers)
    total = sum(row["total"] for row in layers)
    return {
        "board": b.name,
        "kernels": kernels,
        "tflite_bytes": len(data),
        "gzip_bytes": len(gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0)),
        "macs": int(sum(c.macs for c in costs)),
        "estimated_ms": float(sum(c.ms for c in costs)),
        "arena_bytes": int(memory_report(model, kernels).arena_bytes),
        "weight_sparsity": zeros / total if total else 0.0,
        "layers": layers,
        "ops": [
            {"opcode": c.opcode, "output": c.output, "macs": int(c.macs), "estimated_ms": c.ms}
            for c in costs
        ],
    }


_RATIO_KEYS = ("tflite_bytes", "gzip_bytes", "macs", "estimated_ms", "arena_bytes")


def compare_sparsity(
    dense_graph: Graph,
    sparse_graph: Graph,
    board: str | Board = DEFAULT_BOARD,
    *,
    kernels: str = "cmsis-nn",
) -> dict[str, Any]:
    """The report's before/after section: ``dense_graph`` vs ``sparse_graph`` on ``board``.

    ``dense_graph`` is the "before" (e.g. the model captured before pruning, or the pruned
    model captured with ``remove_pruned_channels=False``); ``sparse_graph`` the artifact that
    ships. Returns ``{"board", "kernels", "dense": artifact_stats, "sparse": artifact_stats,
    "ratios": {key: sparse / dense}, "channel_removal": what capture removed (or None)}``;
    a ratio below 1 is a saving.

    Raises:
        ValueError: An unknown board or kernel library.

    >>> section = compare_sparsity(dense, sparse, "nucleo-l4r5zi")  # doctest: +SKIP
    >>> section["ratios"]["tflite_bytes"], section["ratios"]["estimated_ms"]  # doctest: +SKIP
    (0.483, 0.31)
    """
    dense = artifact_stats(dense_graph, board, kernels=kernels)
    sparse = artifact_stats(sparse_graph, board, kernels=kernels)
    ratios = {
        key: (float(sparse[key]) / float(dense[key]) if dense[key] else None) for key in _RATIO_KEYS
    }
    return {
        "board": dense["board"],
        "kernels": kernels,
        "dense": dense,
        "sparse": sparse,
        "ratios": ratios,
        "channel_removal": sparse_graph.metadata.get("channel_removal"),
    }


def sweep_point(
    sparsity: float,
    graph: Graph,
    accuracy: float | None,
    board: str | Board = DEFAULT_BOARD,
    *,
    kernels: str = "cmsis-nn",
) -> dict[str, Any]:
    """One row of a sparsity sweep: the recipe's target, accuracy and what ships at it.

    ``{"sparsity", "weight_sparsity", "accuracy", "tflite_bytes", "gzip_bytes", "macs",
    "estimated_ms"}``; ``edgekiln run`` plots these against ``sparsity``.

    >>> sweep_point(0.5, graph, 0.97)["gzip_bytes"]  # doctest: +SKIP
    15210
    """
    stats = artifact_stats(graph, board, kernels=kernels)
    return {
        "sparsity": float(sparsity),
        "weight_sparsity": stats["weight_sparsity"],
        "accuracy": None if accuracy is None else float(accuracy),
        **{key: stats[key] for key in ("tflite_bytes", "gzip_bytes", "macs", "estimated_ms")},
    }
