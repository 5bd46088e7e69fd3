"""Run artifacts on targets and measure how far apart their outputs are, in LSB.

The one place that maps a target name (``onnxruntime``, ``litert``, ``tflm``, ``mcu:BOARD``)
to its runner, and that turns ``TargetResult`` objects into the report's ``targets`` and
``pairwise`` entries. Needs no PyTorch.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.targets.base import TargetResult

logger = logging.getLogger(__name__)

RUNTIMES = ("onnxruntime", "litert", "tflm")


def artifact_format(target: str) -> str:
    """The artifact format a target runs: ``onnx`` for ONNX Runtime, ``tflite`` for the rest."""
    return "onnx" if target == "onnxruntime" else "tflite"


def run_target(
    name: str,
    artifact: str | Path,
    x: np.ndarray,
    y: np.ndarray | None = None,
    *,
    boards: Mapping[str, Any] | None = None,
    kernels: str = "cmsis-nn",
    latency_runs: int = 50,
    keep_intermediates: bool = False,
) -> TargetResult:
    """Run ``artifact`` on the target called ``name`` and return its result.

    ``boards`` maps user-defined board names to ``Board`` objects (recipe boards); built-in
    boards need no entry. ``keep_intermediates`` returns every tensor in
    ``details["intermediates"]`` (for layer-by-layer comparison). An unknown name raises
    ValueError listing the target names.
    """
    keep = keep_intermediates
    if name == "onnxruntime":
        from edgekiln.targets.onnxruntime import run_onnxruntime

        return run_onnxruntime(artifact, x, y, runs=latency_runs, keep_intermediates=keep)
    if name == "litert":
        from edgekiln.targets.litert import run_litert

        # it needs >= 1 timed run
        return run_litert(artifact, x, y, runs=max(1, latency_runs), keep_intermediates=keep)
    if name == "tflm":
        from edgekiln.targets.tflm import run_tflm

        return run_tflm(artifact, x, y, runs=min(max(1, latency_runs), 20), keep_intermediates=keep)
    if name.startswith("mcu:"):
        from edgekiln.targets.mcu import run_mcu

        board_name = name[4:]
        board = (boards or {}).get(board_name, board_name)
        return run_mcu(artifact, x, y, board=board, kernels=kernels, keep_intermediates=keep)
    raise ValueError(
        f"unknown target {name!r}: use one of {', '.join(RUNTIMES)} or mcu:BOARD "
        "(`edgekiln targets` lists the boards)"
    )


def output_integers(result: TargetResult, scale: float, zero_point: int) -> np.ndarray:
    """A target's outputs as integers on the grid ``(scale, zero_point)`` (int32)."""
    if (
        result.outputs is not None
        and result.outputs.dtype == np.int8
        and (result.output_scale == scale and result.output_zero_point == zero_point)
    ):
        return result.outputs.astype(np.int32)
    real = result.real_outputs()
    return (np.round(real / np.float32(scale)) + zero_point).astype(np.int32)


def lsb_stats(ours: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """Distribution of ``|ours - reference|`` for two int32 arrays on one grid.

    >>> lsb_stats(np.array([3, 4, 6]), np.array([3, 5, 6]))
    {'max': 1, 'mean': 0.333333, 'within_1': 1.0, 'histogram': {'0': 2, '1': 1}}
    """
    diff = np.abs(ours.astype(np.int64) - reference.astype(np.int64)).reshape(-1)
    values, counts = np.unique(diff, return_counts=True)
    return {
        "max": int(diff.max(initial=0)),
        "mean": round(float(diff.mean()) if diff.size else 0.0, 6),
        "within_1": float((diff <= 1).mean()) if diff.size else 1.0,
        "histogram": {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)},
    }


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float | None:
    """Fraction of samples whose arg-max agrees (None for outputs that are not (N, classes))."""
    if a.ndim != 2 or b.shape != a.shape:
        return None
    return float((a.argmax(axis=1) == b.argmax(axis=1)).mean())


def target_entry(
    result: TargetResult,
    artifact: str,
    reference: np.ndarray | None = None,
    reference_grid: tuple[float, int] | None = None,
) -> dict[str, Any]:
    """The report's entry for one target; with a reference (the fake-quant model's integer
    outputs on ``reference_grid``), agreement and LSB statistics against it."""
    latency = result.latency
    details = dict(result.details)
    details.pop("intermediates", None)
    entry: dict[str, Any] = {
        "name": result.target,
        "artifact": artifact,
        "ok": result.ok,
        "error": result.error,
        "accuracy": result.accuracy,
        "agreement": None,
        "lsb": None,
        "latency_ms": latency.median_ms if latency else None,
        "latency_p90_ms": latency.p90_ms if latency else None,
        "latency_kind": ("estimated" if latency.estimated else "measured") if latency else None,
        "arena_bytes": _int_or_none(details.get("arena_bytes")),
        "flash_bytes": _int_or_none(details.get("flash_bytes")),
        "board": _board(details.get("board")),
        "details": _jsonable(details),
    }
    if result.outputs is not None and reference is not None and reference_grid is not None:
        ours = output_integers(result, *reference_grid)
        if ours.shape == reference.shape:
            entry["lsb"] = lsb_stats(ours, reference)
            entry["agreement"] = top1_agreement(ours, reference)
        else:
            entry["error"] = (
                f"output shape {ours.shape} differs from the reference's {reference.shape}"
            )
    return entry


def pairwise(results: Iterable[TargetResult], grid: tuple[float, int] | None = None) -> list[dict]:
    """LSB differences between the outputs of every pair of targets that ran.

    ``grid`` is the output scale and zero point to compare on; by default the first result's.
    """
    ok = [r for r in results if r.ok and r.outputs is not None]
    if not ok:
        return []
    if grid is None:
        first = ok[0]
        grid = (float(first.output_scale or 1.0), int(first.output_zero_point or 0))
    ints = {r.target: output_integers(r, *grid) for r in ok}
    rows = []
    for a, b in itertools.combinations(ints, 2):
        if ints[a].shape != ints[b].shape:
            continue
        stats = lsb_stats(ints[a], ints[b])
        rows.append(
            {
                "a": a,
                "b": b,
                "compared": int(ints[a].size),
                "differing": int((ints[a] != ints[b]).sum()),
                "max_lsb": stats["max"],
                "histogram": stats["histogram"],
            }
        )
    return rows


def run_targets(
    names: Iterable[str],
    artifacts: Mapping[str, Path],
    x: np.ndarray,
    y: np.ndarray | None,
    *,
    boards: Mapping[str, Any] | None = None,
    kernels: str = "cmsis-nn",
    latency_runs: int = 50,
    on_done: Callable[[TargetResult], None] | None = None,
) -> list[TargetResult]:
    """Run each named target on the artifact of its format; a target whose artifact is missing
    or whose runner raises on the data becomes a failed result naming the problem."""
    results = []
    for name in names:
        fmt = artifact_format(name)
        artifact = artifacts.get(fmt)
        if artifact is None:
            result = TargetResult(name, "", ok=False, error=f"no {fmt} artifact to run {name} on")
        else:
            try:
                result = run_target(
                    name, artifact, x, y, boards=boards, kernels=kernels, latency_runs=latency_runs
                )
            except (ValueError, FileNotFoundError, KeyError) as e:
                result = TargetResult(name, str(artifact), ok=False, error=str(e))
        logger.info("target %s: ok=%s accuracy=%s", name, result.ok, result.accuracy)
        results.append(result)
        if on_done is not None:
            on_done(result)
    return results


def artifact_entry(path: Path, root: Path | None = None) -> dict[str, Any]:
    """The report's entry for an artifact file: path (relative to ``root`` when given),
    format, bytes, gzip bytes and SHA-256."""
    data = path.read_bytes()
    fmt = {".onnx": "onnx", ".tflite": "tflite", ".npz": "graph"}.get(path.suffix.lower(), "")
    return {
        "path": str(path.relative_to(root)) if root is not None else str(path),
        "format": fmt,
        "bytes": len(data),
        "gzip_bytes": len(gzip.compress(data, compresslevel=9, mtime=0)),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def _board(board: Any) -> dict[str, Any] | None:
    if board is None:
        return None
    if isinstance(board, dict):
        return {k: board.get(k) for k in ("name", "core", "clock_hz", "sram_bytes", "flash_bytes")}
    return {
        k: getattr(board, k, None)
        for k in ("name", "core", "clock_hz", "sram_bytes", "flash_bytes")
    }


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int | np.integer) else None


def _jsonable(value: Any) -> Any:
    """Numbers, strings, lists and dicts only; arrays become short summaries."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return {"array": list(value.shape), "dtype": str(value.dtype)}
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "__dict__"):
        return _jsonable({k: v for k, v in vars(value).items() if not k.startswith("_")})
    return str(value)
